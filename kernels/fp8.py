"""FP8 (E4M3 / E5M2) quantization with per-tensor, per-channel, 128x128 block and 1x128 tile scales.

The block and tile modes follow the DeepSeek-V3 recipe: weights get one scale per 128x128 block,
activations one scale per 1x128 tile (per token, per 128 channels), both computed online from the data.
A scale is the block's amax / fmt.max, so ``dequantize = q * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Fp8Format:
    name: str
    max: float
    ml_dtype: type
    onnx_dtype_name: str


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", 448.0, ml_dtypes.float8_e4m3fn, "FLOAT8E4M3FN"),
    "e5m2": Fp8Format("e5m2", 57344.0, ml_dtypes.float8_e5m2, "FLOAT8E5M2"),
}

SCALINGS = ("tensor", "channel", "block", "tile")


@dataclass(frozen=True)
class Fp8Tensor:
    data: np.ndarray  # same shape as x, dtype fmt.ml_dtype
    scale: np.ndarray  # float32: tensor [], channel [N], block [ceil(N/b), ceil(K/b)], tile [M, ceil(K/b)]
    fmt: Fp8Format
    scaling: str
    block: int

    def dequantize(self) -> np.ndarray:
        """Return ``data * scale`` as float32, with each scale broadcast over its block."""
        grid = self.scale.reshape(-1, 1) if self.scaling in ("tensor", "channel") else self.scale
        full = _expand(grid, _block_shape(self.data.shape, self.scaling, self.block), self.data.shape)
        return self.data.astype(np.float32) * full


def quantize_fp8(x: np.ndarray, fmt: str = "e4m3", scaling: str = "block", block: int = 128) -> Fp8Tensor:
    """Quantize ``x`` to FP8 with scales of the chosen granularity.

    scaling:
      - "tensor":  one scale for the whole array (any shape of at least one dimension);
      - "channel": one scale per row of a 2-D ``[N_out, K]`` weight, scale ``[N]``;
      - "block":   one scale per ``block x block`` weight block, scale ``[ceil(N/block), ceil(K/block)]``;
      - "tile":    one scale per ``1 x block`` activation tile, scale ``[M, ceil(K/block)]``.
    Ragged last blocks are fine. Special values:
      - a block whose finite values are all zero gets scale 1 and stays exactly zero;
      - values beyond the range saturate to +-fmt.max instead of overflowing;
      - NaN stays NaN;
      - +-inf saturates to +-fmt.max. Scales come from finite values only, so one inf does not
        wipe out its block: it dequantizes to +-(the block's finite amax).
    """
    f = FP8_FORMATS[fmt]
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if np.ndim(x) != 2 and not (scaling == "tensor" and np.ndim(x) >= 1):
        raise ValueError(f"scaling={scaling!r} needs a 2-D array, got shape {np.shape(x)}")
    x = np.asarray(x, dtype=np.float32)
    blk = _block_shape(x.shape, scaling, block)
    a = np.abs(x.reshape(_as_2d(x.shape)))  # [R, C]
    amax = _block_amax(np.where(np.isfinite(a), a, 0), blk)  # [nb_r, nb_c]
    grid = (amax / np.float32(f.max)).astype(np.float32)
    grid[grid == 0] = 1.0  # all-zero blocks (or amax so small that amax / max underflows)
    y = x / _expand(grid, blk, x.shape)
    q = np.clip(y, -f.max, f.max).astype(f.ml_dtype)  # clip keeps NaN, maps +-inf to +-max
    scale = grid.reshape(()) if scaling == "tensor" else grid[:, 0] if scaling == "channel" else grid
    return Fp8Tensor(q, scale, f, scaling, block)


def fake_quant_fp8(x: np.ndarray, fmt: str = "e4m3", scaling: str = "block", block: int = 128) -> np.ndarray:
    """Quantize to FP8 and dequantize back to float32, to measure or simulate FP8 error."""
    return quantize_fp8(x, fmt, scaling, block).dequantize()


def expand_block_scale(scale: np.ndarray, rows: int, block: int = 128) -> np.ndarray:
    """Repeat 128x128 block scales ``[nb_rows, nb_cols]`` along rows to ``[rows, nb_cols]``.

    ONNX blocked quantization blocks along one axis only, so a DequantizeLinear(axis=1,
    block_size=block) on a ``[rows, K]`` weight consumes this per-row copy of the block scales.
    """
    return np.repeat(scale, block, axis=0)[:rows]


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(np.prod(shape[:-1])), shape[-1]


def _block_shape(shape: tuple[int, ...], scaling: str, block: int) -> tuple[int, int]:
    if scaling == "tensor":
        return _as_2d(shape)
    return {"channel": (1, shape[-1]), "block": (block, block), "tile": (1, block)}[scaling]


def _block_amax(a: np.ndarray, blk: tuple[int, int]) -> np.ndarray:
    (r, c), (rows, cols) = a.shape, blk
    nr, nc = -(-r // rows), -(-c // cols)
    padded = np.pad(a, ((0, nr * rows - r), (0, nc * cols - c)))  # [nr * rows, nc * cols]
    return padded.reshape(nr, rows, nc, cols).max(axis=(1, 3))  # [nr, nc]


def _expand(grid: np.ndarray, blk: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    r, c = _as_2d(shape)
    full = np.repeat(np.repeat(grid, blk[0], axis=0), blk[1], axis=1)  # [nr * rows, nc * cols]
    return full[:r, :c].reshape(shape)
