"""`hetrun export`, `run`, `inspect`, `keygen` and `sign`: deployment bundles from the command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import hetrun.bundle  # names load lazily: export and run bring in torch only when they run
from hetrun.cli import Command, threads_arg, whole_number
from hetrun.errors import BundleError, HetrunError
from hetrun.files import print_json
from hetrun.formats import PRECISIONS as PRECISION_CHOICES
from hetrun.spec import MAX_EXPERTS

MAX_NEW_TOKENS = 4096
MAX_FILES_SHOWN = 60  # `hetrun inspect` lists every file of smaller bundles, only the failing ones of larger
TRUST_ENV = "HETRUN_TRUST"  # default --trust: public key files, separated by os.pathsep
TRUST_HELP = ("require a valid signature by this Ed25519 public key (KEY.pub from `hetrun keygen`; repeat for several "
              f"signers; default: ${TRUST_ENV}, key files separated by '{os.pathsep}'); an unsigned or badly signed "
              "bundle is refused before anything in it is read")


_token_count = whole_number(0, MAX_NEW_TOKENS)


def _trust(args: argparse.Namespace) -> list[str] | None:
    """The trusted public key files of --trust, else of $HETRUN_TRUST, else None (no signature required)."""
    if args.trust:
        return args.trust
    env = [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p.strip()]
    return env or None


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
                   help="[layers, experts] token counts per expert (.npy, .csv or .json) for load-aware placement")
    p.add_argument("--redundant", type=whole_number(0, MAX_EXPERTS), default=0, metavar="N",
                   help="extra replica slots per layer")
    p.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0,
                   help="seed of a preset's random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at DIR (atomically)")
    p.add_argument("--sign", metavar="KEY", default=None,
                   help="sign the manifest with this Ed25519 private key (`hetrun keygen -o KEY`; encrypted keys read "
                        "$HETRUN_KEY_PASSPHRASE): `hetrun run --trust KEY.pub` then refuses any bundle but yours")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--graph", action="store_true",
                   help="write a graph bundle instead: the whole model as one onnxruntime graph that `hetrun run` "
                        "runs without torch (the profile must put every expert and the dense part on one "
                        "onnxruntime CPU device; hetrun.bundle.graph_runner)")
    p.add_argument("--json", action="store_true", help="print a summary of the bundle as JSON")


def _export(args: argparse.Namespace) -> int:
    if args.graph:
        return _export_graph(args)
    t0 = time.perf_counter()
    man = hetrun.bundle.export(args.model, args.profile, args.output, precision=args.precision, load=args.load,
                               redundant_experts=args.redundant, force=args.force, progress=not args.no_progress,
                               seed=args.seed, sign=args.sign)
    seconds = time.perf_counter() - t0
    size = sum(f.size for f in man.files.values())
    graphs: dict[str, int] = {}
    for precision in {e.path: e.precision for e in man.experts}.values():
        graphs[precision] = graphs.get(precision, 0) + 1
    if args.json:
        print_json({"bundle": args.output, "model": man.model.model_dump(), "profile": man.plan["profile"],
                    "precision": man.precision, "graphs": graphs, "files": len(man.files) + 1, "size_bytes": size,
                    "signed": args.sign is not None, "seconds": seconds})
        return 0
    print(f"wrote bundle {args.output}: {sum(graphs.values())} expert graphs "
          f"({', '.join(f'{n} {p}' for p, n in sorted(graphs.items()))}), {len(man.files) + 1} files, "
          f"{size / 1e6:.2f} MB in {seconds:.1f} s")
    if args.sign:
        print(f"signed with {args.sign}; check it with `hetrun run {args.output} --trust {args.sign}.pub ...`")
    print(f"next: hetrun inspect {args.output}   |   hetrun run {args.output} --prompt-ids 1,2,3")
    return 0


def _export_graph(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--load", args.load), ("--redundant", args.redundant)) if value]
    if given:
        raise HetrunError(f"{given[0]} applies to bundles, not to graph bundles (--graph): leave one of them out")
    from hetrun.bundle.graph_export import export_graph  # heavy: torch, transformers and the runtime

    t0 = time.perf_counter()
    man = export_graph(args.model, args.profile, args.output, precision=args.precision, force=args.force,
                       seed=args.seed, sign=args.sign)
    seconds = time.perf_counter() - t0
    size = sum(f.size for f in man.files.values())
    if args.json:
        print_json({"bundle": args.output, "graph": True, "model": man.model, "profile": man.profile,
                    "precision": man.precision, "dense_precision": man.dense_precision, "files": len(man.files) + 1,
                    "size_bytes": size, "signed": args.sign is not None, "seconds": seconds})
        return 0
    print(f"wrote graph bundle {args.output}: {man.precision} experts, {man.dense_precision} dense linear layers, "
          f"{len(man.files) + 1} files, {size / 1e6:.2f} MB in {seconds:.1f} s")
    if args.sign:
        print(f"signed with {args.sign}; check it with `hetrun run {args.output} --trust {args.sign}.pub ...`")
    print(f"next: hetrun run {args.output} --prompt-ids 1,2,3")
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
    p.add_argument("--threads", type=threads_arg, default=None, help="threads per expert session")
    p.add_argument("--trust", action="append", metavar="KEY.pub", default=None, help=TRUST_HELP)
    p.add_argument("--logits", action="store_true", help="with --json: include the logits at the prompt's last position")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run(args: argparse.Namespace) -> int:
    from hetrun.bundle.graph_runner import is_graph_bundle  # light: no torch

    if is_graph_bundle(args.bundle):
        return _run_graph(args)
    model = hetrun.bundle.load(args.bundle, profile=args.profile, threads=args.threads, trust=_trust(args))
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
    if out["nonfinite_step"] is not None:
        raise HetrunError(f"the model produced NaN or infinite logits at generated token {out['nonfinite_step'] + 1}, "
                          "so the tokens from there on are meaningless; export with --precision bf16 or fp32 and "
                          "compare with `hetrun accuracy`")
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


def _run_graph(args: argparse.Namespace) -> int:
    # a graph bundle, run without torch (hetrun.bundle.graph_runner)
    from hetrun.bundle.graph_runner import GraphModel

    if args.profile:
        raise HetrunError(f"'{args.bundle}' is a graph bundle, which runs on this CPU's onnxruntime alone: leave out "
                          "--profile")
    model = GraphModel(args.bundle, args.threads, trust=_trust(args))
    t0 = time.perf_counter()
    new_ids, last = model.run(args.prompt_ids, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    if args.json:
        doc = {"bundle": args.bundle, "graph": True, "model": model.manifest.model, "prompt_ids": args.prompt_ids,
               "new_ids": new_ids, "seconds": seconds}
        if args.logits:
            doc["last_logits"] = last.tolist()
        print_json(doc)
        return 0
    print(f"prompt:    {' '.join(map(str, args.prompt_ids))}")
    print(f"generated: {' '.join(map(str, new_ids))}")
    print(f"one onnxruntime graph ({model.manifest.precision} experts, {model.manifest.dense_precision} dense linear "
          f"layers), {seconds:.2f} s")
    return 0


# ---- inspect ------------------------------------------------------------------------------------------

def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `hetrun export`")
    p.add_argument("--trust", action="append", metavar="KEY.pub", default=None, help=TRUST_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _inspect(args: argparse.Namespace) -> int:
    from hetrun.bundle.graph_runner import is_graph_bundle  # light: no torch

    if is_graph_bundle(args.bundle):
        return _inspect_graph(args)
    info = hetrun.bundle.inspect_bundle(args.bundle, trust=_trust(args))
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


def _inspect_graph(args: argparse.Namespace) -> int:
    # a graph bundle: its manifest and every file checked (the first failure is the one-line error)
    from hetrun.bundle.graph_runner import check_graph_bundle

    trust = _trust(args)
    man = check_graph_bundle(args.bundle, trust)[0]
    signed = (Path(args.bundle) / hetrun.bundle.SIGNATURE).exists()
    signature = "signed by a trusted key" if trust else "signed, not verified: pass --trust with the signer's " \
        "public key to check it" if signed else "unsigned: trust it only as far as you trust where it came from"
    size = sum(f.size for f in man.files.values())
    if args.json:
        print_json({"bundle": args.bundle, "graph": True, **man.model_dump(mode="json"), "size_bytes": size,
                    "signature": signature, "ok": True})
        return 0
    sh = man.shape
    print(f"graph bundle {args.bundle} (format {man.format_version}, hetrun {man.hetrun_version}, {man.created_utc})")
    print(f"model {man.model}, exported for profile '{man.profile}': {sh.layers} layers, hidden {sh.hidden}, "
          f"{sh.heads} heads ({sh.kv_heads} KV), {sh.experts} experts top-{sh.top_k}, vocabulary {sh.vocab}, "
          f"{man.positions} positions")
    print(f"{man.precision} experts, {man.dense_precision} dense linear layers; {len(man.files) + 1} files, "
          f"{size / 1e6:.2f} MB; every file matches the manifest")
    print(f"signature: {signature}")
    print("all checks pass")
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
    shown = shown[:MAX_FILES_SHOWN]
    hidden = len(info["files"]) - len(shown)
    f = Table(title="files" + (f" ({hidden} more not shown; --json lists all)" if hidden else ""))
    for col in ("file", "bytes", "check"):
        f.add_column(col)
    for row in shown:
        status = "[green]ok[/]" if row["status"] == "ok" else f"[red]{row['status']}[/]: {escape(row['message'])}"
        f.add_row(escape(row["path"]), str(row["size"]), status)
    c.print(f)
    sig = info["signature"]
    who = f" by key {escape(sig['key'])}" if sig.get("key") else ""
    c.print(f"signature{who}: {escape(sig['detail'])}")
    ok = info["ok"]
    c.print("[green]all checks pass[/]" if ok else "[red]checks failed[/]")
    sys.stdout.flush()


# ---- keygen and sign --------------------------------------------------------------------------------------

def _keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="KEY",
                   help="private key file to write (mode 0600); the public key goes to KEY.pub. Neither may exist. "
                        "Set $HETRUN_KEY_PASSPHRASE to encrypt the private key")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _keygen(args: argparse.Namespace) -> int:
    private, public, fp = hetrun.bundle.generate_key_pair(args.output)
    if args.json:
        print_json({"private_key": str(private), "public_key": str(public), "fingerprint": fp})
        return 0
    print(f"wrote private key {private} (keep it secret) and public key {public}, fingerprint {fp}")
    print(f"next: hetrun export MODEL --profile P -o bundle/ --sign {private}   |   "
          f"hetrun run bundle/ --trust {public} --prompt-ids 1,2,3")
    return 0


def _sign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory to sign (checked completely first)")
    p.add_argument("--key", required=True, metavar="KEY", help="Ed25519 private key file (`hetrun keygen -o KEY`)")


def _sign(args: argparse.Namespace) -> int:
    from hetrun.bundle.graph_runner import is_graph_bundle, sign_graph_bundle  # light: no torch

    sign = sign_graph_bundle if is_graph_bundle(args.bundle) else hetrun.bundle.sign_bundle
    fp = sign(args.bundle, args.key)
    print(f"signed bundle {args.bundle} with key {fp} ({hetrun.bundle.SIGNATURE})")
    return 0


INSPECT_HELP = (
    "show what a bundle holds and check every file (exit 2 when a check fails). Without --trust the checks prove the "
    "bundle is intact and well-formed (every file has the sha256 its manifest lists, no path leaves the bundle, no "
    "symlink, no extra file, no custom operator): they do not prove who made it, since anyone who edits a bundle "
    "can recompute its checksums. With --trust KEY.pub they also prove that the holder of KEY signed this exact "
    "manifest, hence every file. Neither proves that the weights are good: run bundles only from sources you trust")

COMMANDS = {
    "export": Command(
        "write a deployment bundle: one ONNX graph per expert and precision, dense weights, plan, profile, checksums",
        _export_args, _export,
        "  hetrun export tiny --profile mixed-demo -o bundle/\n"
        "  hetrun export ./my-mixtral --profile cpu -o bundle/ --precision fp32\n"
        "  hetrun export tiny --profile my.yaml -o bundle/ --load load.json --redundant 4 --force\n"
        "  hetrun export tiny --profile mixed-demo -o bundle/ --sign ~/.hetrun/key"),
    "run": Command(
        "verify a bundle, load it and generate greedily from prompt token ids",
        _run_args, _run,
        "  hetrun run bundle/ --prompt-ids 1,2,3\n"
        "  hetrun run bundle/ --prompt-ids 1,2,3 --max-new-tokens 20 --json\n"
        "  hetrun run bundle/ --prompt-ids 5,6 --profile other.yaml   # only if every device of the plan maps\n"
        "  hetrun run bundle/ --prompt-ids 1,2,3 --trust alice.pub   # refuses a bundle Alice did not sign"),
    "inspect": Command(
        INSPECT_HELP, _inspect_args, _inspect,
        "  hetrun inspect bundle/\n"
        "  hetrun inspect bundle/ --json\n"
        "  hetrun inspect bundle/ --trust alice.pub   # intact AND signed by Alice's key"),
    "keygen": Command(
        "make an Ed25519 key pair for signing bundles (or: openssl genpkey -algorithm ed25519 -out KEY && "
        "openssl pkey -in KEY -pubout -out KEY.pub)",
        _keygen_args, _keygen,
        "  hetrun keygen -o ~/.hetrun/key          # writes key (0600) and key.pub\n"
        "  HETRUN_KEY_PASSPHRASE=... hetrun keygen -o team.key   # encrypted private key"),
    "sign": Command(
        "check a bundle completely, then sign its manifest with an Ed25519 private key (writes manifest.sig)",
        _sign_args, _sign,
        "  hetrun sign bundle/ --key ~/.hetrun/key\n"
        "  hetrun inspect bundle/ --trust ~/.hetrun/key.pub"),
}
