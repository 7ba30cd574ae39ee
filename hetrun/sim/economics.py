"""Dollars, joules and CO2: the arithmetic that turns simulated token rates into cost.

All prices are per hour per device (profile fields with their sources) or per million tokens (API prices).
Functions refuse non-finite or negative inputs with a one-line error, so a report never shows NaN or inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetrun.errors import HetrunError, ProfileError
from hetrun.profile import Profile

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class ApiPrice:
    """Per million tokens."""

    name: str
    input_cache_hit: float
    input_cache_miss: float
    output: float
    source: str


# DeepSeek-R1 API prices the inference-system overview bills its day of tokens at.
DEEPSEEK_R1_PRICE = ApiPrice("DeepSeek-R1 API", 0.14, 0.55, 2.19,
                             "DeepSeek-V3/R1 inference system overview, footnote: $0.14/M input (cache hit), "
                             "$0.55/M input (cache miss), $2.19/M output")
# DeepSeek's fleet on that day: 226.75 H800 nodes on average, 8 GPUs each, $2 per GPU-hour.
DEEPSEEK_FLEET = {"nodes": 226.75, "gpus_per_node": 8, "gpu_hour_usd": 2.0, "published_cost_per_day": 87072.0,
                  "published_revenue_per_day": 562027.0}


def _finite(name: str, *values: float) -> None:
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise HetrunError(f"{name} must be a finite number >= 0, got {v!r}")


def fleet_cost_per_day(nodes: float, gpus_per_node: int, gpu_hour_usd: float) -> float:
    """nodes x GPUs per node x 24 h x $ per GPU-hour."""
    _finite("fleet size and price", nodes, gpus_per_node, gpu_hour_usd)
    return nodes * gpus_per_node * 24.0 * gpu_hour_usd


def daily_revenue(input_tokens: float, cache_hit_tokens: float, output_tokens: float,
                  price: ApiPrice = DEEPSEEK_R1_PRICE) -> dict:
    """Revenue of a day's tokens billed at an API price, by component."""
    _finite("token counts", input_tokens, cache_hit_tokens, output_tokens)
    if cache_hit_tokens > input_tokens:
        raise HetrunError(f"cache-hit tokens ({cache_hit_tokens:g}) exceed input tokens ({input_tokens:g})")
    hit = cache_hit_tokens / 1e6 * price.input_cache_hit
    miss = (input_tokens - cache_hit_tokens) / 1e6 * price.input_cache_miss
    out = output_tokens / 1e6 * price.output
    return {"input_cache_hit_usd": hit, "input_cache_miss_usd": miss, "output_usd": out, "total_usd": hit + miss + out}


def profile_price_per_hour(profile: Profile) -> float:
    """Dollars per hour for every device of the profile; raises when a device has no price."""
    total = 0.0
    for d in profile.devices:
        p = d.price_per_hour
        if p is None or not math.isfinite(p) or p < 0:
            raise ProfileError(f"profile '{profile.name}': device '{d.id}' has no usable price_per_hour; "
                               "set price_per_hour on its group or device type")
        total += p
    if total <= 0:
        raise ProfileError(f"profile '{profile.name}' costs $0 per hour (every device has price_per_hour 0); "
                           "set prices on its device groups to compare costs")
    return total


def usd_per_million(usd_per_hour: float, tokens_per_s: float) -> float | None:
    """$ per million tokens at a rate; None when the rate is zero (nothing to price)."""
    if tokens_per_s <= 0 or not math.isfinite(tokens_per_s):
        return None
    return usd_per_hour / 3600.0 / tokens_per_s * 1e6


def kg_co2_per_million(joules_per_token: float, grid_kg_per_kwh: float) -> float:
    """kg CO2 per million tokens from energy per token and grid carbon intensity."""
    return joules_per_token * 1e6 / 3.6e6 * grid_kg_per_kwh


def fleet_for_volume(input_tokens_per_day: float, output_tokens_per_day: float, prefill_per_node: float,
                     decode_per_node: float) -> dict:
    """Nodes a day's tokens need at simulated per-node rates (prefill and decode nodes, averaged over the day)."""
    _finite("token volumes", input_tokens_per_day, output_tokens_per_day)
    if prefill_per_node <= 0 or decode_per_node <= 0:
        raise HetrunError("per-node token rates must be positive to size a fleet")
    p = input_tokens_per_day / SECONDS_PER_DAY / prefill_per_node
    d = output_tokens_per_day / SECONDS_PER_DAY / decode_per_node
    return {"prefill_nodes": p, "decode_nodes": d, "nodes": p + d}
