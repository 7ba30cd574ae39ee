"""The OpenAI API's request bodies as strict pydantic models, its error body, and the response objects.

Requests are validated strictly, as OpenAI's own API does: a field of the wrong type ("5" for max_tokens), an unknown
field or an unsupported option (n > 1, logprobs, tools, penalties) is a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4  # OpenAI's limit on stop strings
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}  # union branches in pydantic's locs


class RequestError(Exception):
    """A request the server refuses; `status` is its HTTP status, the rest fills OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> RequestError | None:
        """The first option this server cannot honour, as a 400 (OpenAI's defaults are all accepted)."""
        if self.n != 1:
            return RequestError("only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return RequestError(f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            return RequestError("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            return RequestError("stream_options is only allowed with stream: true", param="stream_options")
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> RequestError | None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            return RequestError("one prompt per request: give a string (a list of strings must hold exactly one)",
                                param="prompt")
        if self.echo:
            return RequestError("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            return RequestError("best_of is not supported (only 1)", param="best_of")
        if self.logprobs is not None:
            return RequestError("logprobs is not supported", param="logprobs")
        if self.suffix:
            return RequestError("suffix is not supported", param="suffix")
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> RequestError | None:
        if self.logprobs or self.top_logprobs is not None:
            return RequestError("logprobs is not supported", param="logprobs")
        if self.tools:
            return RequestError("tools are not supported", param="tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            return RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        return super().unsupported()


def parse(model: type[_Sampling], raw: bytes) -> _Sampling:
    """The validated request from a raw body, or a 400 RequestError naming the first thing wrong with it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(data).__name__}",
                           code="invalid_json")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        path = [str(p) for p in err["loc"] if isinstance(p, int) or not _is_type_tag(p)]
        param = ".".join(path) or None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param,
                           code="invalid_type" if err["type"].endswith("_type") else "invalid_value") from None
    problem = req.unsupported()
    if problem is not None:
        raise problem
    return req


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in _TYPE_TAGS


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(kind: str, rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, created: int | None = None) -> dict:
    """A whole (non-streamed) response: kind "completion" (text_completion) or "chat" (chat.completion)."""
    created = created if created is not None else int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
          first: bool = False, usage_: dict | None = None) -> dict:
    """One streamed event; text None gives the closing usage chunk (no choices)."""
    if kind == "chat":
        obj = "chat.completion.chunk"
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        obj = "text_completion"
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "choices": [] if text is None and finish_reason is None else choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
