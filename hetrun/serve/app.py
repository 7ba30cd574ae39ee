"""The ASGI app (FastAPI): OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health and /metrics.

Every error is OpenAI's JSON error body with a 4xx or 5xx status: a malformed body, a field of the wrong type, a
prompt longer than the context, max_tokens < 1 or an unknown model is 400, a missing or wrong API key 401, a full
queue 429, a draining server 503. Streams are server-sent events ending in `data: [DONE]`; a client that goes away
cancels its request in the engine at once, streamed or not. Request bodies are read as JSON whatever their
Content-Type says (`curl -d` sends form encoding).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetrun.serve import schemas
from hetrun.serve.engine import Engine, EngineBusy, EngineStopped, GenerationFailed
from hetrun.serve.loading import ServedModel
from hetrun.serve.metrics import CONTENT_TYPE, RequestTimings, ServerMetrics
from hetrun.serve.sampling import Sampling
from hetrun.serve.schemas import ChatRequest, CompletionRequest, RequestError
from hetrun.serve.textstream import TextStream

MAX_BODY_BYTES = 16 * 2**20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerState:
    served: ServedModel
    engine: Engine
    metrics: ServerMetrics
    api_key: str | None = None
    draining: bool = False
    created: int = 0


def create_app(state: ServerState) -> FastAPI:
    """The app serving `state`; the engine is started and stopped by whoever runs the app (hetrun.serve.server)."""
    app = FastAPI(title="hetrun", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hetrun = state

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return _error(RequestError(f"internal error: {type(exc).__name__}: {exc}", 500))

    @app.get("/health")
    async def health():
        ok = not state.draining and state.engine.alive
        return JSONResponse({"status": "ok" if ok else ("draining" if state.draining else "unavailable")},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/expert_load")
    async def expert_load(request: Request):
        # the expert-load trace, [layers, experts] routed tokens as EPLB lays it out: `hetrun plan --load`,
        # `hetrun simulate --load` and `hetrun fleet --load` read this document as it is
        if (problem := _auth_problem(state, request)) is not None:
            return _error(problem)
        runtime = getattr(state.served.model, "hetrun", None)
        if runtime is None:
            return _error(RequestError("this model runs no hetrun experts, so it counts no expert load", 404))
        table = runtime.stats.tokens_per_expert  # [L, E]
        return {"model": state.served.name, "layers": int(table.shape[0]), "experts": int(table.shape[1]),
                "tokens_per_expert": table.tolist()}

    @app.get("/v1/models")
    async def models(request: Request):
        if (problem := _auth_problem(state, request)) is not None:
            return _error(problem)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        if (problem := _auth_problem(state, request)) is not None:
            return _error(problem)
        if name != state.served.name:
            return _error(RequestError(f"model '{name}' does not exist; this server serves '{state.served.name}'",
                                       404, param="model", code="model_not_found"))
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, "chat")

    return app


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _model_card(state: ServerState) -> dict:
    return {"id": state.served.name, "object": "model", "created": state.created, "owned_by": "hetrun",
            "max_model_len": state.served.context_length}


def _auth_problem(state: ServerState, request: Request) -> RequestError | None:
    if state.api_key is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        return RequestError("missing or incorrect API key: send `Authorization: Bearer KEY`", 401,
                            code="invalid_api_key")
    return None


async def _body(request: Request) -> bytes:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB", 413)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Job:
    """One validated request, ready for the engine."""

    kind: str  # completion, chat
    req: schemas._Sampling
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling | None


async def _generate(state: ServerState, request: Request, kind: str) -> Response:
    start = time.perf_counter()
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    try:
        if (problem := _auth_problem(state, request)) is not None:
            raise problem
        if state.draining:
            raise RequestError("the server is shutting down", 503)
        job = _job(state, kind, await _body(request))
        stream = state.engine.generate(job.prompt_ids, job.max_new_tokens, job.sampling)
        try:
            first = await _unless_disconnected(request, stream.__anext__())  # a queue's wait may be long
        except EngineBusy as e:
            raise RequestError(str(e), 429, code="rate_limit_exceeded", type="rate_limit_error") from None
        except EngineStopped as e:
            raise RequestError(str(e), 503) from None
        except GenerationFailed as e:
            raise RequestError(f"generation failed: {e}", 500) from None
        except StopAsyncIteration:
            raise RequestError("generation produced nothing", 500) from None
    except RequestError as e:
        state.metrics.requests.labels(endpoint, str(e.status)).inc()
        return _error(e)
    if first is _GONE:
        state.metrics.cancelled.labels(endpoint).inc()
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    if job.req.stream:
        return StreamingResponse(_events(state, job, stream, first, start, endpoint), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return await _whole(state, request, job, stream, first, start, endpoint)


def _job(state: ServerState, kind: str, raw: bytes) -> _Job:
    served = state.served
    req = schemas.parse(ChatRequest if kind == "chat" else CompletionRequest, raw)
    if req.model is not None and req.model != served.name:
        raise RequestError(f"model '{req.model}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")
    ids = _chat_ids(served, req) if kind == "chat" else _prompt_ids(served, req)
    context = served.context_length
    if len(ids) >= context:
        raise RequestError(f"the prompt is {len(ids)} tokens long; this model's context is {context} tokens, which "
                           "must also hold at least one generated token", param="messages" if kind == "chat" else
                           "prompt", code="context_length_exceeded")
    asked = req.max_completion_tokens if kind == "chat" and req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if kind == "chat" and req.max_completion_tokens is not None else "max_tokens"
    if asked is None:
        asked = DEFAULT_COMPLETION_TOKENS if kind == "completion" else context - len(ids)
    if asked < 1:
        raise RequestError(f"{name} must be at least 1, got {asked}", param=name)
    if len(ids) + asked > context:
        raise RequestError(f"this model's context is {context} tokens; the prompt ({len(ids)} tokens) plus "
                           f"{name} ({asked}) is {len(ids) + asked}: lower {name} or shorten the prompt",
                           param=name, code="context_length_exceeded")
    return _Job(kind, req, ids, asked, _sampling(served, req))


def _prompt_ids(served: ServedModel, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        vocab = served.model.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})",
                               param="prompt")
        ids = list(prompt)
    else:
        ids = served.tokenizer(prompt)["input_ids"]
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    return ids


def _chat_ids(served: ServedModel, req: ChatRequest) -> list[int]:
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise RequestError(f"model '{served.name}' has no chat template; use /v1/completions", param="messages",
                           code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as e:  # noqa: BLE001 -- a template's own checks (raise_exception) reject a conversation
        raise RequestError(f"the model's chat template rejects these messages: {' '.join(str(e).split())[:200]}",
                           param="messages") from None
    return list(ids["input_ids"])


def _sampling(served: ServedModel, req) -> Sampling | None:
    """The request's Sampling, None for greedy; unset fields come from the model's generation_config."""
    gen = getattr(served.model, "generation_config", None)
    sampled_by_default = bool(getattr(gen, "do_sample", False))
    temperature = req.temperature
    if temperature is None:
        temperature = (getattr(gen, "temperature", None) or 1.0) if sampled_by_default else 0.0
    top_p = req.top_p if req.top_p is not None else ((getattr(gen, "top_p", None) or 1.0) if sampled_by_default
                                                     else 1.0)
    if temperature == 0:
        return None
    return Sampling(temperature, top_p, req.seed)


async def _whole(state: ServerState, request: Request, job: _Job, stream, first, start: float,
                 endpoint: str) -> Response:
    """A non-streamed answer; a client that disconnects before it is ready cancels the request."""
    timings = RequestTimings(start)
    text = TextStream(state.served.tokenizer, job.req.stop_strings())

    async def collect():
        pieces, n, step = [], 0, first
        try:
            while True:
                timings.token(time.perf_counter())
                pieces.append(text.push(step.tokens[n:]))
                n = len(step.tokens)
                if text.stopped:
                    return "".join(pieces), "stop", n
                if step.finish_reason is not None:
                    pieces.append(text.finish())
                    return "".join(pieces), step.finish_reason, n
                step = await stream.__anext__()
        finally:
            await stream.aclose()

    try:
        result = await _unless_disconnected(request, collect())
    except (GenerationFailed, EngineStopped) as e:  # EngineStopped: the drain deadline hit a resubmission
        state.metrics.requests.labels(endpoint, "500").inc()
        return _error(RequestError(f"generation failed: {e}", 500))
    if result is _GONE:
        state.metrics.cancelled.labels(endpoint).inc()
        return Response(status_code=499)
    body, finish, n = result
    state.metrics.observe_request(endpoint, 200, len(job.prompt_ids), n, timings)
    rid = schemas.new_id("chatcmpl" if job.kind == "chat" else "cmpl")
    return JSONResponse(schemas.completion(job.kind, rid, state.served.name, body, finish, len(job.prompt_ids), n))


_GONE = object()  # what _unless_disconnected returns when the client went away


async def _unless_disconnected(request: Request, awaitable):
    """The result of `awaitable`, or _GONE (and `awaitable` cancelled) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    return work.result() if not work.cancelled() else _GONE


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(state: ServerState, job: _Job, stream, first, start: float, endpoint: str):
    """The server-sent events of a streamed answer; closing them (client gone) cancels the request."""
    timings = RequestTimings(start)
    text = TextStream(state.served.tokenizer, job.req.stop_strings())
    rid, created, model = schemas.new_id("chatcmpl" if job.kind == "chat" else "cmpl"), int(time.time()), state.served.name
    options = job.req.stream_options
    n, step, opened, outcome = 0, first, False, "cancelled"
    try:
        try:
            while True:
                timings.token(time.perf_counter())
                piece = text.push(step.tokens[n:])
                n = len(step.tokens)
                finish = "stop" if text.stopped else step.finish_reason
                if finish is not None and not text.stopped:
                    piece += text.finish()
                use = schemas.usage(len(job.prompt_ids), n)
                if piece or finish is not None or not opened:
                    yield schemas.sse(schemas.chunk(job.kind, rid, model, created, piece, finish, first=not opened,
                                                    usage_=use if finish is not None or (
                                                        options and options.continuous_usage_stats) else None))
                    opened = True
                if finish is not None:
                    break
                step = await stream.__anext__()
        except (GenerationFailed, EngineStopped) as e:  # the status line is sent already: the error goes in the stream
            outcome = "500"
            yield schemas.sse(schemas.error_body(f"generation failed: {e}", "server_error"))
            yield schemas.SSE_DONE
            return
        if options and options.include_usage:
            yield schemas.sse(schemas.chunk(job.kind, rid, model, created, None, usage_=use))
        yield schemas.SSE_DONE
        outcome = "200"
    finally:
        await stream.aclose()
        if outcome == "cancelled":
            state.metrics.cancelled.labels(endpoint).inc()
        else:
            state.metrics.observe_request(endpoint, outcome, len(job.prompt_ids), n, timings)
