"""Hardware profiles: the device catalog (one YAML per SKU) and deployment profiles (which devices, how many, where)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetrun.backends.registry import backend_names
from hetrun.errors import PrecisionError, ProfileError
from hetrun.formats import PRECISIONS, base_precision


class StrictModel(BaseModel):
    """A schema that refuses unknown fields and is immutable once validated (profiles, settings, manifests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSpec(StrictModel):
    name: str = ""
    bandwidth_gbs: float = Field(gt=0, description="one direction, GB/s")
    latency_us: float = Field(default=5.0, ge=0)
    efficiency: float = Field(default=0.8, gt=0, le=1)


class DeviceType(StrictModel):
    """One SKU in the device catalog."""

    name: str
    vendor: Literal["nvidia", "huawei", "intel", "amd", "other"]
    kind: Literal["gpu", "npu", "cpu", "accelerator"]
    description: str = ""
    tflops: dict[str, float]
    precisions: list[str] = Field(min_length=1)
    memory_gb: float = Field(gt=0)
    memory_bw_gbs: float = Field(gt=0)
    scale_up: LinkSpec
    tdp_w: float = Field(gt=0)
    idle_w: float = Field(default=0.0, ge=0)
    price_per_hour: float = Field(ge=0)
    real_backends: list[str] = []
    sources: list[str] = Field(min_length=1)
    # Fraction of peak reached in practice; calibration fits these.
    compute_efficiency: float = Field(default=0.6, gt=0, le=1)
    memory_efficiency: float = Field(default=0.8, gt=0, le=1)
    launch_overhead_us: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        bad = [p for p in list(self.precisions) + list(self.tflops) if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {bad[0]!r}; use {', '.join(PRECISIONS)}")
        missing = [p for p in self.precisions if p not in self.tflops and p not in ("int4",)]
        if missing:
            raise ValueError(f"precision {missing[0]!r} has no tflops figure")
        if any(v <= 0 for v in self.tflops.values()):
            raise ValueError("tflops figures must be positive")
        return self

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s at a precision (weight-only formats compute at the best 16-bit rate)."""
        if precision in self.tflops:
            return self.tflops[precision] * 1e12
        return max(self.tflops.get("bf16", 0), self.tflops.get("fp16", 0), self.tflops.get("fp32", 0)) * 1e12


class DeviceGroup(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: str
    count: int = Field(default=1, ge=1, le=100_000)
    node: int = Field(default=0, ge=0)
    per_node: int | None = Field(default=None, ge=1, description="devices per node; nodes count up from `node`")
    backend: str = "simulated"
    precision: str | None = None  # None: the device's best; an explicit request must be supported
    price_per_hour: float | None = Field(default=None, ge=0)
    reserved_gb: float = Field(default=0.0, ge=0, description="activations and KV cache kept free on each device")

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
    timeout_s: float = Field(default=60.0, gt=0, description="a rank silent this long is declared failed")
    startup_timeout_s: float = Field(default=600.0, gt=0, description="how long ranks wait for each other to load")
    heartbeat_s: float = Field(default=0.25, gt=0, le=10)


class ProfileModel(StrictModel):
    name: str
    description: str = ""
    devices: list[DeviceGroup] = Field(min_length=1)
    device_types: dict[str, DeviceType] = {}
    dense_device: str | None = None
    fallback_device: str | None = None
    links: dict[Literal["intra_node", "inter_node"], LinkSpec] = {}
    pins: list[PinRule] = []
    grid_kg_co2_per_kwh: float = Field(default=0.4, ge=0)
    extra: dict[str, Any] = {}  # free-form fields other modules own (simulation settings, distributed layout)
    distributed: DistributedLayout | None = None  # ranks under torchrun; None: one process


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
            d = validate_model(DeviceType, _parse_yaml(f.read_text(), f.name), f"device type {f.name}")
            out[d.name] = d
    return out


def builtin_profiles() -> dict[str, str]:
    """Names and descriptions of the built-in deployment profiles."""
    out = {}
    for f in sorted(resources.files("hetrun.profiles").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            out[f.name[:-5]] = str((_parse_yaml(f.read_text(), f.name) or {}).get("description", ""))
    return out


def load_profile(name_or_path: "str | Path | Profile | dict") -> Profile:
    """A validated profile from a built-in name, a YAML path, or a dict; clear one-line errors otherwise."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if isinstance(name_or_path, dict):
        return _build(name_or_path, "<dict>")
    text, source = _read(str(name_or_path))
    return _build(_parse_yaml(text, source), source)


def _read(name: str) -> tuple[str, str]:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ProfileError(f"profile file '{name}' not found; give a YAML path or one of: {', '.join(builtin_profiles())}")
        try:
            return p.read_text(), str(p)
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read profile '{name}': {e}") from None
    f = resources.files("hetrun.profiles").joinpath(f"{name}.yaml")
    if not f.is_file():
        raise ProfileError(f"unknown profile '{name}'; use a YAML path or one of: {', '.join(builtin_profiles())}")
    return f.read_text(), name


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ProfileError(f"profile '{source}' is not valid YAML{at}: {getattr(e, 'problem', e)}") from None


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
