"""The dispatcher's decode fast path: devices run at the same time, and rows reach sessions without copies."""

import time

import pytest
import torch

import hetrun

TWO = {"name": "two", "devices": [{"id": "a", "type": "h100-sxm", "backend": "simulated"},
                                  {"id": "b", "type": "h100-sxm", "backend": "simulated"}]}


def _token_on_both_devices(layer, hidden: int) -> torch.Tensor:
    """One token whose top-2 experts live on different devices (so each device has exactly one call)."""
    from hetrun.runtime.routing import route, router_logits

    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        x = torch.randn(1, hidden, generator=g)
        ids, _ = route(router_logits(x, layer.weights.gate, layer.router), layer.router, layer.weights.correction_bias)
        if len({int(layer.device_of[int(layer.slots_for(ids)[k])]) for k in range(2)}) == 2:
            return x
    raise AssertionError("no token reaches both devices")


def test_a_step_costs_the_slowest_device_not_the_sum(fresh):
    model = hetrun.deploy(fresh("mixtral"), TWO, precision="fp32")
    layer = model.hetrun.layers[0]
    x = _token_on_both_devices(layer, layer.weights.gate.shape[1])
    sleeps = {0: 0.4, 1: 0.25}
    for r, s in enumerate(layer.sessions):
        real = s.forward

        def slow(rows, real=real, pause=sleeps[int(layer.device_of[r])]):
            time.sleep(pause)
            return real(rows)
        s.forward = slow
    layer(x)  # warm: the devices' worker threads start
    t0 = time.perf_counter()
    with torch.no_grad():
        layer(x)
    took = time.perf_counter() - t0
    assert took < 0.4 + 0.25 - 0.1, f"{took:.3f} s: the devices ran one after the other"
    assert took >= 0.4  # and it did wait for the slower one


def test_a_decode_token_alone_gets_its_rows_of_a_batch_whichever_order_its_slots_are_in(fresh):
    # One token takes the dispatcher's decode path (its pairs in Python lists); a batch the general one. The K
    # outputs come back in slot order and must be weighted and summed in the router's k order either way.
    from hetrun.runtime.routing import route, router_logits

    model = hetrun.deploy(fresh("mixtral"), TWO, precision="fp32")
    layer = model.hetrun.layers[0]
    assert not layer.replicated
    x = torch.randn(48, layer.weights.gate.shape[1], generator=torch.Generator().manual_seed(3))  # [T, D]
    with torch.no_grad():
        ids, _ = route(router_logits(x, layer.weights.gate, layer.router), layer.router, None)
        slots = layer.slots_for(ids).view(-1, 2)  # [T, K]
        assert (slots[:, 0] < slots[:, 1]).any() and (slots[:, 0] > slots[:, 1]).any()  # both orders occur
        batch = layer(x)  # [T, D]
        alone = torch.cat([layer(x[t:t + 1]) for t in range(x.shape[0])])  # [T, D]
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-6)
    assert model.hetrun.stats.tokens_per_expert[0].sum() == 2 * 2 * x.shape[0]  # both passes counted


def test_rows_reach_cpu_sessions_without_a_copy(fresh):
    model = hetrun.deploy(fresh("qwen3_moe"), "cpu", precision="fp32")
    rt = model.hetrun
    seen = []
    for layer in rt.layers:
        for s in set(layer.sessions):
            real = s.forward

            def spy(rows, real=real):
                seen.append(rows.untyped_storage().data_ptr())
                return real(rows)
            s.forward = spy
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 8]])
    with torch.no_grad():
        model(ids)
    assert seen and rt.stats.transfers == 0  # no host<->device copies on a CPU deployment
    # every session read a slice of one permuted-rows buffer per layer call, not a copy of its own
    assert len(set(seen)) <= rt.stats.calls


def test_hidden_states_on_a_gpu_stay_there_through_gpu_experts(fresh):
    from hetrun.backends.registry import probe_backend

    avail = probe_backend("nvidia")
    if not (avail.ok and torch.cuda.is_available()):
        pytest.skip("needs an NVIDIA GPU and a CUDA build of torch: "
                    f"{avail.reason or 'torch here is a CPU build'}")
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 8]])
    reference = fresh("qwen2_moe")  # routed, shared and gated shared experts
    with torch.no_grad():
        want = reference(ids).logits
    gpu = {"name": "gpu", "devices": [{"id": "gpu", "type": "h100-sxm", "backend": "nvidia"}]}
    model = hetrun.deploy(fresh("qwen2_moe"), gpu, precision="fp32").to("cuda")  # the dense part on the GPU too
    with torch.no_grad():
        got = model(ids.to("cuda")).logits
    assert got.device.type == "cuda" and model.hetrun.stats.transfers == 0  # rows never left the GPU
    assert (got.cpu() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
