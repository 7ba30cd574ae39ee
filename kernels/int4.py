"""Group-wise INT4 weight quantization along K, and its two ONNX layouts.

Codes are kept unpacked as uint8 0..15 with a zero point per group:
``w ~= (codes - zero_point) * scale``. Symmetric quantization is the zero point 8 case
(signed levels -8..7), so both layouts share one dequantize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import ml_dtypes
import numpy as np
from hetrun.kernels.row_chunks import fp32_row_chunks, rows_per_chunk


@dataclass(frozen=True)
class Int4Tensor:
    codes: np.ndarray  # uint8 [N, K], 0..15
    scale: np.ndarray  # float32 [N, n_groups]
    zero_point: np.ndarray  # uint8 [N, n_groups], 0..15 (all 8 when symmetric)
    group: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """Return ``(codes - zero_point) * scale`` as float32 ``[N, K]``."""
        k = self.codes.shape[1]
        zp = np.repeat(self.zero_point, self.group, axis=1)[:, :k]  # [N, K]
        scale = np.repeat(self.scale, self.group, axis=1)[:, :k]  # [N, K]
        return (self.codes.astype(np.float32) - zp) * scale


@dataclass(frozen=True)
class OnnxInt4:
    values: np.ndarray  # ml_dtypes.int4 (symmetric) or uint4 [N, K]
    scale: np.ndarray  # float32 [N, n_groups]
    zero_point: np.ndarray  # same dtype as values [N, n_groups]
    block_size: int


def int4_grid(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of the 16-level grid for each group ``w [..., g]``.

    Symmetric: scale = 2 * amax / 15 and zero point 8 (GPTQ's grid). It spreads the 16 levels
    over [-amax, amax]; +amax lands on 7.5 and clips to 7, so no value is ever off by more than
    half a step, and the step is smaller than amax / 7's.
    Asymmetric: the grid spans [min(w, 0), max(w, 0)], so 0 is always exactly representable.
    All-zero groups get scale 1.
    """
    if symmetric:
        lo = -np.abs(w).max(axis=-1)  # [...]
        hi = -lo
    else:
        lo, hi = np.minimum(w.min(axis=-1), 0), np.maximum(w.max(axis=-1), 0)  # [...]
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.full(scale.shape, 8) if symmetric else np.clip(np.rint(-lo / scale), 0, 15)
    return scale, zp.astype(np.uint8)


def int4_codes(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Round ``w`` to codes 0..15 on the grid ``(code - zero_point) * scale`` (broadcasting)."""
    return np.clip(np.rint(w / scale) + zero_point.astype(np.float32), 0, 15).astype(np.uint8)


def quantize_int4(w: np.ndarray, group: int = 128, symmetric: bool = False) -> Int4Tensor:
    """Round-to-nearest INT4 of ``w [N, K]`` in groups of ``group`` along K (last group may be short).

    ``w`` may be numpy or a torch tensor of any float dtype. Rows are independent, so they are read and quantized a
    chunk at a time (hetrun.kernels.row_chunks): the temporaries of rounding stay small beside the matrix (building a
    2048 x 5632 expert's INT4 graph peaked 364 MB above its FP32 weights with its stacked gate_up rounded in one
    piece, 85 MB by chunks and by matrix)."""
    w = w if hasattr(w, "shape") else np.asarray(w)  # numpy, torch, or rows read on slicing
    n, k = w.shape
    n_groups = -(-k // group)
    codes = np.empty((n, k), np.uint8)  # [N, K]
    scale = np.empty((n, n_groups), np.float32)  # [N, G]
    zp = np.empty((n, n_groups), np.uint8)  # [N, G]
    for r, rows in fp32_row_chunks(w, n_groups * group):  # zero-padded to whole groups, as before
        groups = rows.reshape(len(rows), n_groups, group)  # [n, G, g]
        end = r + len(rows)
        scale[r:end], zp[r:end] = int4_grid(groups, symmetric)
        codes[r:end] = int4_codes(groups, scale[r:end, :, None], zp[r:end, :, None]).reshape(len(rows), -1)[:, :k]
    return Int4Tensor(codes, scale, zp, group, symmetric)


def stack_rows(parts: list[Int4Tensor]) -> Int4Tensor:
    """Matrices quantized alike (same K, group and symmetry) stacked along N: what quantizing their stack gives,
    since every row is quantized on its own."""
    first = parts[0]
    if len(parts) == 1:
        return first
    return Int4Tensor(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                      np.concatenate([p.zero_point for p in parts]), first.group, first.symmetric)


def to_matmulnbits(t: Int4Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack ``t`` for onnxruntime's com.microsoft.MatMulNBits (bits=4, block_size=t.group).

    Returns:
      - B uint8 ``[N, n_blocks, group / 2]``: codes along K, low nibble first; the ragged tail of
        the last block is padded with its zero point, so it dequantizes to 0;
      - scales float32 ``[N * n_blocks]``, row-major ``[N, n_blocks]``;
      - zero_points uint8 ``[N * ceil(n_blocks / 2)]``, two blocks a byte, low nibble first, each row
        padded to whole bytes; None when symmetric, since MatMulNBits' default zero point is 8.
    """
    if t.group < 16 or t.group & (t.group - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, got {t.group}")
    n, k = t.codes.shape
    n_blocks = t.scale.shape[1]
    b = np.empty((n, n_blocks, t.group // 2), np.uint8)  # [N, n_blocks, group / 2]
    step = rows_per_chunk(n_blocks * t.group)  # rows packed at a time: little scratch
    for r in range(0, n, step):
        codes = np.repeat(t.zero_point[r:r + step], t.group, axis=1)  # [rows, n_blocks * group]
        codes[:, :k] = t.codes[r:r + step]
        b[r:r + step] = _nibbles(codes).reshape(-1, n_blocks, t.group // 2)
    if t.symmetric:
        return b, t.scale.reshape(-1), None
    zp = np.pad(t.zero_point, ((0, 0), (0, n_blocks % 2)))  # [N, 2 * ceil(n_blocks / 2)]
    return b, t.scale.reshape(-1), _nibbles(zp).reshape(-1)


def quantize_to_matmulnbits(parts: Iterable, shape: tuple[int, int],
                            group: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round-to-nearest INT4 of the matrices ``parts`` ([n_i, K] each, numpy or torch, any float dtype)
    stacked along N into ``shape`` (N, K), packed for MatMulNBits as ``to_matmulnbits(stack_rows([quantize_int4(p,
    group) ...]))`` packs them, byte for byte, a chunk of rows at a time: no unpacked codes and no stacked copy are
    ever held, and each part is let go once packed (pass a generator to read the next one only then).

    Returns B uint8 ``[N, n_blocks, group / 2]``, scales float32 ``[N * n_blocks]`` and zero points uint8
    ``[N * ceil(n_blocks / 2)]``, as to_matmulnbits does.
    """
    if group < 16 or group & (group - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, got {group}")
    n, k = shape
    nb = -(-k // group)
    b = np.empty((n, nb, group // 2), np.uint8)  # [N, nb, group / 2]
    scale = np.empty((n, nb), np.float32)  # [N, nb]
    zp = np.zeros((n, nb + nb % 2), np.uint8)  # [N, nb rounded up to even]: zero points two a byte
    start = 0
    for w in parts:
        w = w if hasattr(w, "shape") else np.asarray(w)  # numpy, torch, or rows read on slicing
        if w.ndim != 2 or w.shape[1] != k or start + w.shape[0] > n:
            raise ValueError(f"matrices of shape {list(w.shape)} do not stack into [{n}, {k}]")
        for r, rows in fp32_row_chunks(w, nb * group):  # padding columns are 0, which rounds to the zero point
            groups = rows.reshape(len(rows), nb, group)  # [c, nb, g]
            r, end = start + r, start + r + len(rows)
            scale[r:end], zp[r:end, :nb] = int4_grid(groups, False)
            codes = int4_codes(groups, scale[r:end, :, None], zp[r:end, :nb, None]).reshape(len(rows), -1)
            b[r:end] = _nibbles(codes).reshape(-1, nb, group // 2)
        start += w.shape[0]
        del w
    if start != n:
        raise ValueError(f"matrices of {start} rows in all do not stack into [{n}, {k}]")
    return b, scale.reshape(-1), _nibbles(zp).reshape(-1)


def _nibbles(a: np.ndarray) -> np.ndarray:
    # uint8 values 0..15 [rows, 2m] -> [rows, m] bytes, two values each, the first in the low nibble (MatMulNBits')
    return a[:, 0::2] | a[:, 1::2] << 4


def to_onnx_int4(t: Int4Tensor) -> OnnxInt4:
    """Inputs of an opset-21 ``DequantizeLinear(axis=1, block_size=t.group)`` on an INT4 initializer.

    Symmetric tensors become INT4 values (-8..7) with INT4 zero points 0; asymmetric ones UINT4
    codes with UINT4 zero points. ``onnx.numpy_helper.from_array`` packs either dtype.
    """
    if t.symmetric:
        values = (t.codes.astype(np.int8) - 8).astype(ml_dtypes.int4)  # [N, K]
        zp = np.zeros(t.zero_point.shape, dtype=ml_dtypes.int4)  # [N, G]
    else:
        values = t.codes.astype(ml_dtypes.uint4)  # [N, K]
        zp = t.zero_point.astype(ml_dtypes.uint4)  # [N, G]
    return OnnxInt4(values, t.scale, zp, t.group)
