"""What the dispatcher's own time depends on: the features of one layer call and the terms fitted over them.

Measurement records these features per timed layer call, the fit finds one coefficient per term (plus a fixed
cost per router kind), and prediction computes them for a real layer: all three read them from here.
"""

from __future__ import annotations

# (feature, fitted coefficient's name, unit scale): per expert call, per MB routed, per MB through shared experts,
# per 1000 token x expert router scores
DISPATCH_TERMS = (("calls", "per_call_us", 1.0), ("bytes", "us_per_mb", 1e-6),
                  ("shared_bytes", "us_per_shared_mb", 1e-6), ("router_work", "us_per_k_router", 1e-3))


def dispatch_features(router: str, tokens: int, calls: int, top_k: int, hidden: int, experts: int,
                      shared: int) -> dict:
    """What the dispatcher's time depends on: expert calls, bytes it permutes and combines for routed and for
    shared experts, and router work (tokens x experts)."""
    return {"router": router, "tokens": tokens, "calls": calls, "bytes": dispatch_bytes(tokens, top_k, hidden),
            "shared_bytes": 2.0 * tokens * hidden * 4.0 * shared, "router_work": float(tokens * experts)}


def dispatch_bytes(tokens: int, top_k: int, hidden: int) -> float:
    """Bytes the dispatcher moves for one call: permuted rows in, expert rows out, weighted combine (FP32)."""
    return 3.0 * tokens * top_k * hidden * 4.0
