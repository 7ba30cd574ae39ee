"""`hetrun bench generate`: end-to-end greedy generation, hetrun against transformers eager and llama.cpp.

The model is a 2-layer Mixtral-shaped MoE (hidden 1024, intermediate 2816, 8 experts, top-2, vocab 32000) with
random weights, written once as a checkpoint; every system generates greedily from the same 128-token prompt, 64
new tokens, in a child process of its own (so that each one's peak resident memory is its own), with the same
thread count. Reported per system: prefill tokens/s (prompt tokens / time to the first token), decode tokens/s
(the next 63 tokens), peak RSS, and whether its greedy tokens equal transformers' in FP32. The checkpoint is BF16,
as MoE checkpoints ship: transformers loads it in BF16 or FP32, hetrun deploys it as a user would (`hetrun fp32`
with FP32 experts and its dense part computing in FP32: deploy upcasts it where the CPU emulates BF16, the model is
cast afterwards where it does not). llama.cpp runs when
`llama-cpp-python` is installed (the `bench` extra) from GGUF files written from the same weights with the `gguf`
package: F32, Q8_0 and Q4_0, compared with hetrun at FP32, INT8 and INT4 experts. Those files quantize every linear
layer, the LM head included, so by default (--dense-precision matching) hetrun's INT8 and INT4 systems run their
dense linear layers in INT8 and INT4 too; --dense-precision auto deploys them as deploy() would by default (INT8
dense linear layers beside INT4 experts). Each system's relative error of the prompt's last logits against
transformers FP32 is reported beside its speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from hetrun.backends import host_cpu
from hetrun.backends.registry import probe_backend
from hetrun.bench import Benchmark, comma_list
from hetrun.bench.child_process import peak_rss_gb, status_bytes
from hetrun.bench.moe import LOW_PRECISION, system_profile
from hetrun.bench.moe import SYSTEMS as DEVICES
from hetrun.deployment import deploy
from hetrun.errors import HetrunError
from hetrun.files import print_json, table_console
from hetrun.placement.planner import plan
from hetrun.profile import DENSE_PRECISIONS, load_profile
from hetrun.spec import MoESpec
from hetrun.tiny_models import random_config, random_model

SPEC = MoESpec.from_preset("mixtral-bench").replace(name="mixtral-bench-2l", num_layers=2)
PROMPT_LEN, NEW_TOKENS = 128, 64
# system -> (runner, model dtype (for hetrun: the dtype its dense part must compute in; None: as deploy leaves it),
# hetrun precision per backend or None, hetrun's devices: a key of hetrun.bench.moe.SYSTEMS). Without a runtime
# named, hetrun runs on the `cpu` profile: this CPU through onnxruntime and OpenVINO at once, each with half the
# experts. The FP32, INT8 and INT4 systems also run on each runtime alone, as a user who wants one CPU's speed would
# deploy: the runtimes' kernels differ by CPU (on one without INT8 dot products OpenVINO's INT4 expert was 3-4x
# slower than onnxruntime's at one token), two devices on one CPU share its cores, and what runs the dense part
# follows the dense device's runtime (hetrun.runtime.dense).
KINDS = {"fp32": ("float32", {"onnxruntime": "fp32", "openvino": "fp32"}),  # kind -> (model dtype, precisions)
         **{kind: (None, precisions) for kind, precisions in LOW_PRECISION.items()}}
# "... graph" systems: onnxruntime alone with the whole model as one graph (profile model_graph: on,
# hetrun.runtime.model_graph) instead of the dispatcher and the dense part's calls. "... graph bundle": that graph
# exported once (`hetrun export --graph`, in a process of its own) and run by a process without torch or
# transformers (hetrun.bundle.graph_runner), as llama.cpp runs its GGUF file.
GRAPH, BUNDLE = "graph", "graph bundle"
SYSTEMS = {
    "transformers bf16": ("transformers", "bfloat16", None, None),
    "transformers fp32": ("transformers", "float32", None, None),
    "hetrun default": ("hetrun", None, None, "cpu profile"),
    **{f"hetrun {kind}{'' if devices == 'cpu profile' else ' ' + devices}": ("hetrun", *KINDS[kind], devices)
       for kind in KINDS for devices in ("cpu profile", "onnxruntime", "openvino", GRAPH)},
    **{f"hetrun {kind} {BUNDLE}": (BUNDLE, *KINDS[kind], "onnxruntime") for kind in KINDS},
    "llama.cpp F32": ("llama.cpp", "F32", None, None),
    "llama.cpp Q8_0": ("llama.cpp", "Q8_0", None, None),
    "llama.cpp Q4_0": ("llama.cpp", "Q4_0", None, None),
}
# (hetrun system, reference system, decode ratio at least this); RSS: at most these ratios. A hetrun system stands
# for itself and its single-runtime variants ("hetrun int4" and "hetrun int4 onnxruntime", ...): the target is
# checked on the fastest of them that ran, its peak RSS beside it.
TARGETS = [("hetrun default", "transformers bf16", 1.25), ("hetrun int4", "transformers bf16", 2.0),
           ("hetrun fp32", "llama.cpp F32", 0.6), ("hetrun int8", "llama.cpp Q8_0", 0.6),
           ("hetrun int4", "llama.cpp Q4_0", 0.6)]
RSS_TARGETS = [("hetrun default", "transformers bf16", 1.1), ("hetrun fp32", "llama.cpp F32", 1.5),
               ("hetrun int8", "llama.cpp Q8_0", 1.5), ("hetrun int4", "llama.cpp Q4_0", 1.5)]
# --dense-precision matching (the default): each hetrun system's dense linear layers (attention projections, the
# LM head) in the weight format of the llama.cpp file it is held against, which write_gguf quantizes whole: INT4
# beside INT4 experts (Q4_0), INT8 beside INT8 (Q8_0, as auto gives); every other system as auto gives.
MATCHING_DENSE = {"int4": "int4-w4a8", "int8": "int8-w8a8"}


def write_checkpoint(folder: Path, seed: int = 0) -> None:
    """The benchmark model as a transformers checkpoint (safetensors, BF16, as MoE checkpoints ship) in `folder`."""
    model = random_model(SPEC, seed=seed).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def prompt_ids(seed: int = 0, length: int = PROMPT_LEN) -> list[int]:
    """The benchmark prompt: `length` token ids drawn from the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SPEC.vocab_size, (length,), generator=g).tolist()


# ---- one system, in its own process ---------------------------------------------------------------------------

def dense_precision_of(system: str, asked: str) -> str:
    """The dense_precision a hetrun system deploys with: `asked`, where "matching" is MATCHING_DENSE's."""
    if asked != "matching":
        return asked
    kind = system.split()[1] if system.startswith("hetrun ") else ""
    return MATCHING_DENSE.get(kind, "auto")


def _run_torch_model(model, ids: list[int], stats=None) -> dict:
    """Prefill and decode speed of greedy generate, best of two runs after a warm-up, and the logits of the
    prompt's last position (what the first new token is chosen from). With a deployment's DispatchStats, also where
    a decode token's time went in those runs ("split_ms", see _decode_split)."""
    x = torch.tensor([ids])
    # no end-of-sequence token, so every run makes exactly its tokens: min_new_tokens would do it too, but its logits
    # processor searches the whole vocabulary for the EOS id at every step (about 1 ms per token here, for every
    # system alike; llama.cpp's loop does no such thing)
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(x[:, :8], max_new_tokens=2, **gen)  # warm-up
        best: dict[int, tuple] = {}  # new tokens -> (seconds, MoE layer s, expert s, dense s) of the fastest run
        for _ in range(2):
            for new in (1, NEW_TOKENS):
                if stats is not None:
                    stats.reset()
                t0 = time.perf_counter()
                out = model.generate(x, max_new_tokens=new, **gen)
                if out.shape[1] != len(ids) + new:
                    raise HetrunError(f"generate made {out.shape[1] - len(ids)} tokens instead of {new}")
                run = (time.perf_counter() - t0,) + ((stats.layer_s, stats.expert_s, stats.dense_s, stats.graph_s)
                                                     if stats else ())
                best[new] = min(best.get(new, run), run)
        tokens = out[0, len(ids):].tolist()
        logits = model(x).logits[0, -1].float()  # [V]
    first, whole = best[1], best[NEW_TOKENS]
    result = {"prefill_tps": len(ids) / first[0], "decode_tps": (NEW_TOKENS - 1) / max(whole[0] - first[0], 1e-9),
              "tokens": tokens, "logits": logits.tolist()}
    if stats is not None:
        result["split_ms"] = _decode_split(first, whole)
    return result


def _decode_split(first: tuple, whole: tuple) -> dict:
    """Where a decode token's time goes, in ms: (seconds, MoE layer s, expert s, dense s, model graph s) of a
    1-token generate subtracted from those of a NEW_TOKENS one, per token."""
    total, layers, experts, dense, graph = ((b - a) * 1e3 / (NEW_TOKENS - 1) for a, b in zip(first, whole))
    return {"total": total, "moe_layers": layers, "expert_calls": experts, "dense_linears": dense,
            "model_graph": graph, "rest": total - layers - dense - graph}


def _child(system: str, folder: Path, threads: int, prompt_tokens: int = PROMPT_LEN,
           dense_precision: str = "matching") -> dict:
    import transformers  # heavy: only in the benchmark's child processes

    torch.set_num_threads(threads)
    runner, dtype, precisions, devices = SYSTEMS[system]
    graph = devices == GRAPH
    devices = "onnxruntime" if graph else devices
    ids = prompt_ids(length=prompt_tokens)
    # the libraries the system runs on, loaded before any weight is read: what the process holds then is its floor
    # (a backend's probe imports its runtime, and deploy reuses the cached probe)
    importlib.import_module("transformers.models.mixtral.modeling_mixtral")
    for backend in sorted({d["backend"] for d in DEVICES[devices]}) if runner == "hetrun" else []:
        probe_backend(backend)
    extra = {"floor_gb": status_bytes("VmRSS:") / 1e9}
    if runner == "hetrun":  # from the checkpoint directory: experts streamed to their devices, never all in memory
        profile = load_profile(system_profile(devices, dense_precision=dense_precision_of(system, dense_precision),
                                              model_graph="on" if graph else "off"))
        kw = {}
        if precisions is not None:
            p = plan(MoESpec.from_hf_config(transformers.AutoConfig.from_pretrained(folder)), profile)
            kw["plan"] = dataclasses.replace(p, precision={d.id: precisions[d.backend] for d in profile.devices})
        model = deploy(str(folder), profile, threads=threads, **kw).eval()
        if dtype is not None and model.dtype != getattr(torch, dtype):  # a host that computes BF16 natively keeps
            model = model.to(getattr(torch, dtype))  # it: cast then (here deploy's upcast made it FP32 already)
        extra["torch_ops_dtype"] = str(model.model.norm.weight.dtype).removeprefix("torch.")  # attention, norms
        extra["precisions"] = dict(model.hetrun.plan.precision)
        extra["dense_linears"] = model.hetrun.dense.precision if model.hetrun.dense is not None else "model"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    out = _run_torch_model(model, ids, model.hetrun.stats if runner == "hetrun" else None)
    return {**out, **extra}


# ---- GGUF for llama.cpp -------------------------------------------------------------------------------------

def write_gguf(folder: Path, kind: str) -> Path:
    """The checkpoint in `folder` as a llama.cpp GGUF (Mixtral is its llama architecture with experts)."""
    import gguf  # optional: the `bench` extra
    from safetensors.torch import load_file  # heavy: only when writing GGUF

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.float().numpy() for k, v in load_file(f).items()})  # BF16 values, exact in FP32
    cfg = json.loads((folder / "config.json").read_text())
    a, d = SPEC.attention, SPEC.hidden_size
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
             "Q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    path = folder / f"model-{kind}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(SPEC.num_layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(SPEC.moe_intermediate_size)
    w.add_head_count(a.num_heads)
    w.add_head_count_kv(a.num_kv_heads)
    w.add_rope_dimension_count(a.head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(SPEC.num_experts)
    w.add_expert_used_count(SPEC.top_k)
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[kind])
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<0x{i:02X}>" if i < 256 else f"t{i}" for i in range(SPEC.vocab_size)])
    w.add_token_scores([0.0] * SPEC.vocab_size)
    w.add_token_types([6 if i < 256 else 1 for i in range(SPEC.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name: str, t: np.ndarray, quantize: bool = True) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if quantize and qtype != gguf.GGMLQuantizationType.F32 and t.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)

    def rope_rows(t: np.ndarray, heads: int) -> np.ndarray:  # HF rotate-half layout -> GGML's interleaved one
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    put("output_norm.weight", tensors["model.norm.weight"], False)
    put("output.weight", tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]))
    for i in range(SPEC.num_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"], False)
        put(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], False)
        put(f"blk.{i}.attn_q.weight", rope_rows(tensors[p + "self_attn.q_proj.weight"], a.num_heads))
        put(f"blk.{i}.attn_k.weight", rope_rows(tensors[p + "self_attn.k_proj.weight"], a.num_kv_heads))
        put(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate_inp.weight", tensors[_key(tensors, p, "gate")], False)
        gate, up, down = _experts(tensors, p)
        put(f"blk.{i}.ffn_gate_exps.weight", gate)  # [E, I, D]
        put(f"blk.{i}.ffn_up_exps.weight", up)  # [E, I, D]
        put(f"blk.{i}.ffn_down_exps.weight", down)  # [E, D, I]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _key(tensors: dict, prefix: str, name: str) -> str:
    for k in (f"{prefix}mlp.{name}.weight", f"{prefix}block_sparse_moe.{name}.weight"):
        if k in tensors:
            return k
    raise HetrunError(f"the benchmark checkpoint has no router weight under {prefix}")


def _experts(tensors: dict, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # (gate [E, I, D], up [E, I, D], down [E, D, I]) whichever layout save_pretrained wrote.
    for moe in ("mlp", "block_sparse_moe"):
        stacked = f"{prefix}{moe}.experts.gate_up_proj"
        if stacked in tensors:
            gu = tensors[stacked]  # [E, 2I, D]
            i = gu.shape[1] // 2
            return gu[:, :i], gu[:, i:], tensors[f"{prefix}{moe}.experts.down_proj"]
        names = [(f"{prefix}{moe}.experts.{{}}.{g}.weight", f"{prefix}{moe}.experts.{{}}.{u}.weight",
                  f"{prefix}{moe}.experts.{{}}.{dn}.weight") for g, u, dn in (("w1", "w3", "w2"),
                                                                           ("gate_proj", "up_proj", "down_proj"))]
        for g, u, dn in names:
            if g.format(0) in tensors:
                e = range(SPEC.num_experts)
                return (np.stack([tensors[g.format(k)] for k in e]), np.stack([tensors[u.format(k)] for k in e]),
                        np.stack([tensors[dn.format(k)] for k in e]))
    raise HetrunError(f"the benchmark checkpoint has no experts under {prefix}")


# ---- the benchmark --------------------------------------------------------------------------------------------

def llama_cpp_available() -> str:
    """'' when llama-cpp-python and gguf import, else why not."""
    for mod in ("llama_cpp", "gguf"):
        try:
            __import__(mod)
        except ImportError as e:
            return f"{mod} is not installed ({e}); `pip install -e \".[bench]\"` builds llama-cpp-python (minutes)"
    return ""


def run(systems: list[str], threads: int, rounds: int = 2, prompt_tokens: int = PROMPT_LEN,
        dense_precision: str = "matching") -> dict:
    """Each system in a child process on one checkpoint, `rounds` times in alternating order (this VM's memory
    bandwidth drifts over minutes, so no system always runs first); per system its fastest round."""
    missing = llama_cpp_available()
    out: dict = {"cpu": host_cpu.describe(), "threads": threads, "rounds": rounds, "prompt_tokens": prompt_tokens,
                 "dense_precision": dense_precision, "systems": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="hetrun-bench-generate-") as tmp:
        folder = Path(tmp)
        write_checkpoint(folder)
        runs: dict[str, list[dict]] = {}
        for r in range(rounds):
            for system in systems if r % 2 == 0 else systems[::-1]:
                if system in out["skipped"]:
                    continue
                result = _one_system(system, folder, threads, missing, prompt_tokens, dense_precision)
                if isinstance(result, str):
                    out["skipped"][system] = result
                    runs.pop(system, None)
                else:
                    runs.setdefault(system, []).append(result)
    for system in (s for s in systems if s in runs):
        rs = runs[system]
        out["systems"][system] = {**max(rs, key=lambda x: x["decode_tps"]),
                                  "decode_tps_rounds": [x["decode_tps"] for x in rs],
                                  "prefill_tps": max(x["prefill_tps"] for x in rs),
                                  "peak_rss_gb": max(x["peak_rss_gb"] for x in rs)}
    ref = out["systems"].get("transformers fp32", {})
    want = torch.tensor(ref["logits"]) if "logits" in ref else None  # [V]
    for name, r in out["systems"].items():
        r["tokens_equal_transformers_fp32"] = None if "tokens" not in ref else r.get("tokens") == ref["tokens"]
        logits = r.pop("logits", None)  # [V] 32,000 numbers: not kept in the output
        if logits is not None and want is not None:
            r["logits_error_vs_transformers_fp32"] = float((torch.tensor(logits) - want).norm() / want.norm())
    return out


def variants(systems: dict, name: str) -> list[str]:
    """`name` and its single-runtime variants ("hetrun int4", "hetrun int4 onnxruntime", ...) among the measured
    `systems`."""
    return [s for s in systems
            if s == name or (s.startswith(name + " ") and s[len(name) + 1:] in (*DEVICES, GRAPH, BUNDLE))]


def fastest_variant(systems: dict, name: str) -> str | None:
    """Of `name` and its single-runtime variants among the measured `systems`, the one that decoded fastest; None
    when none ran."""
    return max(variants(systems, name), key=lambda s: systems[s]["decode_tps"], default=None)


def _one_system(system: str, folder: Path, threads: int, missing: str, prompt_tokens: int = PROMPT_LEN,
                dense_precision: str = "matching") -> "dict | str":
    # one round of one system in its own process: its result, or why it did not run
    runner, kind = SYSTEMS[system][:2]
    if runner == BUNDLE:
        bundle = folder / f"graph-bundle-{system.split()[1]}-{dense_precision}"
        if not bundle.exists():
            failed = _export_graph_bundle(system, folder, bundle, dense_precision)
            if failed:
                return failed
        cmd = [sys.executable, "-I", "-m", "hetrun.bench.graph_child", str(bundle),
               json.dumps(prompt_ids(length=prompt_tokens)), str(threads), str(NEW_TOKENS)]
    elif runner == "llama.cpp":
        if missing:
            return missing
        gguf_path = folder / f"model-{kind}.gguf"
        if not gguf_path.exists():
            write_gguf(folder, kind)
        # a script of its own (-I: its folder stays off sys.path): the process imports llama_cpp and the
        # standard library only, so its peak RSS is llama.cpp's
        cmd = [sys.executable, "-I", str(Path(__file__).with_name("child_process.py")), str(gguf_path),
               json.dumps(prompt_ids(length=prompt_tokens)), str(threads), str(NEW_TOKENS)]
    else:
        cmd = [sys.executable, "-m", "hetrun", "bench", "generate", "--child", system, "--folder", str(folder),
               "--threads", str(threads), "--prompt-tokens", str(prompt_tokens), "--dense-precision", dense_precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    result = json.loads(lines[-1])
    if runner == BUNDLE:
        manifest = json.loads((bundle / "manifest.json").read_text())
        result.update(dense_linears=manifest["dense_precision"], precisions={"cpu": manifest["precision"]},
                      torch_ops_dtype="none (no torch)")
    return result


def _export_graph_bundle(system: str, folder: Path, bundle: Path, dense_precision: str) -> str:
    # write a graph bundle system's bundle from the checkpoint, in a process of its own; "" or why it failed
    precision = SYSTEMS[system][2]["onnxruntime"]
    profile = folder / f"{bundle.name}.json"
    profile.write_text(json.dumps(system_profile("onnxruntime", dense_precision=dense_precision_of(system,
                                                                                                   dense_precision))))
    proc = subprocess.run([sys.executable, "-m", "hetrun", "export", str(folder), "--profile", str(profile), "-o",
                           str(bundle), "--graph", "--precision", precision, "--no-progress"],
                          capture_output=True, text=True, timeout=1800)
    return "" if proc.returncode == 0 else f"failed to export: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma separated, from: " + ", ".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every system")
    p.add_argument("--rounds", type=int, default=2, help="runs of every system, in alternating order; each keeps its "
                   "fastest (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_LEN,
                   help=f"prompt length in tokens (default {PROMPT_LEN}); longer prompts show what the KV cache costs "
                        f"each decode step (with the {NEW_TOKENS} new tokens, within the model's positions)")
    p.add_argument("--dense-precision", default="matching", choices=("matching",) + DENSE_PRECISIONS,
                   help="the hetrun systems' dense_precision (hetrun.runtime.dense): matching (default: the weight "
                        "format of the llama.cpp file each is held against, which quantizes every linear layer: "
                        "INT4 linear layers, the LM head included, beside INT4 experts as Q4_0; INT8 beside INT8 "
                        "as Q8_0; auto otherwise), auto (what deploy picks: INT8 linear layers beside any integer "
                        "experts), int4-w4a8, int8-w8a8, fp32 or model for every hetrun system")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one system, in its own process
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)


def _main(a: argparse.Namespace) -> int:
    if a.child:
        result = _child(a.child, Path(a.folder), a.threads, a.prompt_tokens, a.dense_precision)
        print(json.dumps({**result, "peak_rss_gb": peak_rss_gb()}))
        return 0
    systems = comma_list(a.systems)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise HetrunError(f"unknown system '{unknown[0]}'; choose from: {', '.join(SYSTEMS)}")
    if a.rounds < 1:
        raise HetrunError(f"--rounds must be at least 1, got {a.rounds}")
    positions = random_config(SPEC).max_position_embeddings
    if not 8 <= a.prompt_tokens <= positions - NEW_TOKENS:
        raise HetrunError(f"--prompt-tokens must be between 8 and {positions - NEW_TOKENS} (the model's {positions} "
                          f"positions less {NEW_TOKENS} new tokens), got {a.prompt_tokens}")
    result = run(systems, a.threads, a.rounds, a.prompt_tokens, a.dense_precision)
    if a.json:
        print_json(result)
    else:
        _print(result)
    return 0


def _print(result: dict) -> None:
    c = table_console(150)
    cpu = result["cpu"]
    c.print(f"CPU: {host_cpu.summary(cpu)}; {result['threads']} threads for every system; each system's fastest of "
            f"{result['rounds']} rounds (decode tok/s of every round in --json); hetrun's dense_precision: "
            f"{result.get('dense_precision', 'auto')}")
    t = Table(title=f"2-layer Mixtral-shaped model, greedy, {result.get('prompt_tokens', PROMPT_LEN)}-token prompt, "
                    f"{NEW_TOKENS} new tokens")
    for col in ("system", "decode tok/s", "prefill tok/s", "peak RSS GB", "floor GB", "dense linears",
                "logits err", "= transformers fp32"):
        t.add_column(col, justify="right")
    for name, r in result["systems"].items():
        same = r.get("tokens_equal_transformers_fp32")
        err = r.get("logits_error_vs_transformers_fp32")
        t.add_row(name, f"{r['decode_tps']:.1f}", f"{r['prefill_tps']:.0f}", f"{r['peak_rss_gb']:.2f}",
                  f"{r['floor_gb']:.2f}" if "floor_gb" in r else "", r.get("dense_linears", ""),
                  "" if err is None else f"{err:.1e}", "" if same is None else ("yes" if same else "no"))
    c.print(t)
    c.print("floor: resident memory once the system's libraries are imported, before it reads a weight; dense "
            "linears: what runs the attention projections and the LM head (model: transformers' own layers); logits "
            "err: relative error of the prompt's last logits against transformers FP32")
    s = result["systems"]
    for mine, ref, want in TARGETS:
        best = fastest_variant(s, mine)
        if best and ref in s:
            ratio = s[best]["decode_tps"] / s[ref]["decode_tps"]
            c.print(f"decode {best} / {ref}: {ratio:.2f} (target >= {want}) "
                    f"{'[green]met[/]' if ratio >= want else '[red]missed[/]'}")
    for mine, ref, want in RSS_TARGETS:
        best = fastest_variant(s, mine)
        if best and ref in s:
            ratio = s[best]["peak_rss_gb"] / s[ref]["peak_rss_gb"]
            above = ""
            if "floor_gb" in s[best] and "floor_gb" in s[ref]:
                mine_above, ref_above = (s[k]["peak_rss_gb"] - s[k]["floor_gb"] for k in (best, ref))
                above = f"; above each one's floor {mine_above:.2f} / {ref_above:.2f} GB = {mine_above / ref_above:.2f}"
            c.print(f"peak RSS {best} / {ref}: {ratio:.2f} (target <= {want}) "
                    f"{'[green]met[/]' if ratio <= want else '[red]missed[/]'}{above}")
            decode_want = next((w for m, r, w in TARGETS if (m, r) == (mine, ref)), None)
            if decode_want is not None:  # the fastest variant may hold more memory than another that is fast enough
                both = [v for v in variants(s, mine) if s[v]["decode_tps"] / s[ref]["decode_tps"] >= decode_want
                        and s[v]["peak_rss_gb"] / s[ref]["peak_rss_gb"] <= want]
                c.print(f"  {mine} variants meeting both targets against {ref} (decode >= {decode_want}, peak <= "
                        f"{want}): {', '.join(both) or 'none'}")
    for name, r in s.items():
        if "split_ms" in r:
            ms = r["split_ms"]
            if ms.get("model_graph"):
                c.print(f"{name}, per decode token: {ms['total']:.2f} ms = the model graph's call "
                        f"{ms['model_graph']:.2f} + the rest (the embedding, the generate loop) {ms['rest']:.2f}")
                continue
            c.print(f"{name}, per decode token: {ms['total']:.2f} ms = MoE layers {ms['moe_layers']:.2f} (their expert "
                    f"calls {ms['expert_calls']:.2f}, summed over devices that run at once) + the dense part's calls "
                    f"on the dense device (linear layers, and attention where it runs there) {ms['dense_linears']:.2f}"
                    f" + the rest (norms, embeddings, attention left to torch, the generate loop, in "
                    f"{r.get('torch_ops_dtype', '?')}) {ms['rest']:.2f}")
    for name, why in result["skipped"].items():
        c.print(f"skipped {name}: {why}")


BENCHMARKS = {
    "generate": Benchmark(
        "end-to-end greedy generation: hetrun against transformers eager and llama.cpp, tokens/s and peak memory",
        _arguments, _main,
        "  hetrun bench generate\n  hetrun bench generate --systems 'transformers bf16,hetrun default'\n"
        "  hetrun bench generate --json"),
}
