"""What this machine's CPU computes natively, read at run time instead of trusted from the device catalog."""

from __future__ import annotations

import functools
import logging
import platform
from typing import TYPE_CHECKING

from hetrun.formats import base_precision
from hetrun.once import warn_once

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hetrun")

# CPU flags (Linux /proc/cpuinfo names) that decide which formats run natively.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
VECTOR_FLAGS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_fp16"})
# 16-bit float dtype (by name: this module loads without torch, as `hetrun run` of a graph bundle does) -> the flags
# of CPUs that compute it natively (elsewhere torch emulates it through FP32)
NATIVE_FLAGS = {"bfloat16": BF16_FLAGS, "float16": frozenset({"avx512_fp16", "amx_fp16"})}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where the system does not list them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU multiplies BF16 natively (AVX512-BF16 or AMX); elsewhere BF16 is emulated in FP32."""
    return native_float("bfloat16")


def native_float(dtype: "torch.dtype | str") -> bool:
    """Whether the CPU computes floating-point `dtype` natively (FP32 and FP64 always; BF16 and FP16 by flags)."""
    name = str(dtype).removeprefix("torch.")
    return name not in NATIVE_FLAGS or bool(NATIVE_FLAGS[name] & cpu_flags())


def native_flags_text(dtype: "torch.dtype | str") -> str:
    """The flags that would make `dtype` native, as people write them ("AMX-BF16 or AVX512-BF16")."""
    return " or ".join(sorted(f.upper().replace("_", "-") for f in NATIVE_FLAGS.get(str(dtype).removeprefix("torch."),
                                                                                     ())))


def describe() -> dict:
    """What the CPU has, for benchmarks and `hetrun devices`: model, cores and the flags that matter here."""
    flags = cpu_flags()
    return {"cpu": platform.processor() or platform.machine(), "native_bf16": native_bf16(),
            "int8_dot": bool(INT8_DOT_FLAGS & flags),
            "flags": sorted((BF16_FLAGS | INT8_DOT_FLAGS | VECTOR_FLAGS) & flags)}


def summary(described: dict) -> str:
    """One line of what `describe()` found: model, flags of interest, native BF16, INT8 dot products."""
    return (f"{described['cpu']}; flags {', '.join(described['flags']) or 'none of interest'}; native BF16: "
            f"{'yes' if described['native_bf16'] else 'no'}; INT8 dot products: "
            f"{'yes' if described['int8_dot'] else 'no'}")


def say_held_as_fp32(backend: str, precision: str) -> None:
    """Say once per (backend, precision) that this CPU runtime holds the format's weights as FP32 after load."""
    warn_once(("held as fp32", backend, precision), "%s has no CPU kernel that computes %s from compressed weights "
              "here, so it holds those expert weights as FP32: exact, but neither smaller nor faster than fp32 (int4, "
              "and int8%s, stay compressed)", backend, precision, "-w8a8" if backend == "onnxruntime" else "")


def reorder(catalog: list[str], first: list[str], last: list[str]) -> list[str]:
    """`catalog` with the formats in `first` (those whose base the catalog has) in front and `last` at the end."""
    bases = set(catalog)
    front = [p for p in first if base_precision(p) in bases]
    back = [p for p in catalog if p in last]
    return front + [p for p in catalog if p not in front and p not in back] + back
