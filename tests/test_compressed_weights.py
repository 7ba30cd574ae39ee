"""Low-precision weights stay compressed after load: each runtime's optimized graph is inspected, not trusted.

On this kind of CPU (no native BF16 or FP8), onnxruntime and OpenVINO hold BF16, FP16 and FP8 weights, and
onnxruntime INT8 weight-only (W8A16) weights, as FP32 after load: they have no kernel that computes those formats
from compressed weights. Those are the documented exceptions below; every other low-precision format must stay
compressed, and a change in either direction fails here. On a CPU with native BF16 (AVX512-BF16, AMX), OpenVINO
must keep BF16 and FP16 weights as such (unverified here: this machine has neither).
"""

import io
import os
import tempfile

import numpy as np
import onnx
import pytest

from hetrun.backends import host_cpu
from hetrun.backends.onnxruntime import session_options
from hetrun.backends.registry import backend_class, probe_backend
from hetrun.bench.precision import cpu_backend, gaussian_expert
from hetrun.formats import FORMATS
from hetrun.runtime.graphs import build_expert_graph

EXPANDED = {  # formats a runtime holds as FP32 on a CPU without native BF16: no kernel computes them compressed
    "onnxruntime": {"fp32", "bf16", "fp16", "fp8", "fp8-w8a16", "int8"},
    "openvino": {"fp32", "bf16", "fp16", "fp8", "fp8-w8a16"},
}
COMPRESSED_TYPES = {"INT8", "UINT8", "INT4", "UINT4", "FLOAT8E4M3FN", "BFLOAT16", "FLOAT16"}
W = gaussian_expert(256, 512, seed=3)


def _pairs():
    return [(r, p) for r in EXPANDED for p in FORMATS if backend_class(r) is not None and backend_class(r).supports(p)]


def _ort_weight_types(precision: str) -> set[str]:
    import onnxruntime as ort

    graph = build_expert_graph(W, precision).serialize()
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(1)
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    big = [t for t in model.graph.initializer if int(np.prod(t.dims)) >= 256 * 64]  # the weights, not the scales
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in big}


def _ov_weight_types(precision: str) -> set[str]:
    from hetrun.backends.openvino import _core

    be = cpu_backend("openvino", precision, 1)
    graph = build_expert_graph(W, precision, target=be.graph_target()).serialize()
    core = _core()
    compiled = core.compile_model(core.read_model(io.BytesIO(graph)), "CPU", be.compile_config("CPU"))
    types = set()
    for node in compiled.get_runtime_model().get_ops():
        info = node.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "FullyConnected":
            types.add(node.input(1).get_element_type().get_type_name().upper())  # the weight input
    return {"FLOAT" if t in ("F32", "FLOAT32") else t.replace("U4", "UINT4").replace("I8", "INT8") for t in types}


@pytest.mark.parametrize("runtime,precision", _pairs())
def test_low_precision_weights_stay_compressed_after_load(runtime, precision):
    if not probe_backend(runtime).ok:
        pytest.skip(f"{runtime} unavailable here: {probe_backend(runtime).reason}")
    expanded = set(EXPANDED[runtime])
    if host_cpu.native_bf16() and runtime == "openvino":  # AVX512-BF16 / AMX: OpenVINO computes BF16 and FP16 as such
        expanded -= {"bf16", "fp16"}
    types = _ort_weight_types(precision) if runtime == "onnxruntime" else _ov_weight_types(precision)
    if precision in expanded:
        assert types == {"FLOAT"}, f"{precision} on {runtime} now keeps {types}: update EXPANDED and the README"
    else:
        assert types and types <= COMPRESSED_TYPES, f"{precision} weights were expanded to {types} on {runtime}"
