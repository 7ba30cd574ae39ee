"""Expert graphs per precision, run for real on onnxruntime and OpenVINO, and on the simulated backend."""

import io

import ml_dtypes
import numpy as np
import onnx
import openvino as ov
import pytest
from hetrun.backends.ort_threads import plain_session_options
from hetrun.backends.registry import backend_class, probe_backend, require_backend
from hetrun.kernels.fp8 import fake_quant_fp8
from onnx import TensorProto, helper

from hetrun.bench.precision import cpu_backend, gaussian_expert
from hetrun.formats import FORMATS, PRECISIONS
from hetrun.profile import load_profile
from hetrun.runtime.graphs import _Builder, build_expert_graph
from hetrun.runtime.weights import ExpertWeights

RUNTIMES = ["onnxruntime", "openvino"]
D, I = 256, 512
# Largest relative error of the expert's output against FP32 (Gaussian weights and inputs, D=256, I=512).
# From the table, except INT4: its 12.5% / 9% are one matrix's noise floor (11.8% / 10.1% / 8.1%, checked
# in tests/test_kernels_int.py); through a SwiGLU expert three such matrices compound to 17.6% / 14.1%.
BOUNDS = {"fp32": 1e-6, "fp16": 0.002, "bf16": 0.01, "fp8-w8a16": 0.06, "fp8": 0.08, "int8": 0.02,
          "int4": 0.19, "int4-g32": 0.155, "int8-w8a8": 0.03, "int4-w4a8": 0.19}
# The error must also be there: each format really quantizes (half of what these formats give here).
FLOORS = {"fp32": 0.0, "fp16": 3e-4, "bf16": 2.5e-3, "fp8-w8a16": 0.023, "fp8": 0.032, "int8": 0.006,
          "int4": 0.088, "int4-g32": 0.07, "int8-w8a8": 0.006, "int4-w4a8": 0.088}
# (runtime, format) pairs each runtime runs: OpenVINO has no activation-quantized INT8 path (its INT8/INT4 keep FP32).
RUNS = [(r, p) for r in RUNTIMES for p in FORMATS if backend_class(r) is None or backend_class(r).supports(p)]


def require(runtime):
    avail = probe_backend(runtime)
    if not avail.ok:
        pytest.skip(f"{runtime} unavailable here: {avail.reason}")


def run_graph(runtime, w, precision, x, calibration=None):
    """Build `precision`'s graph for `runtime`'s CPU backend, load it there, run x."""
    be = cpu_backend(runtime, precision, 2)
    g = build_expert_graph(w, precision, target=be.graph_target(), calibration=calibration)
    return be.load(g.serialize(), "test", g.meta).run(x), g


def rel(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def expert():
    w = gaussian_expert(D, I, seed=0)
    x = np.random.default_rng(1).standard_normal((256, D)).astype(np.float32)
    return w, x, w.reference(x)


def test_every_profile_precision_has_a_graph():
    assert set(FORMATS) == set(PRECISIONS) - {"nvfp4", "mxfp4"}  # FP4 is simulation only
    catalog = {"fp32", "bf16", "fp16", "fp8", "int8", "int4"}
    assert {f.base for f in FORMATS.values()} == catalog
    for p in ("nvfp4", "mxfp4"):  # no backend runs FP4: building its graph is refused like an unknown format
        with pytest.raises(ValueError, match="no expert graph"):
            build_expert_graph(gaussian_expert(8, 16), p)


@pytest.mark.parametrize("runtime,precision", RUNS)
def test_expert_error_against_fp32(runtime, precision, expert):
    require(runtime)
    w, x, ref = expert
    y, g = run_graph(runtime, w, precision, x)
    err = rel(y, ref)
    print(f"{precision:10s} {runtime:12s} relative error {100 * err:.3f}%  ({g.weight_bytes} weight bytes)")
    assert FLOORS[precision] <= err < BOUNDS[precision]


@pytest.mark.parametrize("precision", ["int4", "int4-g32"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int4_expert_error_is_the_formats_own(runtime, precision, expert):
    """The issue's INT4 bounds (12.5% / 9%) are one matrix's noise floor (tests/test_kernels_int.py measures each
    runtime's MatMulNBits against them). Through a SwiGLU expert the errors of gate, up and down compound: torch,
    running the expert in float64 on the same round-to-nearest weights, measures what the runtimes measure."""
    import torch
    from hetrun.kernels.int4 import quantize_int4

    require(runtime)
    w, x, ref = expert
    y, _ = run_graph(runtime, w, precision, x)
    q = {k: torch.from_numpy(quantize_int4(getattr(w, k), FORMATS[precision].group).dequantize()).double()
         for k in ("gate", "up", "down")}
    xt = torch.from_numpy(x).double()  # [T, D]
    emulated = ((torch.nn.functional.silu(xt @ q["gate"].T) * (xt @ q["up"].T)) @ q["down"].T).numpy()  # [T, D]
    err, floor = rel(y, ref), rel(emulated, ref)
    print(f"{precision} on {runtime}: {100 * err:.2f}% vs torch on the same INT4 weights {100 * floor:.2f}%")
    assert abs(err - floor) < 0.002 and rel(y, emulated) < 1e-4


@pytest.mark.parametrize("precision", [p for p in FORMATS if p != "fp32" and all((r, p) in RUNS for r in RUNTIMES)])
def test_runtimes_compute_the_same_numbers(precision, expert):
    for r in RUNTIMES:
        require(r)
    w, x, ref = expert
    y_ort, _ = run_graph("onnxruntime", w, precision, x)
    y_ov, _ = run_graph("openvino", w, precision, x)
    if precision == "bf16" and cpu_backend("openvino", "bf16", 2).precision_hint("CPU") == "bf16":
        # A CPU with native BF16: OpenVINO computes in BF16 (its own rounding of intermediates, BF16 accumulation
        # order); both runtimes stay within the format's bound of FP32, and of each other.
        assert rel(y_ov, y_ort) < BOUNDS["bf16"] and rel(y_ov, ref) < BOUNDS["bf16"]
        return
    # Only FP32 summation order differs (it moves a few values across a rounding boundary).
    assert rel(y_ov, y_ort) < 1e-4 * max(1.0, rel(y_ort, ref) / 0.01)


@pytest.mark.parametrize("precision", list(FORMATS))
@pytest.mark.parametrize("target", RUNTIMES)
def test_graphs_are_valid_onnx_with_two_weight_matmuls(precision, target):
    w = gaussian_expert(72, 48)  # ragged: neither a multiple of 128 nor of 32
    g = build_expert_graph(w, precision, target=target)
    onnx.checker.check_model(g.model, full_check=True)
    matmuls = [n for n in g.model.graph.node if n.op_type in ("MatMul", "MatMulNBits", "Gemm")]
    assert len(matmuls) == 2
    if target == "openvino" and precision in ("int8", "int4", "int4-g32"):  # [N, K], as OpenVINO keeps them compressed
        assert all(n.op_type == "Gemm" and {a.name: a.i for a in n.attribute} == {"transB": 1} for n in matmuls)
    assert g.weight_bytes == build_expert_graph(w, precision).weight_bytes  # the format's bytes, whatever the form
    assert g.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "tokens"
    if precision in ("fp8", "fp8-w8a16"):
        dql = [n for n in g.model.graph.node if n.op_type == "DequantizeLinear"]
        inits = {t.name: t for t in g.model.graph.initializer}
        assert dql and all(inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN for n in dql)


def test_bad_requests():
    w = gaussian_expert(64, 32)
    with pytest.raises(ValueError, match="available"):
        build_expert_graph(w, "fp4")
    with pytest.raises(ValueError, match="calibration"):
        build_expert_graph(w, "int4", calibration=np.zeros((5, 63), np.float32))


# ---- FP8 W8A8: the graph is the DeepSeek-V3 recipe, exactly -------------------------------------------------------

def w8a8_reference(w: ExpertWeights, x: np.ndarray) -> np.ndarray:
    """numpy: E4M3 128x128-block weights (gate, up, down each on its own grid), 1x128-tile E4M3 activations."""
    gate, up, down = (fake_quant_fp8(m, "e4m3", "block") for m in (w.gate, w.up, w.down))
    xq = fake_quant_fp8(x, "e4m3", "tile")
    g, u = xq @ gate.T, xq @ up.T
    h = (g / (1 + np.exp(-g))) * u
    return fake_quant_fp8(h, "e4m3", "tile") @ down.T


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("d,i", [(256, 512), (200, 300)])  # ragged blocks and tiles in the second
def test_w8a8_graph_matches_kernel_emulation(runtime, d, i):
    require(runtime)
    w = gaussian_expert(d, i, seed=3)
    x = np.random.default_rng(4).standard_normal((33, d)).astype(np.float32)
    y, _ = run_graph(runtime, w, "fp8", x)
    want = w8a8_reference(w, x)
    # FP32 summation order may flip an activation code at a rounding boundary: allow a sliver of one code's error.
    assert rel(y, want) < 2e-3, rel(y, want)
    assert rel(y, want) < 0.05 * rel(want, w.reference(x))


# ---- narrow floats rounded without Casts, for OpenVINO ------------------------------------------------------------

def rounding_graph(fmt: str, arithmetic: bool) -> bytes:
    b = _Builder(arithmetic)
    y = b.round_to("x", fmt)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(b.nodes, "round", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])],
                              b.proto.graph.initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def run_ov(graph: bytes, x: np.ndarray) -> np.ndarray:
    core = ov.Core()
    return core.compile_model(core.read_model(io.BytesIO(graph)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]


def run_ort(graph: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(graph, plain_session_options(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


ROUNDED = {"bf16": lambda x: x.astype(ml_dtypes.bfloat16),
           "fp16": lambda x: x.astype(np.float16),
           "e4m3": lambda x: np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn)}


def awkward_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096) * np.exp2(rng.uniform(-30, 20, 4096))  # every binade, subnormals of all three
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519, 65520, -65520, 7e4, 6.1e-5, 2.0 ** -24, 2.0 ** -25,
               3 * 2.0 ** -26, 448, 464, -500, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 1 + 2.0 ** -8,
               1 + 3 * 2.0 ** -9, 1e30, 3.39e38, -3.4e38]
    return np.concatenate([x, special]).astype(np.float32).reshape(1, -1)


@pytest.mark.parametrize("fmt", list(ROUNDED))
@pytest.mark.parametrize("run", [run_ort, run_ov], ids=RUNTIMES)
def test_arithmetic_rounding_is_bit_exact(run, fmt):
    """What graphs for OpenVINO use instead of Casts: round to nearest even, overflow, saturation, subnormals, NaN."""
    x = awkward_values()
    with np.errstate(over="ignore"):
        want = ROUNDED[fmt](x).astype(np.float32)
    got = run(rounding_graph(fmt, arithmetic=True), x)
    np.testing.assert_array_equal(got, want)


def test_openvino_casts_to_bf16_misround():
    """Why graphs for OpenVINO round arithmetically: its CPU plugin does not round f32->bf16->f32 Casts to BF16.
    OpenVINO 2026.4.0 dropped bits 0-14 before rounding; 2026.4.1 removes the Cast pair (no rounding at all).
    If this starts failing, OpenVINO rounds correctly and the workaround in hetrun's graphs can go."""
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("needs a CPU without native BF16 (this one has AVX512-BF16 or AMX, where OpenVINO computes BF16 "
                    "itself); the arithmetic rounding that works around it is tested on every CPU above")
    x = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)
    got = run_ov(rounding_graph("bf16", arithmetic=False), x)
    bits = x.view(np.uint32) & np.uint32(0xFFFF8000)  # bits 0-14 dropped, then round half to even at bit 15
    as_ov = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    assert np.array_equal(got, as_ov) or np.array_equal(got, x)  # one of the two known misroundings
    assert np.mean(got != x.astype(ml_dtypes.bfloat16).astype(np.float32)) > 0.1


# ---- the simulated backend reproduces each device's numerics --------------------------------------------------------

def simulated(device_type: str, precision: str, w: ExpertWeights):
    prof = load_profile({"name": "sim", "devices": [{"id": "d", "type": device_type, "backend": "simulated"}]})
    be = require_backend("simulated")(prof.devices[0], precision, 2)
    g = build_expert_graph(w, precision, target=be.graph_target())
    return be.load(g.serialize(), "sim", g.meta)


def test_fp16_overflow_shows_up_as_inf():
    w = gaussian_expert(64, 128, seed=5)
    x = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    x[1] *= 3e4  # gate/up outputs past 65504 for this token only
    y16 = simulated("ascend-910b2", "fp16", w).run(x)
    assert not np.isfinite(y16[1]).all()
    assert np.isfinite(y16[[0, 2, 3]]).all()
    assert np.isfinite(simulated("ascend-910b2", "bf16", w).run(x)).all()  # BF16 has FP32's range
    assert np.isfinite(simulated("ascend-910b2", "fp32", w).run(x)).all()
    require("openvino")  # the OpenVINO form overflows the same way
    y_ov, _ = run_graph("openvino", w, "fp16", x)
    assert not np.isfinite(y_ov[1]).all() and np.isfinite(y_ov[[0, 2, 3]]).all()


def test_fp8_activations_saturate():
    """An inf activation saturates to 448 x its tile's scale, i.e. the tile's finite amax, as the kernel does."""
    w = gaussian_expert(128, 128, seed=7)
    x = np.random.default_rng(8).standard_normal((3, 128)).astype(np.float32)
    x_inf = x.copy()
    x_inf[0, 5] = np.inf
    sess = simulated("h100-sxm", "fp8", w)
    y = sess.run(x_inf)
    assert np.isfinite(y).all()
    x_sat = x.copy()
    x_sat[0, 5] = np.abs(x[0]).max()
    np.testing.assert_allclose(y, sess.run(x_sat), rtol=0, atol=1e-6)
    assert not np.isfinite(simulated("h100-sxm", "fp32", w).run(x_inf)[0]).all()


def test_bf16_rounding_shows_up():
    w = gaussian_expert(96, 64, seed=9)
    x = np.random.default_rng(10).standard_normal((8, 96)).astype(np.float32)
    y = simulated("xeon-8480", "bf16", w).run(x)
    np.testing.assert_array_equal(y, y.astype(ml_dtypes.bfloat16).astype(np.float32))  # outputs are BF16 values
    err = rel(y, w.reference(x))
    assert 1e-3 < err < 0.01


# ---- GPTQ through the expert graph ------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int4", "int4-g32"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_gptq_beats_round_to_nearest_with_correlated_activations(runtime, precision):
    require(runtime)
    w = gaussian_expert(D, I, seed=11)
    rng = np.random.default_rng(12)
    mix = rng.standard_normal((D, D)) / np.sqrt(D)  # correlated channels
    x_calib = (rng.standard_normal((2048, D)) @ mix).astype(np.float32)
    x_test = (rng.standard_normal((512, D)) @ mix).astype(np.float32)  # held out
    ref = w.reference(x_test)
    y_rtn, g_rtn = run_graph(runtime, w, precision, x_test)
    y_gptq, g_gptq = run_graph(runtime, w, precision, x_test, calibration=x_calib)
    rtn, gptq = rel(y_rtn, ref), rel(y_gptq, ref)
    print(f"{precision} on {runtime}: GPTQ {100 * gptq:.2f}% vs round-to-nearest {100 * rtn:.2f}% "
          f"({100 * (1 - gptq / rtn):.0f}% lower)")
    assert (g_rtn.quantizer, g_gptq.quantizer) == ("rtn", "gptq")
    assert g_rtn.weight_bytes == g_gptq.weight_bytes
    assert gptq < 0.9 * rtn


def gpt_oss_expert(limit: float) -> ExpertWeights:
    """gaussian_expert with biases after each projection and gpt-oss's clamped SwiGLU, clamping at `limit`."""
    from hetrun.spec import ExpertActivation

    w = gaussian_expert(D, I, seed=3)
    rng = np.random.default_rng(4)
    gate_b, up_b, down_b = (rng.standard_normal(n).astype(np.float32) for n in (I, I, D))
    return ExpertWeights(w.gate, w.up, w.down, gate_b, up_b, down_b, ExpertActivation("clamped_swiglu", 1.702, limit))


BIASED_RUNS = RUNS + [("torch", p) for p in ("fp32", "bf16", "fp16")]


@pytest.mark.parametrize("runtime,precision", BIASED_RUNS)
def test_biased_clamped_expert_against_its_reference(runtime, precision):
    """gpt-oss's expert (biases, clamped SwiGLU) at every precision on every CPU backend: within the format's error
    of its FP32 reference, which the plain SwiGLU expert of the same matrices is not."""
    require(runtime)
    w = gpt_oss_expert(limit=1.0)  # gate and up are N(bias, 1): the clamp at 1 bites on a third of them
    x = np.random.default_rng(5).standard_normal((64, D)).astype(np.float32)
    ref = w.reference(x)
    plain = ExpertWeights(w.gate, w.up, w.down).reference(x)
    assert rel(plain, ref) > 0.5  # what the biases and the clamp change, far past every format's error
    y, g = run_graph(runtime, w, precision, x)
    assert rel(y, ref) < BOUNDS[precision]


def test_biased_expert_graph_carries_its_biases_and_activation():
    from hetrun.backends.graph_matrices import read_bias_and_activation, read_expert_matrices
    from hetrun.backends.torch_expert import DenseLinear, TorchExpertSession

    w = gpt_oss_expert(limit=7.0)
    for precision in ("fp32", "int8", "fp8-w8a16"):  # weight-only: the torch path reads the weights the graph uses
        graph = build_expert_graph(w, precision).serialize()
        gate_up_bias, down_bias, activation = read_bias_and_activation(graph)
        np.testing.assert_array_equal(gate_up_bias, np.concatenate([w.gate_up_bias[:I], w.up_bias]))
        np.testing.assert_array_equal(down_bias, w.down_bias)
        assert activation == w.activation
        m = read_expert_matrices(graph)  # the vendor backends' torch path, on the CPU
        sess = TorchExpertSession(DenseLinear(m.gate_up, "float32", "cpu"), DenseLinear(m.down, "float32", "cpu"),
                                  "cpu", "t", extras=(gate_up_bias, down_bias, activation))
        x = np.random.default_rng(6).standard_normal((9, D)).astype(np.float32)
        np.testing.assert_allclose(sess.run(x), run_graph("onnxruntime", w, precision, x)[0], rtol=1e-4, atol=1e-5)
        # read_expert_matrices carries the same, from the one parse the NVIDIA and Ascend torch paths make
        np.testing.assert_array_equal(m.extras[0], gate_up_bias)
        np.testing.assert_array_equal(m.extras[1], down_bias)
        assert m.extras[2] == activation
    # the Ascend backend's own torch path, on the CPU: its session adds the biases and clamps as the graph does
    from hetrun.backends import ascend

    from hetrun.profile import load_profile

    dev = load_profile({"name": "p", "devices": [{"id": "a", "type": "ascend-910b2", "backend": "ascend"}]}).devices[0]
    graph = build_expert_graph(w, "fp32").serialize()
    sess = ascend.AscendBackend(dev, "fp32").load_torch(graph, "cpu", int8_kernel=False)
    np.testing.assert_allclose(sess.run(x), w.reference(x), rtol=1e-4, atol=1e-5)
    plain = build_expert_graph(gaussian_expert(D, I), "fp32").serialize()
    assert read_bias_and_activation(plain)[:2] == (None, None) and read_bias_and_activation(plain)[2].kind == "silu"
