"""OpenVINO: CPU here; Intel GPU and NPU where present. The inference precision hint follows the plan and the device.

Device strings: a profile's cpu devices run on "CPU"; gpu devices on the GPUs OpenVINO lists ("GPU", or "GPU.0",
"GPU.1", ...), profile device index modulo their count; npu devices on "NPU". The NPU compiles static shapes only, so
NPU experts are compiled per token-count bucket (powers of two) and inputs are zero-padded to their bucket.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import numpy as np
from hetrun.backends import host_cpu
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.graph_files import load_through_folder
from hetrun.backends.registry import probe_backend

from hetrun.errors import BackendUnavailable
from hetrun.formats import base_precision, expert_bytes
from hetrun.once import warn_once

if TYPE_CHECKING:
    import onnx
    import torch

    from hetrun.runtime.graphs import ExpertGraph

log = logging.getLogger("hetrun")

# OpenVINO device family per catalog device kind.
DEVICE_STRINGS = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# Per device family, the INFERENCE_PRECISION_HINT that keeps each graph precision's numerics.
#   CPU: OpenVINO on AVX-512-BF16 CPUs defaults to bf16, so everything but bf16 graphs is pinned to f32.
#   GPU: the GPU plugin defaults to f16; fp32 graphs are pinned to f32, 16-bit and weight-compressed graphs run in f16.
#   NPU: computes in f16 whatever the graph says (it has no f32 datapath).
PRECISION_HINTS = {
    "CPU": {"bf16": "bf16", "fp16": "f32", "fp32": "f32", "fp8": "f32", "int8": "f32", "int4": "f32"},
    "GPU": {"bf16": "f16", "fp16": "f16", "fp32": "f32", "fp8": "f16", "int8": "f16", "int4": "f16"},
    "NPU": {"bf16": "f16", "fp16": "f16", "fp32": "f16", "fp8": "f16", "int8": "f16", "int4": "f16"},
}
# Device properties worth showing in `hetrun devices`, where the plugin has them.
CAPABILITY_KEYS = ("FULL_DEVICE_NAME", "DEVICE_TYPE", "DEVICE_ARCHITECTURE", "OPTIMIZATION_CAPABILITIES",
                   "GPU_DEVICE_TOTAL_MEM_SIZE", "GPU_EXECUTION_UNITS_COUNT", "DEVICE_GOPS")
NPU_MAX_BUCKET = 4096  # largest static token count compiled for the NPU; longer inputs run in chunks
# Resident bytes per byte of the format an expert is held in (FP32 for FP8, and for BF16/FP16 without native BF16),
# after OpenVINO 2026.4's CPU plugin has compiled it and run it once, by requested precision, as
# tests/test_resident_memory.py measures them on 35 MB (FP32) experts: the plugin keeps the model's constants and
# repacks a second copy for its kernels (release_memory() frees neither). INT8 experts in nn.Linear layout
# ([N, K] codes, Gemm transB) take 2.08-2.11x; the first INT8 graph a process compiles adds about 5 MB once besides
# (2.38x on two 17 MB experts), a one-time cost the test warms up like the plugin's own.
OV_CPU_RESIDENT = {"fp32": 2.0, "bf16": 2.0, "fp16": 2.0, "fp8": 2.3, "int8": 2.1, "int4": 2.4}


def device_family(device_string: str) -> str:
    """'GPU.1' -> 'GPU'."""
    return device_string.split(".", 1)[0]


class OpenVinoBackend(Backend):
    caps = BackendCaps(
        name="openvino",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"cpu", "gpu", "npu"}),
        real_hardware=True,
        excluded=frozenset({"int8-w8a8", "int4-w4a8"}),  # its INT8/INT4 kernels keep FP32 activations (exact), not W8A8
        install_hint="install it with `pip install hetrun[intel]` (Intel GPU/NPU also need Intel's GPU or NPU drivers)",
        loads_in_process=True,  # takes the ExpertGraph and reads its weights from a folder (hetrun.backends.graph_files)
    )

    @classmethod
    def probe(cls) -> Availability:
        try:
            import openvino as ov  # heavy: loaded only on probe or load, so the registry stays light
        except ImportError as e:
            return Availability(False, f"openvino is not installed ({e}): pip install hetrun[intel]")
        try:
            core = _core()
            devices = tuple(core.available_devices)
        except Exception as e:  # a broken driver must not take the probe down
            return Availability(False, f"openvino is installed but cannot list devices: {e}")
        return Availability(True, devices=devices,
                            details={"version": ov.__version__, "devices": {d: device_capabilities(core, d) for d in devices}})

    @classmethod
    def has_device(cls, device_type) -> bool:
        """Whether OpenVINO lists a device of this catalog type's kind (Intel GPUs only for gpu types)."""
        family = DEVICE_STRINGS.get(device_type.kind)
        if family is None or (device_type.kind in ("gpu", "npu") and device_type.vendor != "intel"):
            return False
        return any(device_family(d) == family for d in probe_backend("openvino").devices)

    def device_string(self) -> str:
        """The OpenVINO device this profile device maps to; raises when it is not present."""
        want = DEVICE_STRINGS.get(self.device.type.kind)
        have = self.probe().devices
        matches = sorted(d for d in have if device_family(d) == want)
        if want is None or not matches:
            raise BackendUnavailable(
                f"OpenVINO has no {want or self.device.type.kind} device for {self.device.id}; found {', '.join(have) or 'none'}; "
                "install Intel's GPU/NPU drivers or use backend: simulated")
        return matches[self.device.index % len(matches)]

    def precision_hint(self, device_string: str) -> str:
        """INFERENCE_PRECISION_HINT for this backend's precision on that device."""
        family = device_family(device_string)
        base = base_precision(self.precision)  # fp8-w8a16 -> fp8, int4-g32 -> int4
        hint = PRECISION_HINTS.get(family, PRECISION_HINTS["CPU"]).get(base, "f32")
        if family == "CPU" and hint == "bf16" and "BF16" not in _cpu_capabilities():
            # Without native BF16, the bf16 hint emulates BF16 everywhere (5-50x slower) and OpenVINO's f32->bf16
            # Convert misrounds; in f32 the graph for target "openvino" rounds to BF16 exactly (see hetrun.runtime.graphs).
            hint = "f32"
        if family == "NPU" and self.precision in ("fp32", "bf16"):
            warn_once(("openvino", "npu", self.precision), "the Intel NPU computes %s experts in f16 (it has no %s "
                      "datapath)", self.precision, self.precision)
        return hint

    @classmethod
    def resident_expert_bytes(cls, precision: str, device_type, hidden: int, intermediate: int) -> float:
        """On CPUs: FP8, and BF16/FP16 without native BF16, are held as FP32; each format times OV_CPU_RESIDENT."""
        if device_type.kind != "cpu":
            return float(expert_bytes(precision, hidden, intermediate))
        narrow = precision in ("fp8", "fp8-w8a16") or (precision in ("bf16", "fp16") and not host_cpu.native_bf16())
        held = "fp32" if narrow else precision
        return OV_CPU_RESIDENT.get(base_precision(precision), 1.0) * expert_bytes(held, hidden, intermediate)

    @classmethod
    def preferred_precisions(cls, device_type) -> list[str]:
        """On a CPU without native BF16 (AVX512-BF16, AMX): INT8 weight-only first (compressed, exact, about twice
        FP32's speed at one token), BF16 and FP16 last (emulated in FP32); with native BF16, the catalog's order."""
        if device_type.kind != "cpu" or host_cpu.native_bf16():
            return list(device_type.precisions)
        return host_cpu.reorder(list(device_type.precisions), ["int8"], ["bf16", "fp16"])

    def graph_target(self) -> str:
        """"openvino" (narrow floats rounded in f32 arithmetic) where the device computes in f32, else standard ONNX."""
        return "openvino" if self.precision_hint(self.device_string()) == "f32" else "onnxruntime"

    def compile_config(self, device_string: str = "CPU") -> dict:
        """Compile properties for a device: only those its plugin supports (the NPU lacks several CPU ones)."""
        # Without DYNAMIC_QUANTIZATION_GROUP_SIZE=0, OpenVINO quantizes activations to INT8 for compressed weights.
        cfg = {"INFERENCE_PRECISION_HINT": self.precision_hint(device_string), "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        if device_family(device_string) == "CPU":
            # Pinned threads of two compiled models (or of OpenVINO and torch) share one core instead of running at
            # once; the dispatcher runs devices concurrently, so leave placement to the OS.
            cfg["ENABLE_CPU_PINNING"] = False
            return cfg
        supported = _supported_properties(_core(), device_string)
        return {k: v for k, v in cfg.items() if supported is None or k in supported}

    def load(self, graph: "bytes | onnx.ModelProto | ExpertGraph", name: str, meta: dict) -> ExpertSession:
        narrow = self.precision in ("fp8", "fp8-w8a16") or (self.precision in ("bf16", "fp16")
                                                             and not host_cpu.native_bf16())
        if self.device.type.kind == "cpu" and narrow:
            host_cpu.say_held_as_fp32("openvino", self.precision)
        core = _core()
        device = self.device_string()
        config = self.compile_config(device)

        def compiled(model) -> ExpertSession:
            if device_family(device) == "NPU":
                return StaticShapeSession(core, model, device, config)
            return OvSession(core.compile_model(model, device, config))

        # read at once, not mapped: mapped weights would become resident only when a call touches them, from a
        # temporary file, where the memory deploy measures per expert would not see them
        return load_through_folder(graph, lambda path: compiled(core.read_model(path, config={"ENABLE_MMAP": False})),
                                   lambda data: compiled(core.read_model(io.BytesIO(data))))


def device_capabilities(core, device: str) -> dict:
    """The CAPABILITY_KEYS this device reports, as plain strings, numbers and lists."""
    out = {}
    supported = _supported_properties(core, device) or set()
    for key in CAPABILITY_KEYS:
        if key not in supported:
            continue
        try:
            value = core.get_property(device, key)
        except Exception:  # noqa: BLE001 -- a property a plugin lists but cannot read is skipped
            continue
        out[key] = list(value) if isinstance(value, (list, tuple)) else value if isinstance(value, (int, float)) else str(value)
    return out


def _cpu_capabilities() -> tuple[str, ...]:
    try:
        return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001
        return ()


def _supported_properties(core, device: str) -> set[str] | None:
    try:
        return set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    except Exception:  # noqa: BLE001
        return None


def _core():
    import openvino as ov  # heavy: loaded only on probe or load, so the registry stays light

    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


_CORE = None


class OvSession(ExpertSession):
    """An OpenVINO infer request fed shared-memory tensors: rows in and out as torch tensors, no copies."""

    def __init__(self, compiled):
        import openvino as ov  # heavy: loaded only on load, so the registry stays light

        self.request = compiled.create_infer_request()
        self.tensor = ov.Tensor
        # one row through it now: the CPU plugin repacks compressed weights on the first inference, so the memory
        # and the time it takes belong to loading, not to the first step that routes a token here
        hidden = compiled.inputs[0].get_partial_shape()[1]
        if hidden.is_static:
            self.request.infer([np.zeros((1, hidden.get_length()), np.float32)])
        width = compiled.outputs[0].get_partial_shape()[1]
        self.width = width.get_length() if width.is_static else None  # output columns; None: the input's

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        x = x.contiguous()  # [N, D]
        y = x.new_empty((x.shape[0], self.width or x.shape[1]))  # [N, D] for an expert, [N, width] for a linear
        self.request.set_input_tensor(self.tensor(x.numpy(), shared_memory=True))
        self.request.set_output_tensor(self.tensor(y.numpy(), shared_memory=True))
        self.request.infer()
        return y


def bucket(tokens: int) -> int:
    """The static token count an input of `tokens` rows runs at: the next power of two, at most NPU_MAX_BUCKET."""
    return min(NPU_MAX_BUCKET, 1 << max(0, tokens - 1).bit_length())


class StaticShapeSession(ExpertSession):
    """An expert compiled per token-count bucket for devices without dynamic shapes (the Intel NPU)."""

    def __init__(self, core, model, device: str, config: dict):
        self.core, self.model, self.device, self.config = core, model, device, config
        self.hidden = model.inputs[0].get_partial_shape()[1].get_length()
        self.requests: dict[int, object] = {}  # bucket -> infer request

    def _request(self, rows: int):
        if rows not in self.requests:
            static = self.model.clone()
            static.reshape({static.inputs[0]: [rows, self.hidden]})
            self.requests[rows] = self.core.compile_model(static, self.device, self.config).create_infer_request()
        return self.requests[rows]

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return x.new_tensor(self.run(x.numpy()))  # the NPU pads to static shapes: one copy each way

    def run(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, max(len(x), 1), NPU_MAX_BUCKET):
            part = x[start:start + NPU_MAX_BUCKET]  # [n, D]
            rows = bucket(len(part))
            padded = np.zeros((rows, x.shape[1]), np.float32)
            padded[:len(part)] = part
            outs.append(self._request(rows).infer([padded])[0][:len(part)].copy())
        return np.concatenate(outs) if outs else np.zeros((0, x.shape[1]), np.float32)
