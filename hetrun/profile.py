"""Hardware profiles: the device catalog (one YAML per SKU) and deployment profiles (which devices, how many, where).

Every YAML file hetrun reads goes through `parse_yaml`: safe loading only, no aliases (a few lines of `&a`/`*a`
expand to gigabytes), no duplicate keys, at most MAX_YAML_BYTES. Every float of every schema is finite, and each
size a profile can state has a ceiling that real deployments never reach, named in the error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.scanner import ScannerError

from hetrun.backends.registry import backend_names
from hetrun.errors import PrecisionError, ProfileError
from hetrun.formats import PRECISIONS, base_precision

# Ceilings no real deployment reaches (DeepSeek's whole serving fleet is 1,814 GPUs; an H200 holds 141 GB), so that
# a typo or a hostile file fails at once, with the limit in the error, instead of planning for hours.
MAX_DEVICES = 4096  # devices in one profile, all groups together
MAX_YAML_BYTES = 16 * 2**20
MAX_YAML_DEPTH = 64  # nested collections; hetrun's own files nest 5 deep
MAX_MEMORY_GB = 1e6  # per device
MAX_TFLOPS = 1e6
MAX_BANDWIDTH_GBS = 1e6
MAX_WATTS = 1e6
MAX_PRICE_PER_HOUR = 1e6
MAX_MICROSECONDS = 1e9
MAX_TIMEOUT_S = 1e6  # about 11 days
MIN_RATE = 1e-6  # TFLOPS and GB/s: below this a device or link does nothing in a lifetime, and times overflow
MIN_EFFICIENCY = 1e-5  # below the calibration fit's own floor (1e-4)


class StrictModel(BaseModel):
    """A schema that refuses unknown fields, NaN and infinities, true/false where a number belongs, and is immutable
    once validated (profiles, settings, manifests)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value, info):
        # pydantic reads true as 1: `memory_gb: yes` would silently be 1 GB
        annotation = cls.model_fields[info.field_name].annotation
        values = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(v, bool) for v in values) and _numbers_only(annotation):
            raise ValueError("a number is needed here, not true/false")
        return value


def _numbers_only(annotation) -> bool:
    """Whether a field holds numbers only: int, float, an optional one, or a dict of them."""
    if annotation in (int, float):
        return True
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is dict:
        args = args[1:]
    elif get_origin(annotation) not in (Union, UnionType):
        return False
    return bool(args) and all(a in (int, float) for a in args)


DensePrecision = Literal["auto", "model", "fp32", "int8-w8a8", "int4-w4a8"]
DENSE_PRECISIONS: tuple[str, ...] = get_args(DensePrecision)


class LinkSpec(StrictModel):
    name: str = ""
    bandwidth_gbs: float = Field(ge=MIN_RATE, le=MAX_BANDWIDTH_GBS, description="one direction, GB/s")
    latency_us: float = Field(default=5.0, ge=0, le=MAX_MICROSECONDS)
    efficiency: float = Field(default=0.8, ge=MIN_EFFICIENCY, le=1)


class DeviceType(StrictModel):
    """One SKU in the device catalog."""

    name: str
    vendor: Literal["nvidia", "huawei", "intel", "amd", "other"]
    kind: Literal["gpu", "npu", "cpu", "accelerator"]
    description: str = ""
    tflops: dict[str, float]
    precisions: list[str] = Field(min_length=1)
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB)
    memory_bw_gbs: float = Field(ge=MIN_RATE, le=MAX_BANDWIDTH_GBS)
    scale_up: LinkSpec
    tdp_w: float = Field(gt=0, le=MAX_WATTS)
    idle_w: float = Field(default=0.0, ge=0, le=MAX_WATTS)
    price_per_hour: float = Field(ge=0, le=MAX_PRICE_PER_HOUR)
    real_backends: list[str] = []
    sources: list[str] = Field(min_length=1)
    # Fraction of peak reached in practice; calibration fits these.
    compute_efficiency: float = Field(default=0.6, ge=MIN_EFFICIENCY, le=1)
    memory_efficiency: float = Field(default=0.8, ge=MIN_EFFICIENCY, le=1)
    launch_overhead_us: float = Field(default=5.0, ge=0, le=MAX_MICROSECONDS)

    @model_validator(mode="after")
    def _check(self):
        bad = [p for p in list(self.precisions) + list(self.tflops) if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {bad[0]!r}; use {', '.join(PRECISIONS)}")
        missing = [p for p in self.precisions if p not in self.tflops and p not in ("int4",)]
        if missing:
            raise ValueError(f"precision {missing[0]!r} has no tflops figure")
        if any(not MIN_RATE <= v <= MAX_TFLOPS for v in self.tflops.values()):
            raise ValueError(f"tflops figures must be between {MIN_RATE:g} and {MAX_TFLOPS:g}")
        return self

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s at a precision (weight-only formats compute at the best 16-bit rate)."""
        if precision in self.tflops:
            return self.tflops[precision] * 1e12
        return max(self.tflops.get("bf16", 0), self.tflops.get("fp16", 0), self.tflops.get("fp32", 0)) * 1e12


class DeviceGroup(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: str
    count: int = Field(default=1, ge=1, le=MAX_DEVICES)
    node: int = Field(default=0, ge=0, le=MAX_DEVICES)
    per_node: int | None = Field(default=None, ge=1, le=MAX_DEVICES, description="devices per node; nodes count up from `node`")
    backend: str = "simulated"
    precision: str | None = None  # None: the device's best; an explicit request must be supported
    price_per_hour: float | None = Field(default=None, ge=0, le=MAX_PRICE_PER_HOUR)
    reserved_gb: float = Field(default=0.0, ge=0, le=MAX_MEMORY_GB,
                               description="activations and KV cache kept free on each device")

    @model_validator(mode="after")
    def _check(self):
        known = [*backend_names(), "auto"]
        if self.backend not in known:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {', '.join(known)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        return self


class PinRule(StrictModel):
    """Put matching experts on a device group (llama.cpp `-ot`, KTransformers rules)."""

    device: str
    layers: list[int] | str | None = None  # [0, 1, 2] or "0-2"
    experts: list[int] | str | None = None
    load_below_percentile: float | None = Field(default=None, ge=0, le=100)
    load_above_percentile: float | None = Field(default=None, ge=0, le=100)


class DistributedLayout(StrictModel):
    """How the profile's devices map onto torch.distributed ranks; hetrun.distributed reads it under torchrun."""

    # per_group: one rank per device group; per_device: one rank per device; or explicit lists of group/device ids.
    ranks: Literal["per_group", "per_device"] | list[list[str]] = "per_group"
    # every_rank: each rank runs the dense parts on its own requests (DP-attention + EP); rank0: rank 0 alone does.
    dense: Literal["every_rank", "rank0"] = "every_rank"
    # auto: nccl when every rank drives NVIDIA GPUs, hccl when every rank drives Ascend NPUs, gloo otherwise.
    collective: Literal["auto", "gloo", "nccl", "hccl"] = "auto"
    timeout_s: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT_S, description="a rank silent this long is declared failed")
    startup_timeout_s: float = Field(default=600.0, gt=0, le=MAX_TIMEOUT_S,
                                     description="how long ranks wait for each other to load")
    heartbeat_s: float = Field(default=0.25, gt=0, le=10)


class RebalanceSettings(StrictModel):
    """Live rebalancing (hetrun.runtime.rebalancer): follow the measured load while serving, within a byte budget."""

    enabled: bool = True
    window_steps: int = Field(default=256, ge=1, le=10**7, description="steps per load window (a step: one forward pass)")
    ema: float = Field(default=0.5, gt=0, le=1, description="weight of the newest window in the smoothed load")
    threshold: float = Field(default=0.05, ge=0, le=1,
                             description="re-plan when the predicted step time falls by at least this fraction")
    max_move_gb: float = Field(default=8.0, ge=0, le=MAX_MEMORY_GB, description="expert bytes copied per rebalance")


class CacheSettings(StrictModel):
    """A hot-expert cache (hetrun.runtime.expert_cache) on fast devices that cannot hold their share of experts."""

    enabled: bool = True
    device: str = Field(description="device group or device id whose devices hold the cache slots")
    slots: int = Field(ge=1, le=2**22, description="cached experts (all layers together) per device")
    policy: Literal["decay", "lfu", "lru"] = "decay"
    half_life_steps: float = Field(default=32.0, gt=0, le=1e7, description="decay policy: a token's weight halves this often")
    max_loads: int = Field(default=8, ge=1, le=4096, description="loads in flight at once")


class ProfileModel(StrictModel):
    name: str
    description: str = ""
    devices: list[DeviceGroup] = Field(min_length=1, max_length=MAX_DEVICES)
    device_types: dict[str, DeviceType] = {}
    dense_device: str | None = None
    # the dense part's linear layers (hetrun.runtime.dense): "auto", "model" (as the model has them), or a format
    dense_precision: DensePrecision = "auto"
    # the whole model as one onnxruntime graph (hetrun.runtime.model_graph): off, auto (where it can), on (or an error)
    model_graph: Literal["off", "auto", "on"] = "off"
    fallback_device: str | None = None
    links: dict[Literal["intra_node", "inter_node"], LinkSpec] = {}
    pins: list[PinRule] = []
    grid_kg_co2_per_kwh: float = Field(default=0.4, ge=0, le=100)
    expert_timeout_s: float = Field(default=60.0, gt=0, le=86400,
                                    description="a device that does not answer an expert call this long fails over")
    extra: dict[str, Any] = {}  # free-form fields other modules own (simulation settings, distributed layout)
    distributed: DistributedLayout | None = None  # ranks under torchrun; None: one process
    rebalance: RebalanceSettings | None = None  # live rebalancing while serving; None: the plan stays as deployed
    cache: CacheSettings | None = None  # hot-expert cache slots on fast devices; None: none


@dataclass(frozen=True)
class Device:
    """One physical device instance of a profile, e.g. `h100:3`."""

    id: str
    group: str
    index: int
    node: int
    type: DeviceType
    backend: str
    precision: str | None
    price_per_hour: float
    reserved_bytes: float

    @property
    def memory_bytes(self) -> float:
        return self.type.memory_gb * 1e9


@dataclass(frozen=True)
class Profile:
    """A validated deployment profile with its devices expanded."""

    model: ProfileModel
    devices: tuple[Device, ...]
    source: str

    @property
    def name(self) -> str:
        return self.model.name

    def group(self, group_id: str) -> tuple[Device, ...]:
        """The devices of one group, or one device by its full id."""
        found = tuple(d for d in self.devices if d.group == group_id or d.id == group_id)
        if not found:
            raise ProfileError(f"profile '{self.name}' has no device '{group_id}'; its devices are: "
                               f"{', '.join(sorted({d.group for d in self.devices}))}")
        return found

    @property
    def dense_device(self) -> Device:
        return self.group(self.model.dense_device)[0] if self.model.dense_device else self.devices[0]

    @property
    def fallback_device(self) -> Device | None:
        return self.group(self.model.fallback_device)[0] if self.model.fallback_device else None

    def link(self, a: Device, b: Device) -> LinkSpec:
        """The link used between two devices (intra-node or inter-node)."""
        if a.node == b.node:
            return self.model.links.get("intra_node") or a.type.scale_up
        if "inter_node" not in self.model.links:
            raise ProfileError(f"profile '{self.name}' spans several nodes but has no links.inter_node; add one")
        return self.model.links["inter_node"]

    @property
    def num_nodes(self) -> int:
        return len({d.node for d in self.devices})


@functools.lru_cache(maxsize=1)
def device_catalog() -> dict[str, DeviceType]:
    """The built-in device catalog, one entry per SKU, from profiles/devices/*.yaml."""
    out = {}
    for f in sorted(resources.files("hetrun.profiles.devices").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            d = validate_model(DeviceType, parse_yaml(f.read_text(), f.name), f"device type {f.name}")
            out[d.name] = d
    return out


def builtin_profiles(published: bool = False) -> dict[str, str]:
    """Names and descriptions of the built-in deployment profiles; with `published`, also the published deployments
    the simulator is validated against (named `published/NAME`)."""
    out = {}
    folders = [("", "hetrun.profiles")] + ([("published/", "hetrun.profiles.published")] if published else [])
    for prefix, package in folders:
        for f in sorted(resources.files(package).iterdir(), key=lambda p: p.name):
            if f.name.endswith(".yaml"):
                out[prefix + f.name[:-5]] = str((parse_yaml(f.read_text(), f.name) or {}).get("description", ""))
    return out


def load_profile(name_or_path: "str | Path | Profile | dict") -> Profile:
    """A validated profile from a built-in name, a YAML path, or a dict; clear one-line errors otherwise."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if isinstance(name_or_path, dict):
        return _build(name_or_path, "<dict>")
    text, source = _read(str(name_or_path))
    return _build(parse_yaml(text, source), source)


def _read(name: str) -> tuple[str, str]:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ProfileError(f"profile file '{name}' not found; give a YAML path or one of: {', '.join(builtin_profiles())}")
        try:
            if p.stat().st_size > MAX_YAML_BYTES:
                raise ProfileError(f"profile '{name}' is {p.stat().st_size} bytes, more than the {MAX_YAML_BYTES} "
                                   "hetrun reads")
            return p.read_text(), str(p)
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read profile '{name}': {e}") from None
    f = resources.files("hetrun.profiles").joinpath(f"{name}.yaml")
    if not f.is_file():
        raise ProfileError(f"unknown profile '{name}'; use a YAML path or one of: {', '.join(builtin_profiles())}")
    return f.read_text(), name


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases, duplicate keys and nesting deeper than MAX_YAML_DEPTH."""

    _depth = 0

    def fetch_flow_collection_start(self, token_class):
        # PyYAML's scanner slows quadratically with flow depth: `[[[[...` must stop here, not after minutes
        if self.flow_level >= MAX_YAML_DEPTH:
            raise ScannerError(None, None, f"collections nested deeper than {MAX_YAML_DEPTH} levels",
                               self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed in hetrun's YAML files; write the value "
                                "out in full", self.peek_event().start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise ComposerError(None, None, f"collections nested deeper than {MAX_YAML_DEPTH} levels",
                                self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                break
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {str(key)[:60]!r}; give each key once",
                                       key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: "str | bytes", source: str, error=ProfileError, what: str = "profile") -> Any:
    """YAML text as plain data, or a one-line `error` naming `source`: safe tags only, no aliases, no duplicate
    keys, at most MAX_YAML_BYTES. Every YAML file hetrun reads comes through here."""
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{what} '{source}' is {len(text)} bytes, more than the {MAX_YAML_BYTES} hetrun reads")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise error(f"{what} '{source}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise error(f"{what} '{source}' is nested too deeply to be a hetrun file") from None
    except (ValueError, TypeError) as e:  # a safe tag on a value of the wrong form (`!!set a`, `!!binary x`)
        raise error(f"{what} '{source}' is not valid YAML: a tagged value of the wrong form "
                    f"({' '.join(str(e).split())[:80]})") from None
    except UnicodeDecodeError:
        raise error(f"{what} '{source}' is not UTF-8 text") from None


def first_error(e: ValidationError, top: str = "(top level)") -> tuple[str, str]:
    """(dotted field path, message) of a pydantic error's first problem, for one-line errors."""
    err = e.errors()[0]
    return ".".join(str(x) for x in err["loc"]) or top, err["msg"].removeprefix("Value error, ")


def validate_model(cls, data: Any, source: str, field_prefix: str = ""):
    """`cls` validated from `data`, or a one-line ProfileError naming `source` and the first bad field (its path
    after `field_prefix`)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        loc, msg = first_error(e)
        raise ProfileError(f"{source}: field '{field_prefix}{loc}': {msg}; fix that field and retry") from None


def _build(data: Any, source: str) -> Profile:
    model = validate_model(ProfileModel, data, f"profile '{source}'")
    total = sum(g.count for g in model.devices)
    if total > MAX_DEVICES:
        raise ProfileError(f"profile '{source}' has {total} devices, more than the {MAX_DEVICES} hetrun plans for "
                           "one deployment; split it into several deployments")
    catalog = {**device_catalog(), **model.device_types}
    devices, ids = [], set()
    for g in model.devices:
        if g.id in ids:
            raise ProfileError(f"profile '{source}': device id '{g.id}' is used twice; give each group its own id")
        ids.add(g.id)
        if g.type not in catalog:
            raise ProfileError(f"profile '{source}': unknown device type '{g.type}' in group '{g.id}'; "
                               f"known types: {', '.join(sorted(catalog))} (or define it under device_types)")
        dt = catalog[g.type]
        if g.precision is not None and base_precision(g.precision) not in dt.precisions:
            raise PrecisionError(f"device '{g.id}' ({dt.name}) cannot run {g.precision}; it supports "
                                 f"{', '.join(dt.precisions)}; request one of those or leave precision unset")
        for i in range(g.count):
            node = g.node + (i // g.per_node if g.per_node else 0)
            devices.append(Device(f"{g.id}:{i}", g.id, i, node, dt, g.backend, g.precision,
                                  dt.price_per_hour if g.price_per_hour is None else g.price_per_hour,
                                  g.reserved_gb * 1e9))
    for field_name in ("dense_device", "fallback_device"):
        ref = getattr(model, field_name)
        if ref is not None and ref not in ids and ref not in {d.id for d in devices}:
            raise ProfileError(f"profile '{source}': {field_name} '{ref}' is not one of the device ids: {', '.join(sorted(ids))}")
    for pin in model.pins:
        if pin.device not in ids and pin.device not in {d.id for d in devices}:
            raise ProfileError(f"profile '{source}': pin names device '{pin.device}', which the profile lacks; "
                               f"use one of: {', '.join(sorted(ids))}")
    if model.distributed is not None and not isinstance(model.distributed.ranks, str):
        _check_rank_lists(model.distributed.ranks, devices, source)
    return Profile(model, tuple(devices), source)


def _check_rank_lists(ranks: list[list[str]], devices: list[Device], source: str) -> None:
    """Every device on exactly one rank; names are group or device ids."""
    owner: dict[str, int] = {}
    for r, names in enumerate(ranks):
        if not names:
            raise ProfileError(f"profile '{source}': distributed.ranks[{r}] is empty; give every rank a device")
        for name in names:
            found = [d for d in devices if d.group == name or d.id == name]
            if not found:
                raise ProfileError(f"profile '{source}': distributed.ranks[{r}] names '{name}', which is no device "
                                   f"group or device id; use one of: {', '.join(sorted({d.group for d in devices}))}")
            for d in found:
                if d.id in owner:
                    raise ProfileError(f"profile '{source}': device '{d.id}' is on rank {owner[d.id]} and rank {r}; "
                                       "put each device on one rank")
                owner[d.id] = r
    missing = [d.id for d in devices if d.id not in owner]
    if missing:
        raise ProfileError(f"profile '{source}': distributed.ranks leaves {', '.join(missing[:3])} on no rank; "
                           "list every device (or use ranks: per_group)")
