"""The simulator against published deployments: every profile in profiles/published/ (hetrun.profiles.published)
describes one published setup -- devices, links, parallelism, precisions, serving mode -- and carries its workload
(`extra.workload`) and the figure it reported (`extra.published`: organisation, source, setup, metric, value, and
which constants were fitted and on what). `validate()` simulates each and returns the error of every case.

    from hetrun.sim.validation import validate
    for row in validate():
        print(row["case"], row["published"], row["simulated"], row["error_pct"])
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from hetrun.errors import HetrunError
from hetrun.profile import load_profile
from hetrun.sim.run import SimResult, simulate

TOLERANCE_PCT = 20.0
FIELDS = ("organisation", "title", "source", "setup", "model", "phase", "metric", "value", "unit", "fitted")


@dataclass(frozen=True)
class Case:
    name: str  # profile name: published/<file stem>
    published: dict

    @property
    def tolerance_pct(self) -> float:
        return float(self.published.get("tolerance_pct", TOLERANCE_PCT))


def cases() -> list[Case]:
    """Every published case, in file order."""
    out = []
    folder = resources.files("hetrun.profiles.published")
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(f.read_text()) or {}
        pub = (data.get("extra") or {}).get("published")
        missing = [k for k in FIELDS if not (pub or {}).get(k)]
        if missing:
            raise HetrunError(f"published profile {f.name} lacks extra.published.{missing[0]}")
        out.append(Case(f"published/{f.name[:-5]}", pub))
    return out


def metric(result: SimResult, name: str) -> float | None:
    """A row figure, or one of the per-node / per-device variants of the prefill capacity."""
    row = result.row
    if name in ("prefill_capacity_tokens_per_s_per_node", "prefill_capacity_tokens_per_s_per_device"):
        cap = result.phases["prefill"].capacity_tokens_per_s
        return cap / (result.num_nodes if name.endswith("node") else result.num_devices)
    return row.get(name)


def run_case(case: Case) -> dict:
    """Simulate one published case; its published and simulated figure and the error in percent."""
    pub = case.published
    prof = load_profile(case.name)
    r = simulate(pub["model"], prof, None, (pub["phase"],))
    sim = metric(r, pub["metric"])
    scale = float(pub.get("per", 1))  # e.g. 2 dies per card
    sim = None if sim is None else sim * scale
    value = float(pub["value"])
    err = None if sim is None else (sim / value - 1) * 100
    return {"case": case.name, "organisation": pub["organisation"], "source": pub["source"], "metric": pub["metric"],
            "unit": pub["unit"], "published": value, "simulated": sim, "error_pct": err,
            "tolerance_pct": case.tolerance_pct, "within": err is not None and abs(err) <= case.tolerance_pct,
            "fitted": " ".join(str(pub["fitted"]).split()), "phase": pub["phase"],
            "feasible": all(p.feasible for p in r.phases.values())}


def validate(names: list[str] | None = None) -> list[dict]:
    """Every published case (or those named), simulated."""
    chosen = cases()
    if names:
        unknown = set(names) - {c.name for c in chosen} - {c.name.split("/", 1)[1] for c in chosen}
        if unknown:
            raise HetrunError(f"unknown published case '{sorted(unknown)[0]}'; cases: "
                              f"{', '.join(c.name for c in chosen)}")
        chosen = [c for c in chosen if c.name in names or c.name.split("/", 1)[1] in names]
    return [run_case(c) for c in chosen]


def markdown_table(rows: list[dict]) -> str:
    """The validation table as README.md shows it (one row per case; errors to 0.1%)."""
    out = ["| case | organisation | figure | published | simulated | error | within |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        sim = "-" if r["simulated"] is None else f"{r['simulated']:,.0f}"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        band = f"±{r['tolerance_pct']:.0f}%"
        ok = ("yes" if abs(r["error_pct"]) <= 20.0 else f"no (test band {band})") if r["error_pct"] is not None else "no"
        out.append(f"| [{r['case'].split('/', 1)[1]}]({r['source']}) | {r['organisation']} | {r['unit']} | "
                   f"{r['published']:,.0f} | {sim} | {err} | {ok} |")
    return "\n".join(out)
