import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from hetrun.backends.ort_threads import plain_session_options
from hetrun.kernels.fp8 import FP8_FORMATS, Fp8Tensor, expand_block_scale, fake_quant_fp8, quantize_fp8
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

TORCH_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# OpenVINO's CPU plugin would otherwise compile for BF16 on this machine.
OV_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def full_scale(t: Fp8Tensor) -> np.ndarray:
    """Each element's scale: dequantizing all-ones codes."""
    ones = np.ones(t.data.shape, dtype=t.fmt.ml_dtype)
    return Fp8Tensor(ones, t.scale, t.fmt, t.scaling, t.block).dequantize()


def wide_range(rng, shape):
    """Gaussian values times 2^U(-12, 12): many binades per block, so some land in FP8 subnormals."""
    return (rng.standard_normal(shape) * np.exp2(rng.uniform(-12, 12, shape))).astype(np.float32)


def assert_half_ulp(x, t):
    """|dequantized - x| <= half an FP8 ULP: relative for normals, absolute for subnormals."""
    info = ml_dtypes.finfo(t.fmt.ml_dtype)
    rel, sub = float(info.eps) / 2, float(info.smallest_subnormal) / 2  # e4m3: 2^-4, 2^-10
    bound = np.maximum(rel * np.abs(x), sub * full_scale(t)) * (1 + 1e-6)
    err = np.abs(t.dequantize() - x)
    assert np.all(err <= bound), f"worst error / bound = {np.max(err / bound):.3f}"


def reference_round(y: np.ndarray, dtype) -> np.ndarray:
    """Round to the nearest finite FP8 value, ties to even, saturating: FP8 codes as uint8."""
    codes = np.arange(128, dtype=np.uint8)  # non-negative half of the code space
    values = codes.view(dtype).astype(np.float64)
    keep = np.isfinite(values)
    codes, values = codes[keep], values[keep]  # ascending
    a = np.minimum(np.abs(y.astype(np.float64)), values[-1])
    hi = np.clip(np.searchsorted(values, a), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (codes[lo] % 2 == 0))
    mag = np.where(pick_lo, codes[lo], codes[hi])
    return mag | (np.signbit(y).astype(np.uint8) << 7)


def test_formats():
    for name, f in FP8_FORMATS.items():
        assert f.name == name
        assert f.max == float(ml_dtypes.finfo(f.ml_dtype).max)
        assert f.onnx_dtype_name in TensorProto.DataType.keys()
    assert FP8_FORMATS["e4m3"].max == 448 and FP8_FORMATS["e5m2"].max == 57344


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "channel", "block", "tile"])
def test_error_within_half_ulp(fmt, scaling):
    x = wide_range(np.random.default_rng(0), (300, 200))  # ragged: 300 = 2*128+44, 200 = 128+72
    t = quantize_fp8(x, fmt, scaling)
    assert t.data.dtype == FP8_FORMATS[fmt].ml_dtype and t.data.shape == x.shape
    assert t.scale.dtype == np.float32
    assert_half_ulp(x, t)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=300),
        elements=st.one_of(st.just(0.0), st.floats(2.0**-60, 2.0**60, width=32), st.floats(-(2.0**60), -(2.0**-60), width=32)),
    ),
    st.sampled_from(["tensor", "channel", "block", "tile"]),
)
def test_error_within_half_ulp_property(x, scaling):
    assert_half_ulp(x, quantize_fp8(x, "e4m3", scaling))


def test_scale_shapes():
    x = np.ones((300, 200), dtype=np.float32)
    assert quantize_fp8(x, scaling="tensor").scale.shape == ()
    assert quantize_fp8(x, scaling="channel").scale.shape == (300,)
    assert quantize_fp8(x, scaling="block").scale.shape == (3, 2)
    assert quantize_fp8(x, scaling="tile").scale.shape == (300, 2)
    assert quantize_fp8(np.ones((2, 3, 5)), scaling="tensor").dequantize().shape == (2, 3, 5)
    with pytest.raises(ValueError):
        quantize_fp8(np.ones((2, 3, 5)), scaling="block")


def test_block_scale_is_block_amax_over_max():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 200)).astype(np.float32)
    x[128:256, :128] = 0  # one all-zero block
    t = quantize_fp8(x, "e4m3", "block")
    for i in range(3):
        for j in range(2):
            blk = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]  # ragged at the edges
            want = np.float32(np.abs(blk).max()) / np.float32(448) if blk.any() else 1.0
            assert t.scale[i, j] == want, (i, j)
    assert not t.data[128:256, :128].astype(np.float32).any()
    assert not t.dequantize()[128:256, :128].any()


def test_tile_and_channel_scales():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 200)).astype(np.float32)
    x[3] = 0
    tile = quantize_fp8(x, "e5m2", "tile")
    for m in range(5):
        for j, cols in enumerate([slice(0, 128), slice(128, 200)]):
            amax = np.abs(x[m, cols]).max()
            assert tile.scale[m, j] == (np.float32(amax) / np.float32(57344) if amax else 1.0)
    chan = quantize_fp8(x, "e4m3", "channel")
    np.testing.assert_array_equal(chan.scale, np.where(x.any(1), np.abs(x).max(1) / np.float32(448), 1.0))
    assert not chan.dequantize()[3].any()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["block", "tile"])
def test_bits_match_torch_and_reference_rounding(fmt, scaling):
    x = wide_range(np.random.default_rng(3), (300, 200))
    t = quantize_fp8(x, fmt, scaling)
    y = x / full_scale(t)  # what gets cast: [300, 200] float32
    got = t.data.view(np.uint8)
    f = FP8_FORMATS[fmt]
    want_torch = torch.from_numpy(y).clamp(-f.max, f.max).to(TORCH_DTYPES[fmt]).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, want_torch)
    np.testing.assert_array_equal(got, reference_round(y, f.ml_dtype))
    np.testing.assert_array_equal(got, np.clip(y, -f.max, f.max).astype(f.ml_dtype).view(np.uint8))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturates_instead_of_overflowing(fmt):
    f = FP8_FORMATS[fmt]
    # A raw cast overflows: E4M3 has no inf, so ml_dtypes gives NaN; E5M2 gives inf.
    assert not np.isfinite(np.float32(1e6).astype(f.ml_dtype).astype(np.float32))
    x = np.array([[1e6, -1e6, 3.0, 0.0]], dtype=np.float32)
    t = quantize_fp8(x, fmt, "tensor")
    np.testing.assert_array_equal(t.data.astype(np.float32)[0, :2], [f.max, -f.max])
    np.testing.assert_allclose(t.dequantize()[0, :2], [1e6, -1e6], rtol=1e-6)
    # Values just past the block amax (float32 rounding of x / scale) still saturate.
    big = np.full((1, 128), 1e6, dtype=np.float32)
    big[0, 1] = np.nextafter(np.float32(1e6), np.float32(np.inf))
    assert np.all(quantize_fp8(big, fmt, "tile").data.astype(np.float32) == f.max)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_nan_and_inf(fmt):
    f = FP8_FORMATS[fmt]
    x = np.array([[np.nan, np.inf, -np.inf, 2.0, -1.0, 0.0]], dtype=np.float32)
    t = quantize_fp8(x, fmt, "tile")
    assert t.scale[0, 0] == np.float32(2.0) / np.float32(f.max)  # scale from finite values only
    codes = t.data.astype(np.float32)[0]
    assert np.isnan(codes[0])
    np.testing.assert_array_equal(codes[1:3], [f.max, -f.max])  # inf saturates
    deq = t.dequantize()[0]
    assert np.isnan(deq[0])
    np.testing.assert_array_equal(deq[1:], [2.0, -2.0, 2.0, -1.0, 0.0])
    # A block of nothing but non-finite values and zeros keeps scale 1.
    t = quantize_fp8(np.array([[np.nan, np.inf, 0.0]], dtype=np.float32), fmt, "tensor")
    assert t.scale == 1.0 and t.data.astype(np.float32)[0, 1] == f.max


def test_fake_quant_e4m3_block_output_error():
    """Weight-only E4M3 with 128x128 blocks on a SwiGLU-sized [256, 512] projection."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 512)) * 0.02).astype(np.float32)  # [N, K]
    x = rng.standard_normal((64, 512)).astype(np.float32)  # [M, K]
    wq = fake_quant_fp8(w, "e4m3", "block")
    assert wq.dtype == np.float32
    err = np.linalg.norm(x @ w.T - x @ wq.T) / np.linalg.norm(x @ w.T)
    print(f"E4M3 block128 weight-only relative output error: {err:.4f}")
    assert err < 0.035, f"E4M3 block relative output error {err:.4f}"
    xq = fake_quant_fp8(x, "e4m3", "tile")  # DeepSeek-V3: 1x128 activation tiles as well
    err_both = np.linalg.norm(x @ w.T - xq @ wq.T) / np.linalg.norm(x @ w.T)
    print(f"E4M3 block128 weights + 1x128 activation tiles: {err_both:.4f}")
    assert err_both < 0.05, f"E4M3 W+A relative output error {err_both:.4f}"


def test_expanded_block_scales_feed_onnx_dequantizelinear(tmp_path):
    """[N, K] E4M3 weight with 128x128 block scales -> DequantizeLinear(axis=1, block_size=128)."""
    rng = np.random.default_rng(5)
    n, k = 200, 384  # ragged rows; OpenVINO needs K % block_size == 0
    t = quantize_fp8(rng.standard_normal((n, k)).astype(np.float32), "e4m3", "block")
    scale = expand_block_scale(t.scale, n)  # [200, 3]
    assert scale.shape == (n, 3)
    nodes = [
        helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"], axis=1, block_size=128),
        helper.make_node("Transpose", ["Wf"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fp8_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(t.data, "W"), numpy_helper.from_array(scale, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    path = tmp_path / "fp8_block.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((4, k)).astype(np.float32)
    want = x @ t.dequantize().T
    got_ort = ort.InferenceSession(str(path), plain_session_options(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    core = ov.Core()
    got_ov = core.compile_model(core.read_model(path), "CPU", OV_F32)(x)[0]
    for got in (got_ort, got_ov):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
