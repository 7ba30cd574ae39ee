"""Simulation workloads: request lengths, prefix-cache hits, expert popularity and the latency targets.

A workload is a frozen description plus a deterministic sample of its requests (numpy, seeded). Presets:
`chat`, `long-context` and `deepseek-prod`, whose averages come from DeepSeek's published day of serving.

Expert popularity is a Zipf skew, or a measured load trace (`expert_load`: a file in EPLB's [layers, experts]
layout, as `model.hetrun.stats` writes it; see hetrun.placement.loads). `decode_batch` fixes the decode batch
instead of growing it to the per-user target. `arrival` and `arrival_rate` say how requests arrive for the
request-level simulator (hetrun.sim.requests): Poisson, bursty (gamma gaps with coefficient of variation
`burstiness`), or a JSONL trace of arrival time, prompt and output length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetrun.errors import PlacementError, WorkloadError
from hetrun.placement.loads import read_load

ARRIVALS = ("poisson", "bursty")
from hetrun.profile import MAX_YAML_BYTES, parse_yaml


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: lognormal with this mean and coefficient of variation (cv=0: every request the same)."""

    mean: float
    cv: float = 1.0
    min: int = 1
    max: int = 131072

    def check(self, what: str) -> None:
        for name, v in (("mean", self.mean), ("cv", self.cv), ("min", self.min), ("max", self.max)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise WorkloadError(f"{what}.{name} must be a finite number, got {v!r}")
        if self.mean <= 0:
            raise WorkloadError(f"{what}.mean must be a positive number of tokens, got {self.mean:g}")
        if self.cv < 0:
            raise WorkloadError(f"{what}.cv must be >= 0, got {self.cv:g}")
        if self.min < 1 or self.max < self.min:
            raise WorkloadError(f"{what} needs 1 <= min <= max, got min={self.min}, max={self.max}")
        if not self.min <= self.mean <= self.max:
            raise WorkloadError(f"{what}.mean={self.mean:g} lies outside [min={self.min}, max={self.max}]")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n integer lengths whose mean is this mean (rescaled after clipping), int64 [n]."""
        if self.cv == 0:
            return np.full(n, int(round(self.mean)), dtype=np.int64)
        sigma = math.sqrt(math.log1p(self.cv ** 2))
        x = rng.lognormal(-sigma ** 2 / 2, sigma, n)  # mean 1
        for _ in range(4):  # clipping moves the mean; rescale a few times
            y = np.clip(x * self.mean / x.mean(), self.min, self.max)
            x = y / y.mean()
        return np.clip(np.rint(x * self.mean), self.min, self.max).astype(np.int64)


@dataclass(frozen=True)
class RequestSample:
    """A drawn set of requests: prompt, output and cached-prefix lengths [N]."""

    prompt: np.ndarray
    output: np.ndarray
    cached: np.ndarray

    @property
    def new(self) -> np.ndarray:
        """Prompt tokens that prefill must compute [N]."""
        return self.prompt - self.cached

    def decode_kv_samples(self, n: int, seed: int) -> np.ndarray:
        """KV lengths seen by n decode steps drawn uniformly over all (request, output position) pairs [n]."""
        rng = np.random.default_rng(seed)
        p = self.output / self.output.sum()
        r = rng.choice(len(p), size=n, p=p)
        pos = np.floor(rng.random(n) * self.output[r]).astype(np.int64)
        return self.prompt[r] + pos

    @property
    def avg_kv_per_output_token(self) -> float:
        """Mean KV length over all output tokens (prompt plus tokens generated so far)."""
        o = self.output.astype(np.float64)
        return float((o * self.prompt + o * (o - 1) / 2).sum() / o.sum())


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    description: str = ""
    requests: int = 1000  # how many requests the sample holds
    cache_hit_ratio: float = 0.0  # fraction of prompt tokens served from the prefix cache
    per_user_tps: float = 20.0  # decode target: tokens/s each user must at least see
    ttft_s: float = 2.0  # prefill target: time to first token
    max_concurrency: int | None = None  # cap on requests decoded at once by one deployment
    expert_skew: float = 0.0  # Zipf exponent of expert popularity (0: every expert equally likely)
    target_avg_kv: float | None = None  # rescale prompts and outputs together so the sample has this average KV
    decode_batch: int | None = None  # fixed decode requests per attention device (None: grow to per_user_tps)
    expert_load: str | None = None  # [layers, experts] load trace (.json / .npy) instead of expert_skew
    arrival: str = "poisson"  # request-level simulation: poisson, bursty, or a .jsonl trace path
    arrival_rate: float | None = None  # requests per second (poisson, bursty); None: 80% of the modeled capacity
    burstiness: float = 3.0  # bursty: coefficient of variation of the gaps between requests (1 is Poisson)
    seed: int = 0
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise WorkloadError (one line) on any bad field."""
        self.prompt.check(f"workload '{self.name}' prompt")
        self.output.check(f"workload '{self.name}' output")
        nums = {"requests": self.requests, "cache_hit_ratio": self.cache_hit_ratio,
                "per_user_tps": self.per_user_tps, "ttft_s": self.ttft_s, "expert_skew": self.expert_skew}
        for k, v in nums.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise WorkloadError(f"workload '{self.name}': {k} must be a finite number, got {v!r}")
        if int(self.requests) != self.requests or self.requests < 1:
            raise WorkloadError(f"workload '{self.name}': requests must be a whole number >= 1, got {self.requests}")
        if not 0 <= self.cache_hit_ratio < 1:
            raise WorkloadError(f"workload '{self.name}': cache_hit_ratio must be in [0, 1), got {self.cache_hit_ratio}")
        if self.per_user_tps <= 0:
            raise WorkloadError(f"workload '{self.name}': per_user_tps must be > 0 tokens/s, got {self.per_user_tps}")
        if self.ttft_s <= 0:
            raise WorkloadError(f"workload '{self.name}': ttft_s must be > 0 seconds, got {self.ttft_s}")
        if self.max_concurrency is not None and (int(self.max_concurrency) != self.max_concurrency
                                                 or self.max_concurrency < 1):
            raise WorkloadError(f"workload '{self.name}': max_concurrency must be a whole number >= 1")
        if self.target_avg_kv is not None and (not isinstance(self.target_avg_kv, (int, float))
                                               or not math.isfinite(self.target_avg_kv) or self.target_avg_kv <= 0):
            raise WorkloadError(f"workload '{self.name}': target_avg_kv must be a positive number of tokens")
        if self.expert_skew < 0:
            raise WorkloadError(f"workload '{self.name}': expert_skew must be >= 0, got {self.expert_skew}")
        if self.decode_batch is not None and (isinstance(self.decode_batch, bool) or not isinstance(
                self.decode_batch, (int, float)) or int(self.decode_batch) != self.decode_batch or self.decode_batch < 1):
            raise WorkloadError(f"workload '{self.name}': decode_batch must be a whole number of requests >= 1, "
                                f"got {self.decode_batch!r}")
        if self.expert_load is not None and not isinstance(self.expert_load, (str, Path)):
            raise WorkloadError(f"workload '{self.name}': expert_load must be a path to a [layers, experts] load "
                                "table (.json or .npy)")
        if not isinstance(self.arrival, (str, Path)) or not (
                str(self.arrival) in ARRIVALS or str(self.arrival).endswith(".jsonl")):
            raise WorkloadError(f"workload '{self.name}': arrival must be one of {', '.join(ARRIVALS)} or a .jsonl "
                                f"trace path, got {self.arrival!r}")
        for k in ("arrival_rate", "burstiness"):
            v = getattr(self, k)
            if v is None and k == "arrival_rate":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise WorkloadError(f"workload '{self.name}': {k} must be a positive number, got {v!r}")

    def replace(self, **changes: Any) -> "Workload":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def sample(self) -> RequestSample:
        """The workload's requests, drawn once with its seed."""
        rng = np.random.default_rng(self.seed)
        n = int(self.requests)
        prompt = self.prompt.sample(rng, n)
        output = self.output.sample(rng, n)
        if self.target_avg_kv is not None:
            # one common factor keeps the prompt:output ratio and puts the sample's KV average on the target
            for _ in range(3):
                c = self.target_avg_kv / RequestSample(prompt, output, prompt * 0).avg_kv_per_output_token
                prompt = np.clip(np.rint(prompt * c), self.prompt.min, self.prompt.max).astype(np.int64)
                output = np.clip(np.rint(output * c), self.output.min, self.output.max).astype(np.int64)
        cached = np.minimum(np.floor(prompt * self.cache_hit_ratio).astype(np.int64), prompt - 1)
        return RequestSample(prompt, output, cached)

    def expert_popularity(self, layers: int, experts: int) -> np.ndarray:
        """[L, E] probability that a routed pick lands on each expert (rows sum to 1): the load trace's rows
        normalised (a row without load: uniform), else Zipf with the workload's skew."""
        if self.expert_load is not None:
            return popularity_from_load(self.expert_load, layers, experts)
        if self.expert_skew == 0:
            return np.full((layers, experts), 1.0 / experts)
        rng = np.random.default_rng(self.seed + 7)
        base = 1.0 / np.arange(1, experts + 1) ** self.expert_skew  # [E] Zipf by rank
        out = np.stack([rng.permutation(base) for _ in range(layers)])
        return out / out.sum(1, keepdims=True)

    def summary(self) -> dict:
        s = self.sample
        return {"name": self.name, "requests": int(self.requests),
                "mean_prompt": float(s.prompt.mean()), "mean_output": float(s.output.mean()),
                "cache_hit_ratio": float(s.cached.sum() / s.prompt.sum()),
                "avg_kv_per_output_token": s.avg_kv_per_output_token,
                "per_user_tps": self.per_user_tps, "ttft_s": self.ttft_s, "expert_skew": self.expert_skew}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        return d


def popularity_from_load(source, layers: int, experts: int) -> np.ndarray:
    """[L, E] pick probabilities from a load trace (a path, array or DispatchStats in EPLB's [layers, experts]
    layout); a one-line WorkloadError when it does not fit the model."""
    try:
        w = read_load(source)
    except PlacementError as e:
        raise WorkloadError(str(e)) from None
    if w.shape != (layers, experts):
        raise WorkloadError(f"expert load trace has shape {list(w.shape)} but the model has {layers} MoE layers x "
                            f"{experts} experts; record it on the same model (model.hetrun.stats' tokens_per_expert)")
    if not np.isfinite(w).all() or (w < 0).any() or not w.any():
        raise WorkloadError("expert load trace must hold finite token counts >= 0, not all zero")
    w = w.copy()
    w[~w.any(1)] = 1.0
    return w / w.sum(1, keepdims=True)


# DeepSeek's day of serving (open-infra-index, 2025-02-27/28): 608B input tokens, 342B of them prefix-cache hits;
# 168B output tokens; average KV length per output token 4,989; 20-22 tokens/s per user.
DEEPSEEK_DAY = {"input_tokens": 608e9, "cache_hit_tokens": 342e9, "output_tokens": 168e9, "avg_kv": 4989.0}


def deepseek_prod_means(prompt_cv: float = 1.0, output_cv: float = 1.0) -> tuple[float, float]:
    """(mean prompt, mean output) that give DeepSeek's input:output ratio and average KV length.

    With independent prompt P and output O, the KV length averaged over output tokens is
    E[P] + (E[O^2]/E[O] - 1)/2 = E[P] + (E[O](1 + cv_O^2) - 1)/2, and E[P] = (608/168) E[O].
    """
    ratio = DEEPSEEK_DAY["input_tokens"] / DEEPSEEK_DAY["output_tokens"]
    mean_out = (DEEPSEEK_DAY["avg_kv"] + 0.5) / (ratio + (1 + output_cv ** 2) / 2)
    return ratio * mean_out, mean_out


def _presets() -> dict[str, Workload]:
    p, o = deepseek_prod_means()
    return {
        "chat": Workload(
            "chat", LengthDist(2048, 1.0, 16, 32768), LengthDist(1024, 1.0, 16, 16384),
            description="interactive chat: 2k-token prompts, 1k-token answers, half the prompt from the prefix cache",
            cache_hit_ratio=0.5, per_user_tps=20.0, ttft_s=2.0,
            sources=("editable assumption: typical multi-turn chat lengths",)),
        "long-context": Workload(
            "long-context", LengthDist(32768, 0.5, 4096, 131072), LengthDist(1024, 1.0, 16, 16384),
            description="long documents: 32k-token prompts, 1k-token answers, little cache reuse",
            cache_hit_ratio=0.2, per_user_tps=15.0, ttft_s=10.0,
            sources=("editable assumption: retrieval / document QA lengths",)),
        "deepseek-prod": Workload(
            "deepseek-prod", LengthDist(round(p, 1), 1.0, 16, 131072), LengthDist(round(o, 1), 1.0, 1, 32768),
            description="DeepSeek's published day: avg KV 4,989 per output token, 56.3% prompt cache hits, "
                        "20-22 tokens/s per user, 608B input / 168B output tokens",
            cache_hit_ratio=342 / 608, per_user_tps=20.0, ttft_s=2.0, target_avg_kv=DEEPSEEK_DAY["avg_kv"],
            sources=("DeepSeek-V3/R1 inference system overview (github.com/deepseek-ai/open-infra-index, "
                     "202502OpenSourceWeek/day_6): 608B input (342B cache hits), 168B output, avg KV 4,989, "
                     "20-22 tokens/s per user",
                     "prompt and output means solved from the 608:168 ratio and the 4,989 average KV "
                     "(deepseek_prod_means); lognormal spread cv=1 is an assumption",
                     "TTFT 2 s: the SLO of published DeepSeek-serving reproductions on H800 (SGLang H800x104 "
                     "study: TTFT < 2 s, ITL < 50 ms; RTP-LLM: TTFT 1.6 s, ITL 50 ms); DeepSeek publishes none")),
    }


PRESETS: dict[str, Workload] = _presets()

_FIELDS = {f.name for f in dataclasses.fields(Workload)}
_DIST_FIELDS = {f.name for f in dataclasses.fields(LengthDist)}


def workload_from_dict(d: Any, source: str = "<dict>") -> Workload:
    """A Workload from a mapping (YAML/JSON shape of Workload.to_dict); one-line errors on bad fields."""
    if not isinstance(d, dict):
        raise WorkloadError(f"workload {source}: expected a mapping of fields, got {type(d).__name__}")
    unknown = set(d) - _FIELDS
    if unknown:
        raise WorkloadError(f"workload {source}: unknown field '{sorted(unknown)[0]}'; fields are: {', '.join(sorted(_FIELDS))}")
    kw = dict(d)
    for k in ("prompt", "output"):
        if k not in kw:
            raise WorkloadError(f"workload {source}: missing '{k}' (give mean, and optionally cv, min, max)")
        v = kw[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = {"mean": v}
        if not isinstance(v, dict) or set(v) - _DIST_FIELDS:
            raise WorkloadError(f"workload {source}: '{k}' must be a number or a mapping with {', '.join(sorted(_DIST_FIELDS))}")
        if "mean" not in v:
            raise WorkloadError(f"workload {source}: '{k}' needs a mean")
        kw[k] = LengthDist(**v)
    kw.setdefault("name", Path(source).stem if source != "<dict>" else "custom")
    kw["sources"] = tuple(kw.get("sources", ()))
    return Workload(**kw)


def load_workload(name_or_path: "str | Path | Workload | dict") -> Workload:
    """A workload from a preset name, a YAML/JSON file, a dict, or a Workload (returned as is)."""
    if isinstance(name_or_path, Workload):
        return name_or_path
    if isinstance(name_or_path, dict):
        return workload_from_dict(name_or_path)
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    p = Path(key)
    if not p.is_file():
        raise WorkloadError(f"unknown workload '{key}'; use a preset ({', '.join(PRESETS)}) or a YAML file")
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise WorkloadError(f"workload file '{key}' is larger than the {MAX_YAML_BYTES} bytes hetrun reads")
        text = p.read_bytes()
    except OSError as e:
        raise WorkloadError(f"cannot read workload file '{key}': {' '.join(str(e).split())}") from None
    data = parse_yaml(text, key, WorkloadError, "workload file")  # no aliases, no duplicate keys
    return workload_from_dict(data, key)
