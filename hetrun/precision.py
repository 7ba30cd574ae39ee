"""Which precision each device runs, and how many bytes its weights take at that precision.

Policy: an explicit request (the call's `precision`, else the profile group's `precision`) must be one the device
has -- its catalog entry's `precisions` list -- and one its backend runs, or it is an error that names the
device and what it has. Without one, each device runs the first precision of its catalog list (the list is in
order of preference) that its backend runs; when that is not the first, it says so with one warning per device
group. Variants such as fp8-w8a16 or int4-g32 need their base precision (fp8, int4) in the catalog.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hetrun.errors import PrecisionError
from hetrun.profile import PRECISION_BASE, PRECISIONS, Device, Profile

if TYPE_CHECKING:
    from hetrun.planner import Plan

log = logging.getLogger("hetrun")

FP8_BLOCK = 128  # weight block edge of the fp8 formats (hetrun.graphs.FP8_BLOCK)
INT4_GROUPS = {"int4": 128, "int4-g32": 32}


def base_precision(precision: str) -> str:
    """The catalog precision a format needs: fp8-w8a16 -> fp8, int4-g32 -> int4, others themselves."""
    return PRECISION_BASE.get(precision, precision)


def runnable_precisions(device: Device) -> set[str]:
    """Every precision name this device's backend executes (variants included when it runs their base)."""
    from hetrun.backends.registry import backend_class, resolve_backend

    cls = backend_class(resolve_backend(device))
    if cls is None:  # backend not importable here: it says why when it is loaded
        return set(PRECISIONS)
    return {p for p in PRECISIONS if base_precision(p) in cls.caps.precisions}


def _check_explicit(device: Device, precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    have = device.type.precisions
    if base_precision(precision) not in have:
        raise PrecisionError(f"device '{device.id}' ({device.type.name}) has no {base_precision(precision)}; its "
                             f"precisions are {', '.join(have)}; ask for one of those or leave precision unset")
    if precision not in runnable_precisions(device):
        raise PrecisionError(f"backend '{device.backend}' of device '{device.id}' cannot run {precision} graphs; it "
                             f"runs {', '.join(sorted(runnable_precisions(device)))}; pick one of those or another backend")
    return precision


def _choose(device: Device, requested: str | None) -> tuple[str, str | None]:
    """(precision, fallback message or None)."""
    explicit = requested or device.precision
    if explicit is not None:
        return _check_explicit(device, explicit), None
    have = device.type.precisions
    runnable = runnable_precisions(device)
    for p in have:
        if p in runnable:
            if p == have[0]:
                return p, None
            return p, (f"device group '{device.group}' ({device.type.name}) prefers {have[0]}, which backend "
                       f"'{device.backend}' cannot run; it runs {p} instead")
    raise PrecisionError(f"device '{device.id}' ({device.type.name}) has {', '.join(have)} but backend "
                         f"'{device.backend}' runs none of them; choose another backend for it in the profile")


def device_precision(device: Device, requested: str | None = None) -> str:
    """The precision `device` runs: `requested` or the profile's (an error if unsupported), else its best runnable."""
    precision, fallback = _choose(device, requested)
    if fallback:
        log.warning("%s", fallback)
    return precision


def plan_precisions(profile: Profile, requested: str | None = None) -> dict[str, str]:
    """Device id -> precision for every device of a profile; one warning per device group that falls back."""
    out, warned = {}, set()
    for d in profile.devices:
        out[d.id], fallback = _choose(d, requested)
        if fallback and d.group not in warned:
            warned.add(d.group)
            log.warning("%s", fallback)
    return out


def matrix_bytes(precision: str, rows: int, cols: int) -> int:
    """Stored bytes of one [rows, cols] weight (nn.Linear layout [out, in]) at a precision, scales included.

    Exactly what hetrun.graphs counts as ExpertGraph.weight_bytes:
      fp32 / fp16 / bf16: 4 / 2 / 2 bytes a value;
      fp8, fp8-w8a16: one E4M3 byte a value + one FP32 scale per 128x128 block (ragged edge blocks count whole);
      int8: one byte a value + one FP32 scale per output row;
      int4, int4-g32: MatMulNBits layout: each row's groups of 128 (32) along `cols` padded to whole groups,
        half a byte a value, one FP32 scale per group, and per row the 4-bit zero points padded to whole bytes.
    """
    if rows < 0 or cols < 0:
        raise PrecisionError(f"matrix shape must be non-negative, got [{rows}, {cols}]")
    n = rows * cols
    if precision == "fp32":
        return 4 * n
    if precision in ("bf16", "fp16"):
        return 2 * n
    if precision in ("fp8", "fp8-w8a16"):
        return n + 4 * _ceil(rows, FP8_BLOCK) * _ceil(cols, FP8_BLOCK)
    if precision == "int8":
        return n + 4 * rows
    if precision in INT4_GROUPS:
        g = INT4_GROUPS[precision]
        groups = _ceil(cols, g)
        return rows * (groups * g // 2 + 4 * groups + _ceil(groups, 2))
    raise PrecisionError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def expert_bytes(precision: str, hidden: int, intermediate: int) -> int:
    """Stored bytes of one SwiGLU expert (gate, up: [I, D]; down: [D, I])."""
    return 2 * matrix_bytes(precision, intermediate, hidden) + matrix_bytes(precision, hidden, intermediate)


def device_weight_bytes(plan: "Plan") -> dict[str, int]:
    """Expert weight bytes each device of a plan holds at its precision: one copy per (expert, device), shared
    experts included (replicas of an expert on one device share a copy, as the dispatcher's sessions do)."""
    spec = plan.spec
    out = {d: 0 for d in plan.device_ids}
    for li in range(plan.num_layers):
        for e, d in sorted(set(zip(plan.phy2log[li].tolist(), plan.device_of[li].tolist()))):
            dev = plan.device_ids[d]
            out[dev] += expert_bytes(plan.precision[dev], spec.hidden_size, spec.moe_intermediate_size)
        for d in plan.shared_device_of[li].tolist():
            dev = plan.device_ids[d]
            out[dev] += expert_bytes(plan.precision[dev], spec.hidden_size, spec.shared_intermediate_size)
    return out


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
