"""Per-rank statistics of distributed MoE steps: tokens and bytes moved, time in all-to-all against expert compute."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RankStats:
    """What one rank did; gathered to rank 0 when the run finishes."""

    rank: int
    host: str = ""
    devices: tuple[str, ...] = ()
    holds_dense: bool = True
    steps: int = 0  # MoE layer steps this rank took part in
    active_steps: int = 0  # ... with tokens of its own
    tokens_routed: int = 0  # (token, expert) pairs of its own tokens, shared experts included
    tokens_sent: int = 0  # of those, sent to experts on other ranks
    tokens_received: int = 0  # pairs other ranks sent to this rank's experts
    tokens_computed: int = 0  # pairs this rank's experts computed (own and received)
    bytes_sent: int = 0  # activations to other ranks: dispatch of its tokens plus combine of theirs
    bytes_received: int = 0
    header_bytes: int = 0  # the per-step count exchange (all_gather of token counts)
    header_s: float = 0.0  # in the count exchange; on ranks without tokens this is mostly waiting for others
    a2a_s: float = 0.0  # in the dispatch and combine all_to_all_single
    expert_s: float = 0.0  # running this rank's expert graphs
    step_s: float = 0.0  # whole steps: routing, count exchange, both all-to-alls, experts, combine
    empty_slots: int = 0  # (step, local expert slot) pairs that received no token
    faults: int = 0  # expert runs that failed over inside this rank
    switches: list = field(default_factory=list)  # [plan version, step, moves] of each live plan switch (runtime.rebalancer)
    tokens_per_device: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = list(self.devices)
        d["a2a_share"] = self.a2a_s / self.step_s if self.step_s > 0 else 0.0
        return d


def format_stats_table(rows: list[dict]) -> str:
    """A plain-text table of gathered RankStats dicts, one line per rank and a total."""
    cols = [("rank", "rank", "{}"), ("devices", "devices", "{}"), ("host", "host", "{}"),
            ("steps", "steps", "{}"), ("tok sent", "tokens_sent", "{}"), ("tok recv", "tokens_received", "{}"),
            ("tok computed", "tokens_computed", "{}"), ("MB sent", "bytes_sent", "{:.3f}"),
            ("MB recv", "bytes_received", "{:.3f}"), ("wait s", "header_s", "{:.3f}"),
            ("a2a s", "a2a_s", "{:.3f}"), ("expert s", "expert_s", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
            ("a2a %", "a2a_share", "{:.1f}")]

    def cell(row: dict, key: str, fmt: str) -> str:
        v = row.get(key, "")
        if key == "devices":
            v = ",".join(v) + ("" if row.get("holds_dense", True) else " (experts only)")
        elif key.startswith("bytes"):
            v = v / 1e6
        elif key == "a2a_share":
            v = 100 * v
        return fmt.format(v)

    body = [[cell(r, k, f) for _, k, f in cols] for r in rows]
    total = {k: sum(r.get(k, 0) for r in rows) for _, k, _ in cols[3:]}
    total["a2a_share"] = total["a2a_s"] / total["step_s"] if total["step_s"] else 0.0
    body.append(["all", "", ""] + [cell(total, k, f) for _, k, f in cols[3:]])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
