"""`hetrun demo`: the main job on built-in defaults -- deploy a tiny DeepSeek-style model on mixed hardware and check it."""

from __future__ import annotations

import argparse
import copy

import hetrun
from hetrun.cli import Command, whole_number
from hetrun.files import print_json


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="mixed-demo", help="built-in profile name or YAML path (default: mixed-demo)")
    p.add_argument("--precision", default=None,
                   help="force one precision on every device (e.g. fp32); default: each device's own")
    p.add_argument("--tokens", type=whole_number(1, 4096), default=12, help="tokens to generate (default 12)")
    p.add_argument("--json", action="store_true", help="machine-readable result")


def _run(args: argparse.Namespace) -> int:
    import torch  # heavy: torch loads only when this command runs

    from hetrun.tiny_models import markov_tokens, trained_tiny_model  # imports torch: only when this command runs

    if args.tokens < 1:
        raise hetrun.HetrunError("--tokens must be at least 1")
    # A random model's logits are near ties, which any precision flips; a briefly trained one behaves like a real model.
    reference = trained_tiny_model("deepseek_v3")
    prompt = markov_tokens(reference.config.vocab_size, 1, 8, seed=7)  # [1, 8] from the language it learned
    model = hetrun.deploy(copy.deepcopy(reference), args.profile, precision=args.precision)
    runtime = model.hetrun
    runtime.stats.reset()
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    with torch.no_grad():
        want = reference.generate(prompt, **gen)[0, prompt.shape[1]:]
        got = model.generate(prompt, **gen)[0, prompt.shape[1]:]
        # Teacher-forced: both models read the same tokens; compare their next-token choices position by position.
        seq = torch.cat([prompt[0], want])[None]
        ref_logits, het_logits = reference(seq).logits[0], model(seq).logits[0]
    agree = (ref_logits.argmax(-1) == het_logits.argmax(-1)).float().mean().item()
    max_diff = (ref_logits - het_logits).abs().max().item() / ref_logits.abs().max().item()
    plan, stats = runtime.plan, runtime.stats
    devices = []
    for i, dev in enumerate(runtime.devices):
        experts = {f"L{w.layer}": sorted({int(e) for e in layer.phy2log[layer.device_of == i]})
                   for layer, w in zip(runtime.layers, (lay.weights for lay in runtime.layers))}
        shared = sum(d == i for layer in runtime.layers for d in layer.shared_devices)
        devices.append({"device": dev.id, "type": dev.type.name, "backend": runtime.backends[i].caps.name,
                        "precision": plan.precision[dev.id], "experts": experts, "shared_experts": int(shared),
                        "tokens": int(stats.tokens_per_device[i]), "modeled_ms": stats.modeled_s_per_device[i] * 1e3,
                        "measured_ms": stats.wall_s_per_device[i] * 1e3})
    result = {"model": "tiny DeepSeek-V3-style model, briefly trained on a synthetic language", "profile": runtime.profile.name,
              "generated_tokens_match": bool(torch.equal(want, got)), "reference_tokens": want.tolist(),
              "hetrun_tokens": got.tolist(), "top1_agreement": agree, "max_logit_diff_rel": max_diff,
              "devices": devices}
    if args.json:
        print_json(result)
        return 0
    _print(result)
    return 0


def _print(r: dict) -> None:
    from rich import box  # display: loaded when a table is printed
    from rich.console import Console  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    # Fits 80 columns (a pipe, a CI log): device over SKU, backend over precision, one line per layer.
    c = Console()
    c.print(f"[bold]hetrun demo[/]: {r['model']}, deployed on profile '{r['profile']}'")
    t = Table(title="where each expert ran", box=box.SIMPLE_HEAD)
    t.add_column("device\n[dim]SKU[/]", no_wrap=True)
    t.add_column("backend\nprecision", no_wrap=True)
    t.add_column("experts per layer", overflow="fold", min_width=14)
    for col in ("tokens", "modeled\nms", "host\nms"):
        t.add_column(col, justify="right", no_wrap=True)
    for d in r["devices"]:
        lines = [f"{k}: {' '.join(map(str, v)) or '-'}" for k, v in d["experts"].items()]
        if d["shared_experts"]:
            lines.append(f"shared: {d['shared_experts']}")
        t.add_row(f"{d['device']}\n[dim]{d['type']}[/]", f"{d['backend']}\n{d['precision']}", "\n".join(lines),
                  str(d["tokens"]), f"{d['modeled_ms']:.3f}", f"{d['measured_ms']:.1f}")
    c.print(t)
    match = "[green]identical[/]" if r["generated_tokens_match"] else "[yellow]different[/]"
    c.print(f"untouched model: {r['reference_tokens']}")
    c.print(f"hetrun:          {r['hetrun_tokens']}")
    c.print(f"generated tokens: {match}; top-1 agreement {r['top1_agreement'] * 100:.1f}% of positions; "
            f"max logit difference {r['max_logit_diff_rel'] * 100:.3f}% of the logits' scale")


COMMANDS = {
    "demo": Command("deploy the built-in tiny DeepSeek-style model on mixed hardware (simulated), generate, and check it "
                    "against the untouched model", _add, _run,
                    "  hetrun demo\n  hetrun demo --precision fp32\n  hetrun demo --profile cpu --json"),
}
