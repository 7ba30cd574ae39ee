"""`hetrun plan`: place a model's experts on a profile's devices and show what each device gets."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from hetrun.cli import Command, whole_number
from hetrun.errors import HetrunError
from hetrun.files import print_json, table_console, write_atomic
from hetrun.placement.device_model import scale_load
from hetrun.placement.loads import model_load
from hetrun.placement.pins import describe, pin_rules
from hetrun.placement.planner import eplb_baseline, plan
from hetrun.profile import load_profile
from hetrun.spec import MAX_EXPERTS


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deepseek-r1",
                   help="model preset (deepseek-r1, qwen3-30b-a3b, mixtral-8x7b, tiny, ...) or a transformers model "
                        "directory / config.json (default deepseek-r1)")
    p.add_argument("--profile", default="mixed-h100-910b-xeon", help="profile name or YAML path "
                                                                     "(default mixed-h100-910b-xeon)")
    p.add_argument("--load", metavar="FILE", help="[MoE layers, experts] token counts (.npy, .csv with a row per "
                                                  "layer, or .json: a list of rows or an object with tokens_per_expert); "
                                                  "default uniform")
    p.add_argument("--redundant", type=whole_number(-MAX_EXPERTS, MAX_EXPERTS), default=0, metavar="N",
                   help="extra expert slots per MoE layer for replicas of hot experts (default 0)")
    p.add_argument("--pin", action="append", default=[], metavar="RULE",
                   help="pin experts to devices, before the profile's pins: device=GROUP[,layers=0-2][,experts=0,4-7]"
                        "[,below=P][,above=P] (load percentiles); repeatable")
    p.add_argument("--precision", help="one precision for every device (an error where a device lacks it); "
                                       "default each device's best")
    p.add_argument("--policy", choices=("auto", "eplb"), default="auto",
                   help="auto: hetrun's heterogeneous solver; eplb: DeepSeek's EPLB (equal slots per device)")
    p.add_argument("--shared-experts", choices=("dense", "balanced"), default=None,
                   help="where shared experts go: dense = the profile's dense device (default), balanced = the "
                        "device that finishes them soonest, layer by layer")
    p.add_argument("--step-tokens", type=whole_number(1, 2**24), default=None, metavar="T",
                   help="tokens per step for predicted times (default: the profile's, else 4096)")
    p.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json; "
                                                                "'-' writes none)")
    p.add_argument("--heatmap", metavar="PNG", help="draw tokens per device and MoE layer, and per expert, to a PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def _run(args: argparse.Namespace) -> int:
    for target in (args.output if args.output != "-" else None, args.heatmap):
        folder = Path(target).parent if target else None
        if folder is not None and str(folder) and not folder.is_dir():
            raise HetrunError(f"cannot write '{target}': folder '{folder}' does not exist")
    from hetrun.checkpoint.config import model_spec  # imports transformers: only when this command runs

    spec = model_spec(args.model)
    profile = load_profile(args.profile)
    load = model_load(args.load, spec)
    result = plan(spec, profile, load=load, redundant_experts=args.redundant, pins=args.pin or None,
                  precision=args.precision, policy=args.policy, shared_experts=args.shared_experts,
                  step_tokens=args.step_tokens)
    eplb = eplb_baseline(result, load) if args.policy == "auto" else None
    if args.output != "-":
        write_atomic(args.output, result.to_json())
    if args.heatmap:
        write_atomic(args.heatmap, heatmap_png(result, load))
    summary = _summary(result, eplb, args)
    if args.json:
        print_json(summary)
        return 0
    _print(summary, np)
    return 0


def _summary(result, eplb, args) -> dict:
    pr = result.predicted
    return {"model": result.spec.name, "profile": result.profile_name, "moe_layers": result.num_layers,
            "experts": result.spec.num_experts, "slots_per_layer": result.num_slots, "policy": pr["policy"],
            "placed_by": pr["placed_by"], "load": pr["load"], "step_tokens": pr["step_tokens"],
            "step_time_s": pr["step_time_s"], "lower_bound_s": pr["lower_bound_s"],
            "routed_step_time_s": pr["routed_step_time_s"], "shared_experts": pr["shared_experts"],
            "pins": pr["pins"], "eplb": eplb, "devices": pr["devices"],
            "plan": None if args.output == "-" else str(args.output), "heatmap": args.heatmap}


def _print(s: dict, np) -> None:
    from rich.markup import escape  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    console = table_console(150)
    t = Table(title=f"'{s['model']}' on '{s['profile']}': {s['slots_per_layer']} slots for {s['experts']} experts "
                    f"in each of {s['moe_layers']} MoE layers ({s['load']} load, {s['step_tokens']} tokens a step)")
    for col, just in (("device", "left"), ("precision", "left"), ("node", "right"), ("slots/layer", "right"),
                      ("experts", "right"), ("replicas", "right"), ("shared", "right"), ("tokens", "right"),
                      ("memory used GB", "right"), ("free GB", "right"), ("time ms", "right"), ("busy", "right")):
        t.add_column(col, justify=just)
    total = sum(d["tokens"] for d in s["devices"].values()) or 1.0
    for dev_id, d in s["devices"].items():
        t.add_row(escape(dev_id), d["precision"], str(d["node"]), f"{d['slots_per_layer']:g}", str(d["experts"]),
                  str(d["replica_slots"]), str(d["shared_experts"]), f"{100 * d['tokens'] / total:.1f}%",
                  f"{d['memory_used_bytes'] / 1e9:.1f}", f"{d['memory_free_bytes'] / 1e9:.1f}",
                  f"{d['time_s'] * 1e3:.3f}", f"{100 * d['busy']:.0f}%")
    console.print(t)
    step, bound = s["step_time_s"], s["lower_bound_s"]
    gap = f" (+{100 * (step / bound - 1):.2f}%)" if bound > 0 else ""
    print(f"modeled step: {step * 1e3:.3f} ms over the MoE layers; lower bound {bound * 1e3:.3f} ms{gap}; "
          f"placed by {s['placed_by']}")
    if s["eplb"]:
        e = s["eplb"]
        gain = 100 * (1 - step / e["step_time_s"])
        extra = e["slots"] - s["slots_per_layer"]  # EPLB's equal slots round the plan's up: replicas this plan lacks
        why = f" (EPLB's {extra} extra slots hold replicas; --redundant {extra} gives this plan as many)" \
            if extra > 0 and gain < 0 else ""
        print(f"EPLB on the same devices ({e['slots']} equal slots, even split, same cost model): "
              f"{e['step_time_s'] * 1e3:.3f} ms; this plan is "
              f"{f'{gain:.1f}% faster' if gain >= 0 else f'{-gain:.1f}% slower'}{why}")
    if s["pins"]:
        print("pins: " + "; ".join(describe(r) for r in pin_rules(s["pins"])))
    for k in ("plan", "heatmap"):
        if s[k]:
            print(f"wrote {k}: {s[k]}")


def heatmap_png(result, load=None) -> bytes:
    """PNG of where the routed tokens go: per MoE layer and device, and per expert and device (all layers)."""
    import matplotlib  # heavy: only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when a chart is drawn

    spec = result.spec
    L, E, D = result.num_layers, spec.num_experts, len(result.device_ids)
    w = scale_load(load, spec, 1)  # [L, E] fractions x top_k
    rows = np.arange(L)[:, None]
    tok = w[rows, result.phy2log] * result.share  # [L, R]
    by_layer = np.zeros((L, D))
    np.add.at(by_layer, (np.broadcast_to(rows, tok.shape), result.device_of), tok)
    by_expert = np.zeros((E, D))
    np.add.at(by_expert, (result.phy2log.ravel(), result.device_of.ravel()), tok.ravel())
    by_layer /= by_layer.sum(1, keepdims=True)
    by_expert /= np.maximum(by_expert.sum(1, keepdims=True), 1e-300)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.28 * D * 2 + 4), max(4.5, min(12.0, 0.035 * E + 3))),
                             gridspec_kw={"width_ratios": [1, 1]})
    for ax, data, title, ylabel in ((axes[0], by_layer, "share of each MoE layer's routed tokens", "MoE layer"),
                                    (axes[1], by_expert, "where each expert's tokens go (all layers)", "expert")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        step = max(1, D // 24)
        ax.set_xticks(range(0, D, step))
        ax.set_xticklabels(result.device_ids[::step], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"'{spec.name}' on '{result.profile_name}': {result.num_slots} slots per layer, "
                 f"{result.predicted.get('load', '?')} load", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


COMMANDS = {
    "plan": Command("place a model's experts on a profile's devices by load, speed, memory and precision", _add, _run,
                    "  hetrun plan --model deepseek-r1 --profile mixed-h100-910b-xeon --redundant 32\n"
                    "  hetrun plan --profile deepseek-decode-h800 --redundant 32 --load load.npy -o plan.json "
                    "--heatmap plan.png\n"
                    "  hetrun plan --redundant 32 --load load.npy --pin device=xeon,below=25 "
                    "--pin device=h100,layers=0-2\n"
                    "  hetrun plan --profile deepseek-prefill-h800 --redundant 32 --policy eplb --json"),
}
