"""Failover inside one process: a backend that raises mid-step hands its tokens to a replica or the fallback device."""

import logging

import pytest
import torch

import hetrun
from hetrun.errors import HetrunError

PROFILE = {"name": "failover", "fallback_device": "spare",
           "devices": [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
                       {"id": "b", "type": "host-cpu", "backend": "onnxruntime"},
                       {"id": "spare", "type": "host-cpu", "backend": "onnxruntime"}]}


def _break_device(model, device_id: str):
    runtime = model.hetrun
    dev = runtime.plan.device_ids.index(device_id)

    def boom(x):
        raise RuntimeError("injected device fault")

    for layer in runtime.layers:
        for r, sess in enumerate(layer.sessions):
            if int(layer.device_of[r]) == dev:
                sess.forward = boom


def test_fault_goes_to_fallback_device_with_identical_output(fresh, caplog):
    reference = fresh("deepseek_v3")
    ids = torch.randint(0, reference.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(3))
    model = hetrun.deploy(fresh("deepseek_v3"), PROFILE, precision="fp32")
    with torch.no_grad():
        healthy = model(ids).logits
    _break_device(model, "b:0")
    with caplog.at_level(logging.ERROR, logger="hetrun"), torch.no_grad():
        faulty = model(ids).logits
        want = reference(ids).logits
    assert torch.equal(faulty, healthy)  # same graph on the same kind of backend: bit-identical
    assert (faulty - want).abs().max() <= 1e-4 * want.abs().max()
    faults = model.hetrun.stats.faults
    assert faults and all(f["device"] == "b:0" for f in faults)
    assert any("device 'b:0' failed on expert" in r.message and "'spare:0'" in r.message for r in caplog.records)


def test_fault_without_replica_or_fallback_is_a_clear_error(fresh):
    profile = {**PROFILE, "fallback_device": None}
    model = hetrun.deploy(fresh("deepseek_v3"), profile, precision="fp32")
    _break_device(model, "a:0")
    with pytest.raises(HetrunError, match="no replica on another device"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4, 5, 6]]))
