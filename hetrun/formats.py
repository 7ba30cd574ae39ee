"""Every precision fact in one place: the formats an expert can run in, what a device needs for each, and its bytes.

A `Format` is a versioned description, in the spirit of torchao's configs: its name (what profiles, plans and
bundles say), the device-catalog precision a device needs to run it (`base`), how it stores weights and rounds
activations (for reports), its INT4 group size, and the bytes of one activation element its kernels move. The
graph builders (hetrun.runtime.graphs) and the cost models (hetrun.roofline, hetrun.placement, hetrun.sim) look
formats up here; nothing else lists precisions.

`FORMATS` holds the formats hetrun builds expert graphs for. The FP4 formats (NVFP4, MXFP4: Blackwell tensor cores)
are simulation-only (`graph=False`): device catalogs, plans and the simulator know them (`PRECISIONS`, `get_format`),
but no backend runs them and `hetrun.runtime.graphs.build_expert_graph` refuses them like any unknown format.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrun.errors import PrecisionError

FP8_BLOCK = 128  # DeepSeek-V3: 128x128 weight blocks, 1x128 activation tiles
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Format:
    """One expert-graph precision."""

    name: str
    base: str  # the device-catalog precision a device needs to run it (variants need their base)
    weights: str  # weight storage, for reports
    activations: str  # activation precision, for reports
    activation_bytes: float  # bytes of one activation element the device's kernels read and write
    group: int = 0  # INT4 group size along K; FP4 block size along K (one scale per block)
    version: int = 1  # bumped when the stored layout changes; bundles record it
    graph: bool = True  # hetrun.runtime.graphs builds ONNX graphs of it; False: simulation only
    int8_activations: bool = False  # activations quantized to INT8 on the fly (MatMulNBits accuracy level 4)


ALL_FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp32", "fp32", "FP32", "FP32", 4.0),
    Format("bf16", "bf16", "BF16", "BF16, FP32 accumulation", 2.0),
    Format("fp16", "fp16", "FP16", "FP16, FP32 accumulation", 2.0),
    Format("fp8", "fp8", "E4M3, 128x128 block scales", "E4M3, 1x128 tile scales", 1.0),
    # INT8 devices (Ascend, AMX Xeons) run W8A8 kernels; the CPU graph keeps FP32 activations but the modeled
    # device moves 8-bit ones.
    Format("int8", "int8", "INT8, per-channel scales", "FP32", 1.0),
    Format("int4", "int4", "INT4, group 128, zero points", "FP32", 2.0, group=128),
    Format("fp8-w8a16", "fp8", "E4M3, 128x128 block scales", "FP32", 2.0),
    Format("int4-g32", "int4", "INT4, group 32, zero points", "FP32", 2.0, group=32),
    # Weights as int8 / int4 and activations quantized to INT8 on the fly, per row and block of K (dynamic W8A8 /
    # W4A8): what INT8 NPUs and onnxruntime's MatMulNBits accuracy level 4 compute; fast on CPUs, about 1-2% more
    # error than weight-only.
    Format("int8-w8a8", "int8", "INT8, block 128, symmetric", "INT8 per 128, dynamic", 1.0, group=128,
           int8_activations=True),
    Format("int4-w4a8", "int4", "INT4, group 128, zero points", "INT8 per 128, dynamic", 1.0, group=128,
           int8_activations=True),
    # OCP / NVIDIA 4-bit floats (E2M1) with block scales, weights and activations both 4-bit (W4A4), as Blackwell's
    # tensor cores run them: NVFP4 one E4M3 scale per 16 values plus one FP32 per tensor, MXFP4 one E8M0 scale per 32
    # (OCP Microscaling Formats v1.0; NVIDIA "Introducing NVFP4", developer.nvidia.com/blog). Activation bytes
    # include the block scales.
    Format("nvfp4", "nvfp4", "E2M1, E4M3 scale per 16 + FP32 per tensor", "E2M1, E4M3 scale per 16", 0.5 + 1 / 16,
           group=16, graph=False),
    Format("mxfp4", "mxfp4", "E2M1, E8M0 scale per 32", "E2M1, E8M0 scale per 32", 0.5 + 1 / 32, group=32,
           graph=False),
)}

# The formats hetrun builds expert graphs for (every backend, bundle and benchmark); FP4 is simulation only.
FORMATS: dict[str, Format] = {k: f for k, f in ALL_FORMATS.items() if f.graph}
PRECISIONS: tuple[str, ...] = tuple(ALL_FORMATS)
# Bytes of one element of a stored tensor (KV cache, transfers) in a named dtype; FP4 with its block scales.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5,
               "nvfp4": 0.5 + 1 / 16, "mxfp4": 0.5 + 1 / 32}


def get_format(precision: str) -> Format:
    """The Format of a precision name; a one-line PrecisionError for unknown names."""
    try:
        return ALL_FORMATS[precision]
    except KeyError:
        raise PrecisionError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}") from None


def base_precision(precision: str) -> str:
    """The catalog precision a format needs: fp8-w8a16 -> fp8, int4-g32 -> int4, others themselves."""
    return get_format(precision).base


def activation_bytes(precision: str) -> float:
    """Bytes of one activation element at a precision, as the cost models count them."""
    return get_format(precision).activation_bytes


def matrix_bytes(precision: str, rows: int, cols: int) -> int:
    """Stored bytes of one [rows, cols] weight (nn.Linear layout [out, in]) at a precision, scales included.

    Exactly what hetrun.runtime.graphs counts as ExpertGraph.weight_bytes:
      fp32 / fp16 / bf16: 4 / 2 / 2 bytes a value;
      fp8, fp8-w8a16: one E4M3 byte a value + one FP32 scale per 128x128 block (ragged edge blocks count whole);
      int8: one byte a value + one FP32 scale per output row;
      int8-w8a8: MatMulNBits layout: each row's blocks of 128 along `cols` padded whole, one byte a value and one
        FP32 scale per block;
      int4, int4-g32, int4-w4a8: MatMulNBits layout: each row's groups of 128 (32) along `cols` padded to whole groups,
        half a byte a value, one FP32 scale per group, and per row the 4-bit zero points padded to whole bytes;
      nvfp4 / mxfp4 (simulation only): half a byte a value, one 1-byte scale per block of 16 / 32 along `cols`,
        nvfp4 also one FP32 scale per tensor.
    """
    fmt = get_format(precision)
    if rows < 0 or cols < 0:
        raise PrecisionError(f"matrix shape must be non-negative, got [{rows}, {cols}]")
    n = rows * cols
    if fmt.base == "fp32":
        return 4 * n
    if fmt.base in ("bf16", "fp16"):
        return 2 * n
    if fmt.base == "fp8":
        return n + 4 * _ceil(rows, FP8_BLOCK) * _ceil(cols, FP8_BLOCK)
    if fmt.base == "int8" and fmt.group:
        blocks = _ceil(cols, fmt.group)
        return rows * blocks * (fmt.group + 4)
    if fmt.base == "int8":
        return n + 4 * rows
    if fmt.base in ("nvfp4", "mxfp4"):
        return rows * (_ceil(cols, 2) + _ceil(cols, fmt.group)) + (4 if fmt.base == "nvfp4" else 0)
    groups = _ceil(cols, fmt.group)  # int4
    return rows * (groups * fmt.group // 2 + 4 * groups + _ceil(groups, 2))


def expert_bytes(precision: str, hidden: int, intermediate: int) -> int:
    """Stored bytes of one SwiGLU expert (gate, up: [I, D]; down: [D, I])."""
    return 2 * matrix_bytes(precision, intermediate, hidden) + matrix_bytes(precision, hidden, intermediate)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
