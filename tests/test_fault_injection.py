"""Fault injection: every way a device can fail, on routed experts, shared experts and the fallback device.

Each case ends in a correct output through failover (FP32 logits identical to a healthy run) or in a one-line
HetrunError naming the device; a wrong result never passes silently.
"""

import time

import pytest
import torch

import hetrun
from hetrun.errors import HetrunError

DEVICES = [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
           {"id": "b", "type": "host-cpu", "backend": "onnxruntime"},
           {"id": "spare", "type": "host-cpu", "backend": "onnxruntime"}]
PROFILE = {"name": "faults", "devices": DEVICES, "dense_device": "a", "fallback_device": "spare",
           "expert_timeout_s": 1.0}
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


def _fault(kind: str):
    """A session.forward that fails in one way (it wraps the healthy one for the shape and value faults)."""
    def make(healthy):
        def forward(x):
            if kind == "exception":
                raise RuntimeError("injected device fault")
            if kind == "hang":
                time.sleep(30)
            y = healthy(x)
            if kind == "one_row":
                return y[:1]
            if kind == "nan":
                return y * float("nan")
            if kind == "inf":
                y = y.clone()
                y[0, 0] = float("inf")
                return y
            raise AssertionError(kind)
        return forward
    return make


def _break(model, device_id: str, kind: str, shared: bool = False, fallback: bool = False) -> None:
    """Make every routed (or shared, or already compiled fallback) session of `device_id` fail with `kind`."""
    rt = model.hetrun
    dev = rt.plan.device_ids.index(device_id)
    for layer in rt.layers:
        if shared:
            sessions = [s for s, d in zip(layer.shared_sessions, layer.shared_devices) if d == dev]
        elif fallback:
            sessions = [s for (_, _, d), s in layer._fallback_sessions.items() if d == dev]
        else:
            sessions = [s for r, s in enumerate(layer.sessions) if int(layer.device_of[r]) == dev]
        for s in set(sessions):
            s.forward = _fault(kind)(s.forward)


@pytest.fixture(scope="module")
def reference():
    from hetrun.tiny_models import tiny_model

    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        return model, model(IDS).logits


def _deployed(reference, profile=PROFILE):
    import copy

    return hetrun.deploy(copy.deepcopy(reference[0]), profile, precision="fp32", threads=1)


@pytest.mark.parametrize("kind", ["one_row", "nan", "inf", "exception", "hang"])
def test_a_faulty_routed_device_fails_over_with_identical_output(reference, kind):
    model = _deployed(reference)
    with torch.no_grad():
        healthy = model(IDS).logits
    _break(model, "b:0", kind)
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.equal(got, healthy)  # the fallback runs the same FP32 graph on the same kind of backend
    want = reference[1]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    faults = model.hetrun.stats.faults
    assert faults and {f["device"] for f in faults} == {"b:0"}
    assert model.hetrun.health.quarantined() == [model.hetrun.plan.device_ids.index("b:0")]


@pytest.mark.parametrize("kind", ["one_row", "nan", "exception"])
def test_a_faulty_shared_expert_device_fails_over(reference, kind):
    model = _deployed(reference)
    with torch.no_grad():
        healthy = model(IDS).logits
    _break(model, "a:0", kind, shared=True)
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.equal(got, healthy)
    assert any(f["kind"] == "shared" and f["device"] == "a:0" for f in model.hetrun.stats.faults)


@pytest.mark.parametrize("kind", ["nan", "exception", "hang"])
def test_a_fault_on_the_fallback_device_too_is_a_one_line_error_naming_both(reference, kind):
    model = _deployed(reference)
    _break(model, "b:0", "exception")
    with torch.no_grad():
        model(IDS)  # compiles the fallback sessions of b's experts that this prompt reaches
    model.hetrun.health.ok(model.hetrun.plan.device_ids.index("b:0"))
    model.hetrun.health.until[:] = 0
    _break(model, "spare:0", kind, fallback=True)
    with pytest.raises(HetrunError) as err, torch.no_grad():
        model(IDS)
    msg = str(err.value)
    assert "\n" not in msg and "'b:0'" in msg and "'spare:0' failed too" in msg


def test_without_replica_or_fallback_the_error_names_the_device(reference):
    model = _deployed(reference, {**PROFILE, "fallback_device": None})
    _break(model, "b:0", "nan")
    with pytest.raises(HetrunError, match=r"device 'b:0' failed on expert \d+ of layer \d+ \(returned NaN"):
        with torch.no_grad():
            model(IDS)


def test_a_dead_device_is_quarantined_not_retried_on_every_call(reference):
    model = _deployed(reference)
    _break(model, "b:0", "exception")
    with torch.no_grad():
        for _ in range(5):
            model(IDS)  # 5 forward passes x 2 MoE layers
    faults = [f for f in model.hetrun.stats.faults if f["device"] == "b:0"]
    assert len(faults) <= 2  # the first call of each layer pass before quarantine, not one per expert call
    dev = model.hetrun.plan.device_ids.index("b:0")
    assert not model.hetrun.health.usable(dev) and model.hetrun.health.retry_in(dev) > 0


def test_a_quarantined_device_is_probed_again_after_its_backoff_and_recovers(reference):
    model = _deployed(reference)
    rt = model.hetrun
    dev = rt.plan.device_ids.index("b:0")
    rt.health.fault(dev)  # as after one fault
    with torch.no_grad():
        model(IDS)  # quarantined: its calls go straight to the fallback device
    assert not rt.stats.faults and rt.stats.tokens_per_device[dev] == 0
    rt.health.until[dev] = 0.0  # its back-off has passed: the next call probes it
    with torch.no_grad():
        model(IDS)
    assert rt.health.usable(dev) and rt.health.backoff[dev] == 0 and rt.stats.tokens_per_device[dev] > 0


def test_non_finite_input_is_reported_as_the_model_s_not_a_device_s(reference):
    model = _deployed(reference)
    layer = model.hetrun.layers[0]
    x = torch.randn(3, layer.weights.gate.shape[1])
    x[1, 2] = float("nan")
    with pytest.raises(HetrunError, match="holds NaN or inf before any expert ran"):
        layer(x)
    assert not model.hetrun.stats.faults


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finiteness_check_catches_every_nan_and_infinity_and_no_large_finite_value(dtype):
    from hetrun.runtime.dispatch import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.randn(3, 1000).to(dtype))
    assert all_finite(torch.full((4, 8), big, dtype=dtype))  # finite values whose float32 sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(2, 1000).to(dtype)
        t[1, 517] = bad
        assert not all_finite(t)
    both = torch.zeros(5, dtype=dtype)
    both[1], both[3] = float("inf"), -float("inf")  # their sum is NaN, not a cancellation
    assert not all_finite(both)
