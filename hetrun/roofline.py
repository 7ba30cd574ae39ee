"""Every modeled second: the roofline of one operator, one SwiGLU expert's FLOPs and bytes, link transfers.

An operator doing F FLOPs and moving B bytes takes
    launches x launch + max(C, M) + (1 - overlap) x min(C, M),  C = F / (peak x compute eff.), M = B / (bw x memory eff.)
`overlap` is 1 for accelerators (compute hides memory time entirely, the classic roofline) and fitted per CPU
runtime by calibration (a CPU GEMM streams weights and computes only partly at once). Peaks, bandwidths and
efficiencies are DeviceType fields; a simulation may override the efficiencies per operator class (GEMM,
attention) through an `Efficiency`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hetrun.errors import ProfileError
from hetrun.formats import activation_bytes

if TYPE_CHECKING:
    from hetrun.profile import DeviceType


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak a class of kernels reaches on one device type, and its fixed cost per kernel."""

    compute: float
    memory: float
    launch_us: float

    def __post_init__(self):
        if not (0 < self.compute <= 1 and 0 < self.memory <= 1) or self.launch_us < 0:
            raise ProfileError(f"efficiencies must be in (0, 1] and launch overhead >= 0, got compute={self.compute}, "
                               f"memory={self.memory}, launch_us={self.launch_us}")

    @classmethod
    def of(cls, device: "DeviceType") -> "Efficiency":
        """The device type's own (GEMM) efficiencies."""
        return cls(device.compute_efficiency, device.memory_efficiency, device.launch_overhead_us)


def roofline(flops, bytes_moved, peak_flops: float, bandwidth: float, compute_eff: float, memory_eff: float,
             launch_us: float, kernels: float = 1.0, overlap: float = 1.0):
    """Seconds of an operator from its FLOPs and bytes and the hardware's rates; numpy arrays broadcast."""
    c = np.asarray(flops, dtype=np.float64) / (peak_flops * compute_eff)
    m = np.asarray(bytes_moved, dtype=np.float64) / (bandwidth * memory_eff)
    out = kernels * launch_us * 1e-6 + np.maximum(c, m) + (1.0 - overlap) * np.minimum(c, m)
    return float(out) if out.ndim == 0 else out


def op_seconds(device: "DeviceType", precision: str, flops, bytes_moved, eff: Efficiency | None = None,
               kernels: float = 1.0):
    """Roofline seconds of an operator on `device` at `precision` (its own efficiencies unless `eff` is given)."""
    e = eff or Efficiency.of(device)
    return roofline(flops, bytes_moved, device.peak_flops(precision), device.memory_bw_gbs * 1e9, e.compute, e.memory,
                    e.launch_us, kernels)


def swiglu_flops_bytes(tokens, hidden: int, intermediate: int, weight_bytes, act_bytes: float):
    """(FLOPs, bytes) of `tokens` rows through SwiGLU experts whose weights (`weight_bytes`, all of them) are read
    once: gate and up [D -> I] and down [I -> D], activations in, out and in between at `act_bytes` each."""
    tokens = np.asarray(tokens, dtype=np.float64)
    flops = 6.0 * tokens * hidden * intermediate
    moved = weight_bytes + act_bytes * tokens * (2 * hidden + 3 * intermediate)
    return flops, moved


def expert_seconds(device: "DeviceType", precision: str, tokens: int, hidden: int, intermediate: int,
                   weight_bytes: float, act_bytes: float | None = None, eff: Efficiency | None = None) -> float:
    """Modeled seconds for `tokens` tokens through one SwiGLU expert (weights read once per call); activations
    move at the format's own width unless `act_bytes` says otherwise."""
    if tokens <= 0:
        return 0.0
    if act_bytes is None:
        act_bytes = activation_bytes(precision)
    return op_seconds(device, precision, *swiglu_flops_bytes(tokens, hidden, intermediate, weight_bytes, act_bytes),
                      eff)


def transfer_seconds(nbytes, bandwidth_gbs: float, efficiency: float, latency_us: float):
    """Seconds to move `nbytes` over a link (one direction); zero bytes cost nothing. Arrays broadcast."""
    if bandwidth_gbs <= 0 or efficiency <= 0:
        raise ProfileError(f"link bandwidth ({bandwidth_gbs} GB/s) and efficiency ({efficiency}) must be positive")
    b = np.asarray(nbytes, dtype=np.float64)
    out = np.where(b > 0, latency_us * 1e-6 + b / (bandwidth_gbs * 1e9 * efficiency), 0.0)
    return float(out) if out.ndim == 0 else out
