"""Huawei Ascend NPUs: experts in torch on `npu` devices through torch_npu, or graphs through onnxruntime's CANN EP.

torch_npu is never imported by hetrun until a probe has shown, in a child process, that importing it works: installing
torch-npu without Huawei's CANN makes `import torch_npu` fail (and, through torch's backend autoloading, `import
torch` too). The probe checks, in order, and names the first thing missing:
  1. torch_npu installed (or onnxruntime with CANNExecutionProvider);
  2. CANN's libraries (libhccl.so), found on LD_LIBRARY_PATH, ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME or the
     default /usr/local/Ascend install, or the linker cache;
  3. the NPU driver (libascend_hal.so);
  4. a child `python -c "import torch, torch_npu"` that counts NPUs (torch.npu.device_count()).
Weights: FP16/BF16/FP32 run as dense torch matmuls on the NPU, INT8 graphs through
torch_npu.npu_weight_quant_batchmatmul (INT8 weights, per-channel scales, BF16 activations). 910B/910C have no FP8.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.nvidia import OrtGpuSession
from hetrun.backends.ort_threads import plain_session_options
from hetrun.backends.registry import probe_backend
from hetrun.backends.torch_expert import DENSE_DTYPES, DenseLinear, TorchExpertSession

from hetrun.errors import BackendUnavailable
from hetrun.once import warn_once

log = logging.getLogger("hetrun")

INSTALL = "pip install hetrun[ascend]"
SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
CANN_LIB = "libhccl.so"
DRIVER_LIB = "libascend_hal.so"
PROBE_TIMEOUT_S = 120
# Child-process probe: torch's backend autoloading is off so that a broken torch_npu shows its own import error.
_PROBE_CODE = """
import json, torch, torch_npu
n = torch.npu.device_count()
props = [torch.npu.get_device_properties(i) for i in range(n)]
print("HETRUN_PROBE " + json.dumps({
    "torch_npu": getattr(torch_npu, "__version__", "?"), "count": n,
    "devices": [{"index": i, "name": p.name, "memory_bytes": int(getattr(p, "total_memory", 0))} for i, p in enumerate(props)],
    "int8_matmul": hasattr(torch_npu, "npu_weight_quant_batchmatmul"),
    "w8a8_matmul": hasattr(torch_npu, "npu_quant_matmul")}))
"""
def _search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        if os.environ.get(var):
            dirs += [Path(os.environ[var]) / "lib64", Path(os.environ[var]) / "lib"]
    dirs += [Path("/usr/local/Ascend/ascend-toolkit/latest/lib64"), Path("/usr/local/Ascend/driver/lib64"),
             Path("/usr/local/Ascend/driver/lib64/driver"), Path("/usr/local/Ascend/driver/lib64/common")]
    return dirs


def find_library(filename: str) -> str | None:
    """Where a shared library is: the search dirs above, then the linker cache; None when nowhere."""
    for d in _search_dirs():
        if (d / filename).is_file():
            return str(d / filename)
    return ctypes.util.find_library(filename.removeprefix("lib").removesuffix(".so"))


def _run_probe_child() -> tuple[dict | None, str]:
    """Import torch_npu in a child process: its findings, or the import error's last line."""
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE_CODE], capture_output=True, text=True, env=env,
                             timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"importing torch_npu took longer than {PROBE_TIMEOUT_S} s"
    for line in out.stdout.splitlines():
        if line.startswith("HETRUN_PROBE "):
            return json.loads(line.removeprefix("HETRUN_PROBE ")), ""
    lines = [ln.strip() for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
    return None, lines[-1] if lines else f"exit status {out.returncode}"


def explain_import_error(err: str) -> str:
    """A probe reason for torch_npu's import error: the missing CANN library by name when there is one."""
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", err)
    if missing:
        return (f"torch_npu installed but CANN not found ({missing.group(1)} missing): install Huawei CANN toolkit "
                f"and source {SET_ENV}")
    return f"torch_npu installed but `import torch_npu` fails: {err}"


def _cann_ep_available() -> bool:
    try:
        import onnxruntime as ort  # heavy: loaded only when an NPU expert runs, never by a probe
    except ImportError:
        return False
    return "CANNExecutionProvider" in ort.get_available_providers()


class AscendBackend(Backend):
    caps = BackendCaps(
        name="ascend",
        precisions=frozenset({"fp32", "fp16", "bf16", "int8"}),
        device_kinds=frozenset({"npu"}),
        real_hardware=True,
        excluded=frozenset({"int8-w8a8", "int4-w4a8"}),  # torch_npu's INT8 weight matmul keeps BF16 activations
        install_hint=(f"`{INSTALL}` installs torch-npu; it also needs Huawei's CANN toolkit (source {SET_ENV}) and the "
                      "Ascend NPU driver"),
    )

    @classmethod
    def probe(cls) -> Availability:
        has_torch_npu = importlib.util.find_spec("torch_npu") is not None
        has_cann_ep = _cann_ep_available()
        if not has_torch_npu and not has_cann_ep:
            return Availability(False, f"torch_npu is not installed ({INSTALL})")
        what = "torch_npu installed" if has_torch_npu else "onnxruntime has CANNExecutionProvider"
        if find_library(CANN_LIB) is None:
            return Availability(False, f"{what} but CANN not found ({CANN_LIB} missing): install Huawei CANN toolkit "
                                       f"and source {SET_ENV}")
        if find_library(DRIVER_LIB) is None:
            return Availability(False, f"{what} but the Ascend NPU driver is not found ({DRIVER_LIB} missing): install "
                                       "the Ascend driver and firmware (`npu-smi info` must list the NPUs)")
        if not has_torch_npu:
            return Availability(True, devices=("CANNExecutionProvider",), details={"path": "onnxruntime CANN"})
        found, err = _run_probe_child()
        if found is None:
            if has_cann_ep:
                return Availability(True, devices=("CANNExecutionProvider",),
                                    details={"path": "onnxruntime CANN", "torch_npu": explain_import_error(err)})
            return Availability(False, explain_import_error(err))
        if found["count"] == 0:
            return Availability(False, "no Ascend NPU visible (torch.npu.device_count() is 0): check `npu-smi info` "
                                       "and ASCEND_RT_VISIBLE_DEVICES", details=found)
        devices = tuple(f"npu:{d['index']} {d['name']}" for d in found["devices"])
        return Availability(True, devices=devices, details={**found, "path": "torch_npu"})

    @classmethod
    def has_device(cls, device_type) -> bool:
        """Whether a device of this catalog type is here: a Huawei NPU that torch_npu or the CANN EP can drive."""
        return device_type.kind == "npu" and device_type.vendor == "huawei" and probe_backend("ascend").ok

    def _availability(self) -> Availability:
        avail = probe_backend("ascend")
        if not avail.ok:
            raise BackendUnavailable(f"device '{self.device.id}' wants an Ascend NPU: {avail.reason}; "
                                     f"{self.caps.install_hint}")
        return avail

    def load(self, graph: bytes, name: str, meta: dict) -> ExpertSession:
        avail = self._availability()
        if avail.details.get("path") == "torch_npu":
            index = self.device.index % int(avail.details["count"])
            return self.load_torch(graph, npu_device(index), bool(avail.details.get("int8_matmul")))
        return self._load_cann(graph)

    def load_torch(self, graph: bytes, device: str, int8_kernel: bool) -> ExpertSession:
        """The torch path on one torch device (`npu:N` here; tests pass `cpu` with a stand-in INT8 kernel)."""
        from hetrun.backends.graph_matrices import read_expert_matrices  # imports onnx: only when a graph loads

        m = read_expert_matrices(graph)
        if self.precision == "int8":
            if int8_kernel and m.gate_up_q is not None and m.down_q is not None:
                gate_up, down = Int8WeightLinear(m.gate_up_q, device), Int8WeightLinear(m.down_q, device)
                if gate_up.ok and down.ok:
                    return TorchExpertSession(gate_up, down, device, f"torch_npu INT8 weight matmul on {device}",
                                              extras=m.extras)
            warn_once(("ascend", "int8"), "INT8 experts on %s run as BF16 matmuls of their dequantized weights (%s)",
                      device, "torch_npu lacks npu_weight_quant_batchmatmul" if not int8_kernel
                      else "the graph's INT8 weights are not per-channel")
            dtype = "bfloat16"
        else:
            dtype = DENSE_DTYPES[self.precision]
        return TorchExpertSession(DenseLinear(m.gate_up, dtype, device), DenseLinear(m.down, dtype, device), device,
                                  f"torch {dtype} matmul on {device}",
                                  extras=m.extras)

    def _load_cann(self, graph: bytes) -> ExpertSession:
        import onnxruntime as ort  # heavy: only when an expert loads

        opts = plain_session_options()
        opts.log_severity_level = 3
        # The graph already encodes its precision (casts, dequantization): CANN must not lower FP32 ops to FP16.
        cann = {"device_id": str(self.device.index), "precision_mode": "must_keep_origin_dtype"}
        try:
            sess = ort.InferenceSession(graph, sess_options=opts,
                                        providers=[("CANNExecutionProvider", cann), "CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- CANN runtime errors carry the fix in their text
            raise BackendUnavailable(f"onnxruntime's CANN EP cannot open an expert for '{self.device.id}': "
                                     f"{' '.join(str(e).split())[:300]}") from None
        return OrtGpuSession(sess)


def npu_device(index: int) -> str:
    """The torch device string of NPU `index`, importing torch_npu (only after the probe said it imports)."""
    import torch_npu  # noqa: F401  -- registers the `npu` device with torch

    return f"npu:{index}"


class Int8WeightLinear:
    """x [M, K] float32 -> x @ W [M, N] float32 with INT8 weights dequantized inside torch_npu's matmul.

    torch_npu.npu_weight_quant_batchmatmul(x, weight [K, N] int8, antiquant_scale [N], antiquant_offset [N]) computes
    x @ ((weight + offset) * scale); activations and scales go in BF16 (FP16 scales underflow for small weights).
    `ok` is False when the graph's scales are not per output channel.
    """

    def __init__(self, q, device: str, kernel=None):
        import torch  # heavy: loaded only when an NPU expert runs, never by a probe

        col = q.column_scale() if q.zero is None else _column(q.scale)
        zero = None if q.zero is None else _column(q.zero)
        self.ok = col is not None and (q.zero is None or zero is not None) and q.codes.dtype == np.int8
        if not self.ok:
            return
        self.kernel = kernel
        self.weight = torch.from_numpy(np.ascontiguousarray(q.codes)).to(device)  # [K, N] int8
        self.scale = torch.from_numpy(col).to(device=device, dtype=torch.bfloat16)  # [N]
        self.offset = None if zero is None else torch.from_numpy(-zero).to(device=device, dtype=torch.bfloat16)  # [N]

    def __call__(self, x):
        import torch  # heavy: loaded only when an NPU expert runs, never by a probe

        kernel = self.kernel
        if kernel is None:
            import torch_npu  # vendor stack: loaded only when an NPU expert runs, never by a probe

            kernel = torch_npu.npu_weight_quant_batchmatmul
        return kernel(x.to(torch.bfloat16), self.weight, self.scale, self.offset).float()


def _column(full: np.ndarray) -> np.ndarray | None:
    return full[0].astype(np.float32) if np.all(full == full[:1]) else None
