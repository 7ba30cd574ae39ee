"""Precision policy: capabilities from the device catalog, explicit requests, implicit fallback, real bytes."""

import dataclasses
import logging

import numpy as np
import pytest
from hetrun.backends.simulated import SimulatedBackend

import hetrun
import hetrun.runtime.weights
from hetrun.errors import PrecisionError
from hetrun.formats import FORMATS, base_precision, expert_bytes, matrix_bytes
from hetrun.placement.plan import device_weight_bytes
from hetrun.placement.planner import simple_plan
from hetrun.placement.precisions import device_precision, plan_precisions
from hetrun.profile import load_profile
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.weights import random_layer_weights
from hetrun.spec import MoESpec
from hetrun.tiny_models import tiny_model

TINY = MoESpec.from_preset("tiny")


def test_mixed_demo_picks_each_devices_best():
    p = simple_plan(TINY, "mixed-demo")
    assert p.precision == {"h100:0": "fp8", "ascend:0": "fp16", "xeon:0": "bf16"}


def test_explicit_fp8_on_ascend_is_an_error_naming_device_and_precisions():
    with pytest.raises(PrecisionError) as e:
        hetrun.deploy(tiny_model("deepseek_v3"), "mixed-demo", precision="fp8")
    msg = str(e.value)
    assert "ascend:0" in msg and "ascend-910b2" in msg and "fp16, bf16, int8, fp32" in msg
    assert "\n" not in msg
    # A variant needs its base precision too.
    with pytest.raises(PrecisionError, match="ascend-910b2.*has no fp8"):
        plan_precisions(load_profile("mixed-demo"), "fp8-w8a16")
    # The same request in a profile fails when the profile loads.
    with pytest.raises(PrecisionError, match="ascend-910b2"):
        load_profile({"name": "p", "devices": [{"id": "npu", "type": "ascend-910b2", "precision": "fp8"}]})


def test_explicit_variants_on_devices_that_have_their_base():
    prof = load_profile({"name": "p", "devices": [{"id": "gpu", "type": "h100-sxm", "precision": "fp8-w8a16"},
                                                  {"id": "cpu", "type": "xeon-8480", "precision": "int4-g32"}]})
    assert plan_precisions(prof) == {"gpu:0": "fp8-w8a16", "cpu:0": "int4-g32"}
    assert base_precision("fp8-w8a16") == "fp8" and base_precision("int4-g32") == "int4"
    assert base_precision("bf16") == "bf16"
    with pytest.raises(PrecisionError, match="unknown precision 'fp4'"):
        device_precision(prof.devices[0], "fp4")


def test_implicit_precision_falls_back_with_one_warning(monkeypatch, caplog):
    # A simulated backend that cannot run FP8: the H100s (preference fp8, bf16, ...) fall back to BF16.
    caps = SimulatedBackend.caps
    monkeypatch.setattr(SimulatedBackend, "caps", dataclasses.replace(caps, precisions=caps.precisions - {"fp8"}))
    prof = load_profile({"name": "p", "devices": [{"id": "gpu", "type": "h100-sxm", "count": 4},
                                                  {"id": "npu", "type": "ascend-910b2", "count": 2}]})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        got = plan_precisions(prof)
    assert got == {"gpu:0": "bf16", "gpu:1": "bf16", "gpu:2": "bf16", "gpu:3": "bf16", "npu:0": "fp16", "npu:1": "fp16"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'gpu'" in warnings[0].getMessage() and "fp8" in warnings[0].getMessage() and "bf16" in warnings[0].getMessage()
    # Explicitly, the same request is an error naming the backend.
    with pytest.raises(PrecisionError, match="backend 'simulated'.*cannot run fp8"):
        plan_precisions(prof, "fp8")


def test_no_warning_without_fallback(caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        plan_precisions(load_profile("mixed-demo"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("precision", list(FORMATS))
@pytest.mark.parametrize("d,i", [(256, 512), (72, 48), (200, 300), (130, 33)])
def test_matrix_bytes_agree_with_the_graphs(precision, d, i):
    rng = np.random.default_rng(0)
    w = hetrun.runtime.weights.ExpertWeights(*(rng.standard_normal(s).astype(np.float32) for s in [(i, d), (i, d), (d, i)]))
    for target in ("onnxruntime", "openvino"):
        assert build_expert_graph(w, precision, target=target).weight_bytes == expert_bytes(precision, d, i)


def test_matrix_bytes_by_hand():
    assert matrix_bytes("fp32", 300, 200) == 240_000
    assert matrix_bytes("bf16", 300, 200) == matrix_bytes("fp16", 300, 200) == 120_000
    assert matrix_bytes("fp8", 300, 200) == 60_000 + 4 * 3 * 2  # 3 x 2 blocks of 128x128, ragged edges whole
    assert matrix_bytes("int8", 300, 200) == 60_000 + 4 * 300
    # INT4 g128, [256, 200]: per row 2 groups padded to 256 values = 128 bytes, 2 scales, 2 zero points in a byte.
    assert matrix_bytes("int4", 256, 200) == 256 * (128 + 8 + 1)
    # INT4 g32, [10, 100]: per row 4 groups = 64 bytes, 4 scales, 2 bytes of zero points.
    assert matrix_bytes("int4-g32", 10, 100) == 10 * (64 + 16 + 2)
    with pytest.raises(PrecisionError):
        matrix_bytes("fp4", 10, 10)


def test_device_memory_follows_precision():
    spec = TINY
    best = simple_plan(spec, "mixed-demo")
    fp32 = simple_plan(spec, "mixed-demo", precision="fp32")
    int8 = simple_plan(spec, "mixed-demo", precision="int8")
    b_best, b_fp32, b_int8 = device_weight_bytes(best), device_weight_bytes(fp32), device_weight_bytes(int8)
    for dev in best.device_ids:  # same placement, fewer bytes per byte-narrower precision
        assert b_int8[dev] < b_fp32[dev]
    assert b_best["h100:0"] < b_best["ascend:0"] * 0.6  # FP8 vs FP16
    # Exactly what the dispatcher's graphs hold: one copy per (expert, device), shared experts included.
    weights = [random_layer_weights(spec, layer) for layer in range(spec.num_moe_layers)]
    want = {d: 0 for d in best.device_ids}
    for li, lw in enumerate(weights):
        for e, d in set(zip(best.phy2log[li].tolist(), best.device_of[li].tolist())):
            dev = best.device_ids[d]
            want[dev] += build_expert_graph(lw.experts[e], best.precision[dev]).weight_bytes
        for s, d in enumerate(best.shared_device_of[li].tolist()):
            dev = best.device_ids[d]
            want[dev] += build_expert_graph(lw.shared[s], best.precision[dev]).weight_bytes
    assert want == b_best
