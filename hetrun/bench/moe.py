"""`hetrun bench moe`: a Mixtral-shaped MoE layer through hetrun's real CPU backends against the transformers block."""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.console import Console
from rich.table import Table

from hetrun.bench import Benchmark, comma_list
from hetrun.files import print_json
from hetrun.placement.planner import simple_plan
from hetrun.profile import load_profile
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.weights import layer_weights_from_block
from hetrun.spec import MoESpec

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def run(tokens: list[int], backends: list[str], precisions: list[str], repeats: int, threads: int) -> list[dict]:
    """Time the transformers block and hetrun's layer on the same weights and inputs; one row per case."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # heavy: only when measured

    torch.set_num_threads(threads)
    spec = MoESpec.from_preset("mixtral-bench")
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(spec.to_hf_config()).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    weights = layer_weights_from_block(spec, 0, block)
    rows = []
    for precision in precisions:
        dtype = TORCH_DTYPES[precision]
        ref_block = copy.deepcopy(block).to(dtype)
        for backend in backends:
            profile = load_profile({"name": f"bench-{backend}",
                                    "devices": [{"id": "cpu", "type": "host-cpu", "backend": backend}]})
            runtime = ExpertRuntime(simple_plan(spec, profile, precision), profile, [weights], threads=threads)
            layer = runtime.layers[0]
            for t in tokens:
                x = torch.randn(t, spec.hidden_size, generator=torch.Generator().manual_seed(t)).to(dtype)  # [T, D]
                with torch.no_grad():
                    ref_s = _best_of(lambda: ref_block(x[None]), repeats)
                    layer(x)
                    runtime.stats.reset()
                    het_s = _best_of(lambda: layer(x), repeats)
                    err = ((layer(x).float() - ref_block(x[None])[0].float()).norm() /
                           ref_block(x[None])[0].float().norm()).item()
                s = runtime.stats
                rows.append({"backend": backend, "precision": precision, "tokens": t,
                             "transformers_ms": ref_s * 1e3, "hetrun_ms": het_s * 1e3,
                             "speedup": ref_s / het_s, "dispatch_overhead": (s.layer_s - s.expert_s) / s.layer_s,
                             "rel_error": err})
    return rows


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1,32,512,2048")
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true")


def _main(a: argparse.Namespace) -> int:
    rows = run(comma_list(a.tokens, int), comma_list(a.backends), comma_list(a.precisions), a.repeats, a.threads)
    if a.json:
        print_json(rows)
        return 0
    flags = _cpu_flags()
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    t = Table(title="MoE layer D=1024 I=2816 E=8 top-2: hetrun vs transformers eager (same weights, same precision)",
              caption=f"threads={a.threads}; CPU native BF16: {'yes' if native_bf16 else 'no (avx512_bf16/AMX absent)'}; "
                      "speedup = transformers time / hetrun time; overhead = routing+permute+combine+copies share")
    for col in ("backend", "precision", "tokens", "transformers ms", "hetrun ms", "speedup", "dispatch overhead",
                "rel. error"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["backend"], r["precision"], str(r["tokens"]), f"{r['transformers_ms']:.2f}", f"{r['hetrun_ms']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['dispatch_overhead'] * 100:.1f}%", f"{r['rel_error']:.1e}")
    Console().print(t)
    return 0


BENCHMARKS = {
    "moe": Benchmark(
        "a Mixtral-shaped MoE layer through hetrun's real CPU backends against the transformers block",
        _arguments, _main,
        "  hetrun bench moe --tokens 1,512 --backends onnxruntime --precisions fp32\n"
        "  hetrun bench moe --json"),
}
