"""Experts read from a checkpoint one at a time, in the form the checkpoint stores them.

A CheckpointExpert is an ExpertSource (hetrun.runtime.weights): it holds names, not tensors. read() reads the
expert's three matrices from the shards -- per-expert tensors, a slice of stacked ones, FP8 codes with their block
scales (per expert, or transformers' stacked *_scale_inv), GPTQ parts -- and returns FP32 ExpertWeights for float
checkpoints or a QuantizedExpert with the stored codes unchanged; read_stored() leaves float matrices in their stored
dtype, which the graph builder converts to its device's precision before dropping them; stored_readers() reads
per-expert 16-bit matrices only when the builder takes each, by rows (StoredRows) where it quantizes row-wise.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from hetrun.checkpoint import gpt_oss
from hetrun.checkpoint.directory import Checkpoint
from hetrun.checkpoint.linears import Stored, fp8_scale_grid, read_linear
from hetrun.checkpoint.naming import FAMILY_NAMES, expert_bases, shared_base, stacked_names
from hetrun.checkpoint.quant import Quantization
from hetrun.checkpoint.shards import FLOATS, Shards, StoredRows
from hetrun.errors import CheckpointError
from hetrun.runtime.weights import ExpertSource, ExpertWeights, Fp8Matrix, GptqMatrix, QuantizedExpert


class CheckpointExpert(ExpertSource):
    """Routed expert `index` of decoder layer `layer`, or (kind "shared") the `part` (k, n) slice of the layer's
    shared-expert MLP, read from `ckpt` on every read()."""

    def __init__(self, ckpt: Checkpoint, layer: int, index: int, kind: str = "routed", part: tuple[int, int] = (0, 1)):
        spec = ckpt.spec
        self.ckpt, self.layer, self.index, self.kind, self.part = ckpt, layer, index, kind, part
        self.hidden = spec.hidden_size
        self.intermediate = spec.moe_intermediate_size if kind == "routed" else \
            spec.shared_intermediate_size * max(spec.num_shared_experts, 1) // part[1]
        self.name = f"L{layer}.{'E' if kind == 'routed' else 'S'}{index}"
        self.activation = spec.expert_activation

    def read(self) -> ExpertWeights | QuantizedExpert:
        return self._read(narrow=False)

    def read_stored(self) -> ExpertWeights | QuantizedExpert:
        return self._read(narrow=True)

    def stored_readers(self):
        ck = self.ckpt
        bases = expert_bases(ck.shards, ck.family, self.layer, self.index) if self.kind == "routed" else None
        if bases is None or any(f"{b}.weight" not in ck.shards or ck.shards.info(f"{b}.weight").dtype not in FLOATS
                                for b in bases):
            return None  # stacked, shared or quantized: read whole
        d, i = self.hidden, self.intermediate
        return tuple(partial(_stored_rows, ck.shards, ck.quant, b, s) for b, s in zip(bases, ((i, d), (i, d), (d, i))))

    def _read(self, narrow: bool) -> ExpertWeights | QuantizedExpert:
        if self.kind == "shared":
            return self._shared()
        ck, d, i = self.ckpt, self.hidden, self.intermediate
        if ck.family == "gpt_oss":  # its own layout: stacked, transposed, interleaved, biased; or MXFP4
            return gpt_oss.read_expert(ck.shards, self.layer, self.index, d, i, self.activation, narrow)
        bases = expert_bases(ck.shards, ck.family, self.layer, self.index)
        if bases is not None:
            shapes = ((i, d), (i, d), (d, i))
            scales = self._stacked_scales(bases, shapes)
            return _assemble([read_linear(ck.shards, ck.quant, b, s, scale=sc, narrow=narrow)
                              for b, s, sc in zip(bases, shapes, scales)])
        stacked = stacked_names(ck.shards, ck.family, self.layer)
        if stacked is None:
            raise CheckpointError(f"{ck.root}: has no weights of expert {self.index} of layer {self.layer} (neither "
                                  f"per-expert tensors nor stacked experts.gate_up_proj)")
        if FAMILY_NAMES[ck.family].transposed:  # Llama 4: [D, 2I] and [I, D] per expert, gate and up concatenated
            gate_up, down = (read_linear(ck.shards, ck.quant, name, shape, index=self.index, narrow=narrow)
                             for name, shape in zip(stacked, ((d, 2 * i), (i, d))))
            if not isinstance(gate_up, np.ndarray) or not isinstance(down, np.ndarray):
                raise CheckpointError(f"{ck.root}: stacked experts '{stacked[0]}' are not a layout "
                                      f"{ck.quant.describe} writes")
            return _assemble([np.ascontiguousarray(gate_up[:, :i].T), np.ascontiguousarray(gate_up[:, i:].T),
                              np.ascontiguousarray(down.T)])
        gate, up = self._stacked_gate_up(stacked[0], narrow)
        down = read_linear(ck.shards, ck.quant, stacked[1], (d, i), index=self.index, narrow=narrow)
        return _assemble([gate, up, down])

    def _stacked_gate_up(self, name: str, narrow: bool) -> tuple[Stored, Stored]:
        """Gate and up of this expert from a stacked gate_up [E, 2I, D] (FP8: scales [E, 2 ceil(I/bm), ...])."""
        shards, quant, d, i = self.ckpt.shards, self.ckpt.quant, self.hidden, self.intermediate
        if shards.info(name).dtype != "F8_E4M3" or quant.method != "fp8":
            gate_up = read_linear(shards, quant, name, (2 * i, d), index=self.index, narrow=narrow)
            if not isinstance(gate_up, np.ndarray):
                raise CheckpointError(f"{shards.root}: stacked experts '{name}' are not a layout {quant.describe} "
                                      "writes")
            return gate_up[:i], gate_up[i:]
        codes = shards.numpy(name, self.index)  # [2I, D] float8_e4m3fn
        scale_name = f"{name}_scale_inv"
        scale = shards.read(scale_name, self.index) if scale_name in shards else None  # [2r, c]
        r, c = fp8_scale_grid(quant, (i, d))
        if codes.shape != (2 * i, d) or scale is None or tuple(scale.shape) != (2 * r, c):
            got = "none" if scale is None else list(scale.shape)
            raise CheckpointError(f"{shards.root}: tensor '{scale_name}' has shape {got} per expert; gate and up "
                                  f"[{i}, {d}] of '{name}' in the fp8 format's {quant.block[0]}x{quant.block[1]} "
                                  f"blocks need [{2 * r}, {c}]; the block size does not match the checkpoint")
        s = np.ascontiguousarray(scale.float().numpy())
        return Fp8Matrix(codes[:i], s[:r], quant.block), Fp8Matrix(codes[i:], s[r:], quant.block)

    def _stacked_scales(self, bases: tuple[str, ...], shapes) -> list:
        """transformers' FP8 save keeps per-expert E4M3 weights but stacks their scales per layer: this expert's
        (name, scale) for gate, up and down, None where a matrix has its own; gate and up's read once."""
        shards, quant = self.ckpt.shards, self.ckpt.quant
        prefix = f"model.layers.{self.layer}.{FAMILY_NAMES[self.ckpt.family].module}.experts."
        out, gate_up = [], None
        for which, (base, shape) in enumerate(zip(bases, shapes)):
            name = f"{prefix}{'down_proj' if which == 2 else 'gate_up_proj'}_scale_inv"
            if quant.method != "fp8" or f"{base}.weight_scale_inv" in shards or name not in shards:
                out.append(None)
            elif which == 2:
                out.append((name, shards.read(name, self.index)))  # [rows, cols]
            else:
                rows = fp8_scale_grid(quant, shape)[0]
                if gate_up is None:
                    gate_up = shards.read(name, self.index)  # [2 rows, cols]
                    if gate_up.shape[0] != 2 * rows:
                        raise CheckpointError(
                            f"{shards.root}: tensor '{name}' has {gate_up.shape[0]} block rows per expert; gate and "
                            f"up [{shape[0]}, {shape[1]}] in the fp8 format's {quant.block[0]}x{quant.block[1]} "
                            f"blocks need {rows} each; the block size does not match")
                out.append((name, gate_up[:rows] if which == 0 else gate_up[rows:]))
        return out

    def _shared(self) -> ExpertWeights | QuantizedExpert:
        ck = self.ckpt
        bases = shared_base(ck.family, self.layer, ck.shards)
        if bases is None:
            raise CheckpointError(f"{ck.root}: has no shared-expert weights for layer {self.layer}")
        d, full = self.hidden, self.intermediate * self.part[1]
        mats = [read_linear(ck.shards, ck.quant, b, s) for b, s in zip(bases, ((full, d), (full, d), (d, full)))]
        expert = _assemble(mats)
        if self.part[1] == 1:
            return expert
        w = expert if isinstance(expert, ExpertWeights) else expert.dequantize()
        rows = slice(self.part[0] * self.intermediate, (self.part[0] + 1) * self.intermediate)
        return ExpertWeights(np.ascontiguousarray(w.gate[rows]), np.ascontiguousarray(w.up[rows]),
                             np.ascontiguousarray(w.down[:, rows]))


def _stored_rows(shards: Shards, quant: Quantization, base: str, shape: tuple[int, int]) -> "StoredRows | np.ndarray":
    """A float weight for a graph builder: a 16-bit one as StoredRows (read by rows as the builder converts it), any
    other as read_linear reads it (and a wrong shape is its one-line error)."""
    info = shards.info(f"{base}.weight")
    if info.dtype in ("BF16", "F16") and tuple(info.shape) == tuple(shape):
        return StoredRows(shards, f"{base}.weight")
    return read_linear(shards, quant, base, shape, narrow=True)


def _assemble(mats: list[Stored]) -> ExpertWeights | QuantizedExpert:
    """An expert from its three stored matrices: quantized when all three share a quantized form, else FP32."""
    if all(isinstance(m, Fp8Matrix) for m in mats) or all(isinstance(m, GptqMatrix) for m in mats):
        return QuantizedExpert(*mats)
    return ExpertWeights(*(m if isinstance(m, np.ndarray) else m.dequantize() for m in mats))


def layer_sources(ckpt: Checkpoint, layer: int) -> tuple[tuple[CheckpointExpert, ...], tuple[CheckpointExpert, ...]]:
    """(routed, shared) experts of decoder layer `layer` as sources."""
    spec = ckpt.spec
    routed = tuple(CheckpointExpert(ckpt, layer, e) for e in range(spec.num_experts))
    if spec.num_shared_experts and shared_base(ckpt.family, layer, ckpt.shards) is not None:
        n = spec.num_shared_experts
        return routed, tuple(CheckpointExpert(ckpt, layer, k, "shared", (k, n)) for k in range(n))
    return routed, ()
