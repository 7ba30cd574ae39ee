import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
from hetrun.backends.ort_threads import plain_session_options
from hetrun.kernels.gptq import gptq_quantize_int4
from hetrun.kernels.int4 import (
    Int4Tensor,
    int4_codes,
    int4_grid,
    quantize_int4,
    quantize_to_matmulnbits,
    stack_rows,
    to_matmulnbits,
    to_onnx_int4,
)
from hetrun.kernels.int8 import quantize_int8
from onnx import TensorProto, helper, numpy_helper

# f32, or OpenVINO's CPU plugin compiles for BF16 on this machine; and no dynamic quantization:
# with it on (the default for compressed weights), OpenVINO quantizes the activations to INT8 in
# groups and MatMulNBits / INT4 DequantizeLinear outputs drift by about 0.5%.
OV_F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# (N, K, group): K a multiple of the group, and ragged K.
SHAPES = [(16, 256, 128), (8, 96, 32), (12, 200, 64)]


def swiglu_weight(seed=0):
    return (np.random.default_rng(seed).standard_normal((256, 512)) * 0.02).astype(np.float32)  # [N, K]


def output_error(w, wq, x):
    y = x @ w.T  # [M, N]
    return float(np.linalg.norm(y - x @ wq.T) / np.linalg.norm(y))


def gaussian_x(m=64, k=512, seed=1):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def correlated_x(rng, m, mix):
    """Activations with correlated channels: Gaussian z [m, K] mixed by A [K, K]."""
    return (rng.standard_normal((m, mix.shape[0])) @ mix).astype(np.float32)


def run_ort(path, x):
    return ort.InferenceSession(str(path), plain_session_options(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def run_openvino(path, x):
    core = ov.Core()
    return core.compile_model(core.read_model(path), "CPU", OV_F32)(x)[0]


def save_linear_graph(path, nodes, inits, k, n, opsets):
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    onnx.save(model, path)
    return path


def assert_close(got, want):
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"relative max error {err:.2e}"


# ---- INT8 ----


def test_int8_per_channel():
    w = swiglu_weight()
    w[7] = 0
    t = quantize_int8(w)
    assert t.data.dtype == np.int8 and t.scale.dtype == np.float32 and t.scale.shape == (256,)
    assert t.data.min() >= -127
    amax = np.abs(w).max(axis=1)
    np.testing.assert_array_equal(t.scale, np.where(amax > 0, amax / np.float32(127), 1.0))
    assert not t.data[7].any() and not t.dequantize()[7].any()
    assert np.all(np.abs(t.dequantize() - w) <= t.scale[:, None] / 2 * (1 + 1e-6))
    err = output_error(w, t.dequantize(), gaussian_x())
    print(f"INT8 per-channel relative output error: {err:.4f}")
    assert err < 0.02, f"INT8 relative output error {err:.4f}"


def test_int8_axis1():
    w = swiglu_weight()
    t = quantize_int8(w, axis=1)
    assert t.scale.shape == (512,)
    np.testing.assert_allclose(t.scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(t.dequantize() - w) <= t.scale[None, :] / 2 * (1 + 1e-6))


# ---- INT4 round to nearest ----


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_int4_grid(symmetric, n, k, group):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[1, :group] = 0  # one all-zero group
    t = quantize_int4(w, group, symmetric)
    n_groups = -(-k // group)
    assert t.codes.shape == (n, k) and t.codes.dtype == np.uint8 and t.codes.max() <= 15
    assert t.scale.shape == t.zero_point.shape == (n, n_groups)
    assert t.scale.dtype == np.float32 and t.zero_point.dtype == np.uint8 and t.zero_point.max() <= 15
    last = w[:, (n_groups - 1) * group :]  # ragged when group does not divide K
    if symmetric:
        assert np.all(t.zero_point == 8)
        np.testing.assert_allclose(t.scale[:, -1], np.abs(last).max(1) * 2 / 15, rtol=1e-6)
    else:
        span = np.maximum(last.max(1), 0) - np.minimum(last.min(1), 0)
        np.testing.assert_allclose(t.scale[:, -1], span / 15, rtol=1e-6)
    assert t.scale[1, 0] == 1.0 and not t.dequantize()[1, :group].any()
    # Nothing is clipped by more than rounding: every value is within half a step.
    step = np.repeat(t.scale, group, axis=1)[:, :k]
    assert np.all(np.abs(t.dequantize() - w) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize(
    "group,symmetric,limit",
    [(128, True, 0.125), (128, False, 0.125), (32, False, 0.09), (32, True, 0.11)],
)
def test_int4_output_error(group, symmetric, limit):
    w = swiglu_weight()
    err = output_error(w, quantize_int4(w, group, symmetric).dequantize(), gaussian_x())
    kind = "symmetric" if symmetric else "zero points"
    print(f"INT4 g{group} {kind} round-to-nearest relative output error: {err:.4f}")
    assert err < limit, f"INT4 g{group} {kind}: relative output error {err:.4f} >= {limit}"


# ---- INT4 ONNX layouts ----


def test_matmulnbits_packing_layout():
    codes = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16  # [1, 32]: one row, two blocks of 16
    zp = np.array([[3, 12]], dtype=np.uint8)
    t = Int4Tensor(codes, np.array([[0.5, 2.0]], np.float32), zp, 16, symmetric=False)
    b, scales, zps = to_matmulnbits(t)
    assert b.shape == (1, 2, 8) and b.dtype == np.uint8
    assert list(b[0, 0, :2]) == [0x10, 0x32]  # element 0 in the low nibble, element 1 in the high
    np.testing.assert_array_equal(scales, [0.5, 2.0])
    np.testing.assert_array_equal(zps, [0xC3])  # block 0's zero point in the low nibble
    # Ragged K: the last block's tail is padded with its zero point; odd block counts pad a nibble.
    t = quantize_int4(np.random.default_rng(3).standard_normal((2, 40)).astype(np.float32), 16)
    b, scales, zps = to_matmulnbits(t)
    assert b.shape == (2, 3, 8) and scales.shape == (6,) and zps.shape == (4,)
    tail = b[:, 2, 4:]  # elements 40..47 of each row
    np.testing.assert_array_equal(tail & 0xF, np.broadcast_to(t.zero_point[:, 2:], (2, 4)))
    assert to_matmulnbits(quantize_int4(np.ones((2, 40), np.float32), 16, symmetric=True))[2] is None
    for group in (8, 96):
        with pytest.raises(ValueError):
            to_matmulnbits(quantize_int4(np.ones((2, 192), np.float32), group))


@pytest.mark.parametrize("k,group", [(40, 16), (256, 128), (300, 32), (2048, 128)])
def test_quantize_to_matmulnbits_packs_what_quantize_then_pack_gives(k, group):
    """Quantizing and packing a chunk of rows at a time, straight from stacked parts of any float dtype, gives
    to_matmulnbits(stack_rows(quantize_int4 ...)) byte for byte (ragged K and odd block counts included)."""
    import torch

    rng = np.random.default_rng(k)
    a = rng.standard_normal((37, k)).astype(np.float32)  # [37, K]
    b = torch.from_numpy(rng.standard_normal((3000, k)).astype(np.float32) * 3).to(torch.bfloat16)  # [3000, K]
    want = to_matmulnbits(stack_rows([quantize_int4(a, group), quantize_int4(b, group)]))
    got = quantize_to_matmulnbits(iter([a, b]), (3037, k), group)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and np.array_equal(w, g)
    for parts, shape in (([a], (38, k)), ([a, a], (37, k)), ([a], (37, k + 1))):
        with pytest.raises(ValueError, match="stack"):
            quantize_to_matmulnbits(parts, shape, group)
    with pytest.raises(ValueError, match="block_size"):
        quantize_to_matmulnbits([a], (37, k), 24)


def matmulnbits_model(tmp_path, t):
    n, k = t.codes.shape
    b, scales, zps = to_matmulnbits(t)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if zps is not None:  # absent when symmetric: MatMulNBits' default zero point is 8
        inits.append(numpy_helper.from_array(zps, "zero_points"))
    node = helper.make_node(
        "MatMulNBits",
        ["x"] + [i.name for i in inits],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=t.group,
    )
    opsets = {"": 21, "com.microsoft": 1}
    return save_linear_graph(tmp_path / "matmulnbits.onnx", [node], inits, k, n, opsets)


def dequantizelinear_model(tmp_path, t):
    n, k = t.codes.shape
    q = to_onnx_int4(t)
    assert q.values.dtype == (ml_dtypes.int4 if t.symmetric else ml_dtypes.uint4)
    inits = [
        numpy_helper.from_array(q.values, "W"),
        numpy_helper.from_array(q.scale, "scale"),
        numpy_helper.from_array(q.zero_point, "zero_point"),
    ]
    assert inits[0].data_type == (TensorProto.INT4 if t.symmetric else TensorProto.UINT4)
    nodes = [
        helper.make_node("DequantizeLinear", ["W", "scale", "zero_point"], ["Wf"], axis=1, block_size=q.block_size),
        helper.make_node("Transpose", ["Wf"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"]),
    ]
    path = save_linear_graph(tmp_path / "dql_int4.onnx", nodes, inits, k, n, {"": 21})
    onnx.checker.check_model(str(path))
    return path


def int4_case(n, k, group, symmetric):
    rng = np.random.default_rng(4)
    t = quantize_int4(rng.standard_normal((n, k)).astype(np.float32), group, symmetric)
    x = rng.standard_normal((5, k)).astype(np.float32)
    return t, x, x @ t.dequantize().T


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("run", [run_ort, run_openvino], ids=["onnxruntime", "openvino"])
def test_matmulnbits_runs(tmp_path, run, n, k, group, symmetric):
    t, x, want = int4_case(n, k, group, symmetric)
    assert_close(run(matmulnbits_model(tmp_path, t), x), want)


@pytest.mark.parametrize(
    "group,symmetric,limit",
    [(128, True, 0.125), (128, False, 0.125), (32, False, 0.09)],
)
@pytest.mark.parametrize("run", [run_ort, run_openvino], ids=["onnxruntime", "openvino"])
def test_int4_matrix_error_on_runtimes(tmp_path, run, group, symmetric, limit):
    """The issue's INT4 rows (12.5% for group 128, 9% for group 32 with zero points) are one matrix's noise floor
    on Gaussian weights: measured here on each real runtime's MatMulNBits against the FP32 product."""
    w, x = swiglu_weight(), gaussian_x()
    y = run(matmulnbits_model(tmp_path, quantize_int4(w, group, symmetric)), x)  # [M, N]
    err = float(np.linalg.norm(y - x @ w.T) / np.linalg.norm(x @ w.T))
    print(f"INT4 g{group} {'symmetric' if symmetric else 'zero points'} on {run.__name__}: {100 * err:.2f}%")
    assert 0.5 * limit < err < limit


OV_RAGGED = pytest.mark.xfail(
    raises=RuntimeError,
    strict=True,
    reason="OpenVINO 2026.4 ONNX frontend: 'DequantizeLinear doesn't support case when dimension of X "
    "at axis 1 (200) cannot be divided by block_size (64)'; onnxruntime runs it",
)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "run,n,k,group",
    [(run_ort, *s) for s in SHAPES]
    + [(run_openvino, *s) for s in SHAPES[:2]]
    + [pytest.param(run_openvino, *SHAPES[2], marks=OV_RAGGED)],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_int4_dequantizelinear_runs(tmp_path, run, n, k, group, symmetric):
    t, x, want = int4_case(n, k, group, symmetric)
    assert_close(run(dequantizelinear_model(tmp_path, t), x), want)


# ---- GPTQ ----


@pytest.mark.parametrize("group,symmetric", [(128, False), (128, True), (32, False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(group, symmetric):
    rng = np.random.default_rng(5)
    w = swiglu_weight()
    mix = rng.standard_normal((512, 512)) / np.sqrt(512)  # [K, K]
    x_calib, x_test = correlated_x(rng, 2048, mix), correlated_x(rng, 512, mix)  # held-out test set
    gptq = output_error(w, gptq_quantize_int4(w, x_calib, group, symmetric).dequantize(), x_test)
    rtn = output_error(w, quantize_int4(w, group, symmetric).dequantize(), x_test)
    print(f"INT4 g{group} symmetric={symmetric}: GPTQ {gptq:.4f} vs round-to-nearest {rtn:.4f}")
    assert gptq < 0.85 * rtn, f"GPTQ {gptq:.4f} vs round-to-nearest {rtn:.4f}"


def test_gptq_with_white_inputs_is_round_to_nearest():
    """H a multiple of I: no error is propagated, so GPTQ rounds exactly like round-to-nearest."""
    w = swiglu_weight()[:, :200]  # ragged: 200 = 128 + 72
    x = 3 * np.eye(200, dtype=np.float32)
    for symmetric in (True, False):
        g, r = gptq_quantize_int4(w, x, 128, symmetric), quantize_int4(w, 128, symmetric)
        np.testing.assert_array_equal(g.codes, r.codes)
        np.testing.assert_array_equal(g.zero_point, r.zero_point)
        np.testing.assert_allclose(g.scale, r.scale, rtol=1e-6)


def test_gptq_ragged_groups_and_dead_inputs():
    rng = np.random.default_rng(6)
    k = 200
    w = rng.standard_normal((32, k)).astype(np.float32)
    x = correlated_x(rng, 600, rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, 5] = 0  # an input channel that never fires
    t = gptq_quantize_int4(w, x, group=48, block=128)  # groups straddle 128-column batches
    assert t.codes.shape == (32, k) and t.scale.shape == (32, 5) and t.codes.max() <= 15
    assert np.all(np.isfinite(t.scale))
    wq = t.dequantize()
    assert not wq[:, 5].any()  # dead input: weight dropped
    x_test = x[:100]
    gptq, rtn = output_error(w, wq, x_test), output_error(w, quantize_int4(w, 48).dequantize(), x_test)
    assert gptq < rtn, f"GPTQ {gptq:.4f} vs round-to-nearest {rtn:.4f}"


def test_grid_helpers_round_trip():
    w = np.array([[-1.0, -0.5, 0.0, 0.25, 2.0]], dtype=np.float32)  # [1, 5]
    scale, zp = int4_grid(w, symmetric=False)
    assert scale[0] == np.float32(3.0 / 15) and zp[0] == 5
    codes = int4_codes(w, scale[:, None], zp[:, None])
    assert codes[0, 0] == 0 and codes[0, 2] == 5 and codes[0, -1] == 15


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_in_row_chunks_is_int4_in_one_piece_and_stacks_like_its_rows(symmetric, monkeypatch):
    from hetrun.kernels import int4, row_chunks

    w = np.random.default_rng(5).standard_normal((300, 200)).astype(np.float32)  # K=200: a short last group
    monkeypatch.setattr(row_chunks, "CHUNK_BYTES", 8 * 256 * 4)  # 8 rows of padded FP32 per chunk: 38 chunks
    chunked = int4.quantize_int4(w, 128, symmetric)
    groups = np.pad(w, ((0, 0), (0, 56))).reshape(300, 2, 128)  # [N, G, g] the whole matrix at once
    scale, zp = int4.int4_grid(groups, symmetric)
    codes = int4.int4_codes(groups, scale[..., None], zp[..., None]).reshape(300, -1)[:, :200]
    assert np.array_equal(chunked.codes, codes) and np.array_equal(chunked.scale, scale)
    assert np.array_equal(chunked.zero_point, zp)
    stacked = int4.stack_rows([int4.quantize_int4(w[:100], 128, symmetric), int4.quantize_int4(w[100:], 128, symmetric)])
    for a, b in zip((stacked.codes, stacked.scale, stacked.zero_point), (codes, scale, zp)):
        assert np.array_equal(a, b)
    packed_in_chunks = int4.to_matmulnbits(chunked)  # packing goes by row chunks too (here 32 rows each)
    monkeypatch.setattr(row_chunks, "CHUNK_BYTES", 1 << 30)
    for a, b in zip(packed_in_chunks, int4.to_matmulnbits(chunked)):
        assert (a is None and b is None) or np.array_equal(a, b)
