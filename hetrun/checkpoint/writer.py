"""Checkpoints written in the real on-disk formats, one tensor at a time (tests, `hetrun bench load`, accuracy).

  bf16 (or the model's dtype)   the hub layout save_pretrained writes: per-expert names, Mixtral's block_sparse_moe
  fp8                           DeepSeek-V3's: every Linear but lm_head E4M3 with weight_scale_inv block scales
  gptq                          AutoGPTQ's: experts (and attention) as qweight, qzeros, scales (F16), g_idx;
                                round-to-nearest, or GPTQ when calibration activations are given; act-order optional

Shards are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (or one `model.safetensors`),
written through a temporary name and renamed. Tensors are produced on demand and written one by one, so a
checkpoint larger than memory can be generated (random_checkpoint).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from hetrun.checkpoint import gpt_oss
from hetrun.checkpoint.naming import FAMILY_NAMES, disk_name
from hetrun.checkpoint.shards import DTYPES, INDEX, SINGLE
from hetrun.files import write_atomic
from hetrun.kernels.fp8 import quantize_fp8
from hetrun.kernels.gptq import gptq_pack, gptq_quantize_int4
from hetrun.kernels.int4 import quantize_int4
from hetrun.runtime.weights import find_moe_blocks, router_name

CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}
GPTQ_PACK = 8  # 4-bit zero points per int32 along a GPTQ linear's outputs: a linear with other output counts stays
# as it is, as GPTQ quantizers leave it (Qwen2-MoE's one-output shared-expert gate)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, dtype, shape, and how to make it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[CODES[self.dtype]][1]


def write_shards(out: "str | os.PathLike", tensors: list[TensorSpec], max_shard_bytes: int) -> dict[str, str]:
    """Write `tensors` into safetensors shards of at most `max_shard_bytes` each (a tensor never splits) plus the
    index, as save_pretrained lays them out; returns the weight map."""
    out = Path(out)
    groups: list[list[TensorSpec]] = [[]]
    size = 0  # bytes of the last group
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, group in zip(names, groups):
        _write_file(out / file, group)
        weight_map.update({t.name: file for t in group})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        write_atomic(out / INDEX, json.dumps(index, indent=2, sort_keys=True))
    return weight_map


def _write_file(path: Path, tensors: list[TensorSpec]) -> None:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            value = t.make()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise ValueError(f"tensor '{t.name}' came out {value.dtype} {list(value.shape)}, not {t.dtype} "
                                 f"{list(t.shape)}")
            f.write(value.contiguous().view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    os.replace(tmp, path)


# ---- a transformers model's tensors under their hub names --------------------------------------------------------

def hub_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(on-disk name, kind, tensor) of every weight of a transformers 5 MoE model, as save_pretrained names them:
    stacked experts split per expert (gpt-oss's kept stacked, kind "stacked"), Mixtral's MoE block under
    block_sparse_moe, a tied lm_head left out. `kind` is "expert", "stacked", "shared", "linear" (another nn.Linear
    weight), "lm_head" or "other"."""
    family = model.config.model_type
    names = FAMILY_NAMES[family]
    blocks = find_moe_blocks(model)
    moe_paths = {path for _, path, _ in blocks}
    routers = tuple(f"{path}.{router_name(block)}." for _, path, block in blocks)  # every router stays as it is
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        block = next((p for p in moe_paths if key.startswith(f"{p}.")), None)
        disk = key if block is None else disk_name(key, family)
        if block is not None and key.startswith(f"{block}.experts.") and names.transposed:
            yield disk, "stacked", t  # their hub layout keeps them stacked (gpt-oss, Llama 4), never quantized here
            continue
        if block is not None and key.startswith(f"{block}.experts."):
            prefix = disk.rsplit(".", 1)[0]  # ...experts
            if key.endswith("gate_up_proj"):
                i = t.shape[1] // 2
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.{names.projections[0]}.weight", "expert", t[e, :i]
                    yield f"{prefix}.{e}.{names.projections[1]}.weight", "expert", t[e, i:]
            elif key.endswith("down_proj"):
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.{names.projections[2]}.weight", "expert", t[e]
            continue
        if block is not None and names.shared and key.startswith(f"{block}.{names.shared}."):
            yield disk, "shared", t
        elif key == "lm_head.weight":
            yield disk, "lm_head", t
        elif key in linears and not key.startswith(routers):
            yield disk, "linear", t
        else:
            yield disk, "other", t


def save_checkpoint(model: torch.nn.Module, out: "str | os.PathLike", quantization: str = "none", *,
                    max_shard_bytes: int = 2**30, block: int = 128, group: int = 128, desc_act: bool = False,
                    sym: bool = True, checkpoint_format: str = "gptq",
                    calibration: dict[int, np.ndarray] | None = None, dense: bool = True, seed: int = 0) -> Path:
    """Write `model` (a transformers 5 MoE model) as a checkpoint directory in `quantization` none, fp8, gptq or
    mxfp4 (gpt-oss only: its experts as OpenAI's release stores them, hetrun.checkpoint.gpt_oss, the rest as is).

    fp8: every Linear but lm_head and the routers, E4M3 with `block` x `block` scales (DeepSeek-V3's layout).
    gptq: routed and shared experts and the other linears whose outputs are a multiple of 8, 4-bit in groups of
    `group` (`sym`, v1 or v2 `checkpoint_format`); `calibration` {decoder layer, or (decoder layer, expert): activations [T, D] entering
    the MoE block (routed to that expert)} quantizes the experts with GPTQ (the rest round to nearest); `desc_act` visits columns in act-order (by the calibration's
    Hessian diagonal, else a seeded random order) and writes g_idx accordingly. `dense=False` leaves every Linear
    outside the experts (attention, dense MLPs) unquantized.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    if quantization == "fp8":
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [block, block]}
    elif quantization == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
                                         "sym": sym, "checkpoint_format": checkpoint_format, "true_sequential": True,
                                         "damp_percent": 0.01, "static_groups": False}
    elif quantization == "mxfp4":
        if model.config.model_type != "gpt_oss":
            raise ValueError("mxfp4 checkpoints are gpt-oss's; quantize another family with fp8 or gptq")
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    elif quantization != "none":
        raise ValueError(f"quantization must be none, fp8, gptq or mxfp4, got {quantization!r}")
    zero_offset = 1 if checkpoint_format == "gptq" else 0
    experts = {} if quantization != "gptq" or calibration is None else \
        {d: t.detach().float().numpy() for d, k, t in hub_tensors(model) if k in ("expert", "shared")}
    specs: list[TensorSpec] = []
    quantized = ("expert", "shared", "linear") if dense else ("expert", "shared")
    for disk, kind, t in hub_tensors(model):
        w = t.detach()
        if quantization == "fp8" and kind in quantized:
            q = quantize_fp8(w.float().numpy(), "e4m3", "block", block)
            codes = torch.from_numpy(q.data.view(np.uint8).copy()).view(torch.float8_e4m3fn)
            specs += [_spec(disk, codes), _spec(f"{disk}_scale_inv", torch.from_numpy(q.scale.astype(np.float32)))]
        elif quantization == "mxfp4" and kind == "stacked" and disk.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = gpt_oss.quantize_mxfp4(w.transpose(1, 2).float().numpy())  # [E, out, in] rows
            specs += [_spec(f"{disk}_blocks", torch.from_numpy(blocks)),
                      _spec(f"{disk}_scales", torch.from_numpy(scales))]
        elif quantization == "gptq" and kind in quantized and (kind != "linear" or w.shape[0] % GPTQ_PACK == 0):
            x = _calibration_input(calibration, experts, model.config.model_type, disk, kind)
            parts = _gptq_linear(w.float().numpy(), x, group, sym, desc_act, zero_offset,
                                 np.random.default_rng([seed, zlib.crc32(_input_of(disk, kind).encode())]))
            base = disk.removesuffix(".weight")
            specs += [_spec(f"{base}.{p}", torch.from_numpy(v)) for p, v in parts.items()]
        else:
            specs.append(_spec(disk, w))
    write_shards(out, specs, max_shard_bytes)
    write_atomic(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        write_atomic(out / "generation_config.json", generation.to_json_string(use_diff=True))
    return out


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    t = t.contiguous()
    return TensorSpec(name, t.dtype, tuple(t.shape), lambda: t)


def _calibration_input(calibration, experts: dict[str, np.ndarray], family: str, disk: str,
                       kind: str) -> np.ndarray | None:
    """The activations [T, K] an expert's Linear sees in the FP32 model, for GPTQ: gate and up take the MoE block's
    input (the rows routed to the expert where given per expert), down takes silu(gate) * up of it (`experts`: FP32
    expert weights by name). None for other linears or without calibration."""
    if calibration is None or kind not in ("expert", "shared"):
        return None
    layer = int(disk.split(".")[2])
    expert = int(disk.split(".")[-3]) if kind == "expert" else None
    x = calibration.get((layer, expert), calibration.get(layer))
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)  # [T, D]
    names = FAMILY_NAMES[family]
    gate, up, down = names.projections if kind == "expert" else names.shared_projections
    if disk.split(".")[-2] != down:
        return x
    base = disk.rsplit(".", 2)[0]  # ...experts.E, or the shared MLP
    g, u = x @ experts[f"{base}.{gate}.weight"].T, x @ experts[f"{base}.{up}.weight"].T  # [T, I]
    return ((g / (1.0 + np.exp(-g))) * u).astype(np.float32)


def _input_of(disk: str, kind: str) -> str:
    """A name for the activations a Linear reads: an expert's gate and up share one (GPTQ's act-order follows the
    input's Hessian, so they share their column order too)."""
    base, proj = disk.rsplit(".", 2)[:2]
    return base if kind in ("expert", "shared") and not proj.startswith(("down", "w2")) else disk


def _gptq_linear(w: np.ndarray, x: np.ndarray | None, group: int, sym: bool, desc_act: bool, zero_offset: int,
                 rng) -> dict[str, np.ndarray]:
    k = w.shape[1]
    order = None
    if desc_act:
        order = np.argsort(-np.einsum("tk,tk->k", x, x), kind="stable") if x is not None else rng.permutation(k)
    wo = w if order is None else w[:, order]
    if x is not None:
        t = gptq_quantize_int4(wo, x if order is None else x[:, order], group, symmetric=sym)
    else:
        t = quantize_int4(wo, group, symmetric=sym)
    return gptq_pack(t, order, zero_offset)


# ---- a random checkpoint of any size, generated as it is written --------------------------------------------------

def random_checkpoint(config, out: "str | os.PathLike", dtype: torch.dtype = torch.bfloat16, shards: int = 4,
                      seed: int = 0, std: float = 0.02) -> Path:
    """A checkpoint of `config`'s shape with Gaussian weights (norms 1), in the hub layout, in about `shards` shards,
    made tensor by tensor: memory stays at one tensor whatever the model's size. Returns the directory."""
    import transformers  # heavy: only to lay the model out (on the meta device)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs = []
    for i, (disk, kind, t) in enumerate(hub_tensors(meta)):
        shape, tdtype = tuple(t.shape), t.dtype
        ones = kind == "other" and len(shape) == 1 and "bias" not in disk

        def make(shape=shape, tdtype=tdtype, ones=ones, i=i):
            if ones:
                return torch.ones(shape, dtype=tdtype)
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            return (torch.randn(shape, generator=g) * std).to(tdtype)

        specs.append(TensorSpec(disk, tdtype, shape, make))
    total, largest = sum(t.nbytes for t in specs), max(t.nbytes for t in specs)
    write_shards(out, specs, -(-total // shards) + largest)  # greedy packing never needs more than `shards`
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    write_atomic(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return out
