"""The engine: transformers' continuous-batching manager over a deployed model, supervised for a long-lived server.

transformers' ContinuousBatchingManager runs one background thread that schedules every request into shared steps
(paged KV cache, chunked prefill, new requests joining between steps) and calls the model, whose MoE blocks are
hetrun's dispatcher. It works unchanged over hetrun's blocks (greedy FP32 output is token-identical to serving each
request alone), so hetrun builds on it rather than on a scheduler of its own. Engine covers what a server needs
beyond it:

- admission: at most max_num_seqs + max_queue requests at once; more is EngineBusy (HTTP 429);
- an asyncio stream per request, fed from the generation thread with call_soon_threadsafe;
- a request whose consumer goes away (client disconnect, stop string) is cancelled and its slot freed at once;
- an exception in a step kills transformers' manager and fails every request in it: Engine starts a new manager
  and resubmits each request with its prompt plus the tokens it already produced, so it completes (greedy output
  unchanged), up to max_retries times per request;
- per-request sampling with a seed of its own (hetrun.serve.sampling), greedy for temperature 0;
- CUDA graphs, compile and async batching stay off: hetrun's experts run on ONNX Runtime, OpenVINO or vendor
  runtimes, which a CUDA graph cannot capture.

Device faults inside one expert call never reach this far: the dispatcher fails over to a replica or the profile's
fallback device within the step, as it does for hetrun.deploy; only a fault it cannot absorb fails the step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from hetrun.serve import sampling as sampling_mod
from hetrun.serve.sampling import Sampling

log = logging.getLogger("hetrun")


class EngineBusy(Exception):
    """Every slot and queue place is taken (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class GenerationFailed(Exception):
    """A request that failed inside the engine and could not be recovered (HTTP 500)."""


@dataclass(frozen=True)
class EngineConfig:
    context_length: int  # prompt plus generated tokens, at most
    max_num_seqs: int = 64  # requests decoded together in one step
    max_queue: int = 256  # requests that may wait for a slot beyond max_num_seqs; more are refused (429)
    max_batch_tokens: int = 512  # tokens in one step (long prompts are prefilled in chunks of this)
    page_size: int = 32  # tokens per KV-cache page
    kv_cache_tokens: int | None = None  # KV-cache capacity; default: max_num_seqs contexts of up to 2048 tokens
    max_retries: int = 2  # resubmissions of one request after a step failed under it

    def __post_init__(self):
        for name in ("context_length", "max_num_seqs", "max_batch_tokens", "page_size", "max_retries"):
            if getattr(self, name) < (0 if name == "max_retries" else 1):
                raise ValueError(f"{name} must be positive")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_queue

    def num_blocks(self) -> int:
        tokens = self.kv_cache_tokens or self.max_num_seqs * min(self.context_length, 2048)
        return max(math.ceil(tokens / self.page_size), math.ceil(self.context_length / self.page_size))


@dataclass
class Step:
    """What a request's stream yields: every token generated so far, and why it ended (None while it runs)."""

    tokens: list[int]
    finish_reason: str | None = None  # "stop" (an end-of-sequence token) or "length" (max_new_tokens)


class Engine:
    """Continuous batching over `model` (a transformers model, usually hetrun-deployed); see the module doc."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: "list[int]", config: EngineConfig):
        self.model = model
        self.eos_token_ids = sorted(set(eos_token_ids)) or [-1]
        self.config = config
        self.outstanding = 0  # admitted requests not yet finished
        self.waiting = 0  # admitted requests without their first token yet
        self.restarts = 0  # managers started after the first (a step failed)
        self.recovered = 0  # requests resubmitted after a failed step
        self._manager = None
        self._stopping = False
        self._lock = threading.Lock()  # one thread (re)starts the manager at a time

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the manager and start its generation thread."""
        with self._lock:
            self._stopping = False
            if self._manager is None or self._is_dead(self._manager):
                self._start_manager()

    def stop(self) -> None:
        """Stop the generation thread now; requests still in it end with GenerationFailed."""
        with self._lock:
            self._stopping = True
            if self._manager is not None and self._manager.is_running():
                self._manager.stop(block=True, hard_stop=True)

    @property
    def alive(self) -> bool:
        """Whether a new request can be served now (a dead manager is restarted by the next request)."""
        return not self._stopping and self._manager is not None

    def _is_dead(self, manager) -> bool:
        return manager.background_thread_status.can_accept_new_requests() is not None or not manager.is_running()

    def _start_manager(self) -> None:
        if self._manager is not None:
            self.restarts += 1
            try:
                self._manager.stop(block=True)  # joins the dead thread and restores the attention implementation
            except Exception as e:  # noqa: BLE001 -- a manager that cannot even stop is replaced all the same
                log.warning("stopping the failed generation loop raised %s: %s", type(e).__name__, e)
        c = self.config
        gen = GenerationConfig(do_sample=False, max_new_tokens=c.context_length, eos_token_id=self.eos_token_ids,
                               pad_token_id=self.eos_token_ids[0] if self.eos_token_ids[0] >= 0 else 0)
        cb = ContinuousBatchingConfig(num_blocks=c.num_blocks(), page_size=c.page_size,
                                      max_batch_tokens=c.max_batch_tokens, max_requests_per_batch=c.max_num_seqs,
                                      use_cuda_graph=False, use_async_batching=False)
        manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        sampling_mod.install(manager)
        with torch.inference_mode():
            manager.start()
        self._manager = manager

    async def _live_manager(self):
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        manager = self._manager
        if manager is None or self._is_dead(manager):
            await asyncio.to_thread(self._restart_if_dead)
            manager = self._manager
        return manager

    def _restart_if_dead(self) -> None:
        with self._lock:
            if not self._stopping and (self._manager is None or self._is_dead(self._manager)):
                fatal = self._manager.background_thread_status.fatal_error if self._manager is not None else None
                log.error("a generation step failed (%s); starting a new generation loop and resubmitting its requests",
                          f"{type(fatal).__name__}: {fatal}" if fatal is not None else "the loop stopped")
                self._start_manager()

    # ---- requests ----------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: "list[int]", max_new_tokens: int,
                       sampling: Sampling | None = None) -> AsyncIterator[Step]:
        """Stream one request's tokens. The first step raises EngineBusy (at capacity) or EngineStopped (draining)
        before anything runs; closing the stream early cancels the request and frees its slot."""
        self._admit()
        done: list[int] = []  # tokens produced by attempts that a failed step ended
        attempts, first = 0, True
        try:
            while True:
                manager = await self._live_manager()
                rid = uuid.uuid4().hex
                outputs: asyncio.Queue = asyncio.Queue()
                manager.register_result_handler(rid, outputs.put_nowait)  # called on this loop, thread-safely
                extra = {sampling_mod.KWARG: sampling} if sampling is not None else {}
                added = manager.add_request(prompt_ids + done, request_id=rid, max_new_tokens=max_new_tokens - len(done),
                                            streaming=True, eos_token_id=self.eos_token_ids, **extra)
                finished, tokens, error = False, [], "the generation loop stopped"
                try:
                    while added is not None:
                        out = await outputs.get()
                        while not outputs.empty() and not out.is_finished():  # a slow reader gets the newest state
                            out = outputs.get_nowait()
                        if out.status == RequestStatus.FAILED:
                            error = out.error or "generation failed"
                            break
                        finished = out.is_finished()
                        if len(out.generated_tokens) > len(tokens) or finished:
                            tokens = list(out.generated_tokens)
                            if first:
                                first = False
                                self.waiting -= 1
                            yield Step(done + tokens, self._finish_reason(tokens) if finished else None)
                        if finished:
                            return
                finally:
                    if not finished:
                        manager.cancel_request(rid)  # frees its KV pages; transformers sends nothing more for it
                        with manager.output_router._lock:
                            manager.output_router.result_handlers.pop(rid, None)
                done += tokens
                if self._stopping:
                    raise GenerationFailed("the server stopped before this request finished")
                if not self._is_dead(manager) or attempts >= self.config.max_retries:
                    raise GenerationFailed(error)
                attempts += 1
                self.recovered += 1
        finally:
            self.outstanding -= 1
            if first:
                self.waiting -= 1

    def _admit(self) -> None:
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        if self.outstanding >= self.config.capacity:
            raise EngineBusy(f"the server is at capacity: {self.config.max_num_seqs} requests running and "
                             f"{self.config.max_queue} waiting; retry later")
        self.outstanding += 1
        self.waiting += 1

    def _finish_reason(self, tokens: "list[int]") -> str:
        return "stop" if tokens and tokens[-1] in self.eos_token_ids else "length"
