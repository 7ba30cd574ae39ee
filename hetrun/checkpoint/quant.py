"""config.json's `quantization_config`: which quantized checkpoint formats hetrun reads, checked into one record.

Read natively:
  fp8    DeepSeek-V3 / transformers FineGrainedFP8Config: E4M3 weights with `weight_scale_inv` block scales
         (`weight_block_size`, default 128x128; FP32 scales, or UE8M0 ones with scale_fmt "ue8m0");
  gptq   AutoGPTQ / GPTQModel / optimum: qweight, qzeros, scales, g_idx (bits 2, 4 or 8; group_size, desc_act;
         checkpoint_format "gptq" stores zero - 1, "gptq_v2" the zero itself).
Anything else (AWQ, bitsandbytes, compressed-tensors, MXFP4, 3-bit GPTQ, ...) is a one-line CheckpointError that
names the format, before a single tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrun.errors import CheckpointError

SUPPORTED = ("fp8", "gptq", "mxfp4")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's linear weights are stored."""

    method: str = "none"  # none, fp8, gptq, or mxfp4 (gpt-oss's experts: hetrun.checkpoint.gpt_oss)
    block: tuple[int, int] = (128, 128)  # fp8: weight block (rows, columns)
    bits: int = 4  # gptq
    group: int = 128  # gptq: input columns per group; -1: one group per column span (whole K)
    desc_act: bool = False  # gptq: act-order (g_idx not k // group)
    sym: bool = True  # gptq
    zero_offset: int = 1  # gptq: 1 for the v1 format (stores zero - 1), 0 for gptq_v2

    @property
    def describe(self) -> str:
        """A short name for messages: 'fp8 128x128 blocks', 'gptq 4-bit g128', 'unquantized'."""
        if self.method == "fp8":
            return f"fp8 {self.block[0]}x{self.block[1]} blocks"
        if self.method == "gptq":
            return f"gptq {self.bits}-bit g{self.group}{' act-order' if self.desc_act else ''}"
        if self.method == "mxfp4":
            return "mxfp4 experts"
        return "unquantized"


def quantization_of(config: dict, where: str) -> Quantization:
    """The Quantization that config.json (as a dict) describes; `where` names the file in errors."""
    q = config.get("quantization_config")
    if q is None:
        return Quantization()
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: quantization_config must be a mapping, got {type(q).__name__}")
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        return _fp8(q, where)
    if method == "gptq":
        return _gptq(q, where)
    if method == "mxfp4":  # OpenAI's gpt-oss release: experts in MXFP4, the rest BF16
        return Quantization("mxfp4")
    hint = {"awq": "AWQ checkpoints are not read yet; use a GPTQ or BF16 checkpoint of the model",
            "bitsandbytes": "bitsandbytes quantizes at load time; use the unquantized checkpoint",
            "compressed-tensors": "compressed-tensors checkpoints are not read yet"}.get(method, "")
    raise CheckpointError(f"{where}: quantization_config.quant_method '{method[:40]}' is not supported; hetrun reads "
                          f"unquantized, {' and '.join(SUPPORTED)} checkpoints" + (f" ({hint})" if hint else ""))


def _fp8(q: dict, where: str) -> Quantization:
    fmt = str(q.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: fp8 quantization_config.fmt '{fmt[:20]}' is not supported; hetrun reads "
                              "E4M3 (float8_e4m3fn) weights")
    if str(q.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise CheckpointError(f"{where}: fp8 activation_scheme '{q.get('activation_scheme')}' is not supported; "
                              "hetrun quantizes activations online per 1x128 tile (dynamic)")
    if str(q.get("scale_fmt") or "float").lower() not in ("float", "ue8m0"):
        raise CheckpointError(f"{where}: fp8 scale_fmt '{q.get('scale_fmt')}' is not supported (float or ue8m0)")
    if q.get("expert_dtype", "fp8") not in (None, "fp8"):
        raise CheckpointError(f"{where}: fp8 expert_dtype '{q.get('expert_dtype')}' is not supported (fp8)")
    block = q.get("weight_block_size")
    if block is None:
        raise CheckpointError(f"{where}: fp8 quantization_config has no weight_block_size; hetrun reads block-scaled "
                              "FP8 (DeepSeek-V3: [128, 128]), not per-tensor scales")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: fp8 weight_block_size must be two positive integers, got {block!r}")
    return Quantization("fp8", block=(int(block[0]), int(block[1])))


def _gptq(q: dict, where: str) -> Quantization:
    bits = q.get("bits")
    if bits not in (2, 4, 8):
        raise CheckpointError(f"{where}: gptq bits={bits!r} is not supported; hetrun reads 2-, 4- and 8-bit GPTQ "
                              "(3-bit packs across words)")
    group = q.get("group_size", 128)
    if not isinstance(group, int) or (group < 1 and group != -1):
        raise CheckpointError(f"{where}: gptq group_size must be a positive integer or -1, got {group!r}")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: gptq checkpoint_format '{fmt[:20]}' is not supported; hetrun reads 'gptq' "
                              "and 'gptq_v2' (re-save Marlin / exllama layouts in the gptq format)")
    return Quantization("gptq", bits=bits, group=group, desc_act=bool(q.get("desc_act", False)),
                        sym=bool(q.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0)
