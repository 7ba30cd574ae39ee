"""One Linear's weight [out, in] as a checkpoint stores it, read and checked against its format.

  float   X.weight in F32, BF16, F16 (or F64)                       -> float32 numpy (or as stored)
  fp8     X.weight F8_E4M3 + X.weight_scale_inv [ceil(out/bm), ceil(in/bn)] (F32, or UE8M0)   -> Fp8Matrix
  gptq    X.qweight, X.qzeros, X.scales, X.g_idx                      -> GptqMatrix

Every mismatch -- a dtype the format does not use, a scale grid that does not fit the weight and the block size,
GPTQ parts of the wrong shape -- is a one-line CheckpointError naming the tensor and the format.
"""

from __future__ import annotations

import numpy as np
import torch

from hetrun.checkpoint.naming import GPTQ_PARTS, linear_stored
from hetrun.checkpoint.quant import Quantization
from hetrun.checkpoint.shards import FLOATS, Shards
from hetrun.errors import CheckpointError
from hetrun.runtime.weights import Fp8Matrix, GptqMatrix

Stored = np.ndarray | Fp8Matrix | GptqMatrix


def read_linear(shards: Shards, quant: Quantization, base: str, shape: tuple[int, int] | None = None,
                index: int | None = None, scale: tuple[str, torch.Tensor] | None = None,
                narrow: bool = False) -> Stored:
    """The weight of Linear `base` (`base`.weight, or GPTQ's `base`.qweight ...) as stored; `shape` (out, in) is
    checked when given.

    With `index`, `base` names a stacked [E, out, in] tensor and its slice `index` is read; `scale` supplies an FP8
    weight's block scales, (name for messages, tensor), when the checkpoint keeps them elsewhere (transformers'
    stacked experts.*_scale_inv). A float weight is FP32, or with `narrow` a 16-bit one numpy of its stored dtype
    (BF16 as ml_dtypes.bfloat16).
    """
    if index is None:
        if linear_stored(shards, base) == "gptq":
            return _gptq(shards, quant, base, shape)
        name = f"{base}.weight"
    else:
        name = base  # a stacked [E, out, in] tensor
    info = shards.info(name)
    dims = info.shape[1:] if index is not None else info.shape
    if len(dims) != 2 or (shape is not None and tuple(dims) != tuple(shape)):
        want = f" [{shape[0]}, {shape[1]}]" if shape is not None else " 2-D"
        raise CheckpointError(f"{shards.root}: tensor '{name}' has shape {list(dims)}; the model's config needs"
                              f"{want} (config.json and weights disagree)")
    if info.dtype in FLOATS:
        # 16-bit weights as stored; F64 to FP32 as before (straight to BF16 could round twice differently)
        return shards.numpy(name, index) if narrow and info.dtype in ("BF16", "F16") else \
            shards.read(name, index).float().numpy()
    if info.dtype == "F8_E4M3":
        if quant.method != "fp8":
            raise CheckpointError(f"{shards.root}: tensor '{name}' is F8_E4M3 but config.json has no fp8 "
                                  "quantization_config (with weight_block_size); the checkpoint is inconsistent")
        codes = shards.numpy(name, index)  # [N, K] float8_e4m3fn
        if scale is None:
            scale_name = f"{name}_scale_inv"
            if scale_name not in shards:
                raise CheckpointError(f"{shards.root}: FP8 weight '{name}' has no '{scale_name}' (fp8 "
                                      f"{quant.block[0]}x{quant.block[1]} block scales)")
            scale = (scale_name, shards.read(scale_name, index))
        _check_scale(shards, quant, name, scale[0], codes.shape, tuple(scale[1].shape))
        if scale[1].dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu):
            raise CheckpointError(f"{shards.root}: tensor '{scale[0]}' is {scale[1].dtype}; fp8 block scales are F32 "
                                  "(or UE8M0)")
        return Fp8Matrix(codes, np.ascontiguousarray(scale[1].float().numpy()), quant.block)
    raise _weight_dtype_error(shards, name, info.dtype, quant)


def _weight_dtype_error(shards: Shards, name: str, dtype: str, quant: Quantization) -> CheckpointError:
    return CheckpointError(f"{shards.root}: tensor '{name}' is {dtype}; a Linear weight must be F32, BF16 or F16 "
                           f"(unquantized) or F8_E4M3 with weight_scale_inv (fp8), this checkpoint is "
                           f"{quant.describe}")


# dtype codes each kind of tensor may have, by name suffix (checked for every tensor when a checkpoint is opened)
_SUFFIX_DTYPES = {".qweight": ("I32",), ".qzeros": ("I32",), ".g_idx": ("I32", "I64"), ".scales": FLOATS,
                  "_scale_inv": (*FLOATS, "F8_E8M0"), "_proj_blocks": ("U8",), "_proj_scales": ("U8",)}


def check_dtypes(shards: Shards, quant: Quantization) -> None:
    """Every tensor's dtype fits its kind and the checkpoint's format, from the headers alone (nothing is read):
    weights float (or E4M3 in an fp8 checkpoint), GPTQ parts as GPTQ stores them, scales float."""
    weights = FLOATS + (("F8_E4M3",) if quant.method == "fp8" else ())
    for name, info in shards.infos.items():
        allowed = next((d for suffix, d in _SUFFIX_DTYPES.items() if name.endswith(suffix)), None)
        if allowed is None and (name.endswith((".weight", "_proj")) and info.dtype != "BOOL"):
            if info.dtype == "F8_E4M3" and quant.method != "fp8":
                raise CheckpointError(f"{shards.root}: tensor '{name}' is F8_E4M3 but config.json has no fp8 "
                                      "quantization_config (with weight_block_size); the checkpoint is inconsistent")
            if info.dtype not in weights:
                raise _weight_dtype_error(shards, name, info.dtype, quant)
        elif allowed is not None and info.dtype not in allowed:
            raise CheckpointError(f"{shards.root}: tensor '{name}' is {info.dtype}; {quant.describe} checkpoints "
                                  f"store it as {' or '.join(allowed)}")


def fp8_scale_grid(quant: Quantization, shape: tuple[int, int]) -> tuple[int, int]:
    """Block scales an FP8 weight of `shape` needs: [ceil(out/bm), ceil(in/bn)]."""
    return -(-shape[0] // quant.block[0]), -(-shape[1] // quant.block[1])


def _check_scale(shards: Shards, quant: Quantization, name: str, scale_name: str, shape, got) -> None:
    want = fp8_scale_grid(quant, shape)
    if tuple(got) != want:
        raise CheckpointError(f"{shards.root}: tensor '{scale_name}' has shape {list(got)}, but '{name}' "
                              f"{list(shape)} in the fp8 format's {quant.block[0]}x{quant.block[1]} blocks "
                              f"(quantization_config.weight_block_size) needs {list(want)}; the block size does not "
                              "match the checkpoint")


def _gptq(shards: Shards, quant: Quantization, base: str, shape: tuple[int, int] | None) -> GptqMatrix:
    if quant.method != "gptq":
        raise CheckpointError(f"{shards.root}: tensor '{base}.qweight' is GPTQ-packed but config.json has no gptq "
                              "quantization_config; the checkpoint is inconsistent")
    missing = [p for p in GPTQ_PARTS[:3] if f"{base}.{p}" not in shards]
    if missing:
        raise CheckpointError(f"{shards.root}: GPTQ linear '{base}' lacks '{base}.{missing[0]}' (gptq stores qweight, "
                              "qzeros, scales and g_idx)")
    infos = {p: shards.info(f"{base}.{p}") for p in GPTQ_PARTS if f"{base}.{p}" in shards}
    per = 32 // quant.bits
    for p in ("qweight", "qzeros"):
        if infos[p].dtype != "I32" or len(infos[p].shape) != 2:
            raise CheckpointError(f"{shards.root}: tensor '{base}.{p}' is {infos[p].dtype} {list(infos[p].shape)}; "
                                  f"{quant.describe} packs it in 2-D I32 words")
    if infos["scales"].dtype not in FLOATS or len(infos["scales"].shape) != 2:
        raise CheckpointError(f"{shards.root}: tensor '{base}.scales' is {infos['scales'].dtype}; {quant.describe} "
                              "stores float scales [groups, out]")
    k, n = infos["qweight"].shape[0] * per, infos["qweight"].shape[1]
    group = k if quant.group == -1 else quant.group
    groups = -(-k // group)
    want = {"qzeros": (groups, -(-n // per)), "scales": (groups, n), "g_idx": (k,)}
    for p, w in want.items():
        if p in infos and tuple(infos[p].shape) != w:
            raise CheckpointError(f"{shards.root}: tensor '{base}.{p}' has shape {list(infos[p].shape)}; "
                                  f"{quant.describe} with qweight {list(infos['qweight'].shape)} needs {list(w)} "
                                  "(the group size does not match the checkpoint)")
    if shape is not None and (n, k) != tuple(shape):
        raise CheckpointError(f"{shards.root}: GPTQ linear '{base}' is [{n}, {k}] (out, in); the model's config needs "
                              f"{list(shape)} (config.json and weights disagree)")
    if "g_idx" in infos:
        if infos["g_idx"].dtype not in ("I32", "I64"):
            raise CheckpointError(f"{shards.root}: tensor '{base}.g_idx' is {infos['g_idx'].dtype}; gptq stores I32")
        g_idx = shards.numpy(f"{base}.g_idx").astype(np.int32)
        if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
            raise CheckpointError(f"{shards.root}: tensor '{base}.g_idx' names groups outside 0..{groups - 1}")
    else:
        g_idx = (np.arange(k) // group).astype(np.int32)
    return GptqMatrix(shards.numpy(f"{base}.qweight"), shards.numpy(f"{base}.qzeros"), shards.numpy(f"{base}.scales"),
                      g_idx, quant.bits, group, quant.zero_offset)


def dense_tensor(shards: Shards, quant: Quantization, name: str) -> torch.Tensor:
    """A dense (non-expert) tensor for the model's state dict: `name` as stored, or a quantized Linear's weight
    (name ending in .weight) dequantized to FP32."""
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and linear_stored(shards, base) == "gptq":
        return torch.from_numpy(_gptq(shards, quant, base, None).dequantize())
    if shards.info(name).dtype == "F8_E4M3" and name.endswith(".weight"):
        w = read_linear(shards, quant, base)
        return torch.from_numpy(w.dequantize() if isinstance(w, Fp8Matrix) else w)
    return shards.read(name)
