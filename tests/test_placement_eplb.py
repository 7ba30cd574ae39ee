import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hetrun.errors import PlacementError
from hetrun.placement import eplb_policy, gpu_loads, rebalance_experts

README = json.loads((Path(__file__).parent / "data" / "eplb_readme_example.json").read_text())["case"]


def _zipf(rng, L, E, s=1.1):
    base = 1.0 / np.arange(1, E + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(L)]) * rng.uniform(0.7, 1.3, (L, E)) * 1000


def _check_consistent(phy2log, log2phy, logcnt, E):
    phy2log, log2phy, logcnt = (np.asarray(a) for a in (phy2log, log2phy, logcnt))
    L, R = phy2log.shape
    for l in range(L):
        assert (np.bincount(phy2log[l], minlength=E) == logcnt[l]).all()
        for e in range(E):
            slots = log2phy[l, e]
            assert (slots[logcnt[l, e]:] == -1).all()
            assert sorted(slots[: logcnt[l, e]]) == sorted(np.flatnonzero(phy2log[l] == e))


def test_readme_example_matches_deepseek_eplb():
    w = torch.tensor(README["weight"])
    G = README["num_gpus"]
    phy2log, log2phy, logcnt = rebalance_experts(w, README["num_replicas"], README["num_groups"], README["num_nodes"], G)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.tolist() == README["eplb_phy2log"]
    loads = gpu_loads(w.numpy(), phy2log, G)  # [L, G]
    ratio = loads.max(1) / loads.mean(1)
    print("README max/mean per layer:", ratio, "EPLB:", README["eplb_max_over_mean"])
    assert (ratio <= np.array(README["eplb_max_over_mean"]) + 1e-9).all()
    _check_consistent(phy2log, log2phy, logcnt, w.shape[1])


def test_numpy_in_numpy_out_and_slot_convention():
    rng = np.random.default_rng(0)
    L, E, R, G, N, groups = 3, 32, 48, 8, 2, 4
    w = _zipf(rng, L, E)
    phy2log, log2phy, logcnt = rebalance_experts(w, R, groups, N, G)
    assert isinstance(phy2log, np.ndarray) and phy2log.dtype == np.int64 and phy2log.shape == (L, R)
    _check_consistent(phy2log, log2phy, logcnt, E)
    # Hierarchical: slot r sits on GPU r // (R // G), GPUs node by node, a group's replicas in one node.
    node_of_slot = (np.arange(R) // (R // G)) // (G // N)  # [R]
    group = phy2log // (E // groups)  # [L, R]
    for l in range(L):
        for g in range(groups):
            assert len(np.unique(node_of_slot[group[l] == g])) == 1
    # Even split over replicas: per-GPU loads add up to the layer's load.
    assert np.allclose(gpu_loads(w, phy2log, G).sum(1), w.sum(1))


def test_global_policy_when_groups_do_not_split_over_nodes():
    rng = np.random.default_rng(1)
    w = _zipf(rng, 2, 24)
    got = rebalance_experts(w, 36, 3, 2, 12)  # 3 groups over 2 nodes: global policy
    want = eplb_policy(w, 36, 3, 2, 12, policy="global")
    for a, b in zip(got, want):
        assert (a == b).all()


def test_zero_row_is_placed_as_uniform():
    w = np.zeros((2, 8))
    w[0] = np.arange(1, 9)
    phy2log, _, logcnt = rebalance_experts(w, 16, 1, 1, 4)
    assert (logcnt[1] == 2).all()  # uniform: every expert replicated once
    assert (np.bincount(phy2log[0], minlength=8) >= 1).all()


@pytest.mark.parametrize("weight, args, words", [
    (np.ones(8), (8, 1, 1, 4), "shape"),
    (-np.ones((2, 8)), (8, 1, 1, 4), "negative"),
    (np.full((2, 8), np.nan), (8, 1, 1, 4), "NaN"),
    (np.full((2, 8), np.inf), (8, 1, 1, 4), "infinite"),
    (np.zeros((2, 8)), (8, 1, 1, 4), "zero everywhere"),
    (np.ones((2, 8)), (6, 1, 1, 2), "at least one slot per expert"),
    (np.ones((2, 8)), (10, 1, 1, 4), "multiple of 4"),
    (np.ones((2, 8)), (12, 2, 4, 6), "evenly over 4 nodes"),
    (np.ones((2, 9)), (12, 2, 2, 4), "equal groups"),
])
def test_bad_input_raises_one_line(weight, args, words):
    with pytest.raises(PlacementError) as err:
        rebalance_experts(weight, *args)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_forced_hierarchical_needs_groups_over_nodes():
    with pytest.raises(PlacementError, match="global policy"):
        eplb_policy(np.ones((1, 12)), 12, 3, 2, 4, policy="hierarchical")
    with pytest.raises(PlacementError, match="unknown EPLB policy"):
        eplb_policy(np.ones((1, 12)), 12, 3, 2, 4, policy="fancy")
