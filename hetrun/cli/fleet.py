"""`hetrun fleet`: the cheapest mix of instances of several device types that serves a workload within an SLO."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hetrun.cli import Command, whole_number
from hetrun.errors import HetrunError
from hetrun.files import print_json, write_atomic
from hetrun.sim.fleet import plans_of, search_fleet


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deepseek-r1", help="model preset (default deepseek-r1), or a transformers model "
                                                          "directory or its config.json")
    p.add_argument("--workload", default="chat", help="workload preset or YAML file (default chat)")
    p.add_argument("--slo", default=None, help="latency targets, e.g. ttft=2s,tpot=50ms (default: the workload's)")
    p.add_argument("--devices", required=True, help="comma-separated device types from the catalog "
                                                    "(hetrun profiles lists them), e.g. h800,ascend-910b2,xeon-8480")
    p.add_argument("--rate", type=float, help="requests per second to serve (default: the workload's arrival_rate)")
    p.add_argument("--budget", type=float, metavar="USD_PER_HOUR",
                   help="$ per hour the fleet may cost; without --rate: serve the most requests within it")
    p.add_argument("--buckets", type=whole_number(1, 8, "buckets"), default=1,
                   help="split the workload by prompt length into this many buckets (Mélange's request-size buckets)")
    p.add_argument("--load", metavar="FILE",
                   help="expert-load trace in EPLB's [MoE layers, experts] layout (.npy, .csv or .json)")
    p.add_argument("--no-pareto", action="store_true", help="skip the cost-latency Pareto front (6x faster)")
    p.add_argument("--plans", metavar="DIR", help="write the placement Plan (JSON) of every instance the mix uses")
    p.add_argument("--json", action="store_true", help="print every number as JSON")


def _run(args: argparse.Namespace) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    progress = None if args.json else (lambda m: print(f"  evaluating {m}", file=sys.stderr, flush=True))
    res = search_fleet(args.model, args.workload, args.slo, devices, rate=args.rate, budget=args.budget,
                       buckets=args.buckets, expert_load=args.load, pareto=not args.no_pareto, progress=progress)
    if args.plans:
        out = Path(args.plans)
        if out.exists() and not out.is_dir():
            raise HetrunError(f"--plans '{out}' is a file; give a directory")
        out.mkdir(parents=True, exist_ok=True)
        for name, text in plans_of(res).items():
            write_atomic(out / f"{name.replace(':', '.').replace('+', '_')}.plan.json", text)
    if args.json:
        print_json(res.to_dict())
        return 0
    _print(res)
    if args.plans:
        print(f"wrote plans to {args.plans}")
    return 0


def _mix_line(r: dict | None) -> str:
    if r is None:
        return "none meets the SLO"
    devs = ", ".join(f"{n} {t}" for t, n in sorted(r["devices"].items()))
    return f"${r['usd_per_hour']:,.2f}/h for {r['rate_rps']:,.2f} requests/s: {devs}"


def _print(res) -> None:
    from rich.console import Console  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    c = Console()
    slo = ", ".join(f"{k} {v * 1e3:g} ms" if k == "tpot" else f"{k} {v:g} s" for k, v in res.slo.items())
    load = f"{res.rate:g} requests/s" if res.rate is not None else f"the most within ${res.budget:g}/h"
    c.print(f"[bold]{res.model}[/bold], workload {res.workload}, SLO {slo}, {load}")
    c.print(f"cheapest mix: {_mix_line(res.best)}")
    st = res.single_type
    c.print(f"best single-type fleet: {_mix_line(st)}" + (f" ({st['device_type']})" if st else ""))
    c.print(res.comparison)
    if res.best:
        t = Table(title="instances of the mix, their EP layout and placement")
        for col in ("instance", "role", "count", "$/h", "req/s", "EP", "slots/device", "placed by"):
            t.add_column(col)
        for i in res.best["instances"]:
            ep = i.get("ep_layout", {})
            slots = "; ".join(f"{g} {v['slots_per_layer']['min']:.0f}-{v['slots_per_layer']['max']:.0f}"
                              for g, v in ep.get("groups", {}).items())
            t.add_row(i["candidate"], i["role"], str(i["instances"]), f"{i['usd_per_hour']:,.2f}",
                      f"{i['requests_per_s']:,.2f}", f"EP{ep.get('expert_parallel', '?')}, {ep.get('slots', '?')} slots",
                      slots, str(i.get("placement", {}).get("placed_by", "")).rsplit(".", 1)[-1])
        c.print(t)
    if res.pareto:
        t = Table(title="Pareto front: cost against latency targets")
        for col in ("SLO scale", "TTFT s", "TPOT ms", "$/h", "req/s", "devices", "on front"):
            t.add_column(col)
        for p in res.pareto:
            devs = ", ".join(f"{n} {k}" for k, n in sorted((p["devices"] or {}).items())) or "-"
            t.add_row(f"{p['slo_scale']:g}x", f"{p['ttft_s']:g}", f"{p['tpot_s'] * 1e3:g}",
                      "-" if p["usd_per_hour"] is None else f"{p['usd_per_hour']:,.2f}",
                      "-" if p["rate_rps"] is None else f"{p['rate_rps']:,.2f}", devs, "yes" if p["pareto"] else "")
        c.print(t)
    dropped = [x for x in res.candidates if x.note]
    if dropped:
        c.print(f"{len(dropped)} of {len(res.candidates)} candidates cannot meet the SLO or do not fit, e.g. "
                f"{dropped[0].name}: {dropped[0].note}")


COMMANDS = {
    "fleet": Command(
        "the cheapest mix of device types (and instances) that serves a workload within a latency SLO",
        _args, _run,
        "  hetrun fleet --model deepseek-r1 --workload chat --slo ttft=2s,tpot=50ms \\\n"
        "      --devices h800,ascend-910b2,xeon-8480 --rate 20\n"
        "  hetrun fleet --workload chat --slo ttft=2s,tpot=50ms --devices h800,ascend-910b2 --budget 200\n"
        "  hetrun fleet --model qwen3-30b-a3b --devices h100-sxm,ascend-910b2 --rate 50 --buckets 2 --json\n"
        "  hetrun fleet --devices h800,ascend-910b2 --rate 20 --plans plans/ --no-pareto"),
}
