"""The Plan: for every MoE layer, which physical expert slots exist, where each lives, and each device's precision.

A Plan is plain data, EPLB-compatible: `phy2log` [L, R] names the logical expert of each physical slot (EPLB's
glossary: a logical expert is the model's expert e, a physical expert one copy of it on a device),
`device_of` [L, R] the device of each slot, `share` [L, R] the fraction of its expert's tokens each slot takes.
hetrun.placement.planner makes plans, hetrun.placement.rebalance changes them for a new load; the runtime, the
bundle and the simulator read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from hetrun.errors import PlacementError
from hetrun.formats import expert_bytes
from hetrun.spec import MoESpec

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Plan:
    spec: MoESpec
    profile_name: str
    device_ids: tuple[str, ...]  # device index -> device id
    precision: dict[str, str]  # device id -> precision
    phy2log: np.ndarray  # [L, R] logical expert of each physical slot
    device_of: np.ndarray  # [L, R] device index of each slot
    share: np.ndarray  # [L, R] fraction of its expert's tokens each slot takes (sums to 1 per expert)
    shared_device_of: np.ndarray  # [L, S] device index of each shared expert
    predicted: dict = field(default_factory=dict)  # per-device load, time, memory (filled by the planner)

    def __post_init__(self):
        self.validate()

    # ---- EPLB-compatible views ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def logcnt(self) -> np.ndarray:
        """Replicas per logical expert [L, E]."""
        e = self.spec.num_experts
        return np.stack([np.bincount(row, minlength=e) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        """Physical slots of each logical expert [L, E, maxcnt], -1 padded."""
        cnt = self.logcnt
        out = -np.ones((self.num_layers, self.spec.num_experts, int(cnt.max())), dtype=np.int64)
        for li, row in enumerate(self.phy2log):
            fill = np.zeros(self.spec.num_experts, dtype=np.int64)
            for r, e in enumerate(row):
                out[li, e, fill[e]] = r
                fill[e] += 1
        return out

    def validate(self) -> None:
        """Raise PlacementError unless every expert has a slot, shares sum to one and devices exist."""
        L, E = self.spec.num_moe_layers, self.spec.num_experts
        if self.phy2log.ndim != 2 or self.phy2log.shape[1] == 0:
            raise PlacementError(f"plan phy2log must be a non-empty [layers, slots] array, got shape {self.phy2log.shape}")
        if self.phy2log.shape != self.device_of.shape or self.phy2log.shape != self.share.shape:
            raise PlacementError("plan arrays phy2log, device_of and share must have the same [L, R] shape")
        if self.phy2log.shape[0] != L:
            raise PlacementError(f"plan has {self.phy2log.shape[0]} layers, model '{self.spec.name}' has {L} MoE layers; re-plan")
        if self.phy2log.min() < 0 or self.phy2log.max() >= E:
            raise PlacementError(f"plan names experts outside 0..{E - 1}; re-plan")
        if (self.logcnt == 0).any():
            li, e = np.argwhere(self.logcnt == 0)[0]
            raise PlacementError(f"plan leaves expert {e} of MoE layer {li} without a slot; re-plan")
        if self.device_of.min() < 0 or self.device_of.max() >= len(self.device_ids):
            raise PlacementError("plan names a device index outside the profile; re-plan")
        if self.shared_device_of.shape != (L, self.spec.num_shared_experts):
            raise PlacementError(f"plan shared_device_of must be [{L}, {self.spec.num_shared_experts}] (MoE layers x "
                                 f"shared experts), got {list(self.shared_device_of.shape)}; re-plan")
        if self.shared_device_of.size and (self.shared_device_of.min() < 0
                                           or self.shared_device_of.max() >= len(self.device_ids)):
            raise PlacementError("plan puts a shared expert on a device index outside the profile; re-plan")
        sums = np.zeros((L, E))
        for li in range(L):
            np.add.at(sums[li], self.phy2log[li], self.share[li])
        if not np.isfinite(self.share).all() or (self.share < 0).any() or not np.allclose(sums, 1.0, atol=1e-6):
            raise PlacementError("plan shares must be non-negative and sum to 1 over each expert's replicas")
        missing = set(self.device_ids) - set(self.precision)
        if missing:
            raise PlacementError(f"plan has no precision for devices {sorted(missing)}")

    def per_device(self, per_slot: np.ndarray) -> np.ndarray:
        """Sum a per-slot quantity [L, R] over the slots of each device: [L, D]."""
        out = np.zeros((self.num_layers, len(self.device_ids)))
        np.add.at(out, (np.repeat(np.arange(self.num_layers), self.num_slots), self.device_of.ravel()),
                  np.asarray(per_slot, dtype=float).ravel())
        return out

    def slots_on(self, layer: int, device: int) -> np.ndarray:
        """Physical slot ids of MoE layer `layer` (0-based among MoE layers) on device index `device`."""
        return np.nonzero(self.device_of[layer] == device)[0]

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "spec": self.spec.to_dict(), "profile": self.profile_name,
                "device_ids": list(self.device_ids), "precision": dict(self.precision),
                "phy2log": self.phy2log.tolist(), "device_of": self.device_of.tolist(), "share": self.share.tolist(),
                "shared_device_of": self.shared_device_of.tolist(), "predicted": self.predicted}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            if d.get("format") != PLAN_FORMAT:
                raise PlacementError(f"plan format {d.get('format')!r} is not {PLAN_FORMAT}; re-plan with this hetrun")
            return cls(MoESpec.from_dict(d["spec"]), d["profile"], tuple(d["device_ids"]), dict(d["precision"]),
                       np.asarray(d["phy2log"], dtype=np.int64), np.asarray(d["device_of"], dtype=np.int64),
                       np.asarray(d["share"], dtype=np.float64),
                       np.asarray(d["shared_device_of"], dtype=np.int64).reshape(len(d["phy2log"]), -1),
                       d.get("predicted", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlacementError(f"malformed plan: {type(e).__name__}: {e}; write plans with Plan.to_json()") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlacementError(f"plan is not valid JSON: {e}") from None


def device_weight_bytes(plan: Plan) -> dict[str, int]:
    """Expert weight bytes each device of a plan holds at its precision: one copy per (expert, device), shared
    experts included (replicas of an expert on one device share a copy, as the dispatcher's sessions do)."""
    spec = plan.spec
    out = {d: 0 for d in plan.device_ids}
    for li in range(plan.num_layers):
        for e, d in sorted(set(zip(plan.phy2log[li].tolist(), plan.device_of[li].tolist()))):
            dev = plan.device_ids[d]
            out[dev] += expert_bytes(plan.precision[dev], spec.hidden_size, spec.moe_intermediate_size)
        for d in plan.shared_device_of[li].tolist():
            dev = plan.device_ids[d]
            out[dev] += expert_bytes(plan.precision[dev], spec.hidden_size, spec.shared_intermediate_size)
    return out
