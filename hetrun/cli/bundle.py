"""`hetrun export`, `hetrun run` and `hetrun inspect`: deployment bundles from the command line."""

from __future__ import annotations

import argparse
import math
import sys
import time

import hetrun.bundle  # names load lazily: export and run bring in torch only when they run
from hetrun.cli import Command
from hetrun.errors import BundleError, HetrunError
from hetrun.files import print_json
from hetrun.formats import PRECISIONS as PRECISION_CHOICES

MAX_NEW_TOKENS = 4096
MAX_FILES_SHOWN = 60  # `hetrun inspect` lists every file of smaller bundles, only the failing ones of larger


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def _token_count(text: str) -> int:
    n = _non_negative(text)
    if n > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"{n} is more than {MAX_NEW_TOKENS}")
    return n


def _threads(text: str) -> int:
    n = _non_negative(text)
    if n < 1:
        raise argparse.ArgumentTypeError("needs at least 1 thread")
    return n


def _prompt_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give comma-separated token ids, e.g. 1,2,3")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a comma-separated list of token ids, e.g. 1,2,3") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("token ids cannot be negative")
    return ids


# ---- export -------------------------------------------------------------------------------------------

def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a preset with random weights (tiny, tiny-mixtral, mixtral-bench) or a local transformers "
                        "model directory (config.json + *.safetensors)")
    p.add_argument("--profile", required=True, help="built-in profile name or YAML path the plan is made for")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="one precision for every device (default: each device's best)")
    p.add_argument("--load", metavar="FILE", default=None,
                   help="[layers, experts] token counts per expert (.npy or .json) for load-aware placement")
    p.add_argument("--redundant", type=_non_negative, default=0, metavar="N", help="extra replica slots per layer")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of a preset's random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a summary of the bundle as JSON")


def _export(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    man = hetrun.bundle.export(args.model, args.profile, args.output, precision=args.precision, load=args.load,
                               redundant_experts=args.redundant, force=args.force, progress=not args.no_progress,
                               seed=args.seed)
    seconds = time.perf_counter() - t0
    size = sum(f.size for f in man.files.values())
    graphs: dict[str, int] = {}
    for precision in {e.path: e.precision for e in man.experts}.values():
        graphs[precision] = graphs.get(precision, 0) + 1
    if args.json:
        print_json({"bundle": args.output, "model": man.model.model_dump(), "profile": man.plan["profile"],
                    "precision": man.precision, "graphs": graphs, "files": len(man.files) + 1, "size_bytes": size,
                    "seconds": seconds})
        return 0
    print(f"wrote bundle {args.output}: {sum(graphs.values())} expert graphs "
          f"({', '.join(f'{n} {p}' for p, n in sorted(graphs.items()))}), {len(man.files) + 1} files, "
          f"{size / 1e6:.2f} MB in {seconds:.1f} s")
    print(f"next: hetrun inspect {args.output}   |   hetrun run {args.output} --prompt-ids 1,2,3")
    return 0


# ---- run ----------------------------------------------------------------------------------------------

def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `hetrun export`")
    p.add_argument("--prompt-ids", type=_prompt_ids, required=True, metavar="IDS",
                   help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=_token_count, default=8, metavar="N",
                   help="tokens to generate greedily (default 8; 0 runs the prompt only)")
    p.add_argument("--profile", default=None,
                   help="run on another profile (default: the bundle's own); every device of the plan must be in it")
    p.add_argument("--threads", type=_threads, default=None, help="threads per expert session")
    p.add_argument("--logits", action="store_true", help="with --json: include the logits at the prompt's last position")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run(args: argparse.Namespace) -> int:
    model = hetrun.bundle.load(args.bundle, profile=args.profile, threads=args.threads)
    vocab = model.config.vocab_size
    bad = [i for i in args.prompt_ids if i >= vocab]
    if bad:
        raise HetrunError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab} tokens (0..{vocab - 1})")
    t0 = time.perf_counter()
    out = hetrun.bundle.greedy(model, args.prompt_ids, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in out["last_logits"]):
        raise HetrunError("the model produced NaN or infinite logits on this prompt (a precision too narrow for its "
                          "activations?); export with --precision bf16 or fp32 and compare with `hetrun accuracy`")
    runtime = model.hetrun
    stats = runtime.stats.to_dict(runtime.plan.device_ids)
    if args.json:
        doc = {"bundle": args.bundle, "model": model.hetrun_manifest.model.name, "profile": runtime.profile.name,
               "prompt_ids": args.prompt_ids, "new_ids": out["new_ids"], "seconds": seconds,
               "devices": stats["devices"], "tokens_per_expert": stats["tokens_per_expert"]}
        if args.logits:
            doc["last_logits"] = out["last_logits"]
        print_json(doc)
        return 0
    from rich.console import Console  # heavy: only for the table of a run without --json
    from rich.table import Table  # display: loaded when a table is printed

    print(f"prompt:    {' '.join(map(str, args.prompt_ids))}")
    print(f"generated: {' '.join(map(str, out['new_ids']))}")
    t = Table(title=f"where the experts ran (profile '{runtime.profile.name}', {seconds:.2f} s)")
    for col in ("device", "precision", "tokens", "modeled ms", "wall ms"):
        t.add_column(col)
    for did, row in stats["devices"].items():
        t.add_row(did, runtime.plan.precision[did], str(row["tokens"]), f"{row['modeled_s'] * 1e3:.3f}",
                  f"{row['wall_s'] * 1e3:.1f}")
    Console().print(t)
    return 0


# ---- inspect ------------------------------------------------------------------------------------------

def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `hetrun export`")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _inspect(args: argparse.Namespace) -> int:
    info = hetrun.bundle.inspect_bundle(args.bundle)
    if args.json:
        print_json(info)
    else:
        _print_inspect(info)
    bad = [f for f in info["files"] if f["status"] != "ok"]
    if bad:
        more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BundleError(f"bundle '{info['bundle']}' failed {len(bad)} check{'s' if len(bad) > 1 else ''}: "
                          f"{bad[0]['message']}{more}")
    return 0


def _print_inspect(info: dict) -> None:
    from rich.console import Console  # heavy: only for the tables of an inspect without --json
    from rich.markup import escape  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    c = Console()
    m = info["model"]
    c.print(f"bundle [bold]{escape(info['bundle'])}[/] (format {info['format_version']}, hetrun "
            f"{escape(info['hetrun_version'])}, {escape(info['created_utc'])})")
    c.print(f"model {escape(m['name'])} ({m['source']}, {m['family']}, {m['dtype']}): {m['layers']} layers, "
            f"{m['moe_layers']} MoE, hidden {m['hidden_size']}, {m['experts']} experts top-{m['top_k']}, "
            f"{m['shared_experts']} shared; plan for profile '{escape(info['profile'])}'")
    d = Table(title="devices")
    for col in ("device", "type", "backend", "precision", "graph target", "routed slots", "shared experts"):
        d.add_column(col)
    for row in info["devices"]:
        d.add_row(escape(row["id"]), escape(row["type"]), escape(row["backend"]), row["precision"],
                  escape(row["graph_target"]),
                  str(row["routed_slots"]), str(row["shared_experts"]))
    c.print(d)
    g = ", ".join(f"{v['count']} {p} ({v['bytes'] / 1e6:.2f} MB)" for p, v in info["graphs"].items())
    c.print(f"expert graphs: {g}; bundle size {info['size_bytes'] / 1e6:.2f} MB")
    shown = info["files"] if len(info["files"]) <= MAX_FILES_SHOWN else [r for r in info["files"] if r["status"] != "ok"]
    hidden = len(info["files"]) - len(shown)
    f = Table(title="files" + (f" ({hidden} more pass every check; --json lists all)" if hidden else ""))
    for col in ("file", "bytes", "check"):
        f.add_column(col)
    for row in shown:
        status = "[green]ok[/]" if row["status"] == "ok" else f"[red]{row['status']}[/]: {escape(row['message'])}"
        f.add_row(escape(row["path"]), str(row["size"]), status)
    c.print(f)
    ok = info["ok"]
    c.print("[green]all checks pass[/]" if ok else "[red]checks failed[/]")
    sys.stdout.flush()


COMMANDS = {
    "export": Command(
        "write a deployment bundle: one ONNX graph per expert and precision, dense weights, plan, profile, checksums",
        _export_args, _export,
        "  hetrun export tiny --profile mixed-demo -o bundle/\n"
        "  hetrun export ./my-mixtral --profile cpu -o bundle/ --precision fp32\n"
        "  hetrun export tiny --profile my.yaml -o bundle/ --load load.json --redundant 4 --force"),
    "run": Command(
        "verify a bundle, load it and generate greedily from prompt token ids",
        _run_args, _run,
        "  hetrun run bundle/ --prompt-ids 1,2,3\n"
        "  hetrun run bundle/ --prompt-ids 1,2,3 --max-new-tokens 20 --json\n"
        "  hetrun run bundle/ --prompt-ids 5,6 --profile other.yaml   # only if every device of the plan maps"),
    "inspect": Command(
        "show what a bundle holds and check every file (exit 2 when a check fails)",
        _inspect_args, _inspect,
        "  hetrun inspect bundle/\n"
        "  hetrun inspect bundle/ --json\n"
        "  hetrun inspect bundle/ && scp -r bundle/ server:   # ship only verified bundles"),
}
