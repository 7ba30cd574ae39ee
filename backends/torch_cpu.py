"""torch on this machine's CPU: BF16 and FP16 experts held in their own dtype, half FP32's bytes.

onnxruntime and OpenVINO have no CPU kernel that computes BF16 or FP16 from the narrow weights on a CPU without native
BF16 (an AVX2 host): both hold such experts as FP32 after load, twice the format's bytes. torch multiplies a narrow
matrix by one row at about the speed of that FP32 copy (Mixtral-bench expert, one token, 2 threads, 2-core AVX2 VM:
torch BF16 1.0-1.2 ms, FP16 0.95 ms; onnxruntime on its FP32 copy 1.15 ms), but there its BF16 product is a
row-by-row kernel (7.7 ms at 8 rows, 29 ms at 32, against 7.6 and 9 ms for FP32 with the weights widened first).
So a call of at most NARROW_ROWS rows multiplies the narrow weights and a longer one widens each matrix to FP32 for
the call (1.7 ms per expert) and runs FP32's GEMM: decode at the format's bytes, prompts at FP32's speed, and the
weights resident once, narrow. A CPU with native BF16 (or FP16) multiplies the narrow weights at every row count.

Numerics are the expert graph's (hetrun.runtime.graphs, `_build_float16ish`): activations rounded to the format before
each matmul, products accumulated in FP32 and rounded to the format, SwiGLU in FP32. The weights are read back out of
the graph (hetrun.backends.graph_matrices), so they are exactly the graph's. torch's intra-op threads are the
process's (torch.set_num_threads): the device's `threads` does not apply here.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from hetrun.backends import host_cpu
from hetrun.backends.base import Availability, Backend, BackendCaps, ExpertSession
from hetrun.backends.torch_expert import ExpertEpilogue

if TYPE_CHECKING:
    import onnx

    from hetrun.profile import DeviceType
    from hetrun.runtime.graphs import ExpertGraph

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NARROW_ROWS = 7  # at most this many rows multiply the narrow weights on a CPU that emulates their dtype


class TorchCpuBackend(Backend):
    caps = BackendCaps(
        name="torch",
        precisions=frozenset(DTYPES),
        device_kinds=frozenset({"cpu"}),
        real_hardware=True,
        loads_in_process=True,  # reads the weights straight out of the graph (its arrays, held beside)
    )

    @classmethod
    def probe(cls) -> Availability:
        # torch is one of hetrun's own dependencies, already imported: nothing can be missing
        return Availability(True, devices=("cpu",), details={"version": torch.__version__,
                                                             "threads": torch.get_num_threads()})

    @classmethod
    def has_device(cls, device_type: "DeviceType") -> bool:
        """Whether a device of this catalog type is here: this machine's CPU."""
        return device_type.kind == "cpu"

    @classmethod
    def preferred_precisions(cls, device_type: "DeviceType") -> list[str]:
        """BF16 first (half FP32's bytes, FP32's range), then FP16 and FP32, of those the catalog lists."""
        return [p for p in ("bf16", "fp16", "fp32") if p in device_type.precisions]

    def load(self, graph: "bytes | onnx.ModelProto | ExpertGraph", name: str, meta: dict) -> ExpertSession:
        from hetrun.backends.graph_matrices import (  # imports onnx
            read_bias_and_activation,
            read_expert_matrices,
            read_stored_float_matrices,
        )

        dtype = getattr(torch, DTYPES[self.precision])
        # the narrow initializers as stored (the FP16/BF16 graphs), else every form evaluated and widened to FP32
        stored = read_stored_float_matrices(graph)
        if stored is None:
            m = read_expert_matrices(graph)
            stored, extras = (m.gate_up, m.down), m.extras  # [D, 2I], [I, D]
        else:
            extras = read_bias_and_activation(graph)
        narrow_native = dtype == torch.float32 or host_cpu.native_float(dtype)
        return TorchCpuSession(_rows_major(stored[0], dtype), _rows_major(stored[1], dtype),
                               None if narrow_native else NARROW_ROWS, extras)


def _rows_major(w, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # a graph's initializer is read-only; the session never writes its weights
        warnings.simplefilter("ignore", UserWarning)
        if w.dtype.name == "bfloat16":  # ml_dtypes' BF16: the same 16 bits as torch's
            t = torch.from_numpy(w.view("uint16")).view(torch.bfloat16)
        else:
            t = torch.from_numpy(w)
    # [K, N] -> [N, K], nn.Linear's layout. The torch target's graphs store [N, K] (w is its transposed view): no
    # copy then; other graphs' [K, N] are narrowed first (half the bytes to move), then transposed by torch
    return t.to(dtype).t().contiguous()


class TorchCpuSession(ExpertSession):
    """y = down(silu(g) * u), [g, u] = x @ gate_up, with the weights [N, K] held in the format's dtype."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, narrow_rows: int | None, extras: tuple | None = None):
        self.gate_up, self.down = gate_up, down  # [2I, D], [D, I]
        self.narrow_rows = narrow_rows  # None: the narrow weights at any row count
        self.epilogue = ExpertEpilogue(extras, "cpu")  # biases and activation (gpt-oss's), silu(g) * u without

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.epilogue(x, lambda t: self._linear(t, self.gate_up), lambda h: self._linear(h, self.down))

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.dtype == torch.float32:
            return torch.nn.functional.linear(x, w)
        x = x.to(w.dtype)  # [N, K] rounded to the format
        if self.narrow_rows is not None and x.shape[0] > self.narrow_rows:
            return torch.nn.functional.linear(x.float(), w.float()).to(w.dtype).float()  # widened for this call
        return torch.nn.functional.linear(x, w).float()  # [N, N_out]: FP32 accumulation, rounded to the format
