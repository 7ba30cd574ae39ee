"""`hetrun bench load`: from checkpoint files to devices, against from_pretrained and the deploy hetrun had before.

A Mixtral-shaped BF16 checkpoint (hidden 2048, intermediate 5632, 8 experts, top-2, 8 layers: about 4.8 GB in 4
shards, written tensor by tensor into a temporary folder and deleted afterwards) is deployed and exported, each arm
in a fresh child process whose peak resident memory (VmHWM) and wall time are measured:

  today            from_pretrained, then deploy as hetrun did before it read directories: every expert copied to
                   FP32 first, all copies alive while the graphs are built (the reference)
  module           from_pretrained, then hetrun.deploy(model): experts converted one at a time
  directory        hetrun.deploy(DIR): dense part read, experts read, converted and dropped one at a time
  today-int4, directory-int4   the same onto an INT4 device
  export-module    from_pretrained, then hetrun export of the module (the reference for export)
  export-directory hetrun export DIR
Targets (the issue's): directory BF16 peak <= 1.15 x the weights' bytes + 1.5 GB; directory INT4 peak <= 0.40 x the
directory BF16 peak; export-directory peak <= the largest shard + 1.5 GB; today / directory wall time >= 1.5. Disk
read throughput of the directory arms is set against `dd` on the same files (each file's pages are dropped from
the page cache first, posix_fadvise). The per-device resident memory of each deploy is set against the plan's.
The profile keeps the dense part as read (dense_precision: model) unless --dense-precision auto asks for what a
profile gets by default: INT8 dense linear layers beside INT4 experts, the BF16 arms unchanged.
A child that outgrows --max-gb is stopped and reported, so a small machine is not driven out of memory. The
machine may be shared: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hetrun.bench import Benchmark, comma_list
from hetrun.bench.child_process import status_bytes
from hetrun.errors import HetrunError
from hetrun.files import print_json, table_console

GB = 1e9
SHAPES = {  # hidden, intermediate, experts, top-k, layers, vocab
    "mixtral-4.4g": (2048, 5632, 8, 2, 8, 32000),
    "mixtral-2.2g": (2048, 5632, 8, 2, 4, 32000),  # half its layers: today's BF16 path fits in ~12 GB of memory
    "small": (1024, 2816, 8, 2, 4, 32000),
}
ARMS = ("today", "module", "directory", "today-int4", "directory-int4", "export-module", "export-directory")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=SHAPES, default="mixtral-4.4g",
                   help="checkpoint shape: the issue's Mixtral-shaped 4.4 GB of experts (default), the same with half "
                        "its layers (mixtral-2.2g: today's BF16 path, which holds FP32 copies of every expert, fits "
                        "where the full one does not), or small (0.6 GB)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino", "torch"),
                   help="backend of the one CPU device deployed to (default onnxruntime; torch holds BF16 experts "
                        "narrow, and its INT4 arms run on onnxruntime, which torch has no INT4 for)")
    p.add_argument("--dense-precision", default="model", choices=("model", "auto"),
                   help="the profile's dense_precision: model (default: the dense part stays as read, so the arms "
                        "differ only in how experts arrive) or auto (what a profile gets by default: INT8 dense "
                        "linear layers beside INT4 experts)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run (default all: {', '.join(ARMS)})")
    p.add_argument("--dir", default=None, help="folder for the generated checkpoint (default: the system temp folder)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="stop an arm whose resident memory passes this (default: 85%% of available memory)")
    p.add_argument("--threads", type=int, default=None, help="threads per expert session")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _main(args: argparse.Namespace) -> int:
    arms = comma_list(args.arms)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise HetrunError(f"unknown arm '{bad[0]}'; use some of: {', '.join(ARMS)}")
    if args.max_gb is not None and not 0 < args.max_gb < float("inf"):
        raise HetrunError(f"--max-gb must be a positive number of GB, got {args.max_gb}")
    if args.threads is not None and args.threads < 1:
        raise HetrunError(f"--threads must be at least 1, got {args.threads}")
    result = run_bench(args.shape, arms, args.backend, args.dir, args.max_gb, args.threads, progress=not args.json,
                       dense_precision=args.dense_precision)
    if args.json:
        print_json(result)
    elif result.get("skipped"):
        print(f"hetrun bench load: skipped: {result['skipped']}")
    else:
        _print(result)
    return 0


def run_bench(shape: str = "mixtral-4.4g", arms=ARMS, backend: str = "onnxruntime", folder: str | None = None,
              max_gb: float | None = None, threads: int | None = None, progress: bool = False,
              dense_precision: str = "model") -> dict:
    """Generate the checkpoint, run each arm in a child process, delete the checkpoint; see the module doc."""
    hidden, inter, experts, top_k, layers, vocab = SHAPES[shape]
    expert_bytes = layers * experts * 3 * hidden * inter * 2
    need = 2.7 * expert_bytes  # the checkpoint and one exported bundle at a time, with room
    root = Path(folder or tempfile.gettempdir())
    if not root.is_dir():
        raise HetrunError(f"--dir '{root}' is not a folder")
    free = shutil.disk_usage(root).free
    if free < max(need, 12 * GB if shape == "mixtral-4.4g" else 0):
        return {"skipped": f"needs {max(need, 12 * GB) / GB:.0f} GB free disk under '{root}', has {free / GB:.1f} GB; "
                           "pass --dir on a larger disk or --shape small"}
    budget = max_gb * GB if max_gb else 0.85 * _available_bytes()
    work = Path(tempfile.mkdtemp(prefix="hetrun-bench-load-", dir=root))
    try:
        ckpt = work / "model"
        _say(progress, f"writing a {shape} BF16 checkpoint under {work}")
        gen = _child(["generate", str(ckpt), shape], budget)
        if gen.get("error"):
            raise HetrunError(f"generating the checkpoint failed: {gen['error']}")
        shards = sorted(ckpt.glob("*.safetensors"))
        weights = sum(f.stat().st_size for f in shards)
        dd = _dd(shards)
        out = {"shape": shape, "backend": backend, "dense_precision": dense_precision, "weights_bytes": weights,
               "shards": len(shards),
               "largest_shard_bytes": max(f.stat().st_size for f in shards), "generate_s": gen["seconds"],
               "dd": dd, "budget_bytes": budget, "arms": {}}
        for arm in arms:
            _say(progress, f"running {arm}")
            _drop_cache(shards)
            out["arms"][arm] = _child(["arm", arm, str(ckpt), str(work), backend, str(threads or 0), dense_precision],
                                      budget)
        out["ratios"] = _ratios(out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ratios(out: dict) -> dict:
    a, w = out["arms"], out["weights_bytes"]
    peak = {k: v.get("peak_rss_bytes") for k, v in a.items() if not v.get("error")}
    r = {}
    if "directory" in peak:
        r["directory_peak_vs_target"] = peak["directory"] / (1.15 * w + 1.5 * GB)
    if "directory" in peak and "directory-int4" in peak:
        r["int4_peak_vs_bf16"] = peak["directory-int4"] / peak["directory"]
    if "export-directory" in peak:
        r["export_peak_vs_target"] = peak["export-directory"] / (out["largest_shard_bytes"] + 1.5 * GB)
    for ref, new in (("today", "directory"), ("today-int4", "directory-int4"), ("module", "directory"),
                     ("export-module", "export-directory")):
        if ref in peak and new in peak:
            r[f"{ref}_over_{new}_seconds"] = a[ref]["seconds"] / a[new]["seconds"]
            r[f"{ref}_over_{new}_peak"] = peak[ref] / peak[new]
    dd = out["dd"]["bytes_per_s"]
    for arm in ("directory", "directory-int4", "export-directory"):
        if arm in peak and a[arm].get("read_s"):
            r[f"{arm}_read_vs_dd"] = a[arm]["bytes_read"] / a[arm]["read_s"] / dd
    return r


def _print(out: dict) -> None:
    from rich.table import Table  # display: loaded when a table is printed

    c = table_console(140)
    c.print(f"checkpoint: {out['shape']}, {out['weights_bytes'] / GB:.2f} GB in {out['shards']} shards (largest "
            f"{out['largest_shard_bytes'] / GB:.2f} GB); dd reads it at {out['dd']['bytes_per_s'] / GB:.2f} GB/s; "
            f"device: one host CPU on {out['backend']}, dense_precision: {out['dense_precision']}; the machine may be "
            "shared: compare ratios within this run")
    t = Table(title="hetrun bench load: each arm in a fresh process")
    for col in ("arm", "wall s", "peak RSS GB", "after imports GB", "read GB/s", "device memory / plan", "note"):
        t.add_column(col, justify="left" if col in ("arm", "note") else "right")
    for arm, v in out["arms"].items():
        if v.get("error"):
            t.add_row(arm, "-", f"{v.get('peak_rss_bytes', 0) / GB:.2f}", "-", "-", "-", v["error"][:70])
            continue
        mem = v.get("memory") or {}
        ratio = ", ".join(f"{d} {m['measured_bytes'] / GB:.2f}/{m['predicted_bytes'] / GB:.2f} GB = {m['ratio']:.2f}"
                          for d, m in mem.items() if m.get("ratio") is not None)
        read = f"{v['bytes_read'] / v['read_s'] / GB:.2f}" if v.get("read_s") else "-"
        t.add_row(arm, f"{v['seconds']:.1f}", f"{v['peak_rss_bytes'] / GB:.2f}", f"{v['baseline_rss_bytes'] / GB:.2f}",
                  read, ratio or "-", "; ".join(x for x in (v.get("note", ""), f"on {v['backend']}"
                                                            if v.get("backend") != out["backend"] else "") if x))
    c.print(t)
    for k, v in out["ratios"].items():
        c.print(f"  {k}: {v:.3f}")


# ---- the parent's helpers ------------------------------------------------------------------------------------

def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"hetrun bench load: {text}", file=sys.stderr, flush=True)


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GB


def _child(argv: list[str], budget: float) -> dict:
    """Run `argv` in a fresh interpreter (this module's __main__); stop it past `budget` resident bytes."""
    proc = subprocess.Popen([sys.executable, "-m", "hetrun.bench.load", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, status_bytes("VmRSS:", proc.pid))
        if peak > budget:
            proc.kill()
            proc.wait()
            return {"error": f"stopped at {peak / GB:.1f} GB resident (the --max-gb budget, {budget / GB:.1f} GB)",
                    "peak_rss_bytes": peak}
        time.sleep(0.1)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300], "peak_rss_bytes": peak}
    return json.loads(lines[-1])


def _drop_cache(files) -> None:
    """Drop these files' pages from the page cache (only theirs), so each arm reads from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _dd(files) -> dict:
    """`dd` reading every shard to /dev/null (page cache dropped first): bytes per second."""
    _drop_cache(files)
    total, t0 = 0, time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
        total += f.stat().st_size
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "bytes_per_s": total / seconds}


# ---- the child: one arm, measured --------------------------------------------------------------------------------

def _generate(path: str, shape: str) -> dict:
    import torch  # heavy: the child's work
    import transformers  # heavy: the child's work

    from hetrun.checkpoint.writer import random_checkpoint

    hidden, inter, experts, top_k, layers, vocab = SHAPES[shape]
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                        num_experts_per_tok=top_k, num_hidden_layers=layers, vocab_size=vocab,
                                        num_attention_heads=16, num_key_value_heads=8, head_dim=hidden // 16,
                                        max_position_embeddings=4096)
    t0 = time.perf_counter()
    random_checkpoint(config, path, torch.bfloat16, shards=4)
    return {"seconds": time.perf_counter() - t0}


def _profile(backend: str, precision: str, dense_precision: str) -> dict:
    return {"name": f"load-{precision}", "devices": [{"id": "cpu", "type": "host-cpu", "backend": backend,
                                                      "precision": precision}], "dense_precision": dense_precision}


def _arm(arm: str, path: str, work: str, backend: str, threads: int, dense_precision: str = "model") -> dict:
    import dataclasses

    import torch  # heavy: the child's work
    import transformers  # heavy: the child's work

    import hetrun
    from hetrun.backends.registry import backend_class
    from hetrun.bundle import export
    from hetrun.placement.planner import plan as make_plan
    from hetrun.profile import load_profile
    from hetrun.runtime.dispatch import ExpertRuntime, swap_moe_blocks
    from hetrun.runtime.weights import model_layer_weights
    from hetrun.spec import MoESpec

    threads = threads or None
    precision = "int4" if arm.endswith("int4") else "bf16"
    if not backend_class(backend).supports(precision):
        backend = "onnxruntime"  # torch: no INT4
    profile = load_profile(_profile(backend, precision, dense_precision))
    baseline = status_bytes("VmRSS:")
    t0 = time.perf_counter()
    note, runtime, model = "", None, None
    if arm in ("today", "today-int4"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        spec = MoESpec.from_hf_config(model.config)
        plan = make_plan(spec, profile)
        layers = model_layer_weights(spec, model)
        # hetrun's deploy before checkpoint directories: every expert in FP32, all alive while graphs are built
        weights = [dataclasses.replace(w, experts=tuple(s.weights() for s in w.experts)) for _, w in layers]
        runtime = ExpertRuntime(plan, profile, weights, threads=threads)
        swap_moe_blocks(model, [p for p, _ in layers], runtime.layers)
        note = "FP32 copies of every expert first"
    elif arm == "module":
        model = hetrun.deploy(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), profile, threads=threads)
        runtime = model.hetrun
    elif arm in ("directory", "directory-int4"):
        model = hetrun.deploy(path, profile, threads=threads)
        runtime = model.hetrun
    elif arm == "export-module":
        module = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        export(module, profile, Path(work) / "bundle", progress=False, force=True)
    else:  # export-directory
        export(path, profile, Path(work) / "bundle", progress=False, force=True)
    seconds = time.perf_counter() - t0
    if model is not None:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))  # it runs
    out = {"seconds": seconds, "peak_rss_bytes": status_bytes("VmHWM:"), "baseline_rss_bytes": baseline, "note": note,
           "backend": backend}
    if runtime is not None:
        out["memory"] = runtime.memory.report(runtime.plan)
    ckpt = getattr(model, "hetrun_checkpoint", None)
    if ckpt is not None:
        out.update(bytes_read=ckpt.shards.bytes_read, read_s=ckpt.shards.read_s)
    if arm.startswith("export"):
        shutil.rmtree(Path(work) / "bundle", ignore_errors=True)
    return out


BENCHMARKS = {
    "load": Benchmark(
        "checkpoint files to devices: peak memory and load time of deploy / export from a directory, against "
        "from_pretrained and hetrun's earlier deploy, and read throughput against dd",
        _arguments, _main,
        "  hetrun bench load\n  hetrun bench load --shape small --json\n"
        "  hetrun bench load --arms directory,directory-int4 --dir /mnt/scratch"),
}


if __name__ == "__main__":  # a child of run_bench: one measured arm, its result as the last JSON line
    try:
        if sys.argv[1] == "generate":
            result = _generate(sys.argv[2], sys.argv[3])
        else:
            result = _arm(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7])
    except HetrunError as e:
        result = {"error": str(e)}
    print(json.dumps(result))
