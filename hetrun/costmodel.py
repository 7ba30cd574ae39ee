"""The roofline cost of one operator on one device type: the larger of compute and memory time, plus launches.

Every simulated time in hetrun comes from here: FLOPs / (peak at the precision x compute efficiency) against
bytes / (bandwidth x memory efficiency), plus a fixed launch overhead per kernel. The efficiencies are
DeviceType fields (calibration fits them); a simulation may override them per operator class (GEMM,
attention) through an `Efficiency`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrun.errors import ProfileError
from hetrun.profile import DeviceType

# Bytes of one activation element when a matmul runs at a precision (weight-only formats keep 16-bit activations).
ACTIVATION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 2.0}
# Bytes of one element of a stored tensor (KV cache, transfers) in a named dtype.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


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
    def of(cls, device: DeviceType) -> "Efficiency":
        """The device type's own (GEMM) efficiencies."""
        return cls(device.compute_efficiency, device.memory_efficiency, device.launch_overhead_us)


def roofline_seconds(device: DeviceType, precision: str, flops: float, bytes_moved: float) -> float:
    """Modeled seconds for an operator doing `flops` and moving `bytes_moved` at `precision` on `device`."""
    compute = flops / (device.peak_flops(precision) * device.compute_efficiency)
    memory = bytes_moved / (device.memory_bw_gbs * 1e9 * device.memory_efficiency)
    return device.launch_overhead_us * 1e-6 + max(compute, memory)


def op_seconds(device: DeviceType, precision: str, flops, bytes_moved, eff: Efficiency | None = None,
               kernels: float = 1.0):
    """Roofline seconds with explicit efficiencies and `kernels` launches; numpy arrays broadcast."""
    import numpy as np

    e = eff or Efficiency.of(device)
    compute = np.asarray(flops, dtype=np.float64) / (device.peak_flops(precision) * e.compute)
    memory = np.asarray(bytes_moved, dtype=np.float64) / (device.memory_bw_gbs * 1e9 * e.memory)
    out = kernels * e.launch_us * 1e-6 + np.maximum(compute, memory)
    return float(out) if out.ndim == 0 else out


def expert_flops_bytes(tokens, hidden: int, intermediate: int, weight_bytes: float, act_bytes: float = 2.0):
    """(FLOPs, bytes) of `tokens` tokens through one SwiGLU expert whose weights are read once."""
    flops = 6.0 * tokens * hidden * intermediate
    moved = weight_bytes + act_bytes * tokens * (2 * hidden + 3 * intermediate)
    return flops, moved


def expert_cost(device: DeviceType, precision: str, tokens: int, hidden: int, intermediate: int,
                weight_bytes: float, act_bytes: float = 2.0) -> float:
    """Modeled seconds for `tokens` tokens through one SwiGLU expert (weights read once per call)."""
    if tokens <= 0:
        return 0.0
    flops, moved = expert_flops_bytes(tokens, hidden, intermediate, weight_bytes, act_bytes)
    return roofline_seconds(device, precision, flops, moved)


def transfer_seconds(nbytes, bandwidth_gbs: float, efficiency: float, latency_us: float):
    """Seconds to move `nbytes` over a link (one direction); zero bytes cost nothing. Arrays broadcast."""
    import numpy as np

    if bandwidth_gbs <= 0 or efficiency <= 0:
        raise ProfileError(f"link bandwidth ({bandwidth_gbs} GB/s) and efficiency ({efficiency}) must be positive")
    b = np.asarray(nbytes, dtype=np.float64)
    out = np.where(b > 0, latency_us * 1e-6 + b / (bandwidth_gbs * 1e9 * efficiency), 0.0)
    return float(out) if out.ndim == 0 else out
