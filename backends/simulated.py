"""Simulated device: executes the real expert graph on the host CPU and charges the modeled device's time and energy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.onnxruntime import OrtSession, inference_session, session_options
from hetrun.backends.registry import probe_backend

from hetrun.roofline import expert_seconds

if TYPE_CHECKING:
    from hetrun.runtime.graphs import ExpertGraph


class SimulatedBackend(Backend):
    caps = BackendCaps(
        name="simulated",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"cpu", "gpu", "npu", "accelerator"}),
        real_hardware=False,
        loads_in_process=True,  # takes the ExpertGraph and reads its weights from a folder (hetrun.backends.graph_files)
    )

    @classmethod
    def probe(cls) -> Availability:
        host = probe_backend("onnxruntime")
        if not host.ok:
            return Availability(False, f"the simulated backend executes graphs with onnxruntime: {host.reason}")
        return Availability(True, devices=("host CPU",))

    def load(self, graph: "bytes | ExpertGraph", name: str, meta: dict) -> ExpertSession:
        return SimulatedSession(inference_session(graph, session_options(self.threads), ["CPUExecutionProvider"]),
                                self, meta)


class SimulatedSession(OrtSession):
    """The real expert graph on the host CPU (onnxruntime), charged at the modeled device's speed."""

    def __init__(self, sess, backend: SimulatedBackend, meta: dict):
        super().__init__(sess)
        self.backend = backend
        self.meta = meta

    def modeled_seconds(self, tokens: int) -> float:
        m = self.meta
        return expert_seconds(self.backend.device.type, self.backend.precision, tokens, m["hidden"], m["intermediate"],
                              m["weight_bytes"])
