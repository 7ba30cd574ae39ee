"""All-to-all dispatch and combine, sized from the Plan: which device receives how many token copies, over
which link (inside a node or between nodes), in which format.

Per MoE layer, pi[d] is the chance that one routed pick lands on device d (expert popularity times the
plan's replica shares). A token makes top_k picks. Dedup modes:
  expert  one copy per routed (token, expert) pair (DeepEP low-latency kernels);
  device  one copy per destination device, 1 - (1 - pi[d])^k of them;
  node    one RDMA copy per destination node, then NVLink forwarding inside it (DeepEP normal kernels);
          with group-limited routing (n_group, topk_group) the node-hit chance follows the groups each node
          holds;
  all     every token to every other device that holds experts (an allgather, and a reduce-scatter back), as
          TensorRT-LLM exchanges tokens between attention-DP ranks.
Links: devices of one type in one node use that type's scale-up link (NVLink, HCCS); devices of different
types in one node use the profile's links.intra_node (PCIe), else the slower scale-up; nodes talk over
links.inter_node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrun.errors import ProfileError
from hetrun.formats import DTYPE_BYTES
from hetrun.profile import LinkSpec
from hetrun.roofline import transfer_seconds
from hetrun.sim.roles import Layout


@dataclass(frozen=True)
class Traffic:
    """Token copies per token of the micro-batch, per MoE layer and device [L, D]."""

    send_inter: np.ndarray
    send_intra: np.ndarray
    recv_inter: np.ndarray
    recv_intra: np.ndarray
    routed_rows: np.ndarray  # [L, D] routed (token, expert) pairs each device computes, per token


@dataclass(frozen=True)
class Links:
    inter: LinkSpec | None
    intra: tuple[LinkSpec, ...]  # [D] each device's link inside its node


def pick_probability(layout: Layout) -> np.ndarray:
    """[L, D] chance that one routed pick of a layer lands on each device."""
    plan = layout.plan
    return plan.per_device(np.take_along_axis(layout.popularity, plan.phy2log, 1) * plan.share)


def _node_hit(layout: Layout, pi: np.ndarray) -> np.ndarray:
    """[L, N] chance that a token sends at least one pick to each node."""
    spec, plan = layout.plan.spec, layout.plan
    k = spec.top_k
    N = int(layout.node.max()) + 1
    L = plan.num_layers
    node_pi = np.zeros((L, N))
    np.add.at(node_pi.T, layout.node, pi.T)
    G, kg = spec.router.n_group, spec.router.topk_group
    if G <= 1 or kg >= G:
        return 1.0 - (1.0 - np.clip(node_pi, 0, 1)) ** k
    # share of each group's pick mass that lands on each node
    E = spec.num_experts
    gsize = E // G
    mass = np.take_along_axis(layout.popularity, plan.phy2log, 1) * plan.share  # [L, R]
    node_of_slot = layout.node[plan.device_of]  # [L, R]
    group_of_slot = plan.phy2log // gsize  # [L, R]
    f = np.zeros((L, N, G))
    np.add.at(f, (np.repeat(np.arange(L), plan.num_slots), node_of_slot.ravel(), group_of_slot.ravel()), mass.ravel())
    f /= np.maximum(f.sum(1, keepdims=True), 1e-300)
    miss_per_group = (1.0 - np.clip(f, 0, 1)) ** (k / kg)  # [L, N, G]
    x = miss_per_group.sum(-1)  # [L, N] "groups that miss the node", continuous
    miss = np.ones((L, N))
    for j in range(kg):  # choosing kg groups out of G without replacement
        miss *= np.clip((x - j) / (G - j), 0.0, 1.0)
    return 1.0 - miss


def traffic(layout: Layout, source_weight: np.ndarray) -> Traffic:
    """Token copies each device sends and receives per token of the micro-batch.

    `source_weight` [D]: share of the micro-batch's tokens each device holds (attention devices; sums to 1).
    """
    spec = layout.plan.spec
    k = spec.top_k
    pi = pick_probability(layout)  # [L, D]
    L, D = pi.shape
    w = np.asarray(source_weight, dtype=np.float64)  # [D]
    node = layout.node
    same = node[:, None] == node[None, :]  # [D, D]
    eye = np.eye(D, dtype=bool)
    intra_pair = same & ~eye
    inter_pair = ~same
    mode = layout.settings.dispatch_dedup
    routed = k * pi  # [L, D] picks per token landing on each device
    if mode in ("expert", "device", "all"):
        if mode == "expert":
            c = routed
        elif mode == "device":
            c = 1.0 - (1.0 - np.clip(pi, 0, 1)) ** k  # [L, D] copies per token
        else:
            c = np.broadcast_to(layout.is_expert.astype(np.float64), pi.shape)
        send_inter = w[None, :] * (c @ inter_pair.T.astype(np.float64))  # [L, D]: sum over destinations
        send_intra = w[None, :] * (c @ intra_pair.T.astype(np.float64))
        recv_inter = c * (inter_pair.astype(np.float64) @ w)[None, :]
        recv_intra = c * (intra_pair.astype(np.float64) @ w)[None, :]
        return Traffic(send_inter, send_intra, recv_inter, recv_intra, routed)
    # node dedup: one RDMA copy per remote node, NVLink inside
    h = 1.0 - (1.0 - np.clip(pi, 0, 1)) ** k  # [L, D]
    g = _node_hit(layout, pi)  # [L, N]
    N = g.shape[1]
    per_node = np.bincount(node, minlength=N).astype(np.float64)  # [N] devices per node
    w_node = np.bincount(node, weights=w, minlength=N)  # [N] token share per node
    remote_nodes = g.sum(1, keepdims=True) - g[:, node]  # [L, D] remote nodes a token of device d reaches
    send_inter = w[None, :] * remote_nodes
    arriving = g * (w.sum() - w_node)[None, :]  # [L, N] tokens arriving at each node from elsewhere
    recv_inter = arriving[:, node] / per_node[node][None, :]  # spread over the node's NICs
    recv_intra = h * (w.sum() - w)[None, :]  # everything not from itself arrives over the node's links
    local_sum = np.zeros((L, N))
    np.add.at(local_sum.T, node, h.T)
    send_intra = w[None, :] * (local_sum[:, node] - h)  # direct sends inside the own node
    # each arrival is forwarded to the node's devices it targets; the node's NICs share that work
    send_intra += arriving[:, node] * local_sum[:, node] / np.maximum(g[:, node], 1e-12) / per_node[node][None, :]
    return Traffic(send_inter, send_intra, recv_inter, recv_intra, routed)


def device_links(layout: Layout) -> Links:
    prof = layout.profile
    devs = layout.devices
    multi = len(set(layout.node.tolist())) > 1
    inter = prof.model.links.get("inter_node")
    if multi and inter is None:
        raise ProfileError(f"profile '{prof.name}' spans several nodes but has no links.inter_node; add one "
                           "(bandwidth_gbs per device, latency_us, efficiency)")
    intra = []
    types_in_node: dict[int, set[str]] = {}
    for d, n in zip(devs, layout.node.tolist()):
        types_in_node.setdefault(n, set()).add(d.type.name)
    for d, n in zip(devs, layout.node.tolist()):
        if len(types_in_node[n]) == 1:
            intra.append(d.type.scale_up)
        elif "intra_node" in prof.model.links:
            intra.append(prof.model.links["intra_node"])
        else:
            slow = min((x for x in devs if layout.node[devs.index(x)] == n), key=lambda x: x.type.scale_up.bandwidth_gbs)
            intra.append(slow.type.scale_up)
    return Links(inter, tuple(intra))


def alltoall_seconds(links: Links, send_inter, recv_inter, send_intra, recv_intra, token_bytes: float) -> np.ndarray:
    """[..., D] seconds each device spends in one all-to-all; inputs are token copies [..., D]."""
    intra_bw = np.array([x.bandwidth_gbs * x.efficiency for x in links.intra])  # [D] GB/s
    intra_lat = np.array([x.latency_us for x in links.intra])
    intra_bytes = np.maximum(send_intra, recv_intra) * token_bytes
    t_intra = np.where(intra_bytes > 0, intra_lat * 1e-6 + intra_bytes / (intra_bw * 1e9), 0.0)
    if links.inter is None:
        return t_intra
    inter_bytes = np.maximum(send_inter, recv_inter) * token_bytes
    t_inter = transfer_seconds(inter_bytes, links.inter.bandwidth_gbs, links.inter.efficiency, links.inter.latency_us)
    return np.maximum(t_intra, t_inter)


def token_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token's hidden state on the wire; FP8 carries one FP32 scale per 128 channels."""
    b = hidden * DTYPE_BYTES[dtype]
    if dtype == "fp8":
        b += 4.0 * -(-hidden // 128)
    return b
