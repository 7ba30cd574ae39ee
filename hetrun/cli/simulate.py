"""`hetrun simulate`, `hetrun compare` and `hetrun calibrate`: cost-comparison profiling at full model scale, and
request-level simulation (`hetrun simulate --requests N`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hetrun.cli import Command, threads_arg, whole_number
from hetrun.errors import HetrunError
from hetrun.files import print_json, write_atomic
from hetrun.profile import load_profile
from hetrun.sim import compare, simulate
from hetrun.sim.economics import DEEPSEEK_FLEET, DEEPSEEK_R1_PRICE, daily_revenue, fleet_cost_per_day, fleet_for_volume
from hetrun.sim.report import (
    chrome_trace,
    csv_text,
    html_report,
    print_requests,
    print_table,
    report_dict,
    requests_html,
)
from hetrun.sim.requests import simulate_requests
from hetrun.sim.run import resolve_workload
from hetrun.sim.workload import DEEPSEEK_DAY

DEFAULT_COMPARE = ("all-h800", "all-ascend-910b", "mixed-h800-910b", "gpu-xeon")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deepseek-r1", help="model preset (default deepseek-r1), or a transformers model "
                                                          "directory or its config.json")
    p.add_argument("--workload", help="workload preset (chat, long-context, deepseek-prod) or a YAML file (default: the "
                                      "profile's own extra.workload, as published/* profiles carry, else chat)")
    p.add_argument("--load", metavar="FILE", help="expert-load trace in EPLB's [MoE layers, experts] layout (.json "
                                                  "with tokens_per_expert, as model.hetrun.stats writes it, .npy or "
                                                  ".csv); "
                                                  "replaces the workload's expert popularity")
    p.add_argument("--decode-batch", type=whole_number(1, what="the decode batch"), metavar="N", help="decode a fixed N requests per attention device "
                                                                 "instead of growing the batch to the per-user target")
    p.add_argument("--json", action="store_true", help="print every number as JSON instead of the table")
    p.add_argument("--csv", metavar="PATH", help="write the table as CSV ('-' for stdout)")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with charts")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome-trace timeline of one step per device "
                                                    "(one file per profile when comparing)")
    p.add_argument("--trace-phase", choices=("decode", "prefill", "aggregated"), default="decode",
                   help="step to trace")


def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="deepseek-decode-h800", help="profile name or YAML path")
    p.add_argument("--phase", choices=("prefill", "decode", "aggregated", "both"), default="both",
                   help="both (default): what the profile's serving mode runs -- prefill and decode, or aggregated")
    p.add_argument("--serving", choices=("aggregated", "disaggregated"),
                   help="override the profile's extra.sim.serving (aggregated: chunked prefill beside decode)")
    p.add_argument("--max-num-tokens", type=whole_number(1, what="max_num_tokens"), metavar="N",
                   help="aggregated: tokens per attention device and step, decode and prompt chunk together")
    p.add_argument("--mtp", metavar="K:A", help="multi-token prediction / speculative decoding: K draft tokens per "
                                                "step, each accepted with probability A (e.g. 1:0.8)")
    p.add_argument("--attention-tp", type=whole_number(1, what="attention_tp"), metavar="N",
                   help="tensor-parallel attention over N devices of a node (default 1: data-parallel attention)")
    r = p.add_argument_group("request-level simulation (--requests)")
    r.add_argument("--requests", type=whole_number(1, what="requests"), metavar="N", help="replay N requests through a continuous-batching "
                                                             "scheduler and report TTFT/TPOT/E2E percentiles")
    r.add_argument("--arrival", metavar="KIND", help="poisson (default), bursty, or a .jsonl trace of arrival_s, "
                                                     "prompt_tokens, output_tokens per line")
    r.add_argument("--rate", type=float, metavar="RPS", help="requests per second (default: the workload's, else 80%% "
                                                             "of the modeled capacity)")
    r.add_argument("--burstiness", type=float, metavar="CV", help="bursty arrivals: coefficient of variation of the "
                                                                  "gaps (default 3)")
    r.add_argument("--slo", metavar="SPEC", help="ttft=2s,tpot=50ms[,e2e=60s] (default: the workload's targets)")
    r.add_argument("--prefill-instances", type=whole_number(1, what="prefill instances"), metavar="K", help="disaggregated: prefill deployments feeding "
                                                                      "the decode one (default: as many as it needs)")
    r.add_argument("--per-request", metavar="PATH", help="write every request's arrival, lengths, TTFT, TPOT and "
                                                         "end-to-end latency as JSONL")
    p.add_argument("--prefill-profile", help="with --fleet: take prefill rates from this profile (DeepSeek runs "
                                             "prefill and decode on separate deployments)")
    p.add_argument("--fleet", action="store_true",
                   help="size a fleet for DeepSeek's published day of tokens at the simulated rates, and show "
                        "DeepSeek's own cost and revenue arithmetic")
    _common(p)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles", nargs="*", help=f"profile names or YAML paths (default: {', '.join(DEFAULT_COMPARE)})")
    _common(p)


def _outputs(results, comparison, args, title: str) -> None:
    rows = [r.row for r in results]
    if args.csv:
        text = csv_text(rows)
        if args.csv == "-":
            sys.stdout.write(text)
        else:
            write_atomic(args.csv, text)
    if args.html:
        write_atomic(args.html, html_report(results, comparison, title))
    if args.trace:
        base = Path(args.trace)
        for r in results:
            if args.trace_phase not in r.phases:
                continue
            path = base if len(results) == 1 else base.with_name(f"{base.stem}.{r.profile.name}{base.suffix or '.json'}")
            if r.phases[args.trace_phase].step is None or not r.phases[args.trace_phase].step.tasks:
                print(f"hetrun: note: no {args.trace_phase} step to trace for '{r.profile.name}' "
                      f"({r.phases[args.trace_phase].reason})", file=sys.stderr)
                continue
            write_atomic(path, json.dumps(chrome_trace(r, args.trace_phase)))
    if args.json:
        print_json(report_dict(results, comparison))
    elif args.csv != "-":
        print_table(rows, title, comparison.statements if comparison else [])
        for k, v in (("html", args.html), ("trace", args.trace), ("csv", args.csv)):
            if v:
                print(f"wrote {k}: {v}")


def _workload(args: argparse.Namespace, profile=None):
    wl = resolve_workload(args.workload, profile)
    changes = {}
    if getattr(args, "load", None):
        changes["expert_load"] = args.load
    if getattr(args, "decode_batch", None) is not None:
        changes["decode_batch"] = args.decode_batch
    return wl.replace(**changes) if changes else wl


def _mtp(text: str) -> dict:
    k, sep, a = text.partition(":")
    try:
        out = {"draft_tokens": int(k), "acceptance": float(a)}
    except ValueError:
        raise HetrunError(f"--mtp takes DRAFT_TOKENS:ACCEPTANCE such as 1:0.8, got '{text}'") from None
    if not sep or out["draft_tokens"] < 1 or not 0 <= out["acceptance"] <= 1:
        raise HetrunError(f"--mtp takes DRAFT_TOKENS:ACCEPTANCE with at least one draft token and an acceptance in "
                          f"[0, 1], such as 1:0.8; got '{text}'")
    return out


def _profile_arg(args: argparse.Namespace, name):
    """The profile, with --serving, --max-num-tokens, --mtp and --attention-tp applied to its extra.sim."""
    prof = load_profile(name)
    changes = {k: v for k, v in (("serving", getattr(args, "serving", None)),
                                 ("max_num_tokens", getattr(args, "max_num_tokens", None)),
                                 ("attention_tp", getattr(args, "attention_tp", None))) if v is not None}
    if getattr(args, "mtp", None):
        changes["mtp"] = _mtp(args.mtp)
    if not changes:
        return prof
    data = prof.model.model_dump()
    data.setdefault("extra", {}).setdefault("sim", {}).update(changes)
    return load_profile(data)


def _requests(args: argparse.Namespace) -> int:
    prof = _profile_arg(args, args.profile)
    r = simulate_requests(args.model, prof, _workload(args, prof), requests=args.requests,
                          rate=args.rate, arrival=args.arrival, burstiness=args.burstiness, slo=args.slo,
                          prefill_profile=args.prefill_profile, prefill_instances=args.prefill_instances)
    if args.html:
        write_atomic(args.html, requests_html(r))
    if args.per_request:
        write_atomic(args.per_request, "".join(json.dumps(x) + "\n" for x in r.per_request()))
    if args.json:
        print_json({"model": r.model, "profile": r.profile, "prefill_profile": r.prefill_profile, **r.summary})
    else:
        print_requests(r)
        for k, v in (("html", args.html), ("per-request", args.per_request)):
            if v:
                print(f"wrote {k}: {v}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    if args.requests is not None or args.arrival or args.rate is not None:
        return _requests(args)
    phases = None if args.phase == "both" else (args.phase,)
    prof = _profile_arg(args, args.profile)
    r = simulate(args.model, prof, _workload(args, prof), phases, trace=bool(args.trace))
    fleet = None
    if args.fleet:
        fleet = _fleet(args, r)
        r.row["fleet"] = fleet
    _outputs([r], None, args, f"{r.spec.name} on {r.profile.name} ({r.num_devices} devices), workload {r.workload.name}")
    if fleet and not args.json:
        _print_fleet(fleet)
    return 0


def _fleet(args, r) -> dict:
    pre = r
    if args.prefill_profile:
        pre = simulate(args.model, args.prefill_profile, r.workload, ("prefill",))
    p_node = pre.row.get("prefill_tokens_per_s_per_node")
    d_node = r.row.get("decode_tokens_per_s_per_node")
    out = {
        "published": {
            "nodes": DEEPSEEK_FLEET["nodes"], "gpus_per_node": DEEPSEEK_FLEET["gpus_per_node"],
            "usd_per_gpu_hour": DEEPSEEK_FLEET["gpu_hour_usd"],
            "cost_per_day": fleet_cost_per_day(DEEPSEEK_FLEET["nodes"], DEEPSEEK_FLEET["gpus_per_node"],
                                               DEEPSEEK_FLEET["gpu_hour_usd"]),
            "revenue_per_day": daily_revenue(DEEPSEEK_DAY["input_tokens"], DEEPSEEK_DAY["cache_hit_tokens"],
                                             DEEPSEEK_DAY["output_tokens"], DEEPSEEK_R1_PRICE),
            "published_revenue_per_day": DEEPSEEK_FLEET["published_revenue_per_day"],
        }
    }
    if p_node and d_node:
        sized = fleet_for_volume(DEEPSEEK_DAY["input_tokens"], DEEPSEEK_DAY["output_tokens"], p_node, d_node)
        gpn = r.num_devices / r.num_nodes
        price = r.usd_per_hour / r.num_devices
        sized.update({"prefill_tokens_per_s_per_node": p_node, "decode_tokens_per_s_per_node": d_node,
                      "cost_per_day": fleet_cost_per_day(sized["nodes"], gpn, price)})
        out["simulated"] = sized
    else:
        out["simulated"] = None
    return out


def _print_fleet(f: dict) -> None:
    p = f["published"]
    rev = p["revenue_per_day"]
    print(f"DeepSeek fleet (published): {p['nodes']} nodes x {p['gpus_per_node']} GPUs x 24 h x "
          f"${p['usd_per_gpu_hour']:g} = ${p['cost_per_day']:,.0f} per day")
    print(f"DeepSeek day billed at R1 prices: ${rev['input_cache_hit_usd']:,.0f} (342B cache-hit input) + "
          f"${rev['input_cache_miss_usd']:,.0f} (266B cache-miss input) + ${rev['output_usd']:,.0f} (168B output) "
          f"= ${rev['total_usd']:,.0f} per day (published: ${p['published_revenue_per_day']:,.0f})")
    s = f.get("simulated")
    if s:
        print(f"Simulated fleet for the same day: {s['prefill_nodes']:.1f} prefill + {s['decode_nodes']:.1f} decode "
              f"= {s['nodes']:.1f} nodes (at {s['prefill_tokens_per_s_per_node']:,.0f} input and "
              f"{s['decode_tokens_per_s_per_node']:,.0f} output tokens/s per node), ${s['cost_per_day']:,.0f} per day")
    else:
        print("Simulated fleet: needs both prefill and decode rates (use --phase both or --prefill-profile)")


def _compare(args: argparse.Namespace) -> int:
    profiles = args.profiles or list(DEFAULT_COMPARE)
    c = compare(args.model, profiles, _workload(args, profiles[0]), trace=bool(args.trace))
    _outputs(c.results, c, args, f"{c.results[0].spec.name}: {len(c.results)} profiles, workload {c.results[0].workload.name}")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="host-profile.yaml", help="where to write the host profile (YAML)")
    p.add_argument("--quick", action="store_true", help="fewer token counts and repetitions (a smoke test)")
    p.add_argument("--backends", default="onnxruntime,openvino", help="comma-separated CPU backends to measure")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4", help="comma-separated expert precisions")
    p.add_argument("--threads", type=threads_arg, default=None, help="threads per backend (default: all cores)")
    p.add_argument("--validate", action="store_true",
                   help="afterwards, predict real tiny and Mixtral-shaped MoE layers and show the error table")
    p.add_argument("--json", action="store_true", help="print the fitted efficiencies as JSON")


def _calibrate(args: argparse.Namespace) -> int:
    from hetrun.calibrate.run import calibrate  # imports torch: only when calibrating

    backends = tuple(x for x in args.backends.split(",") if x)
    precisions = tuple(x for x in args.precisions.split(",") if x)
    if not backends or not precisions:
        raise HetrunError("give at least one backend and one precision to calibrate")
    path, prof = calibrate(args.out, quick=args.quick, backends=backends, precisions=precisions, threads=args.threads,
                           progress=None if args.json else
                           (lambda sweep, s: print(f"  sweep {sweep + 1} {s.backend:11s} {s.precision:5s} "
                                                   f"{s.hidden}x{s.intermediate} {s.tokens:5d} rows: "
                                                   f"{s.seconds * 1e3:8.3f} ms", flush=True)))
    cal = prof["extra"]["calibration"]
    if args.json:
        print_json({"path": str(path), "fits": cal["fits"], "copy_bandwidth_gbs": cal["copy_bandwidth_gbs"],
                    "dispatch": {k: v for k, v in cal["dispatch"].items() if k != "samples"}})
    else:
        from rich.console import Console  # display: loaded when a table is printed
        from rich.table import Table  # display: loaded when a table is printed

        t = Table(title=f"fitted host device types (copy bandwidth {cal['copy_bandwidth_gbs']:.1f} GB/s)")
        for col in ("backend", "precision", "shape", "peak GFLOP/s", "compute eff", "memory eff",
                    "launch us", "rms log err"):
            t.add_column(col)
        for f in cal["fits"]:
            t.add_row(f["backend"], f["precision"], f"{f['hidden']}x{f['intermediate']}", f"{f['peak_gflops']:.1f}",
                      f"{f['compute_efficiency']:.3f}", f"{f['memory_efficiency']:.3f}", f"{f['launch_us']:.1f}",
                      f"{f['rms_log_error']:.3f}")
        Console().print(t)
        d = cal["dispatch"]
        fixed = ", ".join(f"{k} {v:.0f} us" for k, v in d["fixed_us"].items())
        print(f"dispatcher: fixed {fixed} per layer, {d['per_call_us']:.1f} us per expert call, "
              f"{d['us_per_mb']:.1f} us per MB routed, {d.get('us_per_shared_mb', 0.0):.1f} us per MB through shared "
              f"experts, {d.get('us_per_k_router', 0.0):.2f} us per 1000 router scores")
        print(f"wrote {path}")
    if args.validate:  # in a fresh process: calibration's hundreds of sessions leave this one slower (10-20% here)

        cmd = [sys.executable, "-m", "hetrun", "bench", "simulate", "accuracy", str(path)]
        cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--quick"] if args.quick else [])
        sys.stdout.flush()
        subprocess.run(cmd, check=False)
    return 0


COMMANDS = {
    "simulate": Command(
        "simulate one profile at full model scale: tokens/s, TTFT/TPOT, $/Mtok, J/token, CO2, memory",
        _simulate_args, _simulate,
        "  hetrun simulate --profile deepseek-decode-h800 --workload deepseek-prod --phase decode\n"
        "  hetrun simulate --profile deepseek-decode-h800 --prefill-profile deepseek-prefill-h800 "
        "--workload deepseek-prod --fleet\n"
        "  hetrun simulate --profile all-h800 --html report.html --trace trace.json\n"
        "  hetrun simulate --profile all-h800 --serving aggregated --decode-batch 64   # chunked prefill + decode\n"
        "  hetrun simulate --profile all-h800 --serving aggregated --max-num-tokens 2048 --mtp 1:0.8\n"
        "  hetrun simulate --profile all-h800 --attention-tp 8 --phase decode   # TP attention instead of DP\n"
        "  hetrun simulate --profile published/trtllm-8xh200-fp8    # a published setup, with its own workload\n"
        "  hetrun simulate --profile all-h800 --load stats.json    # expert loads from model.hetrun.stats\n"
        "  # request level: 10,000 Poisson requests through PD-disaggregated DeepSeek serving (144 + 3x32 H800s)\n"
        "  hetrun simulate --profile deepseek-decode-h800 --prefill-profile deepseek-prefill-h800 \\\n"
        "      --workload deepseek-prod --requests 10000 --slo ttft=2s,tpot=50ms --html latency.html\n"
        "  hetrun simulate --profile all-h800 --serving aggregated --requests 2000 --arrival bursty --rate 30\n"
        "  hetrun simulate --profile all-h800 --arrival trace.jsonl --per-request out.jsonl"),
    "compare": Command(
        "compare profiles side by side; cost at the same latency target and throughput at the same budget",
        _compare_args, _compare,
        "  hetrun compare --model deepseek-r1 --workload chat\n"
        "  hetrun compare all-h800 mixed-h800-910b --workload long-context --html compare.html --csv compare.csv"),
    "calibrate": Command(
        "measure this machine's CPU backends and write a host device profile with fitted efficiencies",
        _calibrate_args, _calibrate,
        "  hetrun calibrate --out host-profile.yaml\n  hetrun calibrate --quick --out /tmp/host.yaml --validate"),
}
