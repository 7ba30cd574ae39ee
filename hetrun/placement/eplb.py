"""DeepSeek's expert-parallel load balancer (EPLB), reimplemented in numpy.

Same signature, return values and slot convention as DeepSeek's ``eplb.rebalance_experts``:
physical slot ``r`` lives on GPU ``r // (num_replicas // num_gpus)`` and GPUs are numbered
node by node. It assumes identical GPUs; ``hetrun.placement.search`` handles mixed ones.

Load tables: a layer whose load row is all zero is placed as if its load were uniform; a table
that is zero everywhere is rejected, because there is nothing to balance.
"""

from __future__ import annotations

import numpy as np

from hetrun.errors import PlacementError
from hetrun.placement.loads import load_matrix


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Place ``num_replicas`` physical experts per layer on ``num_gpus`` identical GPUs.

    Args:
        weight: [L, E] load (tokens) of each logical expert, numpy or torch.
        num_replicas: physical expert slots per layer, R >= E and a multiple of num_gpus.
        num_groups: expert groups (group-limited routing); E must be a multiple of it.
        num_nodes: server nodes; num_gpus must be a multiple of it.
        num_gpus: GPUs in total.

    Returns:
        phy2log [L, R] logical expert of each slot, log2phy [L, E, maxcnt] slots of each
        logical expert padded with -1, logcnt [L, E] replica counts. torch int64 tensors when
        ``weight`` is a torch tensor, numpy int64 arrays otherwise.

    Uses the hierarchical policy when ``num_groups % num_nodes == 0`` (groups packed to nodes,
    hottest experts replicated inside each node, replicas packed to that node's GPUs), the
    global policy otherwise (the same with one group and one node).
    """
    policy = "hierarchical" if num_nodes >= 1 and num_groups % num_nodes == 0 else "global"
    return eplb_policy(weight, num_replicas, num_groups, num_nodes, num_gpus, policy=policy)


def eplb_policy(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                policy: str = "hierarchical"):
    """``rebalance_experts`` with the policy forced: "hierarchical" or "global"."""
    w = load_matrix(weight)  # [L, E]
    if policy not in ("hierarchical", "global"):
        raise PlacementError(f"unknown EPLB policy {policy!r}; use 'hierarchical' or 'global'")
    _check_sizes(w.shape[1], num_replicas, num_groups, num_nodes, num_gpus, policy == "hierarchical")
    if policy == "global":
        num_groups, num_nodes = 1, 1
    phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    log2phy = _log2phy(phy2log, rank, logcnt)
    return _like(weight, phy2log), _like(weight, log2phy), _like(weight, logcnt)


def gpu_loads(weight, phy2log, num_gpus: int, cost=None) -> np.ndarray:
    """Per-GPU load [L, G] of a placement, each expert's tokens split evenly over its replicas.

    Slot r counts on GPU ``r // (R // num_gpus)``. With ``cost`` [G] (seconds per token) the
    result is per-GPU time instead of tokens.
    """
    w = np.asarray(weight, dtype=np.float64)  # [L, E]
    p2l = np.asarray(phy2log, dtype=np.int64)  # [L, R]
    rows = np.arange(w.shape[0])[:, None]
    cnt = np.zeros_like(w)  # [L, E]
    np.add.at(cnt, (np.broadcast_to(rows, p2l.shape), p2l), 1.0)
    per_slot = w[rows, p2l] / cnt[rows, p2l]  # [L, R]
    loads = per_slot.reshape(w.shape[0], num_gpus, -1).sum(-1)  # [L, G]
    return loads if cost is None else loads * np.asarray(cost, dtype=np.float64)


def _check_sizes(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 hierarchical: bool) -> None:
    if min(num_replicas, num_groups, num_nodes, num_gpus) < 1:
        raise PlacementError("num_replicas, num_groups, num_nodes and num_gpus must all be >= 1")
    if num_replicas < num_experts:
        raise PlacementError(f"{num_replicas} slots for {num_experts} experts; give at least one slot per expert")
    if num_replicas % num_gpus:
        raise PlacementError(f"{num_replicas} slots do not split evenly over {num_gpus} GPUs; use a multiple of {num_gpus}")
    if num_gpus % num_nodes:
        raise PlacementError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes; use a multiple of {num_nodes}")
    if hierarchical and num_groups % num_nodes:
        raise PlacementError(f"{num_groups} expert groups do not split evenly over {num_nodes} nodes; "
                             f"use the global policy or a group count that is a multiple of the node count")
    if hierarchical and num_experts % num_groups:
        raise PlacementError(f"{num_experts} experts do not split into {num_groups} equal groups; fix num_groups")


def _hierarchical(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    # phy2log [L, R], replica rank [L, R], logcnt [L, E] for EPLB's hierarchical policy.
    L, E = w.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = E // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. groups -> nodes; renumber experts so that node n owns the block [n*E/N, (n+1)*E/N).
    group_load = w.reshape(L, num_groups, group_size).sum(-1)  # [L, G]
    node, rank = _balanced_packing(group_load, num_nodes)  # [L, G]
    new_group = node * groups_per_node + rank  # [L, G]
    log2new = (new_group[:, :, None] * group_size + np.arange(group_size)).reshape(L, E)  # [L, E]
    new2log = np.argsort(log2new, axis=1)  # [L, E]

    # 2. replicate the hottest experts inside each node.
    node_w = np.take_along_axis(w, new2log, 1).reshape(L * num_nodes, experts_per_node)  # [L*N, E/N]
    phy2new, phy_rank, new_cnt = _replicate(node_w, slots_per_node)  # [L*N, R/N] x2, [L*N, E/N]

    # 3. replicas -> GPUs of the node, equal counts per GPU.
    phy_w = np.take_along_axis(node_w / new_cnt, phy2new, 1)  # [L*N, R/N]
    gpu, pos = _balanced_packing(phy_w, num_gpus // num_nodes)  # [L*N, R/N]
    slot_of_phy = gpu * slots_per_gpu + pos  # [L*N, R/N]
    phy_of_slot = np.argsort(slot_of_phy, axis=1)  # [L*N, R/N]

    slot2new = np.take_along_axis(phy2new, phy_of_slot, 1)  # [L*N, R/N] node-local ids
    slot2new = (slot2new.reshape(L, num_nodes, -1)
                + (np.arange(num_nodes) * experts_per_node)[None, :, None]).reshape(L, num_replicas)  # [L, R]
    phy2log = np.take_along_axis(new2log, slot2new, 1)  # [L, R]
    slot_rank = np.take_along_axis(phy_rank, phy_of_slot, 1).reshape(L, num_replicas)  # [L, R]
    logcnt = np.take_along_axis(new_cnt.reshape(L, E), log2new, 1)  # [L, E]
    return phy2log, slot_rank, logcnt


def _balanced_packing(w: np.ndarray, num_packs: int):
    # Greedy packing of items [N, M] into num_packs packs of M / num_packs items each.
    # Items go heaviest first (ties: lower index first) to the lightest pack that still has room
    # (ties: lower pack first). Returns pack [N, M] and position inside the pack [N, M].
    N, M = w.shape
    per_pack = M // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(M), (N, M)).copy(), np.zeros((N, M), dtype=np.int64)
    order = np.argsort(-w, axis=1, kind="stable")  # [N, M]
    rows = np.arange(N)
    pack_w = np.zeros((N, num_packs))  # [N, P]
    pack_n = np.zeros((N, num_packs), dtype=np.int64)  # [N, P]
    pack = np.empty((N, M), dtype=np.int64)
    pos = np.empty((N, M), dtype=np.int64)
    for k in range(M):
        item = order[:, k]  # [N]
        p = np.where(pack_n < per_pack, pack_w, np.inf).argmin(1)  # [N]
        pack[rows, item] = p
        pos[rows, item] = pack_n[rows, p]
        pack_w[rows, p] += w[rows, item]
        pack_n[rows, p] += 1
    return pack, pos


def _replicate(w: np.ndarray, num_phy: int):
    # Give num_phy - M extra replicas, one at a time, to the expert with the most load per replica.
    # Returns phy2log [N, num_phy] (the first M slots are the experts themselves), replica rank
    # [N, num_phy] and replica count [N, M].
    N, M = w.shape
    rows = np.arange(N)
    phy2log = np.tile(np.arange(num_phy), (N, 1))  # [N, P]
    rank = np.zeros((N, num_phy), dtype=np.int64)
    cnt = np.ones((N, M), dtype=np.int64)
    for k in range(M, num_phy):
        e = (w / cnt).argmax(1)  # [N]
        phy2log[:, k] = e
        rank[:, k] = cnt[rows, e]
        cnt[rows, e] += 1
    return phy2log, rank, cnt


def _log2phy(phy2log: np.ndarray, rank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    # [L, E, maxcnt] slots of each logical expert in replica-rank order, -1 padded.
    L, R = phy2log.shape
    maxcnt = int(logcnt.max())
    out = np.full((L, logcnt.shape[1], maxcnt), -1, dtype=np.int64)
    out[np.arange(L)[:, None], phy2log, rank] = np.arange(R)
    return out


def _like(template, a: np.ndarray):
    a = np.ascontiguousarray(a, dtype=np.int64)
    if hasattr(template, "detach"):
        import torch  # only when the caller passed torch tensors: placement does not need torch
        return torch.from_numpy(a)
    return a
