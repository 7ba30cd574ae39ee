"""The roofline cost of one operator on one device type: the larger of compute and memory time, plus a launch."""

from __future__ import annotations

from hetrun.profile import DeviceType


def roofline_seconds(device: DeviceType, precision: str, flops: float, bytes_moved: float) -> float:
    """Modeled seconds for an operator doing `flops` and moving `bytes_moved` at `precision` on `device`."""
    compute = flops / (device.peak_flops(precision) * device.compute_efficiency)
    memory = bytes_moved / (device.memory_bw_gbs * 1e9 * device.memory_efficiency)
    return device.launch_overhead_us * 1e-6 + max(compute, memory)


def expert_cost(device: DeviceType, precision: str, tokens: int, hidden: int, intermediate: int,
                weight_bytes: float, act_bytes: float = 2.0) -> float:
    """Modeled seconds for `tokens` tokens through one SwiGLU expert (weights read once per call)."""
    if tokens <= 0:
        return 0.0
    flops = 6.0 * tokens * hidden * intermediate
    moved = weight_bytes + act_bytes * tokens * (2 * hidden + 3 * intermediate)
    return roofline_seconds(device, precision, flops, moved)
