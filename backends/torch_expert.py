"""A SwiGLU expert run in torch on any torch device (cuda, npu, cpu), from matrices read back out of its graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from hetrun.backends.base import ExpertSession

if TYPE_CHECKING:
    import torch

# torch dtype name per graph precision for dense (unquantized) matmuls.
DENSE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class DenseLinear:
    """x [M, K] float32 -> x @ W [M, N] float32, with x and W in `dtype` and the product rounded to it (FP32 accumulation)."""

    def __init__(self, w: np.ndarray, dtype: str, device: str):
        import torch  # heavy: loaded only when a torch-path expert runs

        self.dtype = getattr(torch, dtype)
        self.w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device=device, dtype=self.dtype)  # [K, N]

    def __call__(self, x):
        return (x.to(self.dtype) @ self.w).float()


class TorchExpertSession(ExpertSession):
    """y = down(silu(g) * u) with [g, u] = gate_up(x); each projection is a callable on device tensors."""

    def __init__(self, gate_up: Callable, down: Callable, device: str, path: str):
        self.gate_up = gate_up
        self.down = down
        self.device = device
        self.path = path  # how this expert runs, for reports: e.g. "torch fp8 block-scaled _scaled_mm on cuda:0"

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch  # heavy: loaded only when a torch-path expert runs

        with torch.inference_mode():
            g, u = self.gate_up(x).chunk(2, dim=-1)  # [N, I] each, on the session's device
            return self.down(torch.nn.functional.silu(g) * u).float()  # [N, D]
