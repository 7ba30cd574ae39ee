"""FLOPs, bytes and kernel counts of each operator of one transformer layer, from the model's shapes alone.

Attention covers MLA (DeepSeek-V2/V3: low-rank Q and KV, decode with the absorbed up-projections, prefill with
the KV up-projection expanded over the whole context) and GQA. Everything returns plain numbers or numpy
arrays; `stage_seconds` turns a list of `Op` into device time with the roofline of hetrun.roofline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrun.formats import activation_bytes, expert_bytes, matrix_bytes
from hetrun.profile import DeviceType, LinkSpec
from hetrun.roofline import Efficiency, op_seconds, swiglu_flops_bytes, transfer_seconds
from hetrun.spec import MoESpec


@dataclass(frozen=True)
class Op:
    """One operator instance: `kind` picks the efficiency class (gemm, attention, elementwise)."""

    name: str
    kind: str
    precision: str
    flops: float
    bytes: float
    kernels: float = 1.0


def stage_seconds(ops: list[Op], device: DeviceType, eff: dict[str, Efficiency]) -> float:
    """Sum of roofline times of `ops` on `device`; `eff` maps op kind to its efficiencies."""
    total = 0.0
    for op in ops:
        if op.kernels == 0 and op.flops == 0 and op.bytes == 0:
            continue
        total += op_seconds(device, op.precision, op.flops, op.bytes, eff[op.kind], op.kernels)
    return total


def _gemm(name: str, precision: str, tokens: float, k: int, n: int, apply_tokens: float | None = None) -> Op:
    """x [tokens, k] @ W [k, n]: weights read once, activations in and out."""
    a = activation_bytes(precision)
    t = tokens if apply_tokens is None else apply_tokens
    return Op(name, "gemm", precision, 2.0 * t * k * n, matrix_bytes(precision, n, k) + a * t * (k + n) * 1.0)


# ---- attention ----------------------------------------------------------------------------------

def attention_projection_params(spec: MoESpec, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(in, out) of each attention projection of one layer on one device of a `tp`-way tensor-parallel group: the
    projections per head (MLA q_b, kv_b, o; GQA q, k, v, o) keep 1/tp of the heads, MLA's low-rank down-projections
    (q_a, kv_a) stay whole on every device (as SGLang and vLLM shard MLA)."""
    a, d = spec.attention, spec.hidden_size
    if a.kind == "mla":
        h = a.num_heads // tp
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        out = {"q_a": (d, a.q_lora_rank), "q_b": (a.q_lora_rank, h * qk)} if a.q_lora_rank else {"q": (d, h * qk)}
        out["kv_a"] = (d, a.kv_lora_rank + a.qk_rope_head_dim)
        out["kv_b"] = (a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim))
        out["o"] = (h * a.v_head_dim, d)
        return out
    kvh = max(a.num_kv_heads // tp, 1)
    return {"q": (d, a.num_heads // tp * a.head_dim), "k": (d, kvh * a.head_dim),
            "v": (d, kvh * a.head_dim), "o": (a.num_heads // tp * a.head_dim, d)}


def kv_replication(spec: MoESpec, tp: int) -> float:
    """How many times a `tp`-way tensor-parallel attention group stores each token's KV: MLA's latent is shared by
    all heads, so every device holds all of it (tp copies); GQA splits KV heads, replicating only past num_kv_heads."""
    if tp <= 1:
        return 1.0
    a = spec.attention
    return float(tp) if a.kind == "mla" else tp / min(tp, a.num_kv_heads)


def attention_ops(spec: MoESpec, precision: str, kv_bytes: float, decode: tuple[float, float, float] = (0, 0, 1),
                  prefill: tuple[float, float, float] = (0, 0, 0), tp: int = 1) -> list[Op]:
    """One step's attention on one device: decode requests and prefill tokens in the same kernels' weights.

    decode (requests, KV length summed over them, query tokens per request: 1, or 1 + draft tokens when verifying
    MTP / speculative drafts; the KV is read once per request, each query attends over it);
    prefill (new tokens, context tokens: cached prefix plus new tokens, whose latent KV MLA re-expands through kv_b,
    causal pairs: sum over new tokens of the positions each attends to).
    With `tp` > 1 the numbers are the tensor-parallel group's, and the device computes 1/tp of the heads
    (`attention_projection_params`). MLA decodes in the absorbed form: W_UK folds into the query and W_UV into the
    output (BF16 batched matmuls over heads), the core attends over the compressed latent [kv_lora_rank + rope].
    """
    a = spec.attention
    n_req, kv_sum, q = decode
    n_pre, ctx, pairs = prefill
    dec_tokens = n_req * q
    tokens = dec_tokens + n_pre
    p = attention_projection_params(spec, tp)
    ops = []
    for name, (k, n) in p.items():
        if name == "kv_b":
            if n_pre:  # prefill expands the context's latent KV; decode absorbs kv_b below
                ops.append(_gemm(name, precision, n_pre, k, n, apply_tokens=ctx))
            continue
        ops.append(_gemm(name, precision, tokens, k, n))
    heads = a.num_heads // tp
    if a.kind == "mla":
        qk, v, r = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        flops = moved = 0.0
        if n_req:
            w = matrix_bytes("bf16", p["kv_b"][1], p["kv_b"][0])
            ops.append(Op("absorb_uk", "gemm", "bf16", 2.0 * dec_tokens * heads * a.qk_nope_head_dim * r,
                          w / 2 + 2.0 * dec_tokens * heads * (a.qk_nope_head_dim + r)))
            ops.append(Op("absorb_uv", "gemm", "bf16", 2.0 * dec_tokens * heads * r * v,
                          w / 2 + 2.0 * dec_tokens * heads * (v + r)))
            flops += 2.0 * heads * q * kv_sum * (2 * r + a.qk_rope_head_dim)
            moved += kv_sum * a.kv_bytes_per_token(kv_bytes) + 2.0 * dec_tokens * heads * (r + a.qk_rope_head_dim + r)
        if n_pre:
            flops += 2.0 * heads * (qk + v) * pairs
            moved += 2.0 * heads * (ctx * (qk + v) + n_pre * (qk + v))
    else:
        kv_share = max(a.num_kv_heads // tp, 1) / a.num_kv_heads
        flops = 4.0 * heads * a.head_dim * (q * kv_sum + pairs)
        moved = (kv_sum * a.kv_bytes_per_token(kv_bytes) + ctx * a.kv_bytes_per_token(2.0)) * kv_share \
            + 4.0 * tokens * heads * a.head_dim
    ops.append(Op("core_attention", "attention", "bf16", flops, moved))
    if n_pre:
        ops.append(Op("kv_write", "elementwise", "bf16", 0.0, n_pre * a.kv_bytes_per_token(kv_bytes)))
    return ops


def attention_decode_ops(spec: MoESpec, precision: str, tokens: float, kv_sum: float, kv_bytes: float,
                         tp: int = 1, queries: float = 1.0) -> list[Op]:
    """One decode step's attention for `tokens` requests whose KV lengths add up to `kv_sum` (see attention_ops)."""
    return attention_ops(spec, precision, kv_bytes, decode=(tokens, kv_sum, queries), tp=tp)


def attention_prefill_ops(spec: MoESpec, precision: str, new_tokens: float, context_tokens: float,
                          causal_pairs: float, kv_bytes: float, tp: int = 1) -> list[Op]:
    """Prefill of `new_tokens` prompt tokens attending over their cached prefix and each other (see attention_ops)."""
    return attention_ops(spec, precision, kv_bytes, prefill=(new_tokens, context_tokens, causal_pairs), tp=tp)


def tp_allreduce_seconds(spec: MoESpec, tokens: float, tp: int, link: LinkSpec) -> float:
    """Seconds of one all-reduce of `tokens` BF16 hidden states over a `tp`-way group's scale-up `link` (ring:
    2 (tp - 1) / tp of the data each way, 2 (tp - 1) latency hops); 0 without tensor parallelism."""
    if tp <= 1 or tokens <= 0:
        return 0.0
    nbytes = 2.0 * (tp - 1) / tp * tokens * spec.hidden_size * 2.0
    return transfer_seconds(nbytes, link.bandwidth_gbs, link.efficiency, 2 * (tp - 1) * link.latency_us)


# ---- MLPs and the rest of a layer ----------------------------------------------------------------

def swiglu_ops(name: str, precision: str, tokens: float, hidden: int, intermediate: int, copies: int = 1) -> list[Op]:
    """`copies` SwiGLU MLPs of one shape on the same tokens (gate+up fused, then down)."""
    if copies == 0 or intermediate == 0:
        return []
    flops, moved = swiglu_flops_bytes(tokens, hidden, intermediate, expert_bytes(precision, hidden, intermediate),
                                      activation_bytes(precision))
    return [Op(name, "gemm", precision, flops * copies, copies * moved, kernels=3.0)]


def layer_misc_ops(spec: MoESpec, precision: str, tokens: float, moe: bool, kernels: int,
                   context_tokens: float = 0.0, decode: bool = True, tp: int = 1) -> list[Op]:
    """Memory-bound kernels around the GEMMs of one layer, for `tokens` tokens on an attention device.

    Bytes are counted kernel by kernel from the shapes (BF16 activations; one quantize kernel before each
    FP8/INT8 GEMM input): residual adds and RMSNorms, RoPE, the q/k layout copies attention kernels need (in
    prefill also for every context token MLA re-expands), the quantize of the attention output, and in MoE
    layers the weighted sum of the top-k expert outputs that comes back from the combine. Plus the router.
    With `tp` > 1, `tokens` are the tensor-parallel group's: norms run on all of them, per-head work on 1/tp of
    the heads, the router on the device's 1/tp share of the tokens.
    """
    d, a = spec.hidden_size, spec.attention
    quant = activation_bytes(precision) < 2
    qz = (lambda n: 3.0 * n) if quant else (lambda n: 0.0)  # quantize: read BF16, write 8-bit
    per_token = 6.0 * d + qz(d)  # residual add + input RMSNorm, quantize for the projections
    per_ctx = 0.0
    if a.kind == "mla":
        h, qk = a.num_heads // tp, a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            per_token += 4.0 * a.q_lora_rank + qz(a.q_lora_rank)  # q_a norm (+ quantize for q_b)
        per_token += 4.0 * (a.kv_lora_rank + a.qk_rope_head_dim)  # kv_a norm, RoPE on k_pe
        per_token += 4.0 * h * a.qk_rope_head_dim  # RoPE on q_pe
        if decode:
            per_token += 4.0 * h * (a.kv_lora_rank + a.qk_rope_head_dim)  # absorbed query layout
        else:
            per_token += 4.0 * h * qk  # query layout
            per_ctx = 4.0 * h * qk  # key layout (k_nope from kv_b and shared k_pe) per context token
        per_token += 2.0 * h * a.v_head_dim + qz(h * a.v_head_dim)  # attention output read, quantize for o
    else:
        per_token += (4.0 * (a.num_heads + a.num_kv_heads) * a.head_dim + qz(a.num_heads * a.head_dim)) / tp
    per_token += 8.0 * d + qz(d)  # residual add + post-attention RMSNorm, quantize for the MLP / dispatch
    if moe:
        per_token += 2.0 * d * (spec.top_k + 1)  # weighted sum of the combined expert outputs
    ops = [Op("elementwise", "elementwise", "bf16", 0.0, per_token * tokens + per_ctx * context_tokens,
              kernels=float(kernels))]
    if moe:
        e = spec.num_experts
        t = tokens / tp
        ops.append(Op("router", "gemm", "bf16", 2.0 * t * d * e, 2.0 * d * e + 4.0 * t * (d + e)))
    return ops


def expert_elementwise_op(precision: str, rows, hidden: int, intermediate: int, dispatch_bytes: float) -> Op:
    """Kernels around a device's grouped expert GEMMs for `rows` routed pairs: arranging the received rows
    by expert, SwiGLU activation (+ quantize), and reading the outputs out for the combine."""
    quant = activation_bytes(precision) < 2
    per_row = 2.0 * hidden * dispatch_bytes + 4.0 * intermediate + (1.0 if quant else 2.0) * intermediate \
        + 2.0 * hidden
    return Op("expert_elementwise", "elementwise", "bf16", 0.0, per_row * np.asarray(rows, dtype=np.float64),
              kernels=3.0)


def permute_ops(top_k: int, hidden: int, tokens: float, rows) -> tuple[Op, Op]:
    """(source, destination) gathers that permutation-based routing adds around the all-to-all (BF16 rows): the
    source copies each of `tokens` tokens out once per routed expert, sorted by expert (read 1, write top_k); the
    destination restores the arrival order of its `rows` expert outputs before the combine (read and write each)."""
    src = Op("permute_tokens", "elementwise", "bf16", 0.0, 2.0 * hidden * (1 + top_k) * tokens, kernels=2.0)
    dst = Op("unpermute_rows", "elementwise", "bf16", 0.0, 4.0 * hidden * np.asarray(rows, dtype=np.float64),
             kernels=2.0)
    return src, dst


def embedding_ops(spec: MoESpec, tokens: float, head_tokens: float, tp: int = 1) -> list[Op]:
    """Token embedding lookup and the LM head on `head_tokens` tokens (BF16, as DeepSeek keeps them); a `tp`-way
    tensor-parallel group splits the vocabulary."""
    d, v = spec.hidden_size, -(-spec.vocab_size // tp)
    return [Op("embed", "elementwise", "bf16", 0.0, 2.0 * d * tokens * 2),
            Op("lm_head", "gemm", "bf16", 2.0 * head_tokens * d * v, 2.0 * d * v + 2.0 * head_tokens * (d + v))]


def grouped_expert_op(precision: str, rows, active_experts, hidden: int, intermediate: int) -> Op:
    """One grouped GEMM over a device's experts: `rows` token-expert pairs over `active_experts` weight sets."""
    flops, moved = swiglu_flops_bytes(rows, hidden, intermediate,
                                      active_experts * expert_bytes(precision, hidden, intermediate),
                                      activation_bytes(precision))
    return Op("experts", "gemm", precision, flops, moved, kernels=4.0)


# ---- weights held per device ---------------------------------------------------------------------

def attention_block_bytes(spec: MoESpec, precision: str, tp: int = 1) -> float:
    """Weights of every layer's attention, dense MLP, norms, router gates and the embeddings, as stored on an
    attention device (GEMMs at `precision`, embeddings, gates and kv_b's absorbed halves in BF16); a `tp`-way
    tensor-parallel group splits heads, the dense MLP's intermediate size and the vocabulary."""
    per_layer = attention_layer_bytes(spec, precision, tp)
    dense = spec.num_dense_layers * expert_bytes(precision, spec.hidden_size,
                                                   -(-spec.dense_intermediate_size // tp)) \
        if spec.dense_intermediate_size else 0.0
    gates = spec.num_moe_layers * 2.0 * spec.num_experts * spec.hidden_size
    emb = 2.0 * -(-spec.vocab_size // tp) * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * per_layer + dense + gates + emb


def attention_layer_bytes(spec: MoESpec, precision: str, tp: int = 1) -> float:
    """One layer's attention projections (kv_b's absorbed halves in BF16) and norms on one device."""
    a_params = attention_projection_params(spec, tp)
    return sum(matrix_bytes("bf16" if k == "kv_b" else precision, n, i) for k, (i, n) in a_params.items()) \
        + 2.0 * 4 * spec.hidden_size


def shared_expert_bytes(spec: MoESpec, precision: str, tp: int = 1) -> float:
    """All shared experts of all MoE layers (a `tp`-way tensor-parallel group splits their intermediate size)."""
    if not spec.num_shared_experts:
        return 0.0
    return spec.num_moe_layers * spec.num_shared_experts * expert_bytes(precision, spec.hidden_size,
                                                                         -(-spec.shared_intermediate_size // tp))


def kv_bytes_per_token(spec: MoESpec, kv_elem_bytes: float) -> float:
    """KV-cache bytes one token of context holds across all layers."""
    return spec.num_layers * spec.attention.kv_bytes_per_token(kv_elem_bytes)
