"""The hot-expert cache: a fast device holds copies of the hottest experts whose home is a slow one; hits run there,
misses at home in the same step, loads in the background; FP32 logits stay identical."""

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import hetrun
from hetrun.errors import ProfileError
from hetrun.formats import expert_bytes
from hetrun.profile import device_catalog, load_profile
from hetrun.roofline import transfer_seconds
from hetrun.runtime.expert_cache import CachePolicy
from tests.test_rebalance_live import hold_background_compiles

_HOST = device_catalog()["host-cpu"].model_dump()
SLOW_CPU = {**_HOST, "name": "slow-cpu", "tflops": {k: v / 4 for k, v in _HOST["tflops"].items()},
            "memory_bw_gbs": _HOST["memory_bw_gbs"] / 4}
# Both on onnxruntime, so a cached copy computes the same bits as its home; every expert pinned to the slow one.
FAST_SLOW = {"name": "fast-slow", "device_types": {"slow-cpu": SLOW_CPU},
             "devices": [{"id": "fast", "type": "host-cpu", "backend": "onnxruntime"},
                         {"id": "slow", "type": "slow-cpu", "backend": "onnxruntime"}],
             "dense_device": "fast", "pins": [{"device": "slow"}],
             "links": {"intra_node": {"bandwidth_gbs": 8, "latency_us": 20, "efficiency": 0.5}}}
CACHED = {**FAST_SLOW, "cache": {"device": "fast", "slots": 6}}


def _batches(vocab: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 12, (2, 7), generator=g) + (s // 6) * 40 % (vocab - 12) for s in range(steps)]


def _steps(model, batches, until=lambda: True, limit_s: float = 60.0, static=None):
    end = time.monotonic() + limit_s
    out = []
    for ids in batches:
        with torch.no_grad():
            out.append((model(ids).logits, None if static is None else static(ids).logits))
        time.sleep(0.01)
    while not until():
        assert time.monotonic() < end, "the cache never got there"
        with torch.no_grad():
            out.append((model(batches[0]).logits, None if static is None else static(batches[0]).logits))
        time.sleep(0.01)
    return out


# ---- the policy -------------------------------------------------------------------------------------------------

def test_decay_policy_follows_the_tokens_and_forgets():
    owner = np.zeros((1, 6), dtype=np.int64)
    p = CachePolicy("decay", half_life_steps=1.0, owner=owner, slots=2)
    p.observe(np.array([[10, 5, 1, 0, 0, 0]]))
    loads = p.choose(np.zeros((1, 6), dtype=bool), limit=8)
    assert [(li, e) for li, e, _ in loads] == [(0, 0), (0, 1)] and all(v is None for _, _, v in loads)
    held = np.array([[True, True, False, False, False, False]])
    for _ in range(4):  # traffic moves to expert 4: the decayed scores of 0 and 1 halve every step
        p.observe(np.array([[0, 0, 0, 0, 8, 0]]))
    assert p.choose(held, limit=8) == [(0, 4, (0, 1))]  # the lowest-scored cached expert makes room
    assert p.choose(held, limit=0) == []


def test_admission_needs_a_margin_and_lfu_never_forgets():
    owner = np.array([[0, 0, 0, -1]])  # expert 3 may not be cached
    held = np.array([[True, False, False, False]])
    for kind in ("decay", "lfu"):
        p = CachePolicy(kind, half_life_steps=1e6, owner=owner, slots=1)
        p.observe(np.array([[100, 105, 0, 500]]))
        assert p.choose(held, limit=4) == []  # 5% more tokens than the cached one: not worth a load
        p.observe(np.array([[0, 20, 0, 500]]))
        assert p.choose(held, limit=4) == [(0, 1, (0, 0))]
    lfu = CachePolicy("lfu", 1.0, owner, 1)
    lfu.observe(np.array([[1000, 0, 0, 0]]))
    for _ in range(10):
        lfu.observe(np.array([[0, 50, 0, 0]]))
    assert lfu.choose(held, limit=4) == []  # 500 tokens in 10 steps never catch up with 1000 long ago
    lru = CachePolicy("lru", 1.0, owner, 1)
    lru.observe(np.array([[1000, 0, 0, 0]]))
    lru.observe(np.array([[0, 1, 0, 0]]))
    assert lru.choose(held, limit=4) == [(0, 1, (0, 0))]  # recency alone


def test_cache_section_is_checked():
    assert load_profile(CACHED).model.cache.slots == 6
    for bad in ({"device": "fast", "slots": 0}, {"device": "fast", "slots": 2, "policy": "fifo"},
                {"device": "fast", "slots": 2, "half_life_steps": float("nan")}, {"slots": 3}):
        with pytest.raises(ProfileError, match="cache"):
            load_profile({**FAST_SLOW, "cache": bad})


def test_cache_on_a_device_the_profile_lacks_is_one_line(fresh):
    with pytest.raises(ProfileError, match="no device 'gpu'"):
        hetrun.deploy(fresh("qwen3_moe"), {**FAST_SLOW, "cache": {"device": "gpu", "slots": 2}}, precision="fp32")


# ---- the runtime ----------------------------------------------------------------------------------------------

def test_hits_run_on_the_fast_device_with_identical_fp32_logits(fresh):
    static = hetrun.deploy(fresh("qwen3_moe"), FAST_SLOW, precision="fp32")
    model = hetrun.deploy(fresh("qwen3_moe"), CACHED, precision="fp32")
    rt = model.hetrun
    fast = rt.plan.device_ids.index("fast:0")
    assert not (rt.plan.device_of == fast).any()  # every expert's home is the slow device
    seen = _steps(model, _batches(model.config.vocab_size, 24), until=lambda: rt.stats.cache_hits > 0,
                  static=static)
    assert all(torch.equal(a, b) for a, b in seen)
    c = rt.stats.to_dict(rt.plan.device_ids)["cache"]
    assert c["hits"] > 0 and c["misses"] > 0 and 0 < c["hit_rate"] < 1
    assert c["hits"] == rt.stats.tokens_per_device[fast]  # every hit ran on the fast device
    assert c["loads"] >= 1 and c["bytes_loaded"] == c["loads"] * expert_bytes("fp32", 48, 40)
    link = rt.profile.model.links["intra_node"]
    assert c["modeled_load_s"] == pytest.approx(c["loads"] * transfer_seconds(expert_bytes("fp32", 48, 40), 8, 0.5, 20))
    assert c["modeled_saved_s"] > 0 and link.bandwidth_gbs == 8
    held = rt.cache.to_dict()["fast:0"]
    assert 0 < len(held) <= 6  # never more than its slots


def test_a_miss_never_waits_for_a_load(fresh):
    model = hetrun.deploy(fresh("qwen3_moe"), CACHED, precision="fp32")
    rt = model.hetrun
    release, started = hold_background_compiles(rt)
    batches = _batches(model.config.vocab_size, 8)
    _steps(model, batches, until=lambda: bool(started))
    _steps(model, batches)  # loads are stuck: every step still runs, all misses
    assert rt.stats.cache_hits == 0 and rt.stats.cache_misses > 0
    release.set()
    _steps(model, batches[:1], until=lambda: rt.stats.cache_hits > 0)


def test_a_load_in_flight_can_be_a_victim_and_the_slots_are_never_exceeded(fresh):
    # Six loads fill the six slots and are still compiling when hotter experts arrive: the coldest of those loads
    # make room, and once every load has finished the device holds six copies, not eight.
    model = hetrun.deploy(fresh("qwen3_moe"), CACHED, precision="fp32")
    cache = model.hetrun.cache
    release, started = hold_background_compiles(model.hetrun)
    assert cache.settings.slots == 6 and cache.settings.max_loads == 8 and (cache.policy.owner[0] == 0).all()
    cache.tokens[0, :6] = [10, 10, 10, 10, 9, 9]
    cache.step()
    assert sorted(cache.loading) == [(0, e) for e in range(6)] and not cache.sessions
    cache.tokens[0, 6:8] = 1000  # hotter than any of the six still loading
    cache.step()
    assert sorted(cache.loading) == [(0, e) for e in (0, 1, 2, 3, 6, 7)]  # the two coldest loads made room
    release.set()
    end = time.monotonic() + 60
    while cache.loading:
        assert time.monotonic() < end, "the loads never finished"
        time.sleep(0.01)
        cache.step()
    assert sorted(cache.sessions) == [(0, e) for e in (0, 1, 2, 3, 6, 7)]
    assert len(cache.to_dict()["fast:0"]) == 6 and model.hetrun.stats.cache_evictions == 0  # no copy was evicted


def test_a_failing_cached_copy_falls_back_to_home(fresh, caplog):
    static = hetrun.deploy(fresh("qwen3_moe"), FAST_SLOW, precision="fp32")
    model = hetrun.deploy(fresh("qwen3_moe"), CACHED, precision="fp32")
    rt = model.hetrun
    batches = _batches(model.config.vocab_size, 12)
    _steps(model, batches, until=lambda: len(rt.cache.sessions) > 0)

    def boom(x):
        raise RuntimeError("injected fault on the fast device")

    for s in rt.cache.sessions.values():
        s.forward = boom
    with caplog.at_level(logging.ERROR, logger="hetrun"):
        seen = _steps(model, batches, static=static)
    assert all(torch.equal(a, b) for a, b in seen)
    assert rt.stats.faults and all(f["device"] == "fast:0" for f in rt.stats.faults)


def test_simulated_devices_model_the_time_saved_and_the_transfer(fresh):
    prof = {"name": "gpu-cpu", "devices": [{"id": "gpu", "type": "h100-sxm", "reserved_gb": 1},
                                           {"id": "cpu", "type": "xeon-8480"}],
            "dense_device": "gpu", "pins": [{"device": "cpu"}],
            "links": {"intra_node": {"name": "PCIe", "bandwidth_gbs": 64, "latency_us": 10, "efficiency": 0.8}},
            "cache": {"device": "gpu", "slots": 4}}
    model = hetrun.deploy(fresh("mixtral"), prof)
    rt = model.hetrun
    _steps(model, _batches(model.config.vocab_size, 12), until=lambda: rt.stats.cache_hits > 0)
    c = rt.stats.to_dict(rt.plan.device_ids)
    gpu = rt.plan.device_ids.index("gpu:0")
    spec = rt.plan.spec
    nbytes = expert_bytes(rt.plan.precision["gpu:0"], spec.hidden_size, spec.moe_intermediate_size)
    assert c["cache"]["modeled_load_s"] == pytest.approx(c["cache"]["loads"] * transfer_seconds(nbytes, 64, 0.8, 10))
    assert c["cache"]["modeled_saved_s"] > 0
    assert c["devices"]["gpu:0"]["modeled_s"] > 0 and rt.stats.tokens_per_device[gpu] == c["cache"]["hits"]


def test_slots_the_plan_has_no_room_for_are_named_once(fresh, caplog):
    """The planner does not count cache slots: a cache bigger than what the plan leaves free on its device says so."""
    tiny_fast = {**FAST_SLOW, "device_types": {**FAST_SLOW["device_types"],
                                               "tiny-cpu": {**_HOST, "name": "tiny-cpu", "memory_gb": 0.001}},
                 "devices": [{**FAST_SLOW["devices"][0], "type": "tiny-cpu"}, FAST_SLOW["devices"][1]]}
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        hetrun.deploy(fresh("qwen3_moe"), {**tiny_fast, "cache": {"device": "fast", "slots": 6}}, precision="fp32")
        assert not [r for r in caplog.records if "slots take" in r.message]
        hetrun.deploy(fresh("qwen3_moe"), {**tiny_fast, "cache": {"device": "fast", "slots": 4000}}, precision="fp32")
    said = [r.message for r in caplog.records if "slots take" in r.message]
    assert len(said) == 1 and "cache on 'fast:0': 4000 slots take" in said[0] and "reserved_gb" in said[0]


def test_exit_lets_the_background_compile_in_flight_finish_and_cancels_the_queued_ones(tmp_path):
    # Exiting with a daemon thread inside a runtime's C++ code aborted the process about one time in three; the
    # interpreter's exit now waits for the job each background worker is running.
    script = (
        "import pathlib, time\n"
        "from hetrun.runtime.dispatch import background_worker\n"
        "w = background_worker('hetrun-test')\n"
        f"w.submit(lambda: (time.sleep(1.0), pathlib.Path({str(tmp_path)!r}, 'first').write_text('done')))\n"
        f"w.submit(lambda: pathlib.Path({str(tmp_path)!r}, 'second').write_text('ran'))\n"
        "time.sleep(0.2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "first").read_text() == "done"  # finished, though the main thread had ended
    assert not (tmp_path / "second").exists()  # queued behind it: cancelled
