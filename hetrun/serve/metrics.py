"""/metrics: the server's Prometheus metrics, on a registry of its own.

Requests, tokens in and out, queue depth, time to first token and per output token, engine recoveries, and per
device of the deployment the expert tokens it computed with their modeled and measured time and its faults; with
the profile's `rebalance:` section, live plan switches, expert moves (by source and destination device) and the
bytes they copied; with its `cache:` section, cache hits and misses in routed rows, the hit rate, loads, bytes
loaded, evictions, cached experts per device and the modeled seconds the hits saved. All are read from the runtime's
DispatchStats at each scrape.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets from a tiny model on a CPU (milliseconds) to a large one behind a long queue (a minute).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every metric of one server. `engine` gives queue depth and recoveries, `runtime` (model.hetrun) the devices."""

    def __init__(self, engine, runtime=None, info: "dict[str, str] | None" = None):
        disable_created_metrics()  # no *_created series: process-wide, and this process is the server
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hetrun_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("hetrun_requests_cancelled", "Requests whose client went away before the end",
                                 ["endpoint"], registry=r)
        self.prompt_tokens = Counter("hetrun_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("hetrun_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("hetrun_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("hetrun_time_per_output_token_seconds",
                              "Mean time between a request's output tokens after the first", buckets=TPOT_BUCKETS,
                              registry=r)
        self.latency = Histogram("hetrun_request_duration_seconds", "From request arrival to its last token",
                                 buckets=TTFT_BUCKETS, registry=r)
        Gauge("hetrun_queue_depth", "Admitted requests waiting for their first token",
              registry=r).set_function(lambda: engine.waiting)
        Gauge("hetrun_requests_running", "Admitted requests producing tokens",
              registry=r).set_function(lambda: engine.outstanding - engine.waiting)
        if info:
            Gauge("hetrun_server_info", "What this server runs", list(info), registry=r).labels(**info).set(1)
        r.register(_EngineCollector(engine))
        if runtime is not None:
            r.register(_DeviceCollector(runtime))
            if getattr(runtime, "rebalancer", None) is not None:
                r.register(_RebalanceCollector(runtime))
            if getattr(runtime, "cache", None) is not None:
                r.register(_CacheCollector(runtime))

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def observe_request(self, endpoint: str, status: int | str, prompt_tokens: int, completion_tokens: int,
                        timings: "RequestTimings | None" = None) -> None:
        """Count one answered request; `timings` adds its latency samples."""
        self.requests.labels(endpoint, str(status)).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if timings is not None and timings.first is not None:
            self.ttft.observe(timings.first - timings.start)
            self.latency.observe(timings.last - timings.start)
            if completion_tokens > 1 and timings.last > timings.first:
                self.tpot.observe((timings.last - timings.first) / (completion_tokens - 1))


class RequestTimings:
    """perf_counter() times of one request: arrival, first token, latest token."""

    def __init__(self, start: float):
        self.start, self.first, self.last = start, None, start

    def token(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("hetrun_engine_restarts", "Generation loops started anew after a failed step",
                                  value=self.engine.restarts)
        yield CounterMetricFamily("hetrun_requests_recovered", "Requests resubmitted after a failed step",
                                  value=self.engine.recovered)


class _DeviceCollector:
    """Per device of the deployment, from the runtime's DispatchStats (accumulated since deploy)."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        ids = list(self.runtime.plan.device_ids)
        s = self.runtime.stats
        tokens = CounterMetricFamily("hetrun_device_expert_tokens", "Token rows computed by experts on the device",
                                     labels=["device"])
        modeled = CounterMetricFamily("hetrun_device_modeled_seconds", "Modeled device time in expert calls",
                                      labels=["device"])
        measured = CounterMetricFamily("hetrun_device_measured_seconds", "Measured wall time in expert calls",
                                       labels=["device"])
        faults = CounterMetricFamily("hetrun_device_faults", "Expert calls that failed on the device (failed over)",
                                     labels=["device"])
        per_fault = Tally(str(f.get("device")) for f in list(s.faults))
        for i, d in enumerate(ids):
            tokens.add_metric([d], float(s.tokens_per_device[i]))
            modeled.add_metric([d], float(s.modeled_s_per_device[i]))
            measured.add_metric([d], float(s.wall_s_per_device[i]))
            faults.add_metric([d], float(per_fault.get(d, 0)))
        yield from (tokens, modeled, measured, faults)
        precision = GaugeMetricFamily("hetrun_device_info", "Each device of the deployment and its precision",
                                      labels=["device", "precision"])
        for d in ids:
            precision.add_metric([d, str(self.runtime.plan.precision.get(d, ""))], 1.0)
        yield precision


class _RebalanceCollector:
    """Live rebalancing (hetrun.runtime.rebalancer): plan switches, expert moves and their bytes since deploy."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        s, rb = self.runtime.stats, self.runtime.rebalancer
        moves = list(s.moves)  # the generation thread appends between steps: read a copy
        yield CounterMetricFamily("hetrun_rebalance_switches", "Live plan switches (every layer at once, between "
                                  "steps)", value=len(list(s.switches)))
        by_pair = CounterMetricFamily("hetrun_rebalance_moves", "Expert copies live rebalancing moved onto a device",
                                      labels=["from", "to"])
        per_pair = Tally((str(m.get("from")), str(m.get("to"))) for m in moves)
        for (src, dst), n in sorted(per_pair.items()):
            by_pair.add_metric([src, dst], float(n))
        yield by_pair
        yield CounterMetricFamily("hetrun_rebalance_bytes", "Expert bytes live rebalancing copied",
                                  value=float(s.rebalance_bytes))
        yield CounterMetricFamily("hetrun_rebalance_failures", "Background re-plans that failed (the plan stayed)",
                                  value=float(s.rebalance_failures))
        yield GaugeMetricFamily("hetrun_rebalance_plan_version", "Live plan switches behind the running plan",
                                value=float(rb.version))
        yield GaugeMetricFamily("hetrun_rebalance_last_predicted_gain", "Predicted step-time gain of the last "
                                "re-plan decision (fraction; below the threshold nothing moves)",
                                value=float(rb.last_gain))


class _CacheCollector:
    """The hot-expert cache (hetrun.runtime.expert_cache): hits, misses, loads and modeled time saved since deploy."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        s = self.runtime.stats
        for name, doc, value in (
                ("hetrun_cache_hits", "Routed rows a cached expert copy served", s.cache_hits),
                ("hetrun_cache_misses", "Routed rows of cacheable experts that ran on their home device",
                 s.cache_misses),
                ("hetrun_cache_loads", "Expert copies loaded into cache slots", s.cache_loads),
                ("hetrun_cache_loaded_bytes", "Bytes those loads copied", s.cache_bytes),
                ("hetrun_cache_evictions", "Cached expert copies evicted for hotter ones", s.cache_evictions),
                ("hetrun_cache_saved_modeled_seconds", "Modeled expert seconds the hits saved against their home "
                 "devices", s.cache_saved_s),
                ("hetrun_cache_load_modeled_seconds", "Modeled link seconds of the loads (in the background)",
                 s.cache_load_s)):
            yield CounterMetricFamily(name, doc, value=float(value))
        looked = s.cache_hits + s.cache_misses
        yield GaugeMetricFamily("hetrun_cache_hit_rate", "Hits over routed rows of cacheable experts since deploy",
                                value=s.cache_hits / looked if looked else 0.0)
        held = GaugeMetricFamily("hetrun_cache_experts", "Expert copies the device's cache slots hold now",
                                 labels=["device"])
        for device, experts in self.runtime.cache.to_dict().items():
            held.add_metric([device], float(len(experts)))
        yield held
