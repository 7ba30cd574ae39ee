"""Expert weights read back from an ONNX expert graph, for backends that run experts in torch instead of a graph runtime.

Every expert graph computes y = down(silu(g) * u) with [g, u] = x @ gate_up (gpt-oss's: biases after each matmul
and a clamped SwiGLU, read_bias_and_activation). The reader finds the two weight
matmuls, evaluates the constant subgraph that feeds each one (so any storage format the graph builders use
dequantizes exactly as the graph does), and, where the weight comes straight from a DequantizeLinear of an
initializer, also returns the stored codes with their scales laid out like the matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from hetrun.backends.ort_threads import plain_session_options
from onnx import TensorProto, helper, numpy_helper

from hetrun.spec import SILU, ExpertActivation

ACTIVATION_PROP = "hetrun.expert_activation"  # metadata of a graph whose expert is not silu(g) * u: ExpertActivation
# Ops that only move or relabel a dequantized weight on its way to the MatMul.
_LAYOUT_OPS = ("Transpose", "Identity", "Cast")


@dataclass(frozen=True)
class QuantizedMatrix:
    """A stored weight [K, N] (as used in x @ W): codes with per-element scale and zero point, dequantize = (q - z) * s."""

    codes: np.ndarray  # [K, N] storage dtype: float8_e4m3fn, int8, int4, uint8 ...
    scale: np.ndarray  # [K, N] float32, each element's scale
    zero: np.ndarray | None  # [K, N] float32 zero point, None when there is none
    onnx_type: int  # TensorProto data type of the stored codes

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [K, N] these codes stand for."""
        q = self.codes.astype(np.float32)
        if self.zero is not None:
            q = q - self.zero
        return q * self.scale

    def block_grid(self, bk: int = 128, bn: int = 128) -> np.ndarray | None:
        """Scales [ceil(K/bk), ceil(N/bn)] when the scale is constant over every bk x bn block (and no zero point), else None."""
        if self.zero is not None and np.any(self.zero):
            return None
        k, n = self.scale.shape
        nk, nn = -(-k // bk), -(-n // bn)
        s = np.pad(self.scale, ((0, nk * bk - k), (0, nn * bn - n)), mode="edge").reshape(nk, bk, nn, bn)
        hi, lo = s.max(axis=(1, 3)), s.min(axis=(1, 3))  # [nk, nn]
        return hi.astype(np.float32) if np.array_equal(hi, lo) else None

    def column_scale(self) -> np.ndarray | None:
        """One scale per output column [N] when the scale is constant along K (and no zero point), else None."""
        if self.zero is not None and np.any(self.zero):
            return None
        return self.scale[0].copy() if np.all(self.scale == self.scale[:1]) else None

    def columns(self, start: int, stop: int) -> "QuantizedMatrix":
        """Output columns start:stop of this matrix (e.g. the gate or the up half of gate_up)."""
        zero = None if self.zero is None else self.zero[:, start:stop]
        return QuantizedMatrix(self.codes[:, start:stop], self.scale[:, start:stop], zero, self.onnx_type)

    @property
    def is_e4m3(self) -> bool:
        return self.onnx_type == TensorProto.FLOAT8E4M3FN


@dataclass(frozen=True)
class ExpertMatrices:
    """One expert's two weight matrices as its graph computes them, plus the stored codes where the graph quantizes them."""

    gate_up: np.ndarray  # [D, 2I] float32: [g, u] = x @ gate_up
    down: np.ndarray  # [I, D] float32
    gate_up_q: QuantizedMatrix | None
    down_q: QuantizedMatrix | None
    extras: tuple = (None, None, SILU)  # read_bias_and_activation's (gate_up bias, down bias, activation)

    @property
    def hidden(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate(self) -> int:
        return self.down.shape[0]


def read_expert_matrices(graph) -> ExpertMatrices:
    """The expert's weights from its ONNX graph (bytes, an onnx.ModelProto or an ExpertGraph); ValueError when the
    graph is not a SwiGLU expert."""
    model = _model(graph)
    g = model.graph
    const = _constant_names(g)
    weighted = [n for n in g.node if _weight_input(n, const) is not None]
    if len(weighted) != 2:
        raise ValueError(f"expert graph has {len(weighted)} weight matmuls; expected 2 (fused gate_up, then down)")
    dense = _evaluate_weights(model, weighted, const)
    for i, n in enumerate(weighted):  # act-order GPTQ gathers the input columns in group order: undo it on the weight
        order = _gathered_columns(g, n.input[0])
        if order is not None:
            unpermuted = np.empty_like(dense[i])
            unpermuted[order] = dense[i]  # x[:, order] @ W' == x @ W with W[order] = W'
            dense[i] = unpermuted
    quantized = [_stored_codes(g, _weight_input(n, const), dense[i]) if n.op_type == "MatMul" else None
                 for i, n in enumerate(weighted)]
    gate_up, down = dense
    d, two_i = gate_up.shape
    if two_i % 2 or down.shape != (two_i // 2, d):
        raise ValueError(f"expert graph weights have shapes {gate_up.shape} and {down.shape}; expected [D, 2I] and [I, D]")
    return ExpertMatrices(gate_up, down, quantized[0], quantized[1], _bias_and_activation(model, {}))


def read_stored_float_matrices(graph) -> tuple[np.ndarray, np.ndarray] | None:
    """(gate_up [D, 2I], down [I, D]) as stored, when each weight matmul reads a float initializer directly (FP32
    graphs) or through a Cast to float (FP16/BF16 graphs): the arrays themselves (ml_dtypes.bfloat16, float16 or
    float32; read-only, or the graph's own arrays for an in_process ExpertGraph), without evaluating the graph or
    widening them; a weight stored [N, K] for Gemm(transB=1) comes as its transposed view. None for any other form
    (read_expert_matrices reads every form, widened to FP32). `graph`: bytes, an onnx.ModelProto or an ExpertGraph."""
    arrays = getattr(graph, "arrays", {})  # an in_process ExpertGraph's weights, held beside its proto
    model = graph.model if arrays else _model(graph)  # not filled: the arrays are read where they are
    g = model.graph
    const = _constant_names(g)
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    stored = []
    for n, weight in ((n, _weight_input(n, const)) for n in g.node):
        if weight is None:
            continue
        cast = producer.get(weight)
        if cast is not None and cast.op_type == "Cast":
            weight = cast.input[0]
        if weight not in inits or _gathered_columns(g, n.input[0]) is not None or n.op_type == "MatMulNBits":
            return None
        init = inits[weight]
        if init.data_type not in (TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT):
            return None
        w = arrays[weight] if weight in arrays else numpy_helper.to_array(init)
        stored.append(w.T if n.op_type == "Gemm" else w)  # [K, N]
    if len(stored) != 2 or stored[0].ndim != 2 or stored[1].shape != (stored[0].shape[1] // 2, stored[0].shape[0]):
        return None
    return stored[0], stored[1]


def read_bias_and_activation(graph) -> tuple[np.ndarray | None, np.ndarray | None, ExpertActivation]:
    """(gate_up bias [2I], down bias [D], activation) of an expert graph: its builder's bias_gate_up_* and
    bias_down_* FP32 initializers, each None where it has none, and its ACTIVATION_PROP metadata (silu without).
    `graph`: bytes, an onnx.ModelProto or an ExpertGraph."""
    arrays = getattr(graph, "arrays", {})  # an in_process ExpertGraph's weights, held beside its proto
    return _bias_and_activation(graph.model if arrays else _model(graph), arrays)


def _bias_and_activation(model: onnx.ModelProto, arrays: dict) -> tuple:
    biases = {}
    for t in model.graph.initializer:
        for key in ("gate_up", "down"):
            if t.name.startswith(f"bias_{key}_"):
                biases[key] = np.asarray(arrays[t.name] if t.name in arrays else numpy_helper.to_array(t), np.float32)
    props = {p.key: p.value for p in model.metadata_props}
    activation = ExpertActivation(**json.loads(props[ACTIVATION_PROP])) if ACTIVATION_PROP in props else SILU
    return biases.get("gate_up"), biases.get("down"), activation


def _model(graph) -> onnx.ModelProto:
    if isinstance(graph, bytes):
        return onnx.load_from_string(graph)
    if isinstance(graph, onnx.ModelProto):
        return graph
    return graph.filled_model()  # an ExpertGraph: whole, its arrays moved in where it held them beside


def _gathered_columns(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The column order when `name` is Gather(x, constant indices, axis=1) of the activations, else None."""
    node = next((n for n in g.node if name in n.output), None)
    if node is None or node.op_type != "Gather":
        return None
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    init = next((t for t in g.initializer if t.name == node.input[1]), None)
    return numpy_helper.to_array(init).astype(np.int64) if axis == 1 and init is not None else None


def _constant_names(g: onnx.GraphProto) -> set[str]:
    """Values computable from initializers alone (the graph's nodes are topologically sorted)."""
    const = {t.name for t in g.initializer}
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(n.output)
    return const


def _weight_input(node: onnx.NodeProto, const: set[str]) -> str | None:
    """The constant weight a matmul node applies to an activation, or None for any other node."""
    if node.op_type == "MatMul" and node.input[0] not in const and node.input[1] in const:
        return node.input[1]
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.input[0] not in const:
        return node.input[1]
    if node.op_type == "Gemm" and len(node.input) == 2 and node.input[0] not in const and node.input[1] in const:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}  # the float row-major form: [N, K]
        if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0:
            return node.input[1]
    return None


def _evaluate_weights(model: onnx.ModelProto, weighted: list[onnx.NodeProto], const: set[str]) -> list[np.ndarray]:
    """Each weight matmul's effective [K, N] float32 matrix, computed by onnxruntime from the graph's own nodes."""
    import onnxruntime as ort  # heavy: only when weights are read back from a graph

    g = model.graph
    const_nodes = [n for n in g.node if n.output and all(o in const for o in n.output)]
    nodes, inputs, outputs = list(const_nodes), [], []
    for i, n in enumerate(weighted):
        if n.op_type in ("MatMul", "Gemm"):
            cast = f"hetrun_w{i}"
            nodes.append(helper.make_node("Cast", [n.input[1]], [cast], to=TensorProto.FLOAT))
            if n.op_type == "Gemm":  # [N, K] applied transposed
                nodes.append(helper.make_node("Transpose", [cast], [f"{cast}_t"], perm=[1, 0]))
                cast = f"{cast}_t"
            outputs.append(cast)
        else:  # MatMulNBits packs its weight: apply it to the identity to read the matrix back
            k = helper.get_attribute_value(next(a for a in n.attribute if a.name == "K"))
            eye, out = f"hetrun_eye{i}", f"hetrun_w{i}"
            nodes.append(helper.make_node(n.op_type, [eye] + list(n.input[1:]), [out], domain=n.domain,
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
            inputs.append((helper.make_tensor_value_info(eye, TensorProto.FLOAT, [k, k]), np.eye(k, dtype=np.float32)))
            outputs.append(out)
    sub = helper.make_graph(nodes, "weights", [vi for vi, _ in inputs],
                            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(g.initializer))
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    opts = plain_session_options()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the graph's own arithmetic
    sess = ort.InferenceSession(sub_model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    values = sess.run(outputs, {vi.name: arr for vi, arr in inputs})
    return [np.ascontiguousarray(v, dtype=np.float32) for v in values]


def _stored_codes(g: onnx.GraphProto, weight: str, dense: np.ndarray) -> QuantizedMatrix | None:
    """The stored codes behind `weight` when it is DequantizeLinear(initializer) moved only by layout ops."""
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    chain: list[onnx.NodeProto] = []
    name = weight
    while name in producer and producer[name].op_type in _LAYOUT_OPS:
        chain.append(producer[name])
        name = producer[name].input[0]
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    if any(i and i not in inits for i in dq.input[1:]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    stored = inits[dq.input[0]]
    codes = numpy_helper.to_array(stored)
    scale = _expand(numpy_helper.to_array(inits[dq.input[1]]), codes.shape, attrs.get("axis", 1), attrs.get("block_size", 0))
    zero = None
    if len(dq.input) > 2 and dq.input[2]:
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)
        zero = _expand(zp, codes.shape, attrs.get("axis", 1), attrs.get("block_size", 0))
    for node in reversed(chain):  # replay the layout ops from the DequantizeLinear outward
        if node.op_type == "Transpose":
            perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
            codes, scale = np.transpose(codes, perm), np.transpose(scale, perm)
            zero = None if zero is None else np.transpose(zero, perm)
    if codes.ndim != 2 or codes.shape != dense.shape:
        return None
    q = QuantizedMatrix(np.ascontiguousarray(codes), np.ascontiguousarray(scale, dtype=np.float32),
                        None if zero is None else np.ascontiguousarray(zero), stored.data_type)
    # A Cast to a narrower float on the way would round the values: then the codes are not what the graph uses.
    return q if np.array_equal(q.dequantize(), dense) else None


def _expand(s: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """DequantizeLinear's scale (or zero point) broadcast to the full input shape (per tensor, per axis or blocked)."""
    s = np.asarray(s, dtype=np.float32)
    if s.ndim == 0 or (s.size == 1 and not block):
        return np.full(shape, s.reshape(()), np.float32)
    axis %= len(shape)
    if block:
        return np.take(np.repeat(s, block, axis=axis), np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(s.reshape(view), shape).astype(np.float32)
