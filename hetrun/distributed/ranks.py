"""The rank layout a profile declares: which devices each torch.distributed rank owns, who holds the dense parts."""

from __future__ import annotations

from dataclasses import dataclass

from hetrun.errors import ProfileError
from hetrun.profile import Device, Profile, load_profile

DENSE_LAYOUTS = ("every_rank", "rank0")


@dataclass(frozen=True)
class RankLayout:
    """Devices per rank, the dense layout, the collective backend asked for, and the failure timeouts."""

    profile_name: str
    ranks: tuple[tuple[str, ...], ...]  # rank -> device ids it owns
    dense: str  # every_rank (DP-attention + EP) or rank0
    collective: str  # auto, gloo, nccl or hccl, as the profile asks
    timeout_s: float
    startup_timeout_s: float
    heartbeat_s: float

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def rank_of(self, device_id: str) -> int:
        """The rank that owns a device."""
        for r, ids in enumerate(self.ranks):
            if device_id in ids:
                return r
        raise ProfileError(f"device '{device_id}' is on no rank of profile '{self.profile_name}'")

    def holds_dense(self, rank: int) -> bool:
        """Whether `rank` runs the model's dense parts (attention, embeddings) on requests of its own."""
        return self.dense == "every_rank" or rank == 0

    @property
    def dense_ranks(self) -> tuple[int, ...]:
        return tuple(r for r in range(self.world_size) if self.holds_dense(r))

    def describe(self, rank: int) -> str:
        """`rank 1 (ov:0, sim:1)`: a rank and its devices, for messages."""
        ids = self.ranks[rank] if 0 <= rank < self.world_size else ()
        return f"rank {rank} ({', '.join(ids) or 'no devices'})"


def resolve_layout(profile: "Profile | str | dict") -> RankLayout | None:
    """The profile's rank layout, or None when it declares no `distributed:` section (one process)."""
    profile = load_profile(profile)
    spec = profile.model.distributed
    if spec is None:
        return None
    if spec.ranks == "per_device":
        ranks = [(d.id,) for d in profile.devices]
    elif spec.ranks == "per_group":
        groups: dict[str, list[str]] = {}
        for d in profile.devices:
            groups.setdefault(d.group, []).append(d.id)
        ranks = [tuple(ids) for ids in groups.values()]
    else:  # explicit lists of group or device ids, checked by load_profile
        ranks = [tuple(d.id for d in profile.devices if d.group in names or d.id in names) for names in spec.ranks]
    return RankLayout(profile.name, tuple(ranks), spec.dense, spec.collective, spec.timeout_s,
                      spec.startup_timeout_s, spec.heartbeat_s)


def rank_devices(profile: Profile, layout: RankLayout, rank: int) -> tuple[Device, ...]:
    """The Device objects rank `rank` owns."""
    ids = set(layout.ranks[rank])
    return tuple(d for d in profile.devices if d.id in ids)


def wanted_collective(profile: Profile, layout: RankLayout) -> str:
    """The collective backend the profile asks for: nccl between NVIDIA ranks, hccl between Ascend, else gloo."""
    if layout.collective != "auto":
        return layout.collective
    vendors = set()
    for d in profile.devices:
        if d.backend in ("simulated", "openvino") or d.type.kind == "cpu":
            vendors.add("host")  # runs on the host CPU: tokens live in host memory
        else:
            vendors.add(d.type.vendor)
    if vendors == {"nvidia"}:
        return "nccl"
    if vendors == {"huawei"}:
        return "hccl"
    return "gloo"
