"""Run the server: bind, serve with uvicorn, drain on SIGTERM, stop the engine.

SIGTERM (or Ctrl+C) stops accepting connections at once and flips /health to 503; the requests in flight run to
their end for up to drain_timeout seconds. Then the generation loop stops: what is still running ends as an error the
client can read (in the stream, or a 500), the connections close, and the process exits 0 (130 after Ctrl+C).
uvicorn's own graceful-shutdown limit, a little later, is only the backstop for a connection that hangs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time

import uvicorn

from hetrun.errors import HetrunError
from hetrun.serve.app import ServerState, create_app
from hetrun.serve.engine import Engine, EngineConfig
from hetrun.serve.loading import ServedModel
from hetrun.serve.metrics import ServerMetrics

log = logging.getLogger("hetrun")


BACKSTOP_S = 10.0  # uvicorn cancels what still runs this long after the drain deadline


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it is draining the moment a shutdown signal arrives, and stopping the engine
    at the drain deadline."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.hetrun_state = state
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        state = self.hetrun_state
        if not state.draining:
            state.draining = True
            print(f"hetrun serve: {signal.Signals(sig).name}: draining {state.engine.outstanding} request(s) in "
                  f"flight (up to {self.drain_timeout:g} s), then exiting", file=sys.stderr, flush=True)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.loop.call_later, self.drain_timeout, self._deadline)
        super().handle_exit(sig, frame)

    def _deadline(self) -> None:
        engine = self.hetrun_state.engine
        if engine.outstanding:
            print(f"hetrun serve: drain timeout: ending {engine.outstanding} unfinished request(s)", file=sys.stderr,
                  flush=True)
        self.loop.run_in_executor(None, engine.stop)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HetrunError(f"cannot listen on '{host}': {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise HetrunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(served: ServedModel, config: EngineConfig, sock: socket.socket, api_key: str | None = None,
          drain_timeout: float = 30.0, log_level: str = "warning", info: "dict[str, str] | None" = None) -> int:
    """Serve `served` on the listening socket `sock` (see bind) until SIGTERM or Ctrl+C; returns the exit code
    (0 after a drain)."""
    engine = Engine(served.model, served.eos_token_ids, config)
    engine.start()
    metrics = ServerMetrics(engine, getattr(served.model, "hetrun", None), info)
    state = ServerState(served, engine, metrics, api_key=api_key, created=int(time.time()))
    server = _DrainingServer(uvicorn.Config(create_app(state), log_level=log_level, access_log=False,
                                            timeout_graceful_shutdown=drain_timeout + BACKSTOP_S, lifespan="off"),
                             state, drain_timeout)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"hetrun serve: '{served.name}' (context {served.context_length} tokens) at http://{shown}:{bound_port}/v1 "
          f"(OpenAI API; /health, /metrics){'; API key required' if api_key else ''}", flush=True)
    # uvicorn raises the signal that stopped it again once it has drained; a handler that returns makes that a
    # clean exit 0 instead of a death by SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
