"""Per-request sampling inside transformers' continuous batching: temperature, top_p and a seed of each request's own.

transformers' manager samples every row of a step with one global generator and switches greedy decoding on or off
for all requests at once, so one request's tokens would depend on who else shares its steps. hetrun runs the manager
greedy (argmax) and puts RequestSampler in its logits processor list: a sampling row draws its token with its own
torch.Generator and leaves only that token standing, so argmax picks it; a greedy row passes through untouched.
The same request with the same seed gives the same tokens whatever else is being served.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

KWARG = "sampling"  # the add_request keyword that carries a request's Sampling


@dataclass
class Sampling:
    """How one request samples; its generator advances as the request's tokens are drawn."""

    temperature: float
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError("Sampling needs temperature > 0; temperature 0 is greedy decoding (no Sampling)")
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    def draw(self, logits: torch.Tensor) -> int:
        """One token id from logits [V]."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)  # [V]
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)  # [V]
            before = torch.cumsum(sorted_p, 0) - sorted_p  # [V] mass of the tokens ranked above each one
            sorted_p = torch.where(before < self.top_p, sorted_p, 0.0)  # the smallest set reaching top_p (>= 1 token)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """Draws each sampling row's token with its request's own Sampling; greedy rows pass through (see module doc)."""

    supported_kwargs = {KWARG: Sampling}
    ignored_kwargs = ()

    def __init__(self):
        self._rows: list[Sampling | None] = []  # this step's rows, set by prepare_tensor_args on the generation thread

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        self._rows = [r.state.logit_processor_kwargs.get(KWARG) for r in requests_with_new_token]
        return torch.tensor([i if s is not None else -1 for i, s in enumerate(self._rows)], dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = tensor_arg[: scores.size(0)].tolist()  # [N] index into self._rows, -1 for greedy rows
        if all(r < 0 for r in rows):
            return scores
        scores = scores.clone()  # [N, V]
        for i, r in enumerate(rows):
            if r >= 0:
                token = self._rows[r].draw(scores[i])
                scores[i].fill_(float("-inf"))
                scores[i, token] = 0.0
        return scores


def install(manager) -> None:
    """Make a (not yet started) ContinuousBatchingManager sample per request with RequestSampler.

    The manager must have been made with a greedy generation config (do_sample=False) and no other processors.
    """
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([RequestSampler()]))
    processors.tensors_required = 1  # one int32 per row: the row's index into RequestSampler's rows
    manager.logit_processor = processors
