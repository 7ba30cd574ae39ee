"""`hetrun serve`: an OpenAI-compatible server with continuous batching over one heterogeneous deployment."""

from __future__ import annotations

import argparse
import os

from hetrun.cli import Command
from hetrun.errors import HetrunError
from hetrun.spec import SUPPORTED_FAMILIES

API_KEY_ENV = "HETRUN_API_KEY"


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a transformers model directory (safetensors and a tokenizer), a hetrun bundle, or a "
                        "built-in model: tiny (default), " + ", ".join(f"tiny:{f}" for f in SUPPORTED_FAMILIES) +
                        " -- tiny models trained in seconds on a text hetrun ships, cached in "
                        "~/.cache/hetrun")
    p.add_argument("--profile", default="mixed-demo", help="built-in profile name or YAML path (default: mixed-demo)")
    p.add_argument("--precision", default=None,
                   help="force one precision on every device (e.g. fp32); default: each device's own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require `Authorization: Bearer KEY` on every /v1 route (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: MODEL's name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL's; needed for bundles)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the dense part (attention, norms) of a model directory (default: its own)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together in one step (default 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; beyond that a request gets HTTP 429 (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens per step; longer prompts are prefilled in chunks (default 512)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV-cache capacity in tokens (default: max-num-seqs contexts of up to 2048 tokens)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight may take to finish (default 30)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per expert session (default: the backend's; 1 is fastest for tiny experts, whose "
                        "calls are too small to split, since every device already runs on a thread of its own)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default warning)")


def _run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise HetrunError(f"--port must be between 0 and 65535, not {args.port}")
    if args.drain_timeout < 0:
        raise HetrunError("--drain-timeout must be 0 or more")
    for name in ("max_num_seqs", "max_batch_tokens", "max_model_len", "kv_cache_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HetrunError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise HetrunError("--max-queue must be 0 or more")

    from transformers.utils import logging as hf_logging  # heavy: only when serving

    from hetrun.serve.engine import EngineConfig  # imports torch and transformers: only when serving
    from hetrun.serve.loading import load_served_model  # imports torch and transformers: only when serving
    from hetrun.serve.server import bind, serve  # imports uvicorn and fastapi: only when serving

    hf_logging.disable_progress_bar()  # a server's log is not a terminal: no "Loading weights" bars
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    served = load_served_model(args.model, args.profile, precision=args.precision, tokenizer=args.tokenizer,
                               dtype=args.dtype, max_model_len=args.max_model_len, served_name=args.served_model_name,
                               threads=args.threads)
    config = EngineConfig(context_length=served.context_length, max_num_seqs=args.max_num_seqs,
                          max_queue=args.max_queue, max_batch_tokens=args.max_batch_tokens,
                          kv_cache_tokens=args.kv_cache_tokens)
    runtime = getattr(served.model, "hetrun", None)
    info = {"model": served.name, "profile": runtime.profile.name if runtime is not None else "",
            "precision": args.precision or "per-device"}
    return serve(served, config, sock, api_key=args.api_key, drain_timeout=args.drain_timeout,
                 log_level=args.log_level, info=info)


COMMANDS = {
    "serve": Command("serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions), "
                     "continuously batched, with its experts deployed across the profile's devices", _add, _run,
                     "  hetrun serve &                                   # built-in tiny model on mixed-demo\n"
                     "  curl localhost:8000/v1/completions -d '{\"prompt\": \"The harbour\", \"max_tokens\": 20}'\n"
                     "  hetrun serve path/to/model-dir --profile cpu --precision fp32 --port 8080\n"
                     "  hetrun serve bundle/ --tokenizer path/to/model-dir --api-key secret\n"
                     "  HETRUN_API_KEY=secret hetrun serve tiny:mixtral --host 0.0.0.0 --max-queue 64"),
}
