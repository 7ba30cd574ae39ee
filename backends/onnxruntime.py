"""onnxruntime: CPU execution provider here; CUDA, TensorRT and CANN providers where installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.registry import probe_backend

from hetrun.errors import BackendUnavailable

if TYPE_CHECKING:
    from hetrun.profile import DeviceType

# Execution providers in priority order, per catalog device kind.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "gpu": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "npu": ["CANNExecutionProvider"],
}


class OnnxRuntimeBackend(Backend):
    caps = BackendCaps(
        name="onnxruntime",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"cpu", "gpu", "npu"}),
        real_hardware=True,
        install_hint="install it with `pip install onnxruntime` (or onnxruntime-gpu / onnxruntime-cann for accelerators)",
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light
        except ImportError as e:
            return Availability(False, f"onnxruntime is not installed ({e})")
        providers = tuple(ort.get_available_providers())
        return Availability(True, devices=providers, details={"version": ort.__version__})

    @classmethod
    def has_device(cls, device_type: "DeviceType") -> bool:
        """Whether an execution provider for this catalog type is installed and finds such a device here."""
        providers = set(probe_backend("onnxruntime").devices)
        if not providers & set(PROVIDERS.get(device_type.kind, [])):
            return False
        if device_type.kind == "gpu":  # the CUDA EP is listed even on machines without a GPU
            return device_type.vendor == "nvidia" and probe_backend("nvidia").ok
        if device_type.kind == "npu":
            return device_type.vendor == "huawei" and probe_backend("ascend").ok
        return True

    def providers(self) -> list[str]:
        """Execution providers for this device, best first; raises when none is installed."""
        import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light

        have = set(ort.get_available_providers())
        wanted = PROVIDERS.get(self.device.type.kind, [])
        chosen = [p for p in wanted if p in have]
        if not chosen:
            raise BackendUnavailable(
                f"onnxruntime has no execution provider for {self.device.id} ({self.device.type.kind}): wants "
                f"{' or '.join(wanted) or 'none'}, installed are {', '.join(sorted(have))}; install the vendor build "
                "(onnxruntime-gpu, onnxruntime-cann) or use backend: simulated")
        return chosen

    def load(self, graph: bytes, name: str, meta: dict) -> ExpertSession:
        import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light

        return OrtSession(ort.InferenceSession(graph, sess_options=session_options(self.threads),
                                               providers=self.providers()))


def session_options(threads: int | None):
    """onnxruntime session options for expert graphs that share the host's cores with torch."""
    import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle ORT threads must not spin: torch runs routing and combine on the same cores right after each call.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Fold DequantizeLinear of FP8/INT8 weights into FP32 at load: otherwise onnxruntime dequantizes FP8 on every
    # call (slow) and rewrites INT8 DequantizeLinear+MatMul into MatMulNBits with INT8 activations (0.5% error).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.log_severity_level = 3
    return opts


class OrtSession(ExpertSession):
    def __init__(self, sess):
        self.sess = sess
        self.input = sess.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input: x})[0]
