"""ONNX graphs of one SwiGLU expert, one builder per precision: y = down(silu(gate(x)) * up(x))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as the model stores them (nn.Linear layout: [out, in])."""

    gate: np.ndarray  # [I, D]
    up: np.ndarray  # [I, D]
    down: np.ndarray  # [D, I]

    @property
    def hidden(self) -> int:
        return self.gate.shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[0]

    def reference(self, x: np.ndarray) -> np.ndarray:
        """FP32 numpy reference output [N, D] for x [N, D]."""
        g = x @ self.gate.T  # [N, I]
        u = x @ self.up.T  # [N, I]
        return ((g / (1.0 + np.exp(-g))) * u) @ self.down.T  # [N, D]


@dataclass(frozen=True)
class ExpertGraph:
    model: onnx.ModelProto
    precision: str
    hidden: int
    intermediate: int
    weight_bytes: int  # bytes of weights as stored, scales and zero points included

    def serialize(self) -> bytes:
        return self.model.SerializeToString()

    @property
    def meta(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "weight_bytes": self.weight_bytes,
                "precision": self.precision}


class _Builder:
    """Collects nodes and initializers; names stay unique."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_bytes = 0
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray, counted: bool = True) -> str:
        t = numpy_helper.from_array(array, name)
        self.inits.append(t)
        if counted:
            self.weight_bytes += array.nbytes
        return name

    def init_tensor(self, tensor: onnx.TensorProto, nbytes: int) -> str:
        self.inits.append(tensor)
        self.weight_bytes += nbytes
        return tensor.name

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def round_to(self, x: str, onnx_dtype: int) -> str:
        """Round float32 values through a narrower float type and back (the device's storage precision)."""
        return self.op("Cast", [self.op("Cast", [x], to=onnx_dtype)], to=TensorProto.FLOAT)

    def swiglu(self, x: str, matmul: Callable[[str, str], str]) -> str:
        gate_up = matmul(x, "gate_up")  # [N, 2I]
        g, u = self.name("g"), self.name("u")
        self.nodes.append(helper.make_node("Split", [gate_up], [g, u], axis=1, num_outputs=2))
        h = self.op("Mul", [self.op("Mul", [g, self.op("Sigmoid", [g])]), u])  # [N, I]
        return matmul(h, "down")

    def model(self, x: str, y: str, hidden: int, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        graph = helper.make_graph(
            self.nodes, "expert",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["tokens", hidden])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])],
            self.inits)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="hetrun")
        model.ir_version = IR_VERSION
        return model


def _stacked(w: ExpertWeights) -> dict[str, np.ndarray]:
    """Weights transposed for x @ W: gate and up fused into one [D, 2I] matrix."""
    return {"gate_up": np.ascontiguousarray(np.concatenate([w.gate, w.up], 0).T, dtype=np.float32),  # [D, 2I]
            "down": np.ascontiguousarray(w.down.T, dtype=np.float32)}  # [I, D]


def _build_fp32(w: ExpertWeights) -> _Builder:
    b = _Builder()
    mats = {k: b.init(f"w_{k}", v) for k, v in _stacked(w).items()}
    y = b.swiglu("x", lambda x, k: b.op("MatMul", [x, mats[k]]))
    b.out = y
    return b


def _build_float16ish(w: ExpertWeights, onnx_dtype: int, np_dtype) -> _Builder:
    """FP16/BF16: weights stored narrow, activations rounded to it between ops, products accumulated in FP32."""
    b = _Builder()
    mats = {}
    for k, v in _stacked(w).items():
        stored = b.init(f"w_{k}", v.astype(np_dtype))
        mats[k] = b.op("Cast", [stored], to=TensorProto.FLOAT)

    def matmul(x: str, k: str) -> str:
        return b.round_to(b.op("MatMul", [b.round_to(x, onnx_dtype), mats[k]]), onnx_dtype)

    b.out = b.swiglu("x", matmul)
    return b


def _bf16_dtype():
    import ml_dtypes

    return ml_dtypes.bfloat16


BUILDERS: dict[str, Callable[[ExpertWeights], _Builder]] = {
    "fp32": _build_fp32,
    "fp16": lambda w: _build_float16ish(w, TensorProto.FLOAT16, np.float16),
    "bf16": lambda w: _build_float16ish(w, TensorProto.BFLOAT16, _bf16_dtype()),
}


def build_expert_graph(w: ExpertWeights, precision: str = "fp32") -> ExpertGraph:
    """The ONNX graph of one expert at a precision, with its stored weight bytes counted."""
    if precision not in BUILDERS:
        raise ValueError(f"no expert graph for precision {precision!r}; available: {', '.join(BUILDERS)}")
    b = BUILDERS[precision](w)
    domains = tuple(sorted({n.domain for n in b.nodes if n.domain}))
    model = b.model("x", b.out, w.hidden, domains)
    return ExpertGraph(model, precision, w.hidden, w.intermediate, b.weight_bytes)
