"""The shared equivalence suite: every backend must reproduce the untouched transformers model (ggml test-backend-ops style)."""

import pytest
import torch
from hetrun.backends.registry import backend_names, probe_backend

import hetrun
from tests.conftest import FAMILIES

# Device type each backend drives in this suite; vendor backends need their hardware.
BACKEND_DEVICE = {"onnxruntime": "host-cpu", "openvino": "host-cpu", "torch": "host-cpu", "simulated": "h100-sxm",
                  "nvidia": "h100-sxm", "ascend": "ascend-910b2"}


def one_backend_profile(backend: str, count: int = 5) -> dict:
    # 5 devices: no tiny model's expert count divides by it.
    return {"name": f"all-{backend}", "devices": [{"id": "dev", "type": BACKEND_DEVICE[backend], "count": count,
                                                   "backend": backend}]}


def require(backend: str):
    avail = probe_backend(backend)
    if not avail.ok:
        pytest.skip(f"backend '{backend}' unavailable here: {avail.reason}")


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(backend, family, fresh):
    require(backend)
    reference = fresh(family)
    ids = torch.randint(0, reference.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        want_gen = reference.generate(ids[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    model = hetrun.deploy(fresh(family), one_backend_profile(backend), precision="fp32")
    with torch.no_grad():
        got = model(ids).logits
        got_gen = model.generate(ids[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale
    assert torch.equal(got_gen, want_gen)
    stats = model.hetrun.stats
    assert stats.tokens_per_expert.sum() > 0
    assert stats.tokens_per_device.sum() == stats.tokens_per_expert.sum()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch", "simulated"])
def test_one_token_and_idle_experts(backend, fresh):
    require(backend)
    reference = fresh("deepseek_v3")
    model = hetrun.deploy(fresh("deepseek_v3"), one_backend_profile(backend, count=3), precision="fp32")
    ids = torch.tensor([[5]])
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    per_expert = model.hetrun.stats.tokens_per_expert
    assert (per_expert == 0).any(), "one token cannot reach every expert"
    assert (per_expert.sum(axis=1) == 4).all()  # top-4 of the tiny preset, per MoE layer
