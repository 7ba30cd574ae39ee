"""NVIDIA GPUs: expert graphs through onnxruntime's CUDA (or TensorRT) execution provider, and true FP8 on Hopper/Ada.

Paths, picked per expert at load time:
  - precision fp8 on compute capability >= 8.9 with a CUDA build of torch: the graph's E4M3 weights and scales are read
    back out of its initializers and multiplied with `torch._scaled_mm` (E4M3 x E4M3, FP32 accumulation, BF16 out).
    Hopper (9.x) uses DeepSeek-V3's scaling: 1x128 activation tiles and 128x128 weight blocks. Other GPUs, or a torch
    or cuBLAS that refuses block scales, use row-wise scales: one per token and one per output channel.
    Each weight is checked once against an emulation of `_scaled_mm` before use; a mode that disagrees is dropped.
  - every other precision (and fp8 below 8.9): onnxruntime with CUDAExecutionProvider (TF32 off for fp32 graphs),
    or TensorrtExecutionProvider first when HETRUN_NVIDIA_EP=tensorrt (TensorRT builds one engine per expert: slow to load).
  - no onnxruntime GPU build but a CUDA build of torch: the graph's weights run as dense torch matmuls.
Nothing here imports torch or onnxruntime before a probe or a load asks for it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.ort_threads import plain_session_options
from hetrun.backends.registry import probe_backend
from hetrun.backends.torch_expert import DENSE_DTYPES, DenseLinear, TorchExpertSession
from hetrun.kernels.fp8 import quantize_fp8

from hetrun.errors import BackendUnavailable
from hetrun.once import warn_once

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hetrun")

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
BLOCK = 128  # DeepSeek-V3 recipe: 1x128 activation tiles, 128x128 weight blocks
E4M3_MAX = 448.0
TRT_MAX_TOKENS = 8192  # rows per TensorRT call: the engine's optimization profile spans 1..TRT_MAX_TOKENS
INSTALL = "pip install hetrun[nvidia]"


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    @property
    def has_fp8(self) -> bool:
        return self.capability >= FP8_MIN_CAPABILITY

    def describe(self) -> str:
        return f"cuda:{self.index} {self.name} (cc {self.capability[0]}.{self.capability[1]}, {self.memory_bytes / 1e9:.0f} GB)"


def visible_cuda_devices() -> tuple[tuple[CudaDevice, ...], str]:
    """The CUDA devices this process sees, and why there are none when empty (torch's view if torch is a CUDA build)."""
    via_torch = _torch_cuda_devices()
    if via_torch is not None:
        return via_torch
    return _driver_devices()


def _torch_cuda_devices() -> tuple[tuple[CudaDevice, ...], str] | None:
    """Devices as a CUDA build of torch sees them; None when torch is missing or a CPU build."""
    try:
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks
    except ImportError:
        return None
    if not torch.version.cuda:
        return None
    if not torch.cuda.is_available():
        return (), (f"no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}, finds none; "
                    "check the NVIDIA driver and CUDA_VISIBLE_DEVICES)")
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append(CudaDevice(i, props.name, tuple(torch.cuda.get_device_capability(i)), int(props.total_memory)))
    return tuple(found), ""


def _driver_devices() -> tuple[tuple[CudaDevice, ...], str]:
    """Devices from the CUDA driver API through ctypes (no toolkit, no nvidia-smi)."""
    lib_name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(lib_name)
    except OSError:
        return (), f"no CUDA device visible (NVIDIA driver not found: {lib_name} is missing; install the NVIDIA driver)"
    rc = cuda.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return (), "no CUDA device visible (the NVIDIA driver reports none; check CUDA_VISIBLE_DEVICES)"
    if rc != 0:
        return (), f"no CUDA device visible (cuInit failed with CUDA error {rc}; check the driver installation)"
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    found = []
    for i in range(count.value):
        dev, major, minor, mem = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        cuda.cuDeviceGetName(name, 256, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        cuda.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        found.append(CudaDevice(i, name.value.decode(errors="replace"), (major.value, minor.value), int(mem.value)))
    if not found:
        return (), "no CUDA device visible (the NVIDIA driver reports none; check CUDA_VISIBLE_DEVICES)"
    return tuple(found), ""


def torch_cuda_ready() -> bool:
    """Whether torch is a CUDA build that sees a device (the FP8 and torch paths need it)."""
    try:
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks
    except ImportError:
        return False
    return bool(torch.version.cuda) and torch.cuda.is_available()


def ort_providers() -> tuple[str, ...]:
    """Execution providers onnxruntime offers here, plugin EPs included; () when onnxruntime is missing."""
    try:
        import onnxruntime as ort  # heavy: loaded only when a GPU expert runs or the probe asks
    except ImportError:
        return ()
    names = list(ort.get_available_providers())
    for d in getattr(ort, "get_ep_devices", lambda: [])():
        if d.ep_name not in names:
            names.append(d.ep_name)
    return tuple(names)


def fp8_modes(capability: tuple[int, int]) -> tuple[str, ...]:
    """FP8 scaling modes to try on a GPU, best first: block scales on Hopper only (cuBLAS supports them on sm90)."""
    if capability < FP8_MIN_CAPABILITY:
        return ()
    return ("block", "row") if capability[0] == 9 else ("row",)


class NvidiaBackend(Backend):
    caps = BackendCaps(
        name="nvidia",
        precisions=frozenset({"fp32", "fp16", "bf16", "fp8", "int8", "int4"}),
        device_kinds=frozenset({"gpu"}),
        real_hardware=True,
        excluded=frozenset({"int8-w8a8", "int4-w4a8"}),  # no activation-quantized INT8 path verified on GPUs yet
        install_hint=(f"`{INSTALL}` installs onnxruntime-gpu; it needs the NVIDIA driver, and FP8 needs a CUDA build "
                      "of torch on compute capability 8.9 or newer"),
    )

    @classmethod
    def probe(cls) -> Availability:
        devices, why = visible_cuda_devices()
        have = ort_providers()
        gpu_eps = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
        torch_cuda = bool(devices) and torch_cuda_ready()
        problems = [why] if not devices else []
        if "CUDAExecutionProvider" not in have and not torch_cuda:
            problems.append(f"onnxruntime has no CUDAExecutionProvider (it has {', '.join(have) or 'nothing'}): {INSTALL}")
        details = {"devices": [asdict(d) for d in devices], "onnxruntime_gpu_providers": gpu_eps,
                   "torch_cuda": torch_cuda,
                   "fp8": {f"cuda:{d.index}": (list(fp8_modes(d.capability)) if torch_cuda else []) for d in devices}}
        if problems:
            return Availability(False, "; ".join(problems), details=details)
        return Availability(True, devices=tuple(d.describe() for d in devices), details=details)

    @classmethod
    def has_device(cls, device_type) -> bool:
        """Whether a device of this catalog type is here: an NVIDIA GPU and a runtime to drive it."""
        return device_type.kind == "gpu" and device_type.vendor == "nvidia" and probe_backend("nvidia").ok

    def cuda_device(self) -> CudaDevice:
        """The GPU this profile device runs on: device index modulo the visible GPUs (several may share one)."""
        devices, why = visible_cuda_devices()
        if not devices:
            raise BackendUnavailable(f"device '{self.device.id}' wants an NVIDIA GPU: {why}")
        if self.device.index >= len(devices):
            warn_once(("nvidia", "share", self.device.group), "device group '%s' has more devices than the %d "
                      "visible GPU(s); they share GPUs round-robin", self.device.group, len(devices))
        return devices[self.device.index % len(devices)]

    def load(self, graph: bytes, name: str, meta: dict) -> ExpertSession:
        gpu = self.cuda_device()
        if self.precision == "fp8" and gpu.has_fp8 and torch_cuda_ready():
            session = self._load_fp8(graph, name, gpu)
            if session is not None:
                return session
        if "CUDAExecutionProvider" in ort_providers():
            return self._load_ort(graph, gpu, meta)
        if torch_cuda_ready():
            return self._load_torch_dense(graph, gpu)
        raise BackendUnavailable(f"device '{self.device.id}': onnxruntime has no CUDAExecutionProvider and torch is not a "
                                 f"CUDA build; {INSTALL}")

    def _load_fp8(self, graph: bytes, name: str, gpu: CudaDevice) -> ExpertSession | None:
        """The torch FP8 path, or None (with one warning) when no scaling mode works on this GPU."""
        from hetrun.backends.graph_matrices import read_expert_matrices  # imports onnx: only when a graph loads
        m = read_expert_matrices(graph)
        device = f"cuda:{gpu.index}"
        problems = []
        for mode in fp8_modes(gpu.capability):
            try:
                gate_up = fp8_gate_up(m.gate_up_q, m.gate_up, mode, device)
                down = Fp8Linear(m.down_q, m.down, mode, device)
            except Fp8Unsupported as e:
                problems.append(f"{mode}: {e}")
                continue
            return TorchExpertSession(gate_up, down, device, f"torch._scaled_mm fp8 {mode}-scaled on {device}",
                                      extras=m.extras)
        warn_once(("nvidia", "fp8", gpu.index), "FP8 matmuls unavailable on %s (%s); running FP8 experts through "
                  "onnxruntime", gpu.describe(), "; ".join(problems) or "no scaling mode")
        return None

    def _load_torch_dense(self, graph: bytes, gpu: CudaDevice) -> ExpertSession:
        from hetrun.backends.graph_matrices import read_expert_matrices  # imports onnx: only when a graph loads
        m = read_expert_matrices(graph)
        device = f"cuda:{gpu.index}"
        dtype = DENSE_DTYPES.get(self.precision, "float32")  # quantized graphs: their dequantized weights in FP32
        return TorchExpertSession(DenseLinear(m.gate_up, dtype, device), DenseLinear(m.down, dtype, device), device,
                                  f"torch {dtype} matmul on {device}",
                                  extras=m.extras)

    def _load_ort(self, graph: bytes, gpu: CudaDevice, meta: dict) -> ExpertSession:
        import onnxruntime as ort  # heavy: loaded only when a GPU expert runs or the probe asks

        opts = plain_session_options()
        # Level-2 fusions turn INT8 DequantizeLinear+MatMul into dynamically quantized INT8 activations: not the graph's
        # W8A16 arithmetic (about 1% error on CPU), so integer graphs keep to the basic level.
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if self.precision.startswith("int8")
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.log_severity_level = 3
        cuda_opts = {"device_id": str(gpu.index), "use_tf32": "0" if self.precision == "fp32" else "1"}
        want_trt = os.environ.get("HETRUN_NVIDIA_EP", "cuda").lower() == "tensorrt"
        providers: list = []
        if want_trt and "TensorrtExecutionProvider" in ort.get_available_providers():
            providers.append(("TensorrtExecutionProvider", self.tensorrt_options(gpu, meta, _input_name(graph))))
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.append(("CUDAExecutionProvider", cuda_opts))
        else:  # onnxruntime >= 1.23 may ship CUDA as a plugin EP, reached through its EP devices
            eps = [d for d in ort.get_ep_devices() if d.ep_name == "CUDAExecutionProvider"]
            opts.add_provider_for_devices([eps[gpu.index % len(eps)]], cuda_opts)
        try:
            sess = ort.InferenceSession(graph, sess_options=opts, providers=providers + ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- TensorRT libraries missing or a graph it cannot build: use CUDA
            if not providers or providers[0][0] != "TensorrtExecutionProvider":
                raise BackendUnavailable(f"onnxruntime cannot open an expert on cuda:{gpu.index}: {e}") from None
            warn_once(("nvidia", "trt"), "TensorRT execution provider failed (%s); using CUDAExecutionProvider",
                      str(e).splitlines()[0])
            sess = ort.InferenceSession(graph, sess_options=opts, providers=providers[1:] + ["CPUExecutionProvider"])
        # Rows stay on the GPU when torch can hold them there; a CPU build of torch hands host buffers to the EP.
        return OrtGpuSession(sess, f"cuda:{gpu.index}" if torch_cuda_ready() else "cpu")

    def tensorrt_options(self, gpu: CudaDevice, meta: dict, input_name: str) -> dict:
        """TensorRT EP options: one optimization profile over the token axis, cached engines, FP16 only for fp16 graphs."""
        d = meta["hidden"]
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hetrun", "tensorrt")
        return {"device_id": str(gpu.index), "trt_fp16_enable": "1" if self.precision == "fp16" else "0",
                "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache, "trt_timing_cache_enable": "1",
                "trt_profile_min_shapes": f"{input_name}:1x{d}", "trt_profile_opt_shapes": f"{input_name}:256x{d}",
                "trt_profile_max_shapes": f"{input_name}:{TRT_MAX_TOKENS}x{d}"}


def _input_name(graph: bytes) -> str:
    import onnx  # heavy: loaded only when a GPU expert runs or the probe asks

    return onnx.load_from_string(graph).graph.input[0].name


class OrtGpuSession(ExpertSession):
    """An onnxruntime session on a GPU; `providers` says which EPs it really got (TensorRT, CUDA, CPU for leftovers).

    With `device` "cuda:N" the rows stay on the GPU: torch CUDA tensors are bound to the session's input and output
    (I/O binding), so nothing crosses PCIe inside a step. With "cpu" (the CANN EP) rows go through host memory.
    """

    def __init__(self, sess, device: str = "cpu"):
        self.sess = sess
        self.input = sess.get_inputs()[0].name
        self.output = sess.get_outputs()[0].name
        self.providers = tuple(sess.get_providers())
        self.path = f"onnxruntime {self.providers[0]}"
        self.device = device
        self.binding = sess.io_binding()

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        kind, _, index = self.device.partition(":")
        y = x.new_empty(x.shape)  # [N, D] on the session's device; filled in TensorRT-profile-sized pieces
        for start in range(0, len(x), TRT_MAX_TOKENS):
            part, out = x[start:start + TRT_MAX_TOKENS].contiguous(), y[start:start + TRT_MAX_TOKENS]  # [n, D]
            self.binding.bind_input(self.input, kind, int(index or 0), np.float32, tuple(part.shape), part.data_ptr())
            self.binding.bind_output(self.output, kind, int(index or 0), np.float32, tuple(out.shape), out.data_ptr())
            self.sess.run_with_iobinding(self.binding)
        return y


class Fp8Unsupported(Exception):
    """A scaling mode that this torch / GPU combination cannot run or runs wrongly."""


def fp8_weight(m, w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 codes [K, N] and scales for x @ W: block mode [ceil(K/128), ceil(N/128)], row mode [N].

    The graph's own E4M3 codes are used when its scales already have that granularity; otherwise the graph's
    dequantized weight is quantized again (FP8 of an FP8 weight: a second rounding, visible in the error).
    """
    if m is not None and m.is_e4m3:
        grid = m.block_grid(BLOCK, BLOCK) if mode == "block" else m.column_scale()
        if grid is not None:
            return m.codes, grid
    q = quantize_fp8(np.ascontiguousarray(w.T), "e4m3", "block" if mode == "block" else "channel", BLOCK)  # [N, K]
    return q.data.T, (q.scale.T if mode == "block" else q.scale)


def fp8_gate_up(q, w: np.ndarray, mode: str, device: str, scaled_mm=None):
    """The fused gate_up projection in FP8. The graph builders quantize gate and up on block grids of their own, so
    when I is not a multiple of 128 the fused matrix has no common 128x128 grid: then gate and up run as two
    block-scaled matmuls on the graph's own codes instead of one on re-quantized weights."""
    if mode == "block" and q is not None and q.is_e4m3 and q.block_grid(BLOCK, BLOCK) is None:
        i = w.shape[1] // 2
        halves = [q.columns(0, i), q.columns(i, 2 * i)]
        if all(h.block_grid(BLOCK, BLOCK) is not None for h in halves):
            return ConcatColumns([Fp8Linear(halves[0], w[:, :i], mode, device, scaled_mm),
                                  Fp8Linear(halves[1], w[:, i:], mode, device, scaled_mm)])
    return Fp8Linear(q, w, mode, device, scaled_mm)


class ConcatColumns:
    """x -> [f(x) for f in parts] concatenated along the output columns."""

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, x):
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks

        return torch.cat([p(x) for p in self.parts], dim=-1)


def quantize_activations(x, mode: str):
    """E4M3 codes [M, K] and scales of activations x [M, K]: per 1x128 tile [M, ceil(K/128)] or per row [M, 1]."""
    import torch  # heavy: loaded only when a GPU expert runs or the probe asks

    m, k = x.shape
    a = x.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))  # scales come from finite values only
    if mode == "block":
        kb = -(-k // BLOCK)
        amax = torch.nn.functional.pad(a, (0, kb * BLOCK - k)).view(m, kb, BLOCK).amax(-1)  # [M, kb]
    else:
        amax = a.amax(-1, keepdim=True)  # [M, 1]
    scale = amax / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows or tiles stay exactly zero
    full = scale.repeat_interleave(BLOCK, dim=1)[:, :k] if mode == "block" else scale  # [M, K] or [M, 1]
    q = (x / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def emulated_scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    """torch._scaled_mm's arithmetic in FP32 on any device: (a * scale_a) @ (b * scale_b), rounded to out_dtype.

    a [M, K] and b [K, N] are FP8; scales are tensor-wise [] / [1], row-wise [M, 1] and [1, N], or DeepSeek
    block-wise [M, ceil(K/128)] and [ceil(K/128), ceil(N/128)].
    """

    m, k = a.shape
    n = b.shape[1]
    af, bf = a.float(), b.float()
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        af, bf = af * scale_a.reshape(()), bf * scale_b.reshape(())
    elif scale_a.shape == (m, 1) and scale_b.shape == (1, n):
        af, bf = af * scale_a, bf * scale_b
    else:
        af = af * scale_a.repeat_interleave(BLOCK, dim=1)[:, :k]  # [M, K]
        bf = bf * scale_b.repeat_interleave(BLOCK, dim=0)[:k].repeat_interleave(BLOCK, dim=1)[:, :n]  # [K, N]
    out = af @ bf
    return out.to(out_dtype or a.dtype)


class Fp8Linear:
    """x [M, K] float32 -> x @ W [M, N] float32 through an FP8 scaled matmul with FP32 accumulation and BF16 output.

    `scaled_mm` defaults to torch._scaled_mm; tests pass `emulated_scaled_mm` (or the real op on CPU for row mode).
    The layouts are what torch's CUDA checks ask for: b column-major; in block mode scale_a [M, K/128] with strides
    (1, M) and scale_b [K/128, N/128] with strides (1, K/128).
    """

    def __init__(self, m, w: np.ndarray, mode: str, device: str, scaled_mm=None, check: bool = True):
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks

        if mode not in ("block", "row"):
            raise ValueError(f"FP8 scaling mode must be 'block' or 'row', got {mode!r}")
        k, n = w.shape
        if k % 16 or n % 16:
            raise Fp8Unsupported(f"matrix {k}x{n}: _scaled_mm needs both dimensions divisible by 16")
        self.mode, self.device = mode, device
        self.scaled_mm = scaled_mm or torch._scaled_mm
        codes, scale = fp8_weight(m, w, mode)
        nk = torch.from_numpy(np.ascontiguousarray(codes.T).view(np.uint8)).view(torch.float8_e4m3fn)  # [N, K]
        self.b = nk.to(device).t()  # [K, N], column-major
        if mode == "block":
            self.scale_b = torch.from_numpy(np.ascontiguousarray(scale.T, dtype=np.float32)).to(device).t()  # [kb, nb]
        else:
            self.scale_b = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).to(device).reshape(1, n)
        if check:
            self._check(w)

    def __call__(self, x):
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks

        rows = x.shape[0]
        pad = -rows % 16  # cuBLASLt FP8 kernels want 16-aligned leading dimensions; zero rows cost nothing here
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        qa, sa = quantize_activations(x, self.mode)
        if self.mode == "block":
            sa = sa.t().contiguous().t()  # outer-dim-major: strides (1, M)
        out = self.scaled_mm(qa, self.b, scale_a=sa, scale_b=self.scale_b, out_dtype=torch.bfloat16,
                             use_fast_accum=False)
        return out[:rows].float()

    def _check(self, w: np.ndarray) -> None:
        """Run one small product through the real op and its emulation; raise Fp8Unsupported when they disagree."""
        import torch  # heavy: loaded only when a GPU expert runs or the probe asks

        x = torch.randn(32, w.shape[0], generator=torch.Generator().manual_seed(0)).to(self.device)  # [32, K]
        qa, sa = quantize_activations(x, self.mode)
        want = emulated_scaled_mm(qa, self.b, sa, self.scale_b, out_dtype=torch.bfloat16).float()
        try:
            got = self(x)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            raise Fp8Unsupported(" ".join(str(e).split())[:300]) from None
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        if not err <= 2e-2:  # BF16 output rounding is about 4e-3; a layout mistake is O(1)
            raise Fp8Unsupported(f"torch._scaled_mm disagrees with its emulation (relative error {err:.3g})")
