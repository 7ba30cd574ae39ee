"""The dtype the dense part's torch ops compute in once its linear layers run on the dense device.

What stays in torch after deploy is small: embeddings, norms, rotary tables, the routers' gates and, where it
does not follow its projections onto onnxruntime (hetrun.runtime.attention), attention itself (scores, softmax, the
KV cache). On a CPU that emulates BF16 (or FP16) those ops run slower in the model's
16-bit dtype than in FP32: every op converts its operands, and torch's CPU attention and reductions take the slow
path. Measured on the Mixtral-shaped benchmark model (2-core AVX2 host, one decode token): under torch.profiler
(which inflates small ops) torch's own ops took 4.9 ms per token in BF16 against 2.2 ms in FP32 (SDPA 432 -> 150 us,
the router matmul 140 -> 13 us, argmax over the vocabulary 162 -> 45 us); without it, everything of a decode token
outside the MoE layers and the dense linear layers took 5.21 against 4.55 ms (median of three processes each).

So when the linear layers were moved to a CPU dense device (hetrun.runtime.dense) and the host computes the model's
dtype only by emulation (hetrun.backends.host_cpu), the remaining small parameters and buffers are cast to FP32 and
the embedding table is left compact, its rows cast to FP32 as they are looked up: a few kilobytes more per layer,
never a second copy of a large tensor. Activations, the KV cache and the logits are then FP32. The table is held
as a buffer rather than a parameter, so that `model.dtype` (transformers: the first floating parameter's dtype) says
FP32 and the caches transformers allocates from it (continuous batching's paged cache) match the activations. `dense_precision:
model` (the linear layers kept as the model has them) leaves the model's dtype untouched, and so does a host that
computes the dtype natively. A user's `model.to(dtype)` after deploy is honoured as asked.
"""

from __future__ import annotations

import logging

import torch

from hetrun.backends import host_cpu

log = logging.getLogger("hetrun")


def compute_in_fp32(model: torch.nn.Module, dense_kind: str) -> torch.dtype | None:
    """Cast the model's torch-side dense part to FP32 where its 16-bit dtype is emulated on the CPU dense device
    (`dense_kind`: the dense device's type kind); the embedding tables stay as they are, their lookups return FP32.
    Returns the dtype the model had (None: nothing changed)."""
    emulated = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32
                and not host_cpu.native_float(p.dtype)}
    if dense_kind != "cpu" or len(emulated) != 1:  # none, or a model of mixed 16-bit dtypes: left alone
        return None
    (dtype,) = emulated
    added = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            if module.weight.dtype == dtype:  # kept narrow, as a buffer: the model's dtype is its parameters'
                table = module.weight.detach()
                del module._parameters["weight"]
                module.register_buffer("weight", table)
                module.register_forward_hook(_fp32_rows)
            continue
        for p in module.parameters(recurse=False):
            if p.dtype == dtype:
                p.data = p.data.float()
                added += p.numel() * 2
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dtype == dtype:
                module._buffers[name] = b.float()
                added += b.numel() * 2
    name = str(dtype).removeprefix("torch.")
    log.warning("the dense part's remaining torch ops (attention, norms, routers) compute in FP32: this CPU has no "
                "native %s arithmetic (%s), and FP32 runs them faster here; %.0f kB more, the embedding table stays "
                "%s. Set dense_precision: model in the profile to keep the model's dtype", name,
                host_cpu.native_flags_text(dtype), added / 1e3, name)
    return dtype


def _fp32_rows(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()  # [..., D]
