"""Live rebalancing in one process: moves within a byte budget, prepared in the background, switched between steps,
with FP32 logits identical to a static deployment before, during and after every move."""

import gc
import logging
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import hetrun
from hetrun.errors import PlacementError, ProfileError
from hetrun.placement.moves import budgeted_moves
from hetrun.placement.planner import plan
from hetrun.placement.rebalance import rebalance_plan
from hetrun.profile import load_profile
from hetrun.runtime.rebalancer import SmoothedLoad
from hetrun.runtime.weights import release_sources
from hetrun.spec import MoESpec

# Two devices on the same backend: a moved expert computes the same bits on either.
TWO = {"name": "two-ort", "devices": [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
                                      {"id": "b", "type": "host-cpu", "backend": "onnxruntime"}]}
LIVE = {**TWO, "rebalance": {"window_steps": 2, "ema": 0.8, "threshold": 0.0, "max_move_gb": 1.0}}


def _batches(vocab: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Token batches drawn from a narrow band of the vocabulary that moves every 4 steps: the hot experts drift."""
    g = torch.Generator().manual_seed(seed)
    width = max(4, vocab // 32)
    return [torch.randint(0, width, (2, 7), generator=g) + (s // 4) * 7 % (vocab - width) for s in range(steps)]


def _until(cond, model, batches, static=None, limit_s: float = 60.0):
    """Run batches (again and again) until cond(); returns the pairs of logits (live, static) seen."""
    seen = []
    end = time.monotonic() + limit_s
    i = 0
    while not cond():
        assert time.monotonic() < end, "live rebalancing never switched"
        ids = batches[i % len(batches)]
        with torch.no_grad():
            seen.append((model(ids).logits, None if static is None else static(ids).logits))
        i += 1
        time.sleep(0.01)
    return seen


def hold_background_compiles(rt):
    """Make the runtime's background compiles (measure=False) wait for the returned Event; the list fills with the
    names of those waiting."""
    release, blocked = threading.Event(), []
    real = rt.compile

    def held(device, expert, name, measure=True):
        if not measure:
            blocked.append(name)
            assert release.wait(60)
        return real(device, expert, name, measure)

    rt.compile = held
    return release, blocked


# ---- the placement side: moves within a byte budget -------------------------------------------------------------

def _tiny_plan(load):
    return plan(MoESpec.from_preset("tiny"), "mixed-demo", load=load, redundant_experts=3)


def test_budgeted_moves_stay_in_budget_and_never_slow_the_plan():
    rng = np.random.default_rng(0)
    old = rng.zipf(1.5, (2, 12)).astype(float)
    new = old[:, ::-1].copy()  # the hot experts are now the cold ones
    p = _tiny_plan(old)
    eb = min(p.predicted["model"]["expert_bytes"])
    for budget in (0, eb, 4 * eb, 1e12):
        mp = budgeted_moves(p, new, budget)
        assert mp.bytes <= budget and mp.bytes == sum(m.bytes for m in mp.moves)
        assert mp.after_s <= mp.shares_s * (1 + 1e-9) and mp.shares_s <= mp.before_s * (1 + 1e-9)
        assert (mp.plan.device_of == np.sort(p.device_of, 1)).all()  # slots per device unchanged: memory too
        mp.plan.validate()
        if budget == 0:
            assert not mp.moves
    big = budgeted_moves(p, new, 1e12)
    assert big.moves and big.after_s < budgeted_moves(p, new, 0).after_s  # moves help when shares are not enough
    moved = {(m.layer, m.expert, m.device) for m in big.moves}
    for li in range(p.num_layers):  # every move is a copy the plan did not have before and has now
        before = set(zip(p.phy2log[li].tolist(), p.device_of[li].tolist()))
        after = set(zip(big.plan.phy2log[li].tolist(), big.plan.device_of[li].tolist()))
        assert {(li, e, d) for e, d in after - before} == {m for m in moved if m[0] == li}


def test_budgeted_moves_do_as_well_as_the_solver_rebalance_per_byte():
    ours, theirs = [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        old = rng.zipf(1.4, (2, 12)).astype(float)
        new = np.roll(old, 5, axis=1)
        p = _tiny_plan(old)
        for max_moves in (2, 4):
            q, moved = rebalance_plan(p, new, max_moves=max_moves)
            mp = budgeted_moves(p, new, moved)  # the same bytes the solver's moves copied
            assert mp.bytes <= moved and mp.after_s <= q.predicted["step_time_s"] * 1.1
            ours.append(mp.after_s)
            theirs.append(q.predicted["step_time_s"])
    assert np.mean(ours) <= np.mean(theirs) * 1.02


def test_budgeted_moves_keep_pins_and_refuse_bad_budgets():
    spec = MoESpec.from_preset("tiny")
    rng = np.random.default_rng(2)
    old = rng.zipf(1.5, (2, 12)).astype(float)
    p = plan(spec, "mixed-demo", load=old, redundant_experts=3, pins=["device=xeon,experts=0-3"])
    mp = budgeted_moves(p, old[:, ::-1], 1e12)
    xeon = p.device_ids.index("xeon:0")
    for li in range(p.num_layers):
        assert (mp.plan.device_of[li][np.isin(mp.plan.phy2log[li], [0, 1, 2, 3])] == xeon).all()
    with pytest.raises(PlacementError, match="max_bytes"):
        budgeted_moves(p, old, float("nan"))


def test_smoothed_load_is_an_ema_of_normalised_windows():
    s = SmoothedLoad(0.25)
    s.add(np.array([[3.0, 1.0], [0.0, 0.0]]))
    assert np.allclose(s.value, [[0.75, 0.25], [0.5, 0.5]])  # a layer without tokens starts uniform
    s.add(np.array([[0.0, 10.0], [0.0, 0.0]]))
    assert np.allclose(s.value, [[0.5625, 0.4375], [0.5, 0.5]])  # ... and keeps its average


def test_profile_rebalance_section_is_checked():
    p = load_profile({**TWO, "rebalance": {"window_steps": 8}})
    assert p.model.rebalance.enabled and p.model.rebalance.window_steps == 8
    for bad in ({"window_steps": 0}, {"ema": 0}, {"ema": 1.5}, {"threshold": float("inf")}, {"max_move_gb": -1},
                {"windows": 3}):
        with pytest.raises(ProfileError, match="rebalance"):
            load_profile({**TWO, "rebalance": bad})


# ---- the runtime: background preparation, switch between steps, identical outputs -------------------------------

def test_live_moves_keep_fp32_logits_identical(fresh):
    static = hetrun.deploy(fresh("qwen3_moe"), TWO, precision="fp32")
    live = hetrun.deploy(fresh("qwen3_moe"), LIVE, precision="fp32")
    rt = live.hetrun
    batches = _batches(live.config.vocab_size, 24)
    seen = _until(lambda: len(rt.stats.switches) >= 2 and rt.stats.moves, live, batches, static)
    assert all(torch.equal(a, b) for a, b in seen)  # before, during (job in flight) and after each switch
    s = rt.stats.to_dict(rt.plan.device_ids)
    assert s["rebalance"]["switches"] == len(rt.stats.switches) >= 2 and s["rebalance"]["moves"] == len(rt.stats.moves)
    m = rt.stats.moves[0]
    assert set(m) >= {"layer", "expert", "from", "to", "bytes", "predicted_gain", "step", "version"}
    assert m["to"] in rt.plan.device_ids and m["bytes"] > 0 and m["predicted_gain"] >= 0
    assert s["rebalance"]["bytes"] == sum(x["bytes"] for x in rt.stats.moves)
    for layer in rt.layers:  # the layers run the runtime's current plan, with exactly its copies
        assert (layer.phy2log == rt.plan.phy2log[layer.index]).all()
        assert set(layer.copies) == set(zip(layer.phy2log.tolist(), layer.device_of.tolist()))


def test_no_step_waits_for_a_move_and_old_copies_are_freed(fresh):
    live = hetrun.deploy(fresh("qwen3_moe"), LIVE, precision="fp32")
    rt = live.hetrun
    release, blocked = hold_background_compiles(rt)
    old = {(layer.index, *key): weakref.ref(s) for layer in rt.layers for key, s in layer.copies.items()}
    batches = _batches(live.config.vocab_size, 24)
    _until(lambda: bool(blocked), live, batches)  # a job is preparing a move ...
    steps = rt.steps
    for ids in batches[:6]:  # ... and steps go on meanwhile, on the old plan
        with torch.no_grad():
            live(ids)
    assert rt.steps == steps + 6 and not rt.stats.switches
    release.set()
    _until(lambda: bool(rt.stats.switches), live, batches)
    gc.collect()
    kept = {(layer.index, *key) for layer in rt.layers for key in layer.copies}
    dropped = [key for key in old if key not in kept]
    assert dropped and all(old[key]() is None for key in dropped)  # the old copies' sessions are gone


def test_released_sources_fail_the_job_in_one_line_and_serving_goes_on(fresh, caplog):
    live = hetrun.deploy(fresh("qwen3_moe"), LIVE, precision="fp32")
    rt = live.hetrun
    assert rt.layers[0].weights.experts[0].read() is not None  # deploy keeps sources when rebalancing is on
    release_sources([layer.weights for layer in rt.layers])  # as if someone freed them anyway
    batches = _batches(live.config.vocab_size, 24)
    with caplog.at_level(logging.ERROR, logger="hetrun"):
        _until(lambda: rt.stats.rebalance_failures > 0, live, batches)
    assert any("live rebalancing: preparing a new plan failed" in r.message and "released after deploy" in r.message
               for r in caplog.records)
    with torch.no_grad():
        assert torch.isfinite(live(batches[0]).logits).all()


def test_a_plan_with_other_slots_is_refused(fresh):
    live = hetrun.deploy(fresh("qwen3_moe"), LIVE, precision="fp32")
    rt = live.hetrun
    other = plan(rt.plan.spec, TWO, redundant_experts=2, precision="fp32")
    with pytest.raises(PlacementError, match="keep the devices and the number of slots"):
        rt.switch_plan(other, {})


def test_ranks_agree_through_header_fields_or_drop_the_candidate(fresh, caplog):
    """The torchrun agreement, driven with header tables by hand on a real runtime: a candidate switches at the next
    step only when every rank has the same one ready; a digest mismatch or a failure drops it on every rank."""
    from hetrun.runtime.rebalancer import BUSY, FAILED, IDLE, LiveRebalancer

    live = hetrun.deploy(fresh("qwen3_moe"), LIVE, precision="fp32")
    rt = live.hetrun
    rb = LiveRebalancer(rt, rt.profile.model.rebalance, rt.routed_load, collective=True)
    load = np.random.default_rng(0).zipf(1.5, (rt.plan.num_layers, rt.plan.spec.num_experts)).astype(float)
    active = np.array([True, False])

    def prepared():
        rb.job = rt.background(rb._make_job(rt.plan, load, rb.version + 1))
        rb.job.result(60)
        assert rb.header_fields()[1] == rb.version + 1  # ready
        return rb.header_fields()

    mine = prepared()
    rb.on_table(1, active, np.array([mine, [0, BUSY, 0]]))  # the other rank is still busy: wait
    assert rb.scheduled is None and rb.ready is not None
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        rb.on_table(1, active, np.array([mine, [0, mine[1], mine[2] ^ 1]]))  # another plan there: dropped
    assert rb.ready is None and rb.header_fields() == (0, IDLE, 0)
    assert any("different plans from the same load" in r.message for r in caplog.records)
    mine = prepared()
    rb.on_table(0, active, np.array([mine, [0, FAILED, 0]]))
    assert rb.ready is None and rb.scheduled is None
    mine = prepared()
    rb.on_table(1, active, np.array([mine, mine]))  # everyone has it: due at the next step, not before
    assert rb.scheduled is not None and rb.version == 0 and not rt.stats.switches
    rb.new_step()
    assert rb.version == 1 and len(rt.stats.switches) == 1
    with pytest.raises(hetrun.HetrunError, match="plan versions"):
        rb.on_table(1, active, np.array([[1, IDLE, 0], [0, IDLE, 0]]))  # a rank left behind


def test_a_bundle_rebalances_and_caches_with_identical_logits(fresh, tmp_path):
    """`hetrun.load(bundle, profile)` (what `hetrun run` and `hetrun serve BUNDLE` deploy): moved and cached experts
    load their graphs from the bundle, and FP32 logits stay those of the static bundle."""
    from hetrun.bundle import export, load

    model = fresh("qwen3_moe")
    export(model, TWO, tmp_path / "b", precision="fp32", progress=False)
    static = load(tmp_path / "b", TWO)
    live = load(tmp_path / "b", {**LIVE, "cache": {"device": "b", "slots": 4, "half_life_steps": 2}})
    rt = live.hetrun
    batches = _batches(live.config.vocab_size, 24)
    seen = _until(lambda: len(rt.stats.switches) >= 2 and rt.stats.cache_hits > 0, live, batches, static)
    assert all(torch.equal(a, b) for a, b in seen)
    assert rt.stats.moves and not rt.stats.rebalance_failures and rt.stats.cache_loads > 0


def test_a_bundle_moves_experts_only_where_it_holds_their_graphs(fresh, tmp_path, caplog):
    """A bundle holds each expert's graph at its planned device's precision only: live rebalancing and the cache
    never plan a copy it cannot build (no failing job, no error), and say nothing can move."""
    from hetrun.bundle import export, load

    mixed = {**TWO, "devices": [{**TWO["devices"][0], "precision": "fp32"}, {**TWO["devices"][1], "precision": "bf16"}]}
    export(fresh("qwen3_moe"), mixed, tmp_path / "b", progress=False)
    live = load(tmp_path / "b", {**mixed, "rebalance": LIVE["rebalance"], "cache": {"device": "b", "slots": 4}})
    rt = live.hetrun
    can = rt.placeable()  # [L, E, D]
    for li in range(rt.plan.num_layers):  # exactly the copies the plan has
        want = np.zeros(can.shape[1:], dtype=bool)
        want[rt.plan.phy2log[li], rt.plan.device_of[li]] = True
        assert (can[li] == want).all()
    with caplog.at_level(logging.ERROR, logger="hetrun"):
        for ids in _batches(live.config.vocab_size, 12):
            with torch.no_grad():
                live(ids)
            time.sleep(0.01)
    assert rt.stats.rebalance_failures == 0 and not rt.stats.moves and rt.stats.cache_loads == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
