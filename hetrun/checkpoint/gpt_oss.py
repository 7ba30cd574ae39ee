"""gpt-oss's experts as its checkpoints store them, one expert read at a time.

Each layer stacks its experts: model.layers.N.mlp.experts.
  gate_up_proj [E, D, 2I]    gate and up interleaved along 2I (gate first), applied as x @ W (BF16 releases, and
  down_proj [E, I, D]        what save_pretrained writes)
  gate_up_proj_bias [E, 2I], down_proj_bias [E, D]
or, in OpenAI's own release (config.json quantization_config.quant_method "mxfp4"), each matrix [out, in] as MXFP4:
  *_blocks [E, out, in/32, 16]   uint8, two E2M1 values a byte, the low nibble first
  *_scales [E, out, in/32]       uint8 E8M0 exponents (2^(s - 127)), one per 32 values along `in`.
"""

from __future__ import annotations

import numpy as np

from hetrun.checkpoint.shards import Shards
from hetrun.errors import CheckpointError
from hetrun.runtime.weights import ExpertWeights
from hetrun.spec import ExpertActivation

FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=np.float32)  # the value of each 4-bit code
MXFP4_BLOCK = 32


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 codes [..., G, 16] (uint8) with exponents [..., G] (uint8) -> float32 values [..., G * 32], exactly."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair up")
    values = np.empty((*blocks.shape[:-1], MXFP4_BLOCK), dtype=np.float32)  # [..., G, 32]
    values[..., 0::2] = FP4_E2M1[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1)


def read_expert(shards: Shards, layer: int, index: int, hidden: int, intermediate: int,
                activation: ExpertActivation, narrow: bool) -> ExpertWeights:
    """Expert `index` of decoder layer `layer`: gate, up [I, D] and down [D, I] with their biases. Float weights come
    in their stored dtype with `narrow` (BF16 stays BF16), else FP32; MXFP4 ones dequantized to FP32."""
    d, i = hidden, intermediate
    prefix = f"model.layers.{layer}.mlp.experts."
    if f"{prefix}gate_up_proj_blocks" in shards:
        gate_up, down = (_mxfp4(shards, f"{prefix}{m}", index, shape)
                         for m, shape in (("gate_up_proj", (2 * i, d)), ("down_proj", (d, i))))
    elif f"{prefix}gate_up_proj" in shards:
        gate_up, down = (_stored(shards, f"{prefix}{m}", index, shape, narrow).T  # [out, in] views
                         for m, shape in (("gate_up_proj", (d, 2 * i)), ("down_proj", (i, d))))
    else:
        raise CheckpointError(f"{shards.root}: has no weights of expert {index} of layer {layer} (neither "
                              f"{prefix}gate_up_proj nor its MXFP4 _blocks)")
    gate_up_bias, down_bias = (_stored(shards, f"{prefix}{m}_bias", index, (n,), False)
                               for m, n in (("gate_up_proj", 2 * i), ("down_proj", d)))
    return ExpertWeights(np.ascontiguousarray(gate_up[0::2]), np.ascontiguousarray(gate_up[1::2]),
                         np.ascontiguousarray(down), gate_up_bias[0::2].copy(), gate_up_bias[1::2].copy(), down_bias,
                         activation)


def _stored(shards: Shards, name: str, index: int, shape: tuple[int, ...], narrow: bool) -> np.ndarray:
    _check(shards, name, shape)
    info = shards.info(name)
    if narrow and info.dtype in ("BF16", "F16"):
        return shards.numpy(name, index)
    return shards.read(name, index).float().numpy()


def _mxfp4(shards: Shards, base: str, index: int, shape: tuple[int, int]) -> np.ndarray:
    out, cols = shape
    groups = -(-cols // MXFP4_BLOCK)
    _check(shards, f"{base}_blocks", (out, groups, MXFP4_BLOCK // 2), "U8")
    _check(shards, f"{base}_scales", (out, groups), "U8")
    w = dequantize_mxfp4(shards.numpy(f"{base}_blocks", index), shards.numpy(f"{base}_scales", index))
    return w[:, :cols]  # [out, in]


def _check(shards: Shards, name: str, shape: tuple[int, ...], dtype: str | None = None) -> None:
    if name not in shards:
        raise CheckpointError(f"{shards.root}: lacks tensor '{name}'; the checkpoint is incomplete")
    info = shards.info(name)
    if tuple(info.shape[1:]) != tuple(shape) or (dtype is not None and info.dtype != dtype):
        want = f"{dtype + ' ' if dtype else ''}[E, {', '.join(map(str, shape))}]"
        raise CheckpointError(f"{shards.root}: tensor '{name}' is {info.dtype} {list(info.shape)}; the model of "
                              f"config.json needs {want} (config.json and weights disagree)")


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., in] (in a multiple of 32) as MXFP4, round to nearest: (blocks [..., in/32, 16] uint8, scales
    [..., in/32] uint8), each block's exponent the OCP MX one, floor(log2(amax)) - 2, its values saturating at 6."""
    w = np.asarray(w, dtype=np.float32)
    g = w.reshape(*w.shape[:-1], -1, MXFP4_BLOCK)  # [..., G, 32]
    amax = np.abs(g).max(axis=-1)  # [..., G]
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127).clip(-127, 127)
    scaled = g / np.ldexp(1.0, exp.astype(np.int32))[..., None]
    magnitudes = FP4_E2M1[:8]  # codes 0-7; 8-15 are their negatives
    nearest = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1)  # [..., G, 32]
    codes = (nearest + 8 * ((scaled < 0) & (nearest > 0))).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)
