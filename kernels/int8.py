"""Symmetric per-channel INT8 weight quantization (levels -127..127, no zero point)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
