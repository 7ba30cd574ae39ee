"""Attention on the dense device's runtime: once a layer's q, k, v and o projections run there (hetrun.runtime.dense),
the attention between them -- rotary embedding, the KV-cache append and grouped-query attention -- runs there too, as
one onnxruntime GroupQueryAttention call that writes the new keys and values into the cache in place.

Left to transformers, each decode step of each layer costs a dozen small torch ops and their Python around two
runtime calls (rotary tables, rotate-half, a torch.cat that copies the whole KV cache per step, SDPA, transposes):
on the Mixtral-shaped benchmark model (2-core AVX2 host, 190 cached tokens) 1.1 ms per layer, of which the two
projection calls are 0.33 ms. As a GroupQueryAttention call on the projections' packed output it is one call more
and none of the rest: 0.65 ms per layer, decode 8% faster end to end.

The KV cache stays transformers': each layer's entry of its DynamicCache becomes an InPlaceKVLayer, whose keys and
values are views of buffers with room to grow, so the runtime's op appends in place (past and present bound to the
same memory), and transformers' own attention code, should it run on the same cache, appends in place too.

Taken over only where the result is transformers' own: Llama-style attention classes (ATTENTION_CLASSES: Mixtral,
Llama, Mistral, Qwen2-MoE with its q/k/v biases, Qwen3-MoE with its per-head q/k norms, both applied in torch to the
projections' output as transformers applies them) without a sliding window or attention sinks, with a rotate-half
rotary table that depends on the position alone, in FP32,
and per call only without an attention mask (no padding: transformers passes none to SDPA then), with the
positions the cache implies, on a DynamicCache layer that is empty or already in place. Every other call runs
transformers' code unchanged.
"""

from __future__ import annotations

import logging
import time

import onnx
import torch
from onnx import TensorProto, helper
from transformers.cache_utils import DynamicCache, DynamicLayer

from hetrun.backends.ort_binding import HostBindings
from hetrun.errors import HetrunError
from hetrun.runtime.dense import RuntimeLinear, SharedInputCall
from hetrun.runtime.dispatch import ExpertRuntime, all_finite
from hetrun.runtime.graphs import OPSET

log = logging.getLogger("hetrun")
ATTENTION_CLASSES = ("MixtralAttention", "LlamaAttention", "MistralAttention", "Qwen2MoeAttention", "Qwen3MoeAttention")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary tables that do not depend on the sequence length
ROTARY_ROWS = 4096  # positions in the first rotary table; doubled whenever a sequence outgrows it
KV_HEADROOM = 256  # tokens of room a KV buffer is given beyond what it holds, at least (and an eighth more)


class InPlaceKVLayer(DynamicLayer):
    """A DynamicCache layer whose keys and values [B, H, n, Dh] are views of buffers [B, H, capacity, Dh]: appending
    writes into the buffers (a copy of everything cached only when they are full) instead of concatenating."""

    _kbuf: "torch.Tensor | None" = None
    _vbuf: "torch.Tensor | None" = None

    def length(self) -> int:
        """Tokens cached."""
        return 0 if not self.is_initialized or self.keys is None or self.keys.dim() != 4 else self.keys.shape[-2]

    def reserve(self, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers [B, H, C, Dh], of the dtype and device of `like` [B, H, *, Dh], with room for `tokens` more
        after what is cached (grown, or re-adopted when transformers replaced the views: a beam reorder, a batch
        selection)."""
        b, h, _, d = like.shape
        if not self.is_initialized:  # (not lazy_initialization: its signature differs between transformers releases)
            self.device, self.is_initialized = like.device, True
            self.keys = self.values = None
        n = self.length()
        kb = self._kbuf
        backed = (kb is not None and n > 0 and self.keys.data_ptr() == kb.data_ptr()
                  and self.keys.stride() == kb.stride() and tuple(self.keys.shape[:2]) == (b, h))
        if not backed or n + tokens > kb.shape[2] or kb.dtype != like.dtype:
            capacity = n + tokens + max(KV_HEADROOM, (n + tokens) // 8)
            kb = like.new_empty((b, h, capacity, d))  # [B, H, C, Dh]
            vb = like.new_empty((b, h, capacity, d))
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb
            self.keys, self.values = kb[:, :, :n], vb[:, :, :n]
        return self._kbuf, self._vbuf

    def advance(self, tokens: int) -> None:
        """Count `tokens` more as cached (written into the buffers by the caller)."""
        n = self.length() + tokens
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, s = self.length(), key_states.shape[2]
        kb, vb = self.reserve(key_states, s)
        kb[:, :, n:n + s].copy_(key_states)
        vb[:, :, n:n + s].copy_(value_states)
        self.advance(s)
        return self.keys, self.values


class RuntimeAttention:
    """Stands as an attention module's forward: its calls without a mask, on an in-place cache layer, run as one
    GroupQueryAttention call between its q/k/v and o projection calls; every other call runs `original`."""

    def __init__(self, module: torch.nn.Module, original, shared: "SharedGqa"):
        self.module, self.original, self.shared = module, original, shared
        self.qkv: SharedInputCall = module.q_proj.call
        self.calls = 0  # calls taken over (the tests read it)
        projections = (module.q_proj, module.k_proj, module.v_proj)
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in projections]
        self.bias = torch.cat(biases).float() if any(p.bias is not None for p in projections) else None  # [sum N]
        self.norms = (module.q_norm, module.k_norm) if hasattr(module, "q_norm") else None  # per head, Qwen3-style
        self.bindings = HostBindings(shared.session)  # this layer's: its cache buffers stay bound between steps
        self._lengths = torch.zeros(1, dtype=torch.int32)  # [B] last position per sequence, filled in place
        self._total = torch.zeros(1, dtype=torch.int32)  # [1] tokens after this call, filled in place

    def __call__(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        layer = self._cache_layer(hidden_states, attention_mask, kwargs)
        if layer is None:
            return self.original(hidden_states, position_embeddings, attention_mask, **kwargs)
        b, s, _ = hidden_states.shape
        g = self.shared
        n = layer.length()
        packed = self._projected(hidden_states)  # [B*S, (Hq + 2 Hkv) * Dh]
        kbuf, vbuf = layer.reserve(g.kv_like(b), s)  # [B, Hkv, C, Dh] each
        out = self._attend(packed.view(b, s, -1), kbuf, vbuf, n)  # [B, S, Hq * Dh]
        layer.advance(s)
        self.calls += 1
        return self.module.o_proj(out), None

    def _projected(self, hidden: torch.Tensor) -> torch.Tensor:
        # q, k and v [M, (Hq + 2 Hkv) * Dh] as transformers hands them to rotary: biases added, q/k normed per head
        packed = self.qkv.run_all(hidden)  # [M, (Hq + 2 Hkv) * Dh]
        if self.bias is not None:
            packed = packed + self.bias
        if self.norms is not None:
            g, m = self.shared, packed.shape[0]
            q_end, k_end = g.heads * g.head_dim, (g.heads + g.kv_heads) * g.head_dim
            q = self.norms[0](packed[:, :q_end].reshape(m, g.heads, g.head_dim)).reshape(m, q_end)
            k = self.norms[1](packed[:, q_end:k_end].reshape(m, g.kv_heads, g.head_dim)).reshape(m, k_end - q_end)
            packed = torch.cat([q, k, packed[:, k_end:]], dim=1)
        return packed

    def _attend(self, packed: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, cached: int) -> torch.Tensor:
        # Attention output [B, S, Hq*Dh] of packed q/k/v [B, S, (Hq + 2 Hkv)*Dh] against `cached` tokens in kbuf
        # and vbuf [B, Hkv, C, Dh], to which the new keys and values are appended (in place).
        g = self.shared
        b, s, _ = packed.shape
        cos, sin = g.tables(cached + s)  # [P, Dh/2] each
        if self._lengths.shape[0] != b:
            self._lengths = torch.zeros(b, dtype=torch.int32)
        self._lengths.fill_(cached + s - 1)
        self._total.fill_(cached + s)
        packed = packed.contiguous()
        out = packed.new_empty((b, s, g.heads * g.head_dim))  # [B, S, Hq*Dh]
        for name, t in (("query", packed), ("past_key", kbuf), ("past_value", vbuf), ("seqlens_k", self._lengths),
                        ("total_sequence_length", self._total), ("cos_cache", cos), ("sin_cache", sin)):
            self.bindings.input(name, t)
        for name, t in (("output", out), ("present_key", kbuf), ("present_value", vbuf)):
            self.bindings.output(name, t)
        t0 = time.perf_counter()
        self.bindings.run()
        g.stats.dense_s += time.perf_counter() - t0
        if not all_finite(out):
            raise HetrunError(f"dense device '{g.device_id}' returned NaN or inf from attention: check the device, "
                              "or set dense_precision: model")
        return out

    def _cache_layer(self, hidden: torch.Tensor, mask, kwargs: dict) -> "InPlaceKVLayer | None":
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if mask is not None or not isinstance(cache, DynamicCache) or hidden.dtype != torch.float32 \
                or hidden.device.type != "cpu" or self.module.training:
            return None
        idx = self.module.layer_idx
        if idx >= len(cache.layers):
            return None
        layer = cache.layers[idx]
        if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
            layer = cache.layers[idx] = InPlaceKVLayer()
        if not isinstance(layer, InPlaceKVLayer):
            return None
        n, s = layer.length(), hidden.shape[1]
        positions, where = kwargs.get("position_ids"), kwargs.get("cache_position")
        if positions is not None and not _counts_from(positions.reshape(-1, s), n):
            return None  # positions other than the cache's (packed sequences): transformers' code
        if where is not None and not _counts_from(where.reshape(1, -1)[:, :s], n):
            return None
        return layer


def _counts_from(rows: torch.Tensor, start: int) -> bool:
    # whether every row [R, S] reads start, start + 1, ..., start + S - 1
    s = rows.shape[1]
    if s == 1:  # a decode step: one position per row
        return all(p == start for p in rows.reshape(-1).tolist())
    return bool((rows == torch.arange(start, start + s)).all())


class SharedGqa:
    """The GroupQueryAttention session every taken-over layer of a model calls (it holds no weights) and the rotary
    tables they share."""

    def __init__(self, session, heads: int, kv_heads: int, head_dim: int, rotary: torch.nn.Module, stats,
                 device_id: str):
        self.session, self.heads, self.kv_heads, self.head_dim = session, heads, kv_heads, head_dim
        self.rotary, self.stats, self.device_id = rotary, stats, device_id
        self.cos = self.sin = torch.empty(0)
        self.cos_rows = self.sin_rows = torch.empty(0)  # [P, Dh] the whole heads' tables, as the model uses them
        self._like = torch.empty(0)

    def kv_like(self, batch: int) -> torch.Tensor:
        """An empty FP32 CPU tensor [B, Hkv, 0, Dh]: the cache layout for InPlaceKVLayer.reserve."""
        if self._like.shape[0] != batch:
            self._like = torch.empty((batch, self.kv_heads, 0, self.head_dim))
        return self._like

    def tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [P, Dh/2] of positions 0 .. P-1, P >= `positions` (ROTARY_ROWS, doubled as needed), as the
        model's rotary module computes them (its attention scaling included)."""
        rows = self.cos.shape[0]
        if positions > rows:
            rows = max(rows, ROTARY_ROWS)
            while rows < positions:
                rows *= 2
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), torch.arange(rows)[None])  # [1, P, Dh]
            half = self.head_dim // 2
            self.cos_rows, self.sin_rows = cos[0].float(), sin[0].float()  # [P, Dh]
            self.cos = self.cos_rows[:, :half].contiguous()  # [P, Dh/2]: rotate-half repeats each half
            self.sin = self.sin_rows[:, :half].contiguous()
        return self.cos, self.sin


class RotaryTable(torch.nn.Module):
    """Stands where the model's rotary module stood once its attention runs on the runtime: the cos and sin
    [B, S, Dh] the model hands every layer are rows of the tables SharedGqa holds (the module's own values, computed
    once), instead of a dozen small ops per step (about 0.13 ms a decode token on the benchmark model, where the
    layers taken over do not read them at all). Positions beyond the tables grow them; negative positions and
    hidden states off the host CPU go to the module itself."""

    def __init__(self, rotary: torch.nn.Module, shared: SharedGqa):
        super().__init__()
        self.rotary, self.shared = rotary, shared

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type != "cpu" or position_ids.device.type != "cpu" or position_ids.numel() == 0:
            return self.rotary(x, position_ids)
        lo, hi = (int(t) for t in position_ids.aminmax())
        if lo < 0:  # (an index would wrap around)
            return self.rotary(x, position_ids)
        g = self.shared
        g.tables(hi + 1)
        return g.cos_rows[position_ids].to(x.dtype), g.sin_rows[position_ids].to(x.dtype)  # [B, S, Dh] each


def _table_is_exact(table: RotaryTable) -> bool:
    # whether looked-up rows equal the module's own values bit for bit, for one decode position and a prompt's
    # positions (elementwise ops either way, but vector and scalar code paths may round differently)
    x = torch.zeros(1, dtype=torch.float32)
    probes = [torch.tensor([[p]]) for p in (0, 1, 127, ROTARY_ROWS - 1)] + [torch.arange(37)[None]]
    return all(torch.equal(a, b) for p in probes for a, b in zip(table(x, p), table.rotary(x, p)))


def gqa_graph(heads: int, kv_heads: int, head_dim: int, scale: float) -> onnx.ModelProto:
    """com.microsoft GroupQueryAttention on packed q/k/v [B, S, (Hq + 2 Hkv)*Dh] with rotate-half rotary tables
    [P, Dh/2] and a KV cache [B, Hkv, C, Dh] shared between past and present (appended in place)."""
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    width = (heads + 2 * kv_heads) * head_dim
    inputs = [helper.make_tensor_value_info("query", f, ["B", "S", width]),
              helper.make_tensor_value_info("past_key", f, ["B", kv_heads, "C", head_dim]),
              helper.make_tensor_value_info("past_value", f, ["B", kv_heads, "C", head_dim]),
              helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", i32, [1]),
              helper.make_tensor_value_info("cos_cache", f, ["P", head_dim // 2]),
              helper.make_tensor_value_info("sin_cache", f, ["P", head_dim // 2])]
    outputs = [helper.make_tensor_value_info("output", f, ["B", "S", heads * head_dim]),
               helper.make_tensor_value_info("present_key", f, ["B", kv_heads, "C", head_dim]),
               helper.make_tensor_value_info("present_value", f, ["B", kv_heads, "C", head_dim])]
    names = [i.name for i in inputs]
    node = helper.make_node("GroupQueryAttention", names[:1] + ["", ""] + names[1:],  # key, value: packed in query
                            [o.name for o in outputs], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(scale))
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def why_not(module: torch.nn.Module, config) -> str:
    """Why an attention module's calls cannot run as GroupQueryAttention on the runtime ("" when they can)."""
    name = type(module).__name__
    if name not in ATTENTION_CLASSES:
        return f"{name} is not one of {', '.join(ATTENTION_CLASSES)}"
    projections = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(p, RuntimeLinear) for p in projections):
        return "its projections do not all run on the dense device"
    q, k, v, _ = projections
    if not (q.call is k.call is v.call and (q.member, k.member, v.member) == (0, 1, 2)):
        return "its q, k and v projections are not one call"
    if hasattr(module, "sinks"):
        return "it has attention sinks"
    if _slides(module, config):
        return "it has a sliding window"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None or q.call.bounds != [0, heads * head_dim, (heads + kv_heads) * head_dim,
                                             (heads + 2 * kv_heads) * head_dim] or head_dim % 2:
        return "its head layout is not q, k, v heads of one size"
    if head_dim % 16:  # onnxruntime's CPU kernel refuses other sizes when it runs, not when the graph loads
        return f"its head size {head_dim} is not a multiple of 16"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "its rotary embedding covers part of each head"
    norms = [getattr(module, n, None) for n in ("q_norm", "k_norm")]
    if any(n is not None for n in norms) and not all(getattr(n, "weight", torch.empty(0)).shape == (head_dim,)
                                                     for n in norms):
        return "its q/k norms are not one per head"  # (OLMoE's span every head at once)
    return ""


def _rotates_half(rotary: torch.nn.Module) -> bool:
    # GroupQueryAttention's tables hold one half of a head's cos and sin: the other half must repeat it
    tables = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(64)[None])  # cos, sin [1, 64, Dh] each
    if not (isinstance(tables, tuple) and len(tables) == 2):
        return False  # DeepSeek-V2's: one complex table
    cos, sin = tables
    half = cos.shape[-1] // 2
    return all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin))


def _slides(module: torch.nn.Module, config) -> bool:
    # whether any layer attends through a sliding window (Qwen2-MoE keeps a window size it does not use)
    if getattr(module, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return getattr(config, "use_sliding_window", True) is not False and bool(getattr(config, "sliding_window", None))


def run_attention(model: torch.nn.Module, runtime: ExpertRuntime) -> int:
    """Let the model's attention run on the dense device as GroupQueryAttention where the dense linear layers run
    on onnxruntime (see the module's docstring for which calls); returns the number of layers taken over."""
    report = runtime.dense
    dense = runtime.profile.dense_device
    if report is None or not report.layers or dense.backend != "onnxruntime":
        return 0
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    config = model.config.get_text_config(decoder=True)
    modules = [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES]
    reasons = {why_not(m, config) for m in modules}
    rope = getattr(rotary, "rope_type", None)
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":  # eager attention always gets a mask, so no call would be taken over
        reasons.add(f"its attention implementation is {implementation!r}, not 'sdpa'")
    if model.dtype != torch.float32:  # the graph computes in FP32: so does the rest of the dense part, or not this
        reasons.add(f"the model computes in {str(model.dtype).removeprefix('torch.')}")
    if rotary is None or rope not in STATIC_ROPE:
        reasons.add(f"its rotary embedding ({rope or 'none found'}) depends on the sequence length")
    elif not _rotates_half(rotary):
        reasons.add("its rotary table is not rotate-half (each half of a head's cos and sin alike)")
    if not modules or reasons - {""}:
        why = "; ".join(sorted(reasons - {""})) or "no attention module of a known kind"
        log.info("attention stays in transformers' code: %s", why)
        return 0
    first = modules[0]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, first.head_dim
    backend = runtime.backends[runtime.plan.device_ids.index(dense.id)]
    session = backend.load_graph(gqa_graph(heads, kv_heads, head_dim, first.scaling).SerializeToString())
    shared = SharedGqa(session, heads, kv_heads, head_dim, rotary, runtime.stats, dense.id)
    shared.tables(ROTARY_ROWS)
    for m in modules:
        m.forward = RuntimeAttention(m, m.forward, shared)
    table = RotaryTable(rotary, shared)
    if _table_is_exact(table):
        inner.rotary_emb = table
    report.attention_layers = len(modules)
    log.info("attention of %d layers runs on '%s' as GroupQueryAttention, its KV cache appended in place",
             len(modules), dense.id)
    return len(modules)
