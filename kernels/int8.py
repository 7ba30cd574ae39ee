"""Symmetric per-channel INT8 weight quantization (levels -127..127, no zero point)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hetrun.kernels.row_chunks import fp32_row_chunks


@dataclass(frozen=True)
class Int8Tensor:
    data: np.ndarray  # int8, same shape as the weight
    scale: np.ndarray  # float32 [w.shape[axis]]
    axis: int

    def dequantize(self) -> np.ndarray:
        """Return ``data * scale`` as float32, the scale broadcast along ``axis``."""
        return self.data.astype(np.float32) * _along(self.scale, self.axis, self.data.ndim)


def quantize_int8(w: np.ndarray, axis: int = 0) -> Int8Tensor:
    """Quantize ``w`` with one scale per index of ``axis`` (axis=0: per output row of ``[N, K]``).

    scale = amax / 127; all-zero channels get scale 1 and stay zero.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    others = tuple(d for d in range(w.ndim) if d != axis)
    scale = (np.abs(w).max(axis=others) / np.float32(127)).astype(np.float32)  # [w.shape[axis]]
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / _along(scale, axis, w.ndim)), -127, 127).astype(np.int8)
    return Int8Tensor(q, scale, axis)


def _along(scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def to_matmulnbits_int8(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 in blocks of `block` along K, packed for com.microsoft.MatMulNBits (bits=8), for w [N, K].

    `w` may also be a torch tensor of any float dtype (a BF16 LM head): it is read to FP32 a row chunk at a time, so
    no FP32 copy of the whole matrix is made. Returns B uint8 [N, n_blocks, block] (codes + 128, the op's default
    zero point; the ragged tail of the last block holds 128, which dequantizes to 0) and scales float32
    [N * n_blocks] (amax / 127 per block, 1 for all-zero blocks).
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, got {block}")
    w = w if hasattr(w, "numpy") else np.asarray(w)
    n, k = w.shape
    nb = -(-k // block)
    codes = np.empty((n, nb, block), np.uint8)  # [N, nb, block]
    scales = np.empty((n, nb), np.float32)  # [N, nb]
    for r, rows in fp32_row_chunks(w, nb * block):  # an LM head is never copied whole to FP32
        blocks = rows.reshape(-1, nb, block)  # [rows, nb, block]
        scale = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)  # [rows, nb]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocks / scale[:, :, None]), -127, 127) + 128  # [rows, nb, block]
        codes[r:r + len(rows)] = q.astype(np.uint8)
        scales[r:r + len(rows)] = scale
    return codes, scales.reshape(-1)
