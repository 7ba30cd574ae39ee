"""Chrome traces of distributed MoE steps: each rank records spans, rank 0 merges them into one file."""

from __future__ import annotations

import time
from contextlib import contextmanager

LANES = {"moe": 0, "comm": 1, "experts": 2}


class Tracer:
    """Spans of one rank, timed on its own clock; `offset_us` maps them onto rank 0's clock."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.events: list[dict] = []
        self.origin_perf = time.perf_counter()
        self.origin_wall_us = time.time() * 1e6
        self.offset_us = 0.0

    def now_us(self) -> float:
        return self.origin_wall_us + (time.perf_counter() - self.origin_perf) * 1e6

    def add(self, name: str, lane: str, start_us: float, end_us: float, **args) -> None:
        if self.enabled:
            self.events.append({"name": name, "cat": lane, "ph": "X", "ts": start_us,
                                "dur": max(end_us - start_us, 0.0), "tid": LANES[lane], "args": args})

    @contextmanager
    def span(self, name: str, lane: str, **args):
        if not self.enabled:
            yield
            return
        t0 = self.now_us()
        try:
            yield
        finally:
            self.add(name, lane, t0, self.now_us(), **args)

    def export(self) -> dict:
        """This rank's events on rank 0's clock."""
        return {"events": [{**e, "ts": e["ts"] - self.offset_us} for e in self.events]}


def merge_chrome_trace(per_rank: list[dict], labels: list[str], meta: dict | None = None) -> dict:
    """One Chrome trace (chrome://tracing, Perfetto): one process per rank, lanes moe / comm / experts."""
    events: list[dict] = []
    starts = [e["ts"] for part in per_rank if part for e in part["events"]]
    t0 = min(starts) if starts else 0.0
    for rank, (part, label) in enumerate(zip(per_rank, labels)):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": label}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for lane, tid in LANES.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": lane}})
        for e in (part or {}).get("events", []):
            events.append({**e, "pid": rank, "ts": round(e["ts"] - t0, 3), "dur": round(e["dur"], 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta or {}}
