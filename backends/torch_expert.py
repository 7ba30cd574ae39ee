"""A SwiGLU expert (gpt-oss's with its biases and clamped activation) run in torch on any torch device (cuda, npu,
cpu), from matrices read back out of its graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from hetrun.backends.base import ExpertSession

from hetrun.spec import SILU

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
    """y = down(act(g, u)) with [g, u] = gate_up(x); each projection is a callable on device tensors. `extras`:
    graph_matrices.read_bias_and_activation's (gate_up bias, down bias, activation), for experts that have them."""

    def __init__(self, gate_up: Callable, down: Callable, device: str, path: str, extras: tuple | None = None):
        self.gate_up = gate_up
        self.down = down
        self.device = device
        self.path = path  # how this expert runs, for reports: e.g. "torch fp8 block-scaled _scaled_mm on cuda:0"
        self.epilogue = ExpertEpilogue(extras, device)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch  # heavy: loaded only when a torch-path expert runs

        with torch.inference_mode():
            return self.epilogue(x, lambda t: self.gate_up(t).float(), lambda h: self.down(h).float())  # [N, D]


class ExpertEpilogue:
    """What an expert does around its two matmuls: the biases after each (gpt-oss) and how gate and up combine."""

    def __init__(self, extras: tuple | None, device: str):
        import torch  # heavy: loaded only when a torch-path expert runs

        gate_up_bias, down_bias, self.activation = extras or (None, None, SILU)
        self.biases = tuple(None if b is None else torch.tensor(np.asarray(b), dtype=torch.float32, device=device)
                            for b in (gate_up_bias, down_bias))  # [2I], [D] float32 copies (graphs may be read-only)

    def __call__(self, x, gate_up: Callable, down: Callable):
        """x [N, D] -> [N, D] float32, with gate_up and down the matmuls (each returning float32)."""
        gu = gate_up(x)  # [N, 2I]
        if self.biases[0] is not None:
            gu = gu + self.biases[0]
        g, u = gu.chunk(2, dim=-1)  # [N, I] each
        y = down(self.activation.apply(g, u))  # [N, D]
        return y if self.biases[1] is None else y + self.biases[1]
