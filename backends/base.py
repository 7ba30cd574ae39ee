"""What every backend is: capabilities as data, a probe that never raises, and sessions that run expert graphs."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from hetrun.formats import base_precision, expert_bytes

if TYPE_CHECKING:
    import torch

    from hetrun.profile import Device


@dataclass(frozen=True)
class BackendCaps:
    """What a backend can do, as data (in the spirit of ggml's dev_caps)."""

    name: str
    precisions: frozenset[str]  # catalog precisions it executes, variants included (fp8-w8a16 with fp8, ...)
    device_kinds: frozenset[str]  # catalog kinds it can drive: cpu, gpu, npu, accelerator
    real_hardware: bool  # False for the simulated backend
    install_hint: str = ""
    excluded: frozenset[str] = frozenset()  # variants it does not run although it runs their base
    # load() takes the ExpertGraph itself, in this process, built in_process (weights held beside the proto): no
    # copies of the weights into protobuf and out again (each at about 1 GB/s of fresh memory here)
    loads_in_process: bool = False


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    devices: tuple[str, ...] = ()  # real device strings found, e.g. ("CPU",) or ("cuda:0",)
    details: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """What one call to an expert session cost: measured wall time, and modeled device figures."""

    tokens: int = 0
    wall_s: float = 0.0
    modeled_s: float = 0.0
    modeled_j: float = 0.0


class ExpertSession(abc.ABC):
    """One compiled expert graph on one device: x [N, D] float32 -> y [N, D] float32, as torch tensors on `device`."""

    device: str = "cpu"  # the torch device the session takes its rows on and returns them on

    @abc.abstractmethod
    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        """x [N, D] float32 on `device` -> y [N, D] float32 on `device`."""

    def run(self, x: np.ndarray) -> np.ndarray:
        """x [N, D] float32 numpy -> y [N, D] float32 numpy (tools and tests; the dispatcher calls forward)."""
        import torch  # heavy: backends stay light until a session runs

        y = self.forward(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return y.detach().to("cpu").numpy()

    def modeled_seconds(self, tokens: int) -> float:
        """Device time this call would take on the modeled device (0 for real devices: they are measured)."""
        return 0.0


class Backend(abc.ABC):
    """A backend drives one device of a profile. Subclasses declare `caps` and implement probe/load."""

    caps: ClassVar[BackendCaps]

    def __init__(self, device: "Device", precision: str, threads: int | None = None):
        self.device = device
        self.precision = precision
        self.threads = threads

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Availability:
        """Whether this backend can run here, and why not. Never raises."""

    @classmethod
    def supports(cls, precision: str) -> bool:
        """Whether this backend executes expert graphs of this precision (a variant such as fp8-w8a16: its base)."""
        return base_precision(precision) in cls.caps.precisions and precision not in cls.caps.excluded

    @classmethod
    def resident_expert_bytes(cls, precision: str, device_type, hidden: int, intermediate: int) -> float:
        """Bytes one expert at `precision` keeps resident once this backend has loaded it: its stored bytes, unless
        the backend holds the format otherwise (CPU runtimes expand some formats to FP32). The planner counts
        memory with it; deploy measures it (model.hetrun.memory)."""
        return float(expert_bytes(precision, hidden, intermediate))

    @classmethod
    def preferred_precisions(cls, device_type) -> list[str]:
        """The device type's precisions in this backend's order of preference here: the catalog's order, unless the
        backend knows better for the hardware it finds (CPU backends read the host's real capabilities)."""
        return list(device_type.precisions)

    def graph_target(self) -> str:
        """The `target` to build this backend's expert graphs for (see hetrun.runtime.graphs.build_expert_graph)."""
        return self.caps.name

    @abc.abstractmethod
    def load(self, graph: bytes, name: str, meta: dict) -> ExpertSession:
        """Compile one serialized ONNX expert graph for this device (the ExpertGraph itself where
        caps.loads_in_process says so). `meta` carries flops/bytes per token."""
