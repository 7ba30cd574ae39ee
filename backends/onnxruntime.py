"""onnxruntime: CPU execution provider here; CUDA, TensorRT and CANN providers where installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from hetrun.backends import host_cpu
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.graph_files import load_through_folder
from hetrun.backends.ort_threads import session_options as session_options  # (the name other modules import)
from hetrun.backends.registry import probe_backend

from hetrun.errors import BackendUnavailable
from hetrun.formats import base_precision, expert_bytes

if TYPE_CHECKING:
    import onnx
    import torch

    from hetrun.profile import DeviceType
    from hetrun.runtime.graphs import ExpertGraph

# Execution providers in priority order, per catalog device kind.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "gpu": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "npu": ["CANNExecutionProvider"],
}


# Formats onnxruntime's CPU kernels cannot compute from compressed weights: it holds them as FP32 after load.
HELD_AS_FP32_ON_CPU = frozenset({"bf16", "fp16", "fp8", "fp8-w8a16", "int8"})
# Resident bytes per stored byte of the MatMulNBits formats on CPUs (weights prepacked with their scales), as
# tests/test_resident_memory.py measures them on 35 MB (FP32) experts with onnxruntime 1.32; others: 1.
ORT_CPU_RESIDENT = {"int8-w8a8": 1.09, "int4": 1.08}


class OnnxRuntimeBackend(Backend):
    caps = BackendCaps(
        name="onnxruntime",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"cpu", "gpu", "npu"}),
        real_hardware=True,
        install_hint="install it with `pip install onnxruntime` (or onnxruntime-gpu / onnxruntime-cann for accelerators)",
        loads_in_process=True,  # takes the ExpertGraph and reads its weights from a folder (hetrun.backends.graph_files)
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

    @classmethod
    def resident_expert_bytes(cls, precision: str, device_type, hidden: int, intermediate: int) -> float:
        """On CPUs the formats of HELD_AS_FP32_ON_CPU take FP32's bytes, MatMulNBits formats ORT_CPU_RESIDENT's."""
        if device_type.kind != "cpu":
            return float(expert_bytes(precision, hidden, intermediate))
        held = "fp32" if precision in HELD_AS_FP32_ON_CPU else precision
        factor = ORT_CPU_RESIDENT.get(held, ORT_CPU_RESIDENT.get(base_precision(held), 1.0))
        return factor * expert_bytes(held, hidden, intermediate)

    @classmethod
    def preferred_precisions(cls, device_type: "DeviceType") -> list[str]:
        """On CPUs: INT8 weights with INT8 activations first (MatMulNBits' fast kernel); BF16 and FP16 last, since
        onnxruntime has no CPU kernel for them (it computes them with FP32 copies of the weights)."""
        if device_type.kind != "cpu":
            return list(device_type.precisions)
        return host_cpu.reorder(list(device_type.precisions), ["int8-w8a8"], ["bf16", "fp16"])

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

    def load(self, graph: "bytes | onnx.ModelProto | ExpertGraph", name: str, meta: dict) -> ExpertSession:
        if self.device.type.kind == "cpu" and self.precision in HELD_AS_FP32_ON_CPU:
            host_cpu.say_held_as_fp32("onnxruntime", self.precision)
        return OrtSession(self.load_graph(graph))

    def load_graph(self, graph: "bytes | onnx.ModelProto | ExpertGraph"):
        """An onnxruntime InferenceSession of any graph (not an expert's: several inputs and outputs, bound by the
        caller), with the options and providers this device's expert sessions get. A graph given as a proto or an
        ExpertGraph (consumed: its weights are written out) is read from a temporary folder with its weights as
        external data; serialized bytes are read as they are."""
        return inference_session(graph, session_options(self.threads), self.providers())


def inference_session(graph: "bytes | onnx.ModelProto | ExpertGraph", options, providers: list[str]):
    """An onnxruntime InferenceSession of `graph`: serialized bytes as they are, a proto or an ExpertGraph from a
    temporary folder (hetrun.backends.graph_files.load_through_folder)."""
    import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light

    def session(path_or_bytes):
        return ort.InferenceSession(path_or_bytes, sess_options=options, providers=providers)

    return load_through_folder(graph, session, session)




class OrtSession(ExpertSession):
    """An onnxruntime CPU session fed through I/O binding: rows in and out as torch tensors, no copies."""

    def __init__(self, sess):
        self.sess = sess
        # onnxruntime's Python wrapper keeps the serialized model for the session's life (its own "TODO: holding
        # the memory indefinitely"): a second copy of every weight. The session has its own; drop that one.
        if getattr(sess, "_model_bytes", None) is not None:
            sess._model_bytes = None
        self.input = sess.get_inputs()[0].name
        self.output = sess.get_outputs()[0].name
        width = sess.get_outputs()[0].shape[-1]
        self.width = width if isinstance(width, int) else None  # output columns; None: the input's (D -> D)
        self.binding = sess.io_binding()
        # One call on a zero row here: a session read from a folder maps some weights in (scales, zero points) and
        # sets up kernel state on its first call. Made at load, it counts in the memory deploy measures per expert
        # (about 1.6 MB of a 2048 x 5632 INT4 expert's 20 MB), and the first step does not pay for it.
        k = sess.get_inputs()[0].shape[-1]
        if isinstance(k, int):
            import torch  # heavy: backends stay light until a session runs

            self.forward(torch.zeros(1, k))

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        x = x.contiguous()  # [N, D]
        y = x.new_empty((x.shape[0], self.width or x.shape[1]))  # [N, D] for an expert, [N, width] for a linear
        self.binding.bind_input(self.input, "cpu", 0, np.float32, tuple(x.shape), x.data_ptr())
        self.binding.bind_output(self.output, "cpu", 0, np.float32, tuple(y.shape), y.data_ptr())
        self.sess.run_with_iobinding(self.binding)
        return y
