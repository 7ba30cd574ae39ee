"""`hetrun accuracy`: what each device's precision costs in accuracy, against the same model in FP32.

For a tiny transformers model deployed on a profile (by default briefly trained on a synthetic Markov-chain
language so that its logit margins resemble a real model's; `--weights random` keeps the random init), per device: its precision, the bytes its expert
weights take, each of its experts' output relative error against the FP32 expert (on the hidden states the
model really feeds that layer), and the end-to-end figures had every expert run at that precision. For the
deployment as planned: the relative error of the logits and top-1 token agreement with FP32 over a fixed set of
prompt positions (teacher-forced: both models read the same tokens).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import numpy as np

import hetrun
from hetrun.cli import Command, threads_arg, whole_number
from hetrun.errors import HetrunError
from hetrun.files import print_json, table_console
from hetrun.placement.plan import device_weight_bytes
from hetrun.profile import load_profile

# --model names: the tiny presets of hetrun.tiny_models ("tiny" is the DeepSeek-V3-style preset).
MODELS = {"tiny": "deepseek_v3", "tiny-mixtral": "mixtral", "tiny-qwen2-moe": "qwen2_moe",
          "tiny-qwen3-moe": "qwen3_moe", "tiny-qwen3-next": "qwen3_next", "tiny-olmoe": "olmoe",
          "tiny-deepseek-v2": "deepseek_v2", "tiny-glm4-moe": "glm4_moe", "tiny-dots1": "dots1",
          "tiny-minimax-m2": "minimax_m2", "tiny-gpt-oss": "gpt_oss", "tiny-ernie4.5-moe": "ernie4_5_moe",
          "tiny-hunyuan-moe": "hunyuan_v1_moe", "tiny-llama4": "llama4_text"}
PROMPT_SEED = 1234


def prompt_ids(vocab: int, prompts: int = 8, tokens: int = 25, seed: int = PROMPT_SEED):
    """The fixed prompt set: uniform random token ids [prompts, tokens] from a seeded generator."""
    import torch  # heavy: torch loads only when this command runs

    return torch.randint(0, vocab, (prompts, tokens), generator=torch.Generator().manual_seed(seed))


def logit_agreement(got, want) -> dict:
    """Relative error of logits [..., V] against FP32 ones (None when any is not finite) and top-1 agreement."""
    import torch  # heavy: torch loads only when this command runs

    finite = bool(torch.isfinite(got).all())
    same = got.argmax(-1) == want.argmax(-1)
    return {"logits_rel_err": float((got - want).norm() / want.norm()) if finite else None,
            "nonfinite_logits": int((~torch.isfinite(got)).sum()),
            "top1": float(same.float().mean()), "agree": int(same.sum()), "positions": int(same.numel())}


def _moe_inputs(model, ids) -> tuple[list, "object"]:
    """Hidden states [T, D] entering each MoE block (in model order), and the logits, of one forward pass."""
    import torch  # heavy: torch loads only when this command runs

    from hetrun.runtime.weights import find_moe_blocks  # imports torch: only when this command runs

    seen, hooks = {}, []
    blocks = find_moe_blocks(model)
    for _, path, block in blocks:
        hooks.append(block.register_forward_hook(
            lambda mod, args, out, path=path: seen.__setitem__(path, args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return [seen[path] for _, path, _ in blocks], logits


def _expert_errors(runtime, inputs: list, reference) -> dict[int, dict]:
    """Per device index: relative errors of each of its experts (routed and shared) against the FP32 experts of
    `reference` (the undeployed model: deploy releases a deployed model's expert weights)."""
    from hetrun.runtime.weights import model_layer_weights  # imports torch: only when this command runs

    refs = [w for _, w in model_layer_weights(runtime.plan.spec, reference)]
    out: dict[int, dict] = {}
    for layer, ref_layer, x in zip(runtime.layers, refs, inputs):
        x = np.ascontiguousarray(x.float().numpy())  # [T, D]
        jobs = {}
        for r, (e, d) in enumerate(zip(layer.phy2log.tolist(), layer.device_of.tolist())):
            jobs.setdefault((d, "E", e), (layer.sessions[r], ref_layer.experts[e]))
        for s, (sess, d) in enumerate(zip(layer.shared_sessions, layer.shared_devices)):
            jobs[(d, "S", s)] = (sess, ref_layer.shared[s])
        for (d, _, _), (sess, w) in jobs.items():
            if sess is None:  # another process's device
                continue
            y, ref = sess.run(x), w.reference(x)  # [T, D]
            rec = out.setdefault(d, {"errors": [], "nonfinite_experts": 0})
            if np.isfinite(y).all():
                rec["errors"].append(float(np.linalg.norm(y - ref) / max(float(np.linalg.norm(ref)), 1e-30)))
            else:
                rec["nonfinite_experts"] += 1
    return out


def _alone_profile(profile, device) -> dict:
    """A one-device profile of `device`'s type, backend and precision, for the every-expert-at-this-precision run
    (the dense part as the model has it: that column is the experts' error alone)."""
    return {"name": f"{device.group}-alone",
            "devices": [{"id": device.group, "type": device.type.name, "backend": device.backend}],
            "device_types": {k: v.model_dump() for k, v in profile.model.device_types.items()},
            "dense_precision": "model"}


def accuracy_report(model: str = "tiny", profile="mixed-demo", precision: str | None = None, prompts: int = 8,
                    tokens: int = 25, seed: int = 0, threads: int | None = None, weights: str = "trained") -> dict:
    """Accuracy of `model` deployed on `profile` against FP32, per device precision and end to end (see module doc)."""
    from hetrun.tiny_models import (  # imports torch: only when this command runs
        markov_tokens,
        tiny_model,
        trained_tiny_model,
    )

    if model not in MODELS:
        raise HetrunError(f"unknown model '{model}'; use one of: {', '.join(MODELS)}")
    if prompts < 1 or tokens < 1:
        raise HetrunError(f"--prompts and --tokens must be at least 1, got {prompts} and {tokens}")
    if threads is not None and threads < 1:
        raise HetrunError(f"threads must be at least 1, got {threads}")
    if weights not in ("trained", "random"):
        raise HetrunError(f"--weights must be 'trained' or 'random', got '{weights}'")
    prof = load_profile(profile)
    if weights == "trained":  # prompts from the language it learned
        reference = trained_tiny_model(MODELS[model], seed=seed)
        ids = markov_tokens(reference.config.vocab_size, prompts, tokens, seed=PROMPT_SEED)
    else:
        reference = tiny_model(MODELS[model], seed=seed)
        ids = prompt_ids(reference.config.vocab_size, prompts, tokens)
    inputs, want = _moe_inputs(reference, ids)

    deployed = hetrun.deploy(copy.deepcopy(reference), prof, precision=precision, threads=threads)
    import torch  # heavy: torch loads only when this command runs

    with torch.no_grad():
        got = deployed(ids).logits
    runtime = deployed.hetrun
    plan = runtime.plan
    errors = _expert_errors(runtime, inputs, reference)
    held = device_weight_bytes(plan)
    fp32_plan = device_weight_bytes(dataclasses.replace(plan, precision={d: "fp32" for d in plan.device_ids}))

    alone_cache: dict[tuple, dict] = {}
    devices = []
    for i, dev in enumerate(runtime.devices):
        prec = plan.precision[dev.id]
        key = (dev.type.name, dev.backend, prec)
        if key not in alone_cache:
            alone = hetrun.deploy(copy.deepcopy(reference), _alone_profile(prof, dev), precision=prec, threads=threads)
            with torch.no_grad():
                alone_cache[key] = logit_agreement(alone(ids).logits, want)
        rec = errors.get(i, {"errors": [], "nonfinite_experts": 0})
        errs = rec["errors"]
        devices.append({
            "device": dev.id, "type": dev.type.name, "backend": dev.backend, "precision": prec,
            "experts": len(errs) + rec["nonfinite_experts"], "weight_bytes": held[dev.id],
            "fp32_weight_bytes": fp32_plan[dev.id],
            "expert_rel_err_mean": sum(errs) / len(errs) if errs else None,
            "expert_rel_err_max": max(errs) if errs else None,
            "nonfinite_experts": rec["nonfinite_experts"],
            "alone": alone_cache[key]})
    return {"model": model, "weights": weights, "family": MODELS[model], "profile": prof.name, "requested_precision": precision,
            "prompts": prompts, "tokens": tokens, "seed": seed, "devices": devices,
            "deployment": logit_agreement(got, want),
            "dense": None if runtime.dense is None else {"device": runtime.dense.device,
                                                          "precision": runtime.dense.precision,
                                                          "layers": len(runtime.dense.layers)}}


# The INT4 rows of the precision table, as restated: one matrix's round-to-nearest noise floor on Gaussian weights
# (groups of 128 / 32 with zero points), and what three such matrices compound to through a SwiGLU expert.
INT4_TARGETS = {"int4": {"matrix": 0.125, "expert": 0.19}, "int4-g32": {"matrix": 0.09, "expert": 0.155}}
CALIBRATION_SEED = 4321
CALIBRATION_SHAPE = (128, 64)  # GPTQ's calibration: sequences x tokens (8192 positions) of the synthetic language


def int4_report(model: str = "tiny", seed: int = 0, prompts: int = 512, tokens: int = 64,
                threads: int | None = None) -> dict:
    """INT4 against FP32: the per-matrix and per-expert rows on Gaussian weights (D=256, I=512), and on the briefly
    trained tiny model GPTQ against round-to-nearest: each MoE layer's output error on held-out activations and
    teacher-forced top-1 agreement. GPTQ runs as a GPTQ checkpoint (act-order, zero points, calibrated on
    CALIBRATION_SEED's sequences of the synthetic language) deployed from its directory onto an INT4 device."""
    import tempfile

    import torch  # heavy: torch loads only when this command runs

    from hetrun.bench.precision import cpu_backend, gaussian_expert  # imports runtimes: only when this command runs
    from hetrun.checkpoint.writer import save_checkpoint  # imports torch: only when this command runs
    from hetrun.formats import FORMATS
    from hetrun.kernels.int4 import quantize_int4
    from hetrun.runtime.graphs import build_expert_graph  # imports onnx: only when this command runs
    from hetrun.runtime.weights import find_moe_blocks  # imports torch: only when this command runs
    from hetrun.tiny_models import markov_tokens, trained_tiny_model  # imports torch: only when this command runs

    if model not in MODELS:
        raise HetrunError(f"unknown model '{model}'; use one of: {', '.join(MODELS)}")
    rng = np.random.default_rng(seed)
    w = gaussian_expert(256, 512, seed=seed)
    x = rng.standard_normal((256, 256)).astype(np.float32)  # [T, D]
    ref = w.reference(x)
    reference = trained_tiny_model(MODELS[model], seed=seed)
    vocab = reference.config.vocab_size
    calib_ids = markov_tokens(vocab, *CALIBRATION_SHAPE, seed=CALIBRATION_SEED)
    test_ids = markov_tokens(vocab, prompts, tokens, seed=PROMPT_SEED)  # held out: another part of the language
    blocks = find_moe_blocks(reference)
    calib_inputs, _ = _moe_inputs(reference, calib_ids)
    test_inputs, want = _moe_inputs(reference, test_ids)
    calibration = _routed_calibration(reference, blocks, calib_inputs)
    with torch.no_grad():
        block_ref = [_block_output(block, xs) for (_, _, block), xs in zip(blocks, test_inputs)]
    rows = []
    for prec, target in INT4_TARGETS.items():
        group = FORMATS[prec].group
        matrix = float(np.linalg.norm(x @ (quantize_int4(w.gate, group).dequantize() - w.gate).T)
                       / np.linalg.norm(x @ w.gate.T))
        be = cpu_backend("onnxruntime", prec, threads)
        g = build_expert_graph(w, prec, target=be.graph_target())
        expert = float(np.linalg.norm(be.load(g.serialize(), "e", g.meta).run(x) - ref) / np.linalg.norm(ref))
        profile = {"name": f"{prec}-cpu", "devices": [{"id": "cpu", "type": "host-cpu", "backend": "onnxruntime",
                                                       "precision": prec}]}
        deployed = {"rtn": hetrun.deploy(copy.deepcopy(reference), profile, threads=threads)}
        with tempfile.TemporaryDirectory(prefix="hetrun-gptq-") as d:
            save_checkpoint(reference, d, "gptq", group=group, sym=False, desc_act=True, checkpoint_format="gptq_v2",
                            calibration=calibration, dense=False)
            deployed["gptq"] = hetrun.deploy(d, profile, threads=threads)
        quantizers = {}
        for name, m in deployed.items():
            with torch.no_grad():
                layers = [float((layer(xs) - y).norm() / y.norm()) for layer, xs, y in
                          zip(m.hetrun.layers, test_inputs, block_ref)]
                quantizers[name] = {"layer_rel_err": layers, "top1": logit_agreement(m(test_ids).logits, want)}
        rows.append({"precision": prec, "group": group, "matrix_rel_err": matrix, "matrix_target": target["matrix"],
                     "expert_rel_err": expert, "expert_target": target["expert"], **quantizers})
    return {"model": model, "family": MODELS[model], "seed": seed, "prompts": prompts, "tokens": tokens,
            "calibration_sequences": int(calib_ids.shape[0]), "rows": rows}


def _routed_calibration(reference, blocks, inputs) -> dict:
    """GPTQ's calibration rows: per (layer, expert) the inputs the FP32 router sends that expert (at least 64 rows:
    else all of the layer's), per layer all of them (shared experts see every token)."""
    import torch  # heavy: torch loads only when this command runs

    from hetrun.runtime.routing import route, router_logits  # imports torch: only when this command runs
    from hetrun.runtime.weights import router_tensors
    from hetrun.spec import MoESpec

    router = MoESpec.from_hf_config(reference.config).router
    out = {}
    for (layer, _, block), x in zip(blocks, inputs):
        gate, bias, _, gate_bias = router_tensors(block)
        with torch.no_grad():
            ids, _ = route(router_logits(x, gate, router, gate_bias), router, bias)  # [T, K]
        out[layer] = x.numpy()
        for e in range(gate.shape[0]):
            rows = (ids == e).any(dim=1)  # [T]
            out[(layer, e)] = x[rows].numpy() if int(rows.sum()) >= 64 else x.numpy()
    return out


def _block_output(block, x):
    """A transformers MoE block's output [T, D] for x [T, D] (blocks take [B, S, D]; some return router logits)."""
    out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def _print_int4(report: dict) -> None:
    from rich.table import Table  # display: loaded when a table is printed

    t = Table(title=f"INT4 against FP32: Gaussian weights (D=256, I=512), and model {report['model']} "
                    f"({report['family']}, trained) with round-to-nearest or GPTQ, "
                    f"{report['prompts']} x {report['tokens']} held-out positions")
    for col in ("precision", "matrix err", "target", "expert err", "target", "quantizer", "layer err (each MoE layer)",
                "top-1"):
        t.add_column(col, justify="left" if col in ("precision", "quantizer") else "right")
    for r in report["rows"]:
        for q in ("rtn", "gptq"):
            first = q == "rtn"
            t.add_row(r["precision"] if first else "", _pct(r["matrix_rel_err"]) if first else "",
                      f"<= {_pct(r['matrix_target'])}" if first else "", _pct(r["expert_rel_err"]) if first else "",
                      f"<= {_pct(r['expert_target'])}" if first else "", q,
                      " ".join(_pct(e) for e in r[q]["layer_rel_err"]), f"{100 * r[q]['top1']['top1']:.1f}%")
    table_console(140).print(t)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _print(report: dict) -> None:
    from rich.table import Table  # display: loaded when a table is printed

    dep = report["deployment"]
    t = Table(title=f"accuracy of model {report['model']} ({report['family']}) on profile {report['profile']} "
                    f"against FP32, {dep['positions']} positions ({report['prompts']} prompts x {report['tokens']} tokens)")
    for col in ("device", "type", "backend", "precision", "experts", "weight bytes", "of FP32",
                "expert err mean", "expert err max", "solo logits err", "solo top-1"):
        t.add_column(col, justify="left" if col in ("device", "type", "backend", "precision") else "right")
    for d in report["devices"]:
        a = d["alone"]
        ratio = f"{d['weight_bytes'] / d['fp32_weight_bytes']:.3f}" if d["fp32_weight_bytes"] else "-"
        err_max = _pct(d["expert_rel_err_max"]) + (f" ({d['nonfinite_experts']} inf/nan)" if d["nonfinite_experts"] else "")
        t.add_row(d["device"], d["type"], d["backend"], d["precision"], str(d["experts"]), f"{d['weight_bytes']:,}",
                  ratio, _pct(d["expert_rel_err_mean"]), err_max, _pct(a["logits_rel_err"]), f"{100 * a['top1']:.1f}%")
    c = table_console(140)
    c.print(t)
    c.print("expert err: each expert's output against the FP32 expert on the hidden states this model feeds it; "
            "solo: end to end with every expert at that device's precision")
    extra = f", {dep['nonfinite_logits']} non-finite logits" if dep["nonfinite_logits"] else ""
    dense = report.get("dense")
    where = "the model's own linear layers" if dense is None else \
        f"{dense['layers']} linear layers on {dense['device']} in {dense['precision']}"
    c.print(f"deployment as planned (dense part: {where}): logits relative error {_pct(dep['logits_rel_err'])}, "
            f"top-1 agreement with FP32 {100 * dep['top1']:.1f}% ({dep['agree']}/{dep['positions']} positions){extra}")


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help=f"tiny random model: {', '.join(MODELS)} (default tiny, DeepSeek-style)")
    p.add_argument("--profile", default="mixed-demo", help="built-in profile name or YAML path (default mixed-demo)")
    p.add_argument("--precision", default=None,
                   help="run every device at this precision (an error where a device lacks it); default: each device's best")
    p.add_argument("--prompts", type=whole_number(1, 4096), default=None,
                   help="prompts in the fixed prompt set (default 8; with --int4, 512)")
    p.add_argument("--tokens", type=whole_number(1, 4096), default=None,
                   help="tokens per prompt (default 25: 200 positions in all; with --int4, 64: 32768 positions)")
    p.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0,
                   help="seed of the model's initial weights (default 0)")
    p.add_argument("--weights", choices=("trained", "random"), default="trained",
                   help="trained (default): the tiny model after a short deterministic training run on a synthetic "
                        "Markov-chain language, prompts from that language; random: untrained, uniform random prompts")
    p.add_argument("--threads", type=threads_arg, default=None, help="threads per backend session")
    p.add_argument("--int4", action="store_true",
                   help="the INT4 rows instead: per-matrix and per-expert error on Gaussian weights against their "
                        "targets, and GPTQ against round-to-nearest on the trained model (per-layer error on "
                        "held-out activations, top-1 agreement); --profile and --precision do not apply")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run(args: argparse.Namespace) -> int:
    if args.int4:  # GPTQ and round-to-nearest differ by a few top-1 flips: many positions tell them apart
        report = int4_report(args.model, args.seed, args.prompts or 512, args.tokens or 64, args.threads)
        print_json(report) if args.json else _print_int4(report)
        return 0
    report = accuracy_report(args.model, args.profile, args.precision, args.prompts or 8, args.tokens or 25, args.seed,
                             args.threads, args.weights)
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0


COMMANDS = {
    "accuracy": Command(
        "each device's precision against FP32: per-expert error, logits error, top-1 agreement, weight bytes",
        _add, _run,
        "  hetrun accuracy --model tiny --profile mixed-demo\n"
        "  hetrun accuracy --model tiny --profile mixed-demo --precision int8 --json\n"
        "  hetrun accuracy --model tiny --int4    # INT4 rows: targets, GPTQ against round-to-nearest"),
}
