"""ONNX graphs of one SwiGLU expert, one builder per precision: y = down(silu(gate(x)) * up(x)), or with gpt-oss's
biases after each projection and its clamped SwiGLU (hetrun.spec.ExpertActivation), kept in FP32 at every precision.

Every graph takes x [tokens, D] float32 and returns y [tokens, D] float32, with exactly two weight matmuls
(the fused gate_up, then down). What changes per precision is how the weights are stored and how the
activations are rounded on their way in:

  fp32        FP32 weights.
  fp16, bf16  weights stored in FP16/BF16; activations rounded to it before and after each matmul, products
              accumulated in FP32 (FP16 overflows to inf past 65504, as on the device).
  fp8         DeepSeek-V3 recipe, W8A8: E4M3 weights with one scale per 128x128 block
              (DequantizeLinear(axis=1, block_size=128) on FLOAT8E4M3FN initializers), and activations
              quantized online to E4M3 per 1x128 tile (per token, per 128 channels), saturating at 448.
  fp8-w8a16   the same E4M3 weights, activations left in FP32 (weight-only FP8).
  int8        symmetric per-output-channel INT8 weights (W8A16); for OpenVINO stored [N, K] and multiplied by
              Gemm(transB=1), the layout its CPU plugin keeps compressed (0.53 against 0.87 ms per expert at one
              token for [K, N] on a 2-core AVX2 host, Mixtral-bench shape).
  int4        group-wise INT4 with zero points, groups of 128 along K, in com.microsoft.MatMulNBits; round-to-
              nearest, or GPTQ when calibration activations are given. For OpenVINO the same codes, scales and
              zero points as UINT4 [N, groups, group] initializers dequantized in f32 before Gemm(transB=1), the
              pattern its CPU plugin keeps compressed and runs fastest.
  int4-g32    the same with groups of 32.
  int8-w8a8   INT8 weights in blocks of 128 along K and activations quantized to INT8 per block on the fly
              (MatMulNBits bits=8, accuracy level 4): onnxruntime's fast CPU path, as INT8 NPUs compute.
  int4-w4a8   the int4 weights with activations quantized the same way (MatMulNBits accuracy level 4).

An expert read from a quantized checkpoint (a QuantizedExpert, or an ExpertSource that reads one) goes onto a
device of its own format unchanged: DeepSeek-V3 FP8 codes and block scales become the fp8 graph's initializers
byte for byte (scales repeated per row, as ONNX blocks along one axis), 4-bit GPTQ codes, scales and zero points
become MatMulNBits' (act-order: the input columns gathered in group order, so g_idx's groups are contiguous). On a
device of another format the expert is dequantized once to FP32 and built as any other.

`target` is the backend that will run the graph (Backend.graph_target()). "openvino" gets a form that
OpenVINO's CPU plugin computes faithfully in f32; every other name gets standard ONNX. OpenVINO 2026.4 on CPUs
without native BF16 computes narrow-float Casts wrongly: f32->bf16 drops bits 0-14 before rounding (about
twice BF16's error; 2026.4.1 removes f32->bf16->f32 pairs instead), f32->f16->f32 pairs are removed (no FP16
rounding or overflow at all), and f32->f8e4m3
rounds twice (via f16) and ignores `saturate`. Graphs for OpenVINO therefore round in FP32 arithmetic
(Veltkamp splitting for normal numbers, Round on the subnormal grid, the formats' overflow and saturation),
which gives bit for bit what onnxruntime's Casts give. Those graphs need f32 execution: on a device that
computes in f16 or bf16 the backend asks for the standard form instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from hetrun.backends.graph_files import filled
from hetrun.backends.graph_matrices import ACTIVATION_PROP
from hetrun.formats import E4M3_MAX, FORMATS, FP8_BLOCK, Format, matrix_bytes
from hetrun.kernels.fp8 import quantize_fp8
from hetrun.kernels.gptq import gptq_int4, gptq_quantize_int4
from hetrun.kernels.int4 import Int4Tensor, quantize_int4, quantize_to_matmulnbits, stack_rows, to_matmulnbits
from hetrun.kernels.int8 import quantize_int8, to_matmulnbits_int8
from hetrun.once import warn_once
from hetrun.runtime.weights import ExpertSource, ExpertWeights, Fp8Matrix, GptqMatrix, QuantizedExpert
from hetrun.spec import SILU

log = logging.getLogger("hetrun")
OPSET = 21
IR_VERSION = 10
MATMULNBITS_BLOCKS = (16, 32, 64, 128, 256)  # block sizes onnxruntime's and OpenVINO's MatMulNBits take
ACTIVATION_QUANTIZED = 4  # MatMulNBits accuracy_level 4: activations quantized to INT8 per block on the fly


@dataclass(frozen=True)
class ExpertGraph:
    model: onnx.ModelProto
    precision: str
    hidden: int
    intermediate: int
    weight_bytes: int  # bytes the format stores: values, scales and zero points (one scale per block); see formats.matrix_bytes
    target: str = "onnxruntime"
    onnx_bytes: int = 0  # bytes of the graph's weight initializers (block scales repeated per row, as ONNX wants them)
    quantizer: str = ""  # "rtn" or "gptq" for INT4
    # in_process graphs: weight initializers whose bytes are held here, not in `model` (their raw_data is empty)
    arrays: dict = field(default_factory=dict)

    def serialize(self) -> bytes:
        return self.filled_model().SerializeToString()

    def filled_model(self) -> onnx.ModelProto:
        """`model` with every initializer's bytes in it (an in_process graph's arrays moved into the proto once)."""
        return filled(self.model, self.arrays)

    @property
    def meta(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "weight_bytes": self.weight_bytes,
                "precision": self.precision, "onnx_bytes": self.onnx_bytes, "target": self.target,
                "quantizer": self.quantizer}


def _transposed(a: np.ndarray) -> np.ndarray:
    """a [N, K] -> a.T [K, N] contiguous, the bytes moved by torch's blocked transpose (numpy's strided copy is
    1.5x slower on 2-byte and 5x slower on 4-byte values here, and expert graphs transpose every weight)."""
    bits = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]  # any dtype, ml_dtypes' included
    t = torch.from_numpy(np.ascontiguousarray(a).view(bits)).t().contiguous()  # [K, N]
    return t.numpy().view(a.dtype)


class _Builder:
    """Collects nodes and initializers; names stay unique. `arithmetic` rounds narrow floats without Casts;
    `row_major` stores INT8 and INT4 weights as nn.Linear does, [N, K], multiplied by Gemm(transB=1);
    `float_row_major` FP32, FP16 and BF16 ones (the torch backend holds them so: no transpose there and back)."""

    def __init__(self, arithmetic: bool, row_major: bool = False, float_row_major: bool = False,
                 keep_arrays: bool = False):
        self.arithmetic = arithmetic
        self.row_major = row_major
        self.float_row_major = float_row_major
        self.arrays: dict[str, np.ndarray] | None = {} if keep_arrays else None  # in_process: weights held here
        self.nodes: list[onnx.NodeProto] = []
        # initializers are written straight into the model: helper.make_graph and make_model would copy each twice
        self.proto = onnx.ModelProto()
        self.weight_bytes = 0
        self.onnx_bytes = 0
        self.quantizer = ""
        self.out = ""
        self.activation = SILU  # how gate and up combine; the biases after each matmul, where the expert has them
        self.gate_up_bias: np.ndarray | None = None  # [2I]
        self.down_bias: np.ndarray | None = None  # [D]
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        """A weight initializer; its bytes count towards onnx_bytes (format bytes are counted by the caller)."""
        name = self.name(name)
        t = self.proto.graph.initializer.add()
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        if self.arrays is not None and data_type not in _PACKED:  # the bytes stay in the array, not copied in
            t.name, t.data_type = name, data_type
            t.dims.extend(array.shape)
            self.arrays[name] = array
            self.onnx_bytes += array.nbytes
        else:
            self.onnx_bytes += _initializer(t, array, name)
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (scalar or shape), shared by every use."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.name("c")
            _initializer(self.proto.graph.initializer.add(), arr, self._consts[key])
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    # ---- narrow-float rounding -------------------------------------------------------------------------
    def round_to(self, x: str, fmt: str) -> str:
        """Round float32 values to bf16, fp16 or e4m3 (saturating at 448) and back to float32."""
        if not self.arithmetic:
            onnx_type = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16,
                         "e4m3": TensorProto.FLOAT8E4M3FN}[fmt]
            attrs = {"saturate": 1} if fmt == "e4m3" else {}
            return self.op("Cast", [self.op("Cast", [x], to=onnx_type, **attrs)], to=TensorProto.FLOAT)
        return {"bf16": self._round_bf16, "fp16": self._round_fp16, "e4m3": self._round_e4m3}[fmt](x)

    def _veltkamp(self, x: str, keep_bits: int) -> str:
        """x rounded to `keep_bits` significant bits, ties to even: c = x*(2^s+1); x' = c - (c - x), s = 24 - bits."""
        c = self.op("Mul", [x, self.const(2.0 ** (24 - keep_bits) + 1)])
        return self.op("Sub", [c, self.op("Sub", [c, x])])

    def _grid(self, x: str, spacing_log2: int) -> str:
        """x rounded to a multiple of 2^spacing_log2, ties to even (the subnormal grid): Round(x / 2^k) * 2^k."""
        scaled = self.op("Round", [self.op("Mul", [x, self.const(2.0 ** -spacing_log2)])])
        return self.op("Mul", [scaled, self.const(2.0 ** spacing_log2)])

    def _round_bf16(self, x: str) -> str:
        a = self.op("Abs", [x])
        small = self._veltkamp(x, 8)
        # Past 2^100 the Veltkamp product would overflow: round x * 2^-64 instead (exact scaling); past the
        # largest BF16 the product by 2^64 rounds to inf, as the Cast does.
        big = self.op("Mul", [self._veltkamp(self.op("Mul", [x, self.const(2.0 ** -64)]), 8), self.const(2.0 ** 64)])
        r = self.op("Where", [self.op("Greater", [a, self.const(2.0 ** 100)]), big, small])
        return self.op("Where", [self.op("Equal", [a, self.const(np.inf)]), x, r])  # +-inf stay

    def _round_fp16(self, x: str) -> str:
        a = self.op("Abs", [x])
        overflow = self.op("GreaterOrEqual", [a, self.const(65520.0)])  # halfway past 65504 rounds to inf (even)
        normal = self._veltkamp(self.op("Where", [overflow, self.const(0.0), x]), 11)
        sub = self._grid(x, -24)  # subnormals: multiples of 2^-24 below 2^-14
        r = self.op("Where", [self.op("Less", [a, self.const(2.0 ** -14)]), sub, normal])
        return self.op("Where", [overflow, self.op("Mul", [x, self.const(np.inf)]), r])  # +-inf; NaN stays NaN

    def _round_e4m3(self, x: str) -> str:
        xc = self.op("Clip", [x, self.const(-E4M3_MAX), self.const(E4M3_MAX)])  # saturate (inf -> +-448)
        normal = self._veltkamp(xc, 4)
        sub = self._grid(xc, -9)  # subnormals: multiples of 2^-9 below 2^-6
        r = self.op("Where", [self.op("Less", [self.op("Abs", [xc]), self.const(2.0 ** -6)]), sub, normal])
        return self.op("Where", [self.op("IsNaN", [x]), x, r])  # OpenVINO's Clip turns NaN into -448

    # ---- the expert ------------------------------------------------------------------------------------
    def times(self, x: str, w: str, row_major: bool | None = None) -> str:
        """x [T, K] times a float weight: w [K, N], or w [N, K] transposed when row_major (default: the builder's)."""
        row_major = self.row_major if row_major is None else row_major
        return self.op("Gemm", [x, w], transB=1) if row_major else self.op("MatMul", [x, w])  # [T, N]

    def swiglu(self, x: str, matmul: Callable[[str, str], str]) -> str:
        gate_up = self._biased(matmul(x, "gate_up"), self.gate_up_bias, "gate_up")  # [N, 2I]
        g, u = self.name("g"), self.name("u")
        self.nodes.append(helper.make_node("Split", [gate_up], [g, u], axis=1, num_outputs=2))
        a = self.activation
        if a.kind == "silu":
            h = self.op("Mul", [self.op("Mul", [g, self.op("Sigmoid", [g])]), u])  # [N, I]
        else:  # clamped_swiglu: min(g, limit) * sigmoid(alpha * it) * (clip(u, -limit, limit) + 1)
            g = self.op("Min", [g, self.const(a.limit)])
            u = self.op("Clip", [u, self.const(-a.limit), self.const(a.limit)])
            glu = self.op("Mul", [g, self.op("Sigmoid", [self.op("Mul", [g, self.const(a.alpha)])])])
            h = self.op("Mul", [glu, self.op("Add", [u, self.const(1.0)])])  # [N, I]
        return self._biased(matmul(h, "down"), self.down_bias, "down")  # [N, D]

    def _biased(self, y: str, bias: np.ndarray | None, name: str) -> str:
        # an FP32 initializer named bias_<matrix>_<n>, which graph_matrices finds by that name
        return y if bias is None else self.op("Add", [y, self.init(f"bias_{name}", np.asarray(bias, np.float32))])

    def model(self, x: str, y: str, hidden: int, domains: tuple[str, ...] = (), out: int | None = None,
              name: str = "expert") -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        model, graph = self.proto, self.proto.graph  # what make_graph and make_model build, initializers in place
        graph.node.extend(self.nodes)
        graph.name = name
        graph.input.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["tokens", hidden]))
        graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                          ["tokens", hidden if out is None else out]))
        model.opset_import.extend([helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains])
        model.producer_name = "hetrun"
        model.ir_version = IR_VERSION
        return model


_PACKED = (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1)  # two values a byte: numpy_helper packs them


def _initializer(t: onnx.TensorProto, array: np.ndarray, name: str) -> int:
    """Fill `t` as numpy_helper.from_array(array, name) would, its bytes copied in once (from_array's tensor would be
    copied again into the graph); returns the bytes stored. (Reading t.raw_data back would copy them once more.)"""
    data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    if data_type in _PACKED or sys.byteorder != "little":
        t.CopyFrom(numpy_helper.from_array(array, name))
        return len(t.raw_data) if t.HasField("raw_data") else array.nbytes
    t.name = name
    t.dims.extend(array.shape)
    t.data_type = data_type
    t.raw_data = np.ascontiguousarray(array).tobytes()
    return array.nbytes


@dataclass
class _Matrices:
    """The expert's two weights in nn.Linear layout [out, in]; gate_up keeps gate and up apart for block scales.
    A builder takes each once: with no other reference left, a matrix's source bytes go as soon as it is converted."""

    gate_up: tuple | None  # ([I, D], [I, D]) stacked along rows, float32 or as stored (bfloat16 ...), or their readers
    down: tuple | None  # ([D, I],)
    hidden: int
    intermediate: int
    calibration: dict[str, np.ndarray] = field(default_factory=dict)  # matrix -> inputs [M, K]

    def take(self, key: str) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(p) for p in self.each(key))  # a StoredRows part read whole

    def each(self, key: str) -> Iterator:
        """The parts one at a time; a part held as a reader (ExpertSource.stored_readers) is read only then, and may
        be read by rows (StoredRows: the row-chunked quantizers take it so)."""
        parts = list(getattr(self, key))
        setattr(self, key, None)
        while parts:
            part = parts.pop(0)
            yield part() if callable(part) else part

    def rows(self, key: str, dtype=np.float32) -> np.ndarray:
        rows = np.concatenate(self.take(key), 0)  # [N, K]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def fp32_parts(self, key: str) -> tuple[np.ndarray, ...]:
        return tuple(p.astype(np.float32, copy=False) for p in self.take(key))


def _matrices(w: ExpertWeights, calibration: np.ndarray | None) -> _Matrices:
    calib = {}
    if calibration is not None:
        x = np.asarray(calibration, dtype=np.float32)  # [M, D]
        if x.ndim != 2 or x.shape[1] != w.hidden:
            raise ValueError(f"calibration activations must be [tokens, {w.hidden}], got shape {x.shape}")
        i, bias = w.intermediate, w.gate_up_bias
        g, u = (x @ p.astype(np.float32, copy=False).T + (0 if bias is None else bias[k * i:(k + 1) * i])
                for k, p in enumerate((w.gate, w.up)))  # [M, I]
        calib = {"gate_up": x, "down": w.activation.apply(g, u)}  # inputs of each matmul in the FP32 expert
    return _Matrices((w.gate, w.up), (w.down,), w.hidden, w.intermediate, calib)


# ---- builders: each stores both matrices and sets b.out -------------------------------------------------------

def _float_weight(b: _Builder, m: _Matrices, k: str, dtype) -> np.ndarray:
    rows = m.rows(k, dtype)  # [N, K]
    return rows if b.float_row_major else _transposed(rows)  # [N, K] or [K, N]


def _build_fp32(b: _Builder, m: _Matrices, fmt: Format) -> None:
    mats = {}
    for k in ("gate_up", "down"):
        wt = _float_weight(b, m, k, np.float32)
        mats[k] = b.init(f"w_{k}", wt)
        b.weight_bytes += wt.nbytes
    b.out = b.swiglu("x", lambda x, k: b.times(x, mats[k], b.float_row_major))


def _build_float16ish(b: _Builder, m: _Matrices, fmt: Format) -> None:
    """FP16/BF16: weights stored narrow, activations rounded to it around each matmul, products accumulated in FP32."""
    np_dtype = np.float16 if fmt.name == "fp16" else ml_dtypes.bfloat16
    mats = {}
    for k in ("gate_up", "down"):
        wt = _float_weight(b, m, k, np_dtype)  # narrowed first: half the bytes to move
        mats[k] = b.op("Cast", [b.init(f"w_{k}", wt)], to=TensorProto.FLOAT)
        b.weight_bytes += wt.nbytes

    def matmul(x: str, k: str) -> str:
        return b.round_to(b.times(b.round_to(x, fmt.name), mats[k], b.float_row_major), fmt.name)

    b.out = b.swiglu("x", matmul)


def _fp8_weight(b: _Builder, parts: tuple[Fp8Matrix, ...]) -> str:
    """E4M3 weights with block scales -> float32 [K, N] for x @ W.

    Each part ([rows, K], e.g. gate and up) keeps its own block grid; the per-row copies of the block scales (ONNX
    blocks along one axis only) then stack like the rows. OpenVINO runs blocked DequantizeLinear only when K is a
    multiple of the block, so a ragged last block gets its own node.
    """
    bn = parts[0].block[1]
    codes = np.concatenate([p.codes for p in parts], 0)  # [N, K] float8_e4m3fn, the stored bytes
    scale = np.concatenate([p.row_scales() for p in parts], 0)  # [N, ceil(K/bn)]
    b.weight_bytes += sum(p.nbytes for p in parts)
    k = codes.shape[1]
    k_full = k // bn * bn
    pieces = []
    if k_full:
        pieces.append(b.op("DequantizeLinear", [b.init("w_fp8", np.ascontiguousarray(codes[:, :k_full])),
                                                b.init("s_fp8", np.ascontiguousarray(scale[:, :k_full // bn]))],
                           axis=1, block_size=bn))  # [N, k_full]
    if k > k_full:
        pieces.append(b.op("DequantizeLinear", [b.init("w_fp8_tail", np.ascontiguousarray(codes[:, k_full:])),
                                                b.init("s_fp8_tail", np.ascontiguousarray(scale[:, -1:]))],
                           axis=1, block_size=k - k_full))  # [N, K - k_full]
    wf = pieces[0] if len(pieces) == 1 else b.op("Concat", pieces, axis=1)  # [N, K]
    return b.op("Transpose", [wf], perm=[1, 0])  # [K, N]


def _fp8_blocks(w: np.ndarray) -> Fp8Matrix:
    """Round-to-nearest E4M3 of w [N, K] with one scale per 128x128 block (DeepSeek-V3)."""
    q = quantize_fp8(w, "e4m3", "block", FP8_BLOCK)
    return Fp8Matrix(q.data, q.scale, (FP8_BLOCK, FP8_BLOCK))


def _fp8_tiles(b: _Builder, x: str, k: int) -> str:
    """x [T, K] quantized to E4M3 and back per 1x128 tile: scale = finite amax / 448 (1 for all-zero tiles)."""
    nb = -(-k // FP8_BLOCK)
    if nb * FP8_BLOCK != k:  # ragged: zero-pad K; zeros change no amax
        x = b.op("Pad", [x, b.const([0, 0, 0, nb * FP8_BLOCK - k], np.int64)])
    tiles = b.op("Reshape", [x, b.const([-1, nb, FP8_BLOCK], np.int64)])  # [T, nb, 128]
    a = b.op("Abs", [tiles])
    finite = b.op("Where", [b.op("Less", [a, b.const(np.inf)]), a, b.const(0.0)])  # inf and NaN set no scale
    amax = b.op("ReduceMax", [finite, b.const([2], np.int64)], keepdims=1)  # [T, nb, 1]
    scale = b.op("Div", [amax, b.const(E4M3_MAX)])
    scale = b.op("Where", [b.op("Equal", [scale, b.const(0.0)]), b.const(1.0), scale])
    q = b.round_to(b.op("Div", [tiles, scale]), "e4m3")  # [T, nb, 128] on the E4M3 grid
    deq = b.op("Reshape", [b.op("Mul", [q, scale]), b.const([0, nb * FP8_BLOCK], np.int64)])  # [T, nb*128]
    if nb * FP8_BLOCK != k:
        deq = b.op("Slice", [deq, b.const([0], np.int64), b.const([k], np.int64), b.const([1], np.int64)])
    return deq


def _build_fp8(b: _Builder, m: _Matrices, fmt: Format) -> None:
    parts = {k: tuple(_fp8_blocks(p) for p in m.fp32_parts(k)) for k in ("gate_up", "down")}
    _fp8_expert(b, parts, fmt, m.hidden, m.intermediate)


def _fp8_expert(b: _Builder, parts: dict[str, tuple[Fp8Matrix, ...]], fmt: Format, hidden: int,
                intermediate: int) -> None:
    mats = {k: _fp8_weight(b, parts[k]) for k in ("gate_up", "down")}
    dims = {"gate_up": hidden, "down": intermediate}
    if fmt.name == "fp8":  # W8A8: activations quantized online per 1x128 tile
        b.out = b.swiglu("x", lambda x, k: b.op("MatMul", [_fp8_tiles(b, x, dims[k]), mats[k]]))
    else:
        b.out = b.swiglu("x", lambda x, k: b.op("MatMul", [x, mats[k]]))


def _build_int8(b: _Builder, m: _Matrices, fmt: Format) -> None:
    mats = {}
    for k in ("gate_up", "down"):
        q = quantize_int8(m.rows(k), axis=0)  # data [N, K], scale [N]
        b.weight_bytes += q.data.nbytes + q.scale.nbytes
        # OpenVINO keeps [N, K] codes compressed in its FullyConnected: 1.6x [K, N]'s speed at one token
        codes = np.ascontiguousarray(q.data) if b.row_major else _transposed(q.data)  # [N, K] or [K, N]
        mats[k] = b.op("DequantizeLinear", [b.init(f"w_{k}_int8", codes), b.init(f"s_{k}", q.scale)],
                       axis=0 if b.row_major else 1)
    b.out = b.swiglu("x", lambda x, k: b.times(x, mats[k]))


def _build_int8_nbits(b: _Builder, m: _Matrices, fmt: Format) -> None:
    """int8-w8a8: symmetric INT8 weights in blocks along K, activations quantized to INT8 per block on the fly."""
    nodes = {}
    for k in ("gate_up", "down"):
        rows = m.rows(k, None)  # [N, K] as stored: read to FP32 a row chunk at a time
        packed, scales = to_matmulnbits_int8(rows, fmt.group)  # [N, nb, block], [N*nb]
        b.weight_bytes += packed.nbytes + scales.nbytes
        nodes[k] = ([b.init(f"w_{k}_q8", packed), b.init(f"s_{k}", scales)], *rows.shape, fmt.group, None)
    _nbits_swiglu(b, nodes, 8, fmt)


def _build_int4(b: _Builder, m: _Matrices, fmt: Format) -> None:
    b.quantizer = "gptq" if m.calibration else "rtn"
    tensors = {}
    for k in ("gate_up", "down"):
        if m.calibration:
            tensors[k] = (gptq_quantize_int4(m.rows(k), m.calibration[k], fmt.group), None)  # rows [N, K]
        elif b.row_major:  # each part on its own (gate, up), let go once quantized: no stacked copy of the pair
            tensors[k] = (stack_rows([quantize_int4(p, fmt.group, symmetric=False) for p in m.each(k)]), None)
        else:  # packed for MatMulNBits as quantized, a chunk of rows at a time, each part read only then
            shape = (2 * m.intermediate, m.hidden) if k == "gate_up" else (m.hidden, m.intermediate)
            tensors[k] = ((*quantize_to_matmulnbits(m.each(k), shape, fmt.group), shape[1], fmt.group), None)
    _int4_expert(b, tensors, fmt)


def _int4_expert(b: _Builder, tensors: dict[str, tuple[Int4Tensor | tuple, np.ndarray | None]], fmt: Format) -> None:
    """Both matmuls in com.microsoft.MatMulNBits (row_major: _row_major_int4's form); `order` (act-order) gathers the
    input columns first. A tensor may come packed already: (B, scales, zero points, K, group), to_matmulnbits'
    arrays (quantize_to_matmulnbits'). Formats with INT8 activations (int4-w4a8) ask for accuracy level 4."""
    if b.row_major:
        b.weight_bytes += sum(matrix_bytes(fmt.name, *t.codes.shape) for t, _ in tensors.values())
        b.out = b.swiglu("x", lambda x, k: _row_major_int4(b, x, k, *tensors[k]))
        return
    nodes = {}
    for k, (t, order) in tensors.items():
        # [N, nb, group/2], [N*nb], [N*ceil(nb/2)]; t is packed already where _build_int4 packed it as it quantized
        packed, scales, zps, kk, group = (*to_matmulnbits(t), t.codes.shape[1], t.group) \
            if isinstance(t, Int4Tensor) else t
        tensors[k] = None  # the arrays go once their initializers hold them
        inputs = [b.init(f"w_{k}_q4", packed), b.init(f"s_{k}", scales), b.init(f"z_{k}", zps)]
        b.weight_bytes += packed.nbytes + scales.nbytes + zps.nbytes
        perm = None if order is None else b.init(f"order_{k}", np.asarray(order, dtype=np.int64))  # [K]
        nodes[k] = (inputs, packed.shape[0], kk, group, perm)
        del t, packed, scales, zps
    _nbits_swiglu(b, nodes, 4, fmt)


def _row_major_int4(b: _Builder, x: str, name: str, t: Int4Tensor, order: np.ndarray | None) -> str:
    """x [T, K] @ W.T with INT4 codes kept [N, K] in groups, (codes - zero point) * scale in f32: the pattern
    OpenVINO's CPU plugin keeps compressed (0.62 against 0.88 ms per Mixtral-bench expert at one token for
    MatMulNBits on a 2-core AVX2 host). K is padded to whole groups; the padding meets zero input columns."""
    n, k = t.codes.shape
    nb = t.scale.shape[1]
    pad = nb * t.group - k
    codes = np.pad(t.codes, ((0, 0), (0, pad))).reshape(n, nb, t.group).astype(ml_dtypes.uint4)  # [N, nb, g]
    zero = t.zero_point.reshape(n, nb, 1).astype(ml_dtypes.uint4)  # [N, nb, 1]
    w = b.op("Sub", [b.op("Cast", [b.init(f"w_{name}_u4", codes)], to=TensorProto.FLOAT),
                     b.op("Cast", [b.init(f"z_{name}", zero)], to=TensorProto.FLOAT)])
    w = b.op("Mul", [w, b.init(f"s_{name}", t.scale.reshape(n, nb, 1).astype(np.float32))])  # [N, nb, g]
    w = b.op("Reshape", [w, b.const([n, nb * t.group], np.int64)])  # [N, K + pad]
    if order is not None:
        x = b.op("Gather", [x, b.init(f"order_{name}", np.asarray(order, dtype=np.int64))], axis=1)  # group order
    if pad:
        x = b.op("Pad", [x, b.const([0, 0, 0, pad], np.int64)])  # [T, K + pad]
    return b.times(x, w)  # [T, N]


def _nbits_swiglu(b: _Builder, nodes: dict, bits: int, fmt: Format) -> None:
    # the SwiGLU of two MatMulNBits; nodes[k] = (inputs, N, K, block size, act-order permutation or None)
    level = {"accuracy_level": ACTIVATION_QUANTIZED} if fmt.int8_activations else {}

    def matmul(x: str, k: str) -> str:
        inputs, n, kk, block, perm = nodes[k]
        if perm is not None:
            x = b.op("Gather", [x, perm], axis=1)  # [T, K] columns in group order
        return b.op("MatMulNBits", [x] + inputs, domain="com.microsoft", K=kk, N=n, bits=bits, block_size=block,
                    **level)

    b.out = b.swiglu("x", matmul)


def _build_gptq_native(w: QuantizedExpert, b: _Builder, fmt: Format) -> bool:
    """A 4-bit GPTQ expert onto MatMulNBits with its codes, scales and zero points unchanged; False when its layout
    has no MatMulNBits form for `fmt` (another group size, bits, zero points past 15, gate and up in different
    act-orders): the caller then dequantizes."""
    mats = (w.gate, w.up, w.down)
    if any(m.bits != 4 or m.group != fmt.group or m.group not in MATMULNBITS_BLOCKS for m in mats):
        return False
    int4 = [gptq_int4(m.qweight, m.qzeros, m.scales, m.g_idx, m.group, m.zero_offset) for m in mats]
    if any(t is None for t in int4):
        return False
    (g, g_order), (u, u_order), down = int4
    if not (g_order is None and u_order is None or (g_order is not None and u_order is not None
                                                    and np.array_equal(g_order, u_order))):
        return False
    gate_up = Int4Tensor(np.concatenate([g.codes, u.codes]), np.concatenate([g.scale, u.scale]),
                         np.concatenate([g.zero_point, u.zero_point]), g.group, False)  # [2I, D]
    b.quantizer = "gptq-checkpoint"
    _int4_expert(b, {"gate_up": (gate_up, g_order), "down": down}, fmt)
    return True


def _build_native(w: QuantizedExpert, b: _Builder, fmt: Format) -> bool:
    """Build a checkpoint's quantized expert in its own format, unchanged; False when `fmt` is another format."""
    if w.kind == "fp8" and fmt.base == "fp8":
        if len({m.block[1] for m in (w.gate, w.up, w.down)}) == 1:
            _fp8_expert(b, {"gate_up": (w.gate, w.up), "down": (w.down,)}, fmt, w.hidden, w.intermediate)
            b.quantizer = "fp8-checkpoint"
            return True
        return False
    if w.kind == "gptq" and fmt.base == "int4":
        return _build_gptq_native(w, b, fmt)
    return False


_BUILDERS: dict[str, Callable[[_Builder, _Matrices, Format], None]] = {
    "fp32": _build_fp32, "fp16": _build_float16ish, "bf16": _build_float16ish, "fp8": _build_fp8,
    "fp8-w8a16": _build_fp8, "int8": _build_int8, "int4": _build_int4, "int4-g32": _build_int4,
    "int8-w8a8": _build_int8_nbits, "int4-w4a8": _build_int4,
}


def build_expert_graph(w: "ExpertWeights | QuantizedExpert | ExpertSource", precision: str = "fp32",
                       target: str = "onnxruntime", calibration: np.ndarray | None = None,
                       in_process: bool = False) -> ExpertGraph:
    """The ONNX graph of one expert at a precision, for the backend `target`, with its stored weight bytes counted.

    `w` may be FP32 weights, a checkpoint's quantized expert (built natively on a device of its format, else
    dequantized once), or an ExpertSource (read now, dropped with the graph's inputs). `calibration` ([tokens, D]
    activations the expert sees) makes the INT4 formats quantize with GPTQ instead of round-to-nearest; other
    formats, and experts already quantized in the device's format, do not use it. `in_process` (for a backend that
    reads the graph in this process: BackendCaps.loads_in_process) keeps the weight initializers' bytes in
    `ExpertGraph.arrays` instead of copying them into the proto; serialize() and filled_model() put them in.
    """
    if precision not in FORMATS:
        raise ValueError(f"no expert graph for precision {precision!r}; available: {', '.join(FORMATS)}")
    fmt = FORMATS[precision]
    b = _Builder(arithmetic=target == "openvino", row_major=target == "openvino", float_row_major=target == "torch",
                 keep_arrays=in_process)
    # a source of per-expert 16-bit matrices hands readers: each matrix read when its builder takes it
    readers = w.stored_readers() if isinstance(w, ExpertSource) and (calibration is None or fmt.base != "int4") \
        else None
    if readers is None and isinstance(w, ExpertSource):
        w = w.read_stored()  # 16-bit experts stay 16-bit until their format's builder converts them
    if isinstance(w, QuantizedExpert):
        if _build_native(w, b, fmt):
            return _graph(b, precision, target, w.hidden, w.intermediate)
        if fmt.base not in ("fp32", "fp16", "bf16"):
            warn_once(("requantized", w.kind, precision), "%s checkpoint experts (%s) go onto %s devices dequantized "
                      "and quantized again: %s has no form of them", w.kind, _describe(w), precision, precision)
        w = w.dequantize()
    m = _Matrices(readers[:2], readers[2:], w.hidden, w.intermediate) if readers is not None else \
        _matrices(w, calibration if fmt.base == "int4" else None)
    if isinstance(w, ExpertWeights):
        b.activation, b.gate_up_bias, b.down_bias = w.activation, w.gate_up_bias, w.down_bias
    elif readers is not None:  # an ExpertSource read matrix by matrix
        b.activation, b.gate_up_bias, b.down_bias = w.activation, *w.biases()
    del w  # a source's read is held by `m` alone now, so each matrix is freed once its builder has converted it
    _BUILDERS[precision](b, m, fmt)
    return _graph(b, precision, target, m.hidden, m.intermediate)


def _describe(w: QuantizedExpert) -> str:
    m = w.gate
    return f"{m.bits}-bit g{m.group}" if isinstance(m, GptqMatrix) else f"{m.block[0]}x{m.block[1]} blocks"


def _graph(b: _Builder, precision: str, target: str, hidden: int, intermediate: int) -> ExpertGraph:
    domains = tuple(sorted({n.domain for n in b.nodes if n.domain}))
    model = b.model("x", b.out, hidden, domains)
    if b.activation != SILU:  # for the backends that read the expert back out of its graph (graph_matrices)
        helper.set_model_props(model, {ACTIVATION_PROP: json.dumps(dataclasses.asdict(b.activation))})
    return ExpertGraph(model, precision, hidden, intermediate, b.weight_bytes, target, b.onnx_bytes, b.quantizer,
                       b.arrays or {})


# ---- one linear layer of a model's dense part (attention projections, dense MLPs, the LM head) --------------

# Formats a dense linear is built in: weights the CPU runtimes compute from compressed storage.
LINEAR_FORMATS = ("fp32", "int8-w8a8", "int4-w4a8")


def build_linear_graph(w: "np.ndarray | torch.Tensor", precision: str) -> onnx.ModelProto:
    """x [tokens, K] float32 -> x @ w.T [tokens, N] float32 for an nn.Linear weight w [N, K] (no bias), at a
    precision of LINEAR_FORMATS: "fp32" (MatMul), "int8-w8a8" (MatMulNBits, INT8 blocks of 128 along K) or
    "int4-w4a8" (MatMulNBits, INT4 groups of 128 with zero points, round-to-nearest), both with INT8 activations
    per block on the fly: onnxruntime's and OpenVINO's weight-compressed CPU kernels. The integer formats read a
    torch weight of any float dtype (a BF16 LM head) a row chunk at a time, never as a whole FP32 copy."""
    if precision not in LINEAR_FORMATS:
        raise ValueError(f"no linear graph for precision {precision!r}; available: {', '.join(LINEAR_FORMATS)}")
    if precision == "fp32" and isinstance(w, torch.Tensor):
        w = w.float().numpy()  # FP32 already: not copied
    n, k = w.shape  # [N, K]
    b = _Builder(arithmetic=False)
    if precision == "fp32":
        y = b.op("MatMul", ["x", b.init("w", _transposed(np.asarray(w, dtype=np.float32)))])  # [T, N]
        domains: tuple[str, ...] = ()
    else:
        fmt = FORMATS[precision]
        if fmt.base == "int8":
            packed, scales = to_matmulnbits_int8(w, fmt.group)  # [N, nb, block], [N*nb]
            inputs, bits = [b.init("w_q8", packed), b.init("s", scales)], 8
        else:
            packed, scales, zps = quantize_to_matmulnbits((w,), (n, k), fmt.group)  # [N, nb, g/2], ...
            inputs, bits = [b.init("w_q4", packed), b.init("s", scales), b.init("z", zps)], 4
        y = b.op("MatMulNBits", ["x", *inputs], domain="com.microsoft", K=k, N=n, bits=bits, block_size=fmt.group,
                 accuracy_level=ACTIVATION_QUANTIZED)  # [T, N]
        domains = ("com.microsoft",)
    return b.model("x", y, k, domains, out=n, name="linear")

