"""OpenVINO: CPU here; Intel GPU and NPU where present. The inference precision hint follows the plan."""

from __future__ import annotations

import io

import numpy as np

from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.errors import BackendUnavailable

# OpenVINO device string per catalog device kind.
DEVICE_STRINGS = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# The hint that keeps each graph precision's numerics; OpenVINO on AVX-512-BF16 CPUs defaults to bf16 otherwise.
PRECISION_HINTS = {"bf16": "bf16", "fp16": "f32", "fp32": "f32", "fp8": "f32", "int8": "f32", "int4": "f32"}


class OpenVinoBackend(Backend):
    caps = BackendCaps(
        name="openvino",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"cpu", "gpu", "npu"}),
        real_hardware=True,
        install_hint="install it with `pip install openvino` (Intel GPU/NPU also need Intel's drivers)",
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import openvino as ov
        except ImportError as e:
            return Availability(False, f"openvino is not installed ({e})")
        try:
            devices = tuple(ov.Core().available_devices)
        except Exception as e:  # a broken driver must not take the probe down
            return Availability(False, f"openvino is installed but cannot list devices: {e}")
        return Availability(True, devices=devices, details={"version": ov.__version__})

    def device_string(self) -> str:
        """The OpenVINO device this profile device maps to; raises when it is not present."""
        want = DEVICE_STRINGS.get(self.device.type.kind)
        have = self.probe().devices
        if want is None or not any(d == want or d.startswith(want + ".") for d in have):
            raise BackendUnavailable(
                f"OpenVINO has no {want or self.device.type.kind} device for {self.device.id}; found {', '.join(have) or 'none'}; "
                "install Intel's GPU/NPU drivers or use backend: simulated")
        return want

    def compile_config(self) -> dict:
        # Without DYNAMIC_QUANTIZATION_GROUP_SIZE=0, OpenVINO quantizes activations to INT8 for compressed weights.
        cfg = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS.get(self.precision, "f32"),
               "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        return cfg

    def load(self, graph: bytes, name: str, meta: dict) -> ExpertSession:
        core = _core()
        model = core.read_model(io.BytesIO(graph))
        return OvSession(core.compile_model(model, self.device_string(), self.compile_config()))


def _core():
    import openvino as ov

    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


_CORE = None


class OvSession(ExpertSession):
    def __init__(self, compiled):
        self.request = compiled.create_infer_request()

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer([x], share_inputs=True)[0].copy()
