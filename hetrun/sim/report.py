"""Reports of simulated profiles: terminal table (rich), JSON, CSV, a self-contained HTML page with charts,
and a Chrome-trace timeline of one step per device (opens in Perfetto or chrome://tracing)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math

import numpy as np

from hetrun.errors import HetrunError
from hetrun.sim.requests import RequestSimResult
from hetrun.sim.run import Comparison, SimResult

COLUMNS = [  # (key, header, format)
    ("profile", "profile", "{}"),
    ("devices", "devices", "{}"),
    ("usd_per_hour", "$/h", "{:,.1f}"),
    ("prefill_tokens_per_s_per_node", "prefill tok/s/node", "{:,.0f}"),
    ("prefill_tokens_per_s_per_device", "prefill tok/s/dev", "{:,.0f}"),
    ("decode_tokens_per_s_per_node", "decode tok/s/node", "{:,.0f}"),
    ("decode_tokens_per_s_per_device", "decode tok/s/dev", "{:,.0f}"),
    ("per_user_tps", "tok/s per user", "{:.1f}"),
    ("decode_batch_per_device", "requests/dev", "{:.0f}"),
    ("ttft_s", "TTFT s", "{:.2f}"),
    ("tpot_s", "TPOT ms", "ms"),
    ("usd_per_m_input_hit", "$/M in hit", "{:.4f}"),
    ("usd_per_m_input_miss", "$/M in miss", "{:.3f}"),
    ("usd_per_m_output", "$/M out", "{:.3f}"),
    ("usd_per_1k_requests", "$/1k requests", "{:.3f}"),
    ("prefill_j_per_token", "J/tok in", "{:.3f}"),
    ("decode_j_per_token", "J/tok out", "{:.2f}"),
    ("kg_co2_per_m_input", "kgCO2/M in", "{:.4f}"),
    ("kg_co2_per_m_output", "kgCO2/M out", "{:.3f}"),
    ("mem_per_device", "GB/dev w+kv+ws/cap", "{}"),
    ("busy_fraction", "busy", "pct"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "ms":
        return f"{value * 1e3:.1f}"
    if fmt == "pct":
        return f"{value * 100:.0f}%"
    return fmt.format(value)


def _mem_cell(row: dict) -> str:
    parts = []
    for g, m in (row.get("memory") or {}).items():
        parts.append(f"{g} {m['weights_gb']:.0f}+{m['kv_gb']:.0f}+{m['workspace_gb']:.0f}/{m['capacity_gb']:.0f}")
    return "; ".join(parts)


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        r = dict(r, mem_per_device=_mem_cell(r))
        out.append([_fmt(r.get(k), f) for k, _, f in COLUMNS])
    return out


def print_table(rows: list[dict], title: str, notes: list[str] = ()) -> None:
    """The comparison in the terminal: one column per profile, one row per metric (fits 80 columns for a few
    profiles), the API price and any notes under it."""
    from rich.console import Console  # heavy: only when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    t = Table(title=title, show_lines=False)
    t.add_column("metric", style="bold")
    cells = table_rows(rows)
    for r in rows:
        t.add_column(r["profile"], justify="right", overflow="fold")
    for j, (_, h, _) in enumerate(COLUMNS[1:], start=1):
        t.add_row(h, *[c[j] for c in cells])
    c = Console()
    c.print(t)
    if rows:
        p = rows[0]["api_price"]
        c.print(f"reference: {p['name']} ${p['input_cache_hit']}/M input (hit), ${p['input_cache_miss']}/M input "
                f"(miss), ${p['output']}/M output")
    for r in rows:
        for ph in ("prefill", "decode"):
            if r.get(ph + "_ok") is False:
                c.print(f"{r['profile']} {ph}: {r.get(ph + '_note')}")
    for n in notes:
        c.print(n)


# ---- machine-readable -----------------------------------------------------------------------------

def _finite_only(obj):
    """Replace NaN/inf by None everywhere (they must never reach a report)."""
    if isinstance(obj, dict):
        return {str(k): _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _finite_only(obj.tolist())
    return obj


def report_dict(results: list[SimResult], comparison: Comparison | None = None) -> dict:
    """Everything a report shows, JSON-ready (finite numbers or null)."""
    out = {"model": results[0].spec.name, "workload": results[0].workload.summary(),
           "profiles": [r.row for r in results],
           "phases": {r.profile.name: {k: v.to_dict() for k, v in r.phases.items()} for r in results}}
    if comparison is not None:
        out["melange"] = comparison.melange
        out["hexgen"] = comparison.hexgen
        out["statements"] = comparison.statements
    return _finite_only(out)


def csv_text(rows: list[dict]) -> str:
    flat = []
    for r in rows:
        d = {k: v for k, v in r.items() if k not in ("memory", "api_price")}
        d["memory_per_device"] = _mem_cell(r)
        flat.append(_finite_only(d))
    keys: list[str] = []
    for d in flat:
        keys += [k for k in d if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for d in flat:
        w.writerow({k: "" if d.get(k) is None else d.get(k) for k in keys})
    return buf.getvalue()


# ---- Chrome trace ---------------------------------------------------------------------------------

def chrome_trace(result: SimResult, phase: str = "decode", max_devices: int = 16) -> dict:
    """One simulated step as Chrome trace events: a process per device, compute and comm threads.

    Every device follows the global schedule (devices wait for each other at each all-to-all); each event
    lasts as long as that device's own work, so idle gaps show where it waits for the slowest device.
    """
    ph = result.phases.get(phase)
    if ph is None or ph.step is None or not ph.step.tasks:
        raise HetrunError(f"no {phase} step to trace; simulate with trace enabled and phase {phase}")
    st = ph.step
    devs = result.model.layout.devices
    D = len(devs)
    busy_order = np.argsort(-st.busy)
    chosen = sorted(set(list(range(min(D, max_devices - 1))) + [int(busy_order[0])]))
    events = []
    for pid, i in enumerate(chosen):
        events.append({"name": "process_name", "ph": "M", "pid": pid,
                       "args": {"name": f"{devs[i].id} ({devs[i].type.name})"}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "compute"}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": "all-to-all"}})
    key = {"attention": "attention", "attention+mlp": "attention", "dispatch": "dispatch", "experts": "experts",
           "combine": "combine"}
    for stream, name, layer, m, start, _dur in st.tasks:
        arr = st.stages[key[name]]
        for pid, i in enumerate(chosen):
            dur = float(arr[layer, i])
            if dur <= 0:
                continue
            events.append({"name": f"{name} L{layer}", "cat": stream, "ph": "X", "pid": pid,
                           "tid": 0 if stream == "compute" else 1, "ts": start * 1e6, "dur": dur * 1e6,
                           "args": {"micro_batch": m, "layer": layer}})
    end = st.seconds - st.tail
    for pid, i in enumerate(chosen):
        events.append({"name": "lm_head + host", "cat": "compute", "ph": "X", "pid": pid, "tid": 0,
                       "ts": end * 1e6, "dur": st.tail * 1e6, "args": {}})
    return {"traceEvents": _finite_only(events), "displayTimeUnit": "ms",
            "otherData": {"profile": result.profile.name, "phase": phase, "step_ms": st.seconds * 1e3,
                          "model": result.spec.name, "devices_shown": [devs[i].id for i in chosen]}}


# ---- HTML -----------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; }
.small { color: #555; font-size: 12px; } details pre { font-size: 11px; max-height: 30em; overflow: auto; }
"""

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # heavy: only for HTML reports

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def charts(results: list[SimResult]) -> dict[str, str]:
    """Base64 PNGs: $/Mtok bars, tokens/s bars, memory per device, placement heatmap."""
    import matplotlib  # heavy: only for HTML reports

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when a chart is drawn

    rows = [r.row for r in results]
    names = [r["profile"] for r in rows]
    x = np.arange(len(rows))
    out = {}

    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(rows)), 3.8))
    w = 0.26
    for j, (k, lab) in enumerate([("usd_per_m_input_hit", "input (cache hit)"), ("usd_per_m_input_miss",
                                  "input (cache miss)"), ("usd_per_m_output", "output")]):
        vals = [r.get(k) for r in rows]
        bars = ax.bar(x + (j - 1) * w, [vv or 0.0 for vv in vals], w, label=lab, color=f"C{j}")
        ax.bar_label(bars, labels=["n/a" if vv is None else f"{vv:.3g}" for vv in vals], fontsize=7)
    p = rows[0]["api_price"]
    for val, lab, ls in ((p["input_cache_hit"], "API hit", ":"), (p["input_cache_miss"], "API miss", "--"),
                         (p["output"], "API output", "-.")):
        ax.axhline(val, color="gray", ls=ls, lw=1)
        ax.text(len(rows) - 0.5, val, f" {lab} ${val}", fontsize=7, va="bottom", ha="right", color="dimgray")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylabel("$ per million tokens (log)")
    ax.set_title("Cost per million tokens (bars) vs the DeepSeek-R1 API price (lines); n/a: target missed")
    ax.legend(fontsize=8, loc="upper left")
    out["cost"] = _png(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(rows)), 3.6))
    w = 0.38
    for j, (k, ok, lab) in enumerate([("prefill_tokens_per_s_per_node", "prefill_ok", "prefill input tok/s per node"),
                                      ("decode_tokens_per_s_per_node", "decode_ok", "decode output tok/s per node")]):
        vals = [r.get(k) for r in rows]
        bars = ax.bar(x + (j - 0.5) * w, [vv or 0.0 for vv in vals], w, label=lab, color=f"C{j}",
                      hatch=None)
        for bar, r in zip(bars, rows):
            if r.get(ok) is False:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        ax.bar_label(bars, labels=["n/a" if vv is None else f"{vv:,.0f}" + ("*" if r.get(ok) is False else "")
                                   for vv, r in zip(vals, rows)], fontsize=7)
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylabel("tokens/s per node (log)")
    ax.set_yscale("log")
    ax.set_title("Throughput per node at the workload's targets (* hatched: target missed, best effort shown)")
    ax.legend(fontsize=8, loc="upper right")
    out["throughput"] = _png(fig)

    labels, parts, caps = [], [], []
    for r in rows:
        for g, m in (r.get("memory") or {}).items():
            labels.append(f"{r['profile']}\n{g} ({m['device_type']})")
            parts.append((m["weights_gb"], m["kv_gb"], m["workspace_gb"]))
            caps.append(m["capacity_gb"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 3.8))
    xi = np.arange(len(labels))
    pct = np.array(parts) / np.array(caps)[:, None] * 100 if parts else np.zeros((0, 3))
    bottom = np.zeros(len(labels))
    for j, lab in enumerate(("weights", "KV cache", "workspace + activations")):
        ax.bar(xi, pct[:, j], bottom=bottom, label=lab, color=f"C{j}")
        bottom += pct[:, j]
    for xx, b_, pr, cap in zip(xi, bottom, parts, caps):
        ax.text(xx, b_ + 1.5, f"{sum(pr):.0f}/{cap:.0f} GB", ha="center", fontsize=7)
    ax.axhline(100, color="black", lw=1)
    ax.set_ylim(0, 115)
    ax.set_xticks(xi, labels, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("% of device memory")
    ax.set_title("Memory per device at the simulated batch (fullest device of each group)")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    out["memory"] = _png(fig)

    pick = next((r for r in results if len({d.type.name for d in r.profile.devices}) > 1), results[0])
    lay = pick.model.layout
    rows_ = pick.model.traffic.routed_rows.T  # [D, L] routed picks per token on each device
    fig, ax = plt.subplots(figsize=(9, 3.2 + min(6.0, 0.02 * rows_.shape[0])))
    im = ax.imshow(rows_ / rows_.sum(0, keepdims=True) * 100, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("device")
    step = max(1, rows_.shape[0] // 24)
    ax.set_yticks(range(0, rows_.shape[0], step), [lay.devices[i].id for i in range(0, rows_.shape[0], step)],
                  fontsize=6)
    fig.colorbar(im, ax=ax, label="% of the layer's routed tokens")
    ax.set_title(f"Placement of '{pick.profile.name}' ({lay.planner.rsplit('.', 1)[-1]}): "
                 "share of each layer's expert load per device")
    out["placement"] = _png(fig)
    return out


def html_report(results: list[SimResult], comparison: Comparison | None = None, title: str = "") -> str:
    """A self-contained HTML page: summary, table, statements, four charts (PNG embedded), the raw JSON."""
    rows = [r.row for r in results]
    wl = results[0].workload.summary()
    pics = charts(results)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in table_rows(rows))
    notes = "".join(f"<li>{html.escape(s)}</li>" for s in (comparison.statements if comparison else []))
    infeas = "".join(f"<li>{html.escape(r['profile'])} {ph}: {html.escape(r.get(ph + '_note') or '')}</li>"
                     for r in rows for ph in ("prefill", "decode") if r.get(ph + "_ok") is False)
    p = rows[0]["api_price"]
    data = json.dumps(report_dict(results, comparison), indent=1)
    title = title or f"hetrun: {results[0].spec.name} on {len(results)} profile(s), workload {wl['name']}"
    img = lambda k, alt: f'<figure><img alt="{alt}" src="data:image/png;base64,{pics[k]}"></figure>'  # noqa: E731
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE} td:nth-last-child(2) {{ text-align: left; }}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="small">Workload <b>{html.escape(wl['name'])}</b>: {wl['requests']} requests, mean prompt
{wl['mean_prompt']:,.0f} tokens, mean output {wl['mean_output']:,.0f}, prefix-cache hits
{wl['cache_hit_ratio'] * 100:.1f}%, average KV per output token {wl['avg_kv_per_output_token']:,.0f};
targets {wl['per_user_tps']:g} tokens/s per user and TTFT &le; {wl['ttft_s']:g} s. Reference price:
{html.escape(p['name'])} ${p['input_cache_hit']}/M input (hit), ${p['input_cache_miss']}/M (miss),
${p['output']}/M output. Simulated from shapes, plans and profiles; no weights loaded.</p>
<table><tr>{head}</tr>{body}</table>
<p class="small">GB/dev: weights + KV cache + workspace / capacity of the fullest device of each group.
$/M in hit: the cost of loading cached KV; miss: computing the prompt; TPOT: time per output token.</p>
<ul>{notes}{infeas}</ul>
<h2>Cost</h2>{img('cost', 'cost per million tokens')}
<h2>Throughput</h2>{img('throughput', 'tokens per second per node')}
<h2>Memory per device</h2>{img('memory', 'memory per device')}
<h2>Placement</h2>{img('placement', 'placement heatmap')}
<details><summary>All numbers (JSON)</summary><pre>{html.escape(data)}</pre></details>
</body></html>
"""


# ---- request-level simulation ------------------------------------------------------------------------------

def print_requests(r: RequestSimResult) -> None:
    """Percentiles, SLO attainment and goodput of a request-level simulation in the terminal."""
    from rich.console import Console  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    s = r.summary
    t = Table(title=f"{r.model} on {r.profile}" + (f" (prefill on {r.prefill_profile})" if r.prefill_profile else "")
              + f", {s['serving']}, {s['requests']:,} requests, {s['arrivals']}")
    for c in ("metric", "mean", "P50", "P90", "P99", "max", "SLO"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for key, name, unit, slo in (("ttft_s", "TTFT", "s", "ttft"), ("tpot_s", "TPOT", "ms", "tpot"),
                                 ("e2e_s", "end-to-end", "s", "e2e")):
        m = 1e3 if unit == "ms" else 1.0
        v = s[key]
        target = r.slo.get(slo)
        t.add_row(f"{name} ({unit})", *[f"{v[k] * m:,.3g}" for k in ("mean", "p50", "p90", "p99", "max")],
                  "-" if target is None else f"{target * m:g}")
    c = Console()
    c.print(t)
    c.print(f"SLO attainment {s['slo_attainment'] * 100:.1f}% (TTFT {s['ttft_attainment'] * 100:.1f}%, TPOT "
            f"{s['tpot_attainment'] * 100:.1f}%); goodput {s['goodput_rps']:,.2f} requests/s, "
            f"{s['goodput_output_tokens_per_s']:,.0f} output tokens/s; throughput {s['throughput_rps']:,.2f} "
            f"requests/s over {s['span_s']:,.1f} s; mean decode batch {s['mean_running']:,.0f}, "
            f"longest queue {s['max_waiting']:,}")
    c.print(f"simulated in {s['simulation_wall_s']:.1f} s ({r.settings.get('step_evaluations', 0)} step-model "
            "evaluations)")


def latency_charts(r: RequestSimResult) -> dict[str, str]:
    """Base64 PNGs: latency distributions (TTFT, TPOT, end-to-end) with percentiles and SLO, their CDFs, and the
    batch and queue over time."""
    import matplotlib  # heavy: only for HTML reports

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when a chart is drawn

    out = {}
    series = (("TTFT", r.ttft, "ttft", 1.0, "s"), ("TPOT", r.tpot[r.arrivals.output > 1], "tpot", 1e3, "ms"),
              ("end-to-end", r.e2e, "e2e", 1.0, "s"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, x, slo, m, unit) in zip(axes, series):
        x = np.asarray(x, dtype=np.float64) * m
        if not len(x):
            continue
        ax.hist(x, bins=60, color="C0", alpha=0.8)
        for q, ls in ((50, "-"), (90, "--"), (99, ":")):
            v = float(np.percentile(x, q))
            ax.axvline(v, color="black", ls=ls, lw=1, label=f"P{q} {v:,.3g} {unit}")
        if slo in r.slo:
            ax.axvline(r.slo[slo] * m, color="C3", lw=1.5, label=f"SLO {r.slo[slo] * m:g} {unit}")
        ax.set_title(f"{name} ({unit})")
        ax.set_xlabel(unit)
        ax.set_ylabel("requests")
        ax.legend(fontsize=7)
    fig.suptitle("Latency distributions")
    fig.tight_layout()
    out["hist"] = _png(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (name, x, slo, m, unit) in zip(axes, series):
        x = np.sort(np.asarray(x, dtype=np.float64) * m)
        if not len(x):
            continue
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), color="C0")
        if slo in r.slo:
            ax.axvline(r.slo[slo] * m, color="C3", lw=1.5)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(unit)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out["cdf"] = _png(fig)

    tl = r.timeline
    fig, ax = plt.subplots(figsize=(13, 3.2))
    ax.plot(tl["t"], tl["running"], label="decode batch (requests)", color="C0")
    ax.plot(tl["t"], tl["waiting"], label="waiting (not yet admitted or prefilled)", color="C1")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)
    ax.set_title("Batch and queue over time")
    out["timeline"] = _png(fig)
    return out


def requests_html(r: RequestSimResult, title: str = "") -> str:
    """A self-contained HTML page of a request-level simulation: summary table, latency plots, the JSON."""
    s = r.summary
    pics = latency_charts(r)
    title = title or f"hetrun: {r.model} on {r.profile}, {s['requests']:,} requests ({s['serving']})"
    rows = ""
    for key, name, m, unit in (("ttft_s", "TTFT", 1.0, "s"), ("tpot_s", "TPOT", 1e3, "ms"), ("e2e_s", "end-to-end", 1.0,
                                                                                           "s")):
        v = s[key]
        rows += f"<tr><td>{name} ({unit})</td>" + "".join(f"<td>{v[k] * m:,.4g}</td>" for k in
                                                          ("mean", "p50", "p90", "p99", "max")) + "</tr>"
    data = json.dumps(_finite_only(s), indent=1)
    img = lambda k, alt: f'<figure><img alt="{alt}" src="data:image/png;base64,{pics[k]}"></figure>'  # noqa: E731
    slo = ", ".join(f"{k} &le; {v * (1e3 if k == 'tpot' else 1):g} {'ms' if k == 'tpot' else 's'}"
                    for k, v in r.slo.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="small">Arrivals: {html.escape(str(s['arrivals']))}. Serving: {html.escape(s['serving'])}. SLO: {slo}.
Iteration times from the step model; continuous batching with KV reserved per request (prompt + output).</p>
<table><tr><th>metric</th><th>mean</th><th>P50</th><th>P90</th><th>P99</th><th>max</th></tr>{rows}</table>
<p><b>SLO attainment {s['slo_attainment'] * 100:.1f}%</b> (TTFT {s['ttft_attainment'] * 100:.1f}%, TPOT
{s['tpot_attainment'] * 100:.1f}%); goodput {s['goodput_rps']:,.2f} requests/s
({s['goodput_output_tokens_per_s']:,.0f} output tokens/s); throughput {s['throughput_rps']:,.2f} requests/s,
{s['output_tokens_per_s']:,.0f} output tokens/s over {s['span_s']:,.1f} s.</p>
<h2>Latency distributions</h2>{img('hist', 'latency histograms')}
<h2>Cumulative distributions</h2>{img('cdf', 'latency CDFs')}
<h2>Batch and queue</h2>{img('timeline', 'batch and queue over time')}
<details><summary>All numbers (JSON)</summary><pre>{html.escape(data)}</pre></details>
</body></html>
"""
