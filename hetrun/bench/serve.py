"""`hetrun bench serve`: `hetrun serve` under 1, 8 and 32 concurrent streams, against `transformers serve`.

Both servers run the same model directory (default: the built-in tiny model) on this CPU, one at a time, as child
processes; a client in this process keeps N streams busy, each sending streamed completions back to back, and
measures aggregate output tokens/s (from the usage each server reports), time to first token (TTFT) and time per
output token after the first (TPOT). The client is a few lines of asyncio over raw HTTP: on a machine with few cores
a heavy client (the openai package builds a pydantic object per streamed token) would take the servers' CPU. Reported as ratios measured in the same run: hetrun at 32 streams against hetrun at
1, and hetrun (cpu profile, FP32) against transformers serve with its continuous batching at each concurrency.
transformers serve is skipped, with the reason, when it cannot start (it needs fastapi, uvicorn, openai and
accelerate: `pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hetrun.bench import Benchmark, comma_list
from hetrun.errors import HetrunError
from hetrun.files import print_json
from hetrun.serve import builtin
from hetrun.serve.engine import EngineConfig

SCALING_TARGET = 4.0  # hetrun's tokens/s at 32 streams over 1 stream
REFERENCE_TARGET = 1.0  # hetrun's tokens/s over transformers serve's at 8 and 32 streams
START_TIMEOUT_S = 600  # the first start may train the built-in model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a child process, ready once GET /health answers 200; stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None):
        self.name, self.cmd, self.port = name, cmd, port
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"hetrun-bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> str | None:
        """None once healthy, else why not (it exited, or did not answer in time), with its last log lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with code {self.proc.returncode}: {self.tail()}"
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        return f"not healthy after {timeout:.0f} s: {self.tail()}"

    def tail(self, lines: int = 3) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # transformers serve runs its engine in a child of its own
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def prompts(count: int) -> list[str]:
    """Different prompts cut from the built-in model's training text (a few words each)."""
    words = builtin.training_text().split()
    return [" ".join(words[(7 * i) % (len(words) - 6):][:3 + i % 4]) for i in range(count)]


async def _stream(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion over a connection of its own; tokens from the usage the server reports."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    first = last = None
    usage = None
    chunks = 0
    try:
        status = (await reader.readline()).split(b" ", 2)
        if len(status) < 2 or status[1] != b"200":
            raise HetrunError(f"the server answered {b' '.join(status[1:]).decode(errors='replace').strip()}")
        async for event in _sse_events(reader):
            if event == b"[DONE]":
                break
            obj = json.loads(event)
            if obj.get("choices") and obj["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
            if obj.get("usage"):
                usage = obj["usage"]
    finally:
        writer.close()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"tokens": tokens, "ttft": (first or time.perf_counter()) - t0,
            "tpot": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "usage_reported": usage is not None}


async def _sse_events(reader: asyncio.StreamReader):
    """The data of each server-sent event of an HTTP/1.1 response (chunked or not) whose status line was read."""
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        chunked |= name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower()
    buffer = b""
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            buffer += data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
        *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip()


async def measure(port: int, model: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    """`concurrency` streams, each sending `rounds` completions back to back; aggregate and per-request figures."""
    texts = prompts(concurrency * rounds)

    async def worker(w: int) -> list[dict]:
        return [await _stream(port, model, texts[w * rounds + r], max_tokens) for r in range(rounds)]

    await _stream(port, model, texts[0], 4)  # warm-up
    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
            "usage_reported": all(r["usage_reported"] for r in results)}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    if len(values) == 1:
        return {p: values[0] * 1e3 for p in ("p50", "p90", "p99")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49] * 1e3, "p90": q[89] * 1e3, "p99": q[98] * 1e3}


def hetrun_command(model_dir: Path, profile: str, precision: str | None, threads: int | None, port: int,
                   max_seqs: int) -> list[str]:
    cmd = [sys.executable, "-m", "hetrun", "serve", str(model_dir), "--profile", profile, "--port", str(port),
           "--served-model-name", str(model_dir), "--max-num-seqs", str(max_seqs), "--max-queue", str(max_seqs)]
    return cmd + (["--precision", precision] if precision else []) + (["--threads", str(threads)] if threads else [])


def transformers_command(model_dir: Path, port: int, max_seqs: int) -> list[str]:
    """transformers serve with its continuous batching, and the KV cache and step size hetrun serve has."""
    context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 2048
    same = EngineConfig(context_length=context, max_num_seqs=max_seqs)
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching",
            "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--cb-max-batch-tokens", str(same.max_batch_tokens),
            "--cb-block-size", str(same.page_size), "--cb-num-blocks", str(same.num_blocks())]


def transformers_missing() -> str | None:
    """Why `transformers serve` cannot start here, or None."""
    missing = [m for m in ("fastapi", "uvicorn", "openai", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return f"transformers serve needs {', '.join(missing)}: pip install -e \".[bench]\""
    return None


def run(model: str | None, concurrency: list[int], rounds: int, max_tokens: int, profile: str,
        precision: str | None, threads: int | None, reference: bool, console: Console | None = None) -> dict:
    """Measure hetrun serve, then transformers serve, on the same model directory; see the module doc."""
    model_dir = _model_dir(model)
    say = console.print if console is not None else (lambda *a, **k: None)
    load_before = os.getloadavg()
    systems = {"hetrun": ("hetrun serve", lambda port: hetrun_command(model_dir, profile, precision, threads, port,
                                                                      max(concurrency)), {})}
    skipped = None
    if reference:
        skipped = transformers_missing()
        if skipped is None:
            systems["transformers"] = ("transformers serve",
                                       lambda port: transformers_command(model_dir, port, max(concurrency)),
                                       {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    results: dict[str, list[dict]] = {}
    for key, (label, command, env) in systems.items():
        port = free_port()
        say(f"starting {label} on port {port} ...")
        server = ServerProcess(key, command(port), port, env)
        try:
            problem = server.wait_ready(START_TIMEOUT_S)
            if problem is not None:
                if key == "hetrun":
                    raise HetrunError(f"hetrun serve did not start: {problem}")
                skipped = f"transformers serve could not start: {problem}"
                continue
            rows = []
            for c in concurrency:
                rows.append(asyncio.run(measure(server.port, str(model_dir), c, rounds, max_tokens)))
                say(f"  {label}: {c} stream(s): {rows[-1]['tokens_per_s']:.0f} tokens/s")
            results[key] = rows
        finally:
            server.stop()
    if skipped:
        say(f"[yellow]skipped the reference: {skipped}[/]")
    return {"model": str(model_dir), "profile": profile, "precision": precision or "per-device", "threads": threads,
            "max_tokens": max_tokens, "rounds": rounds, "results": results, "reference_skipped": skipped,
            "load_average": {"before": load_before, "after": os.getloadavg()}, "cpus": os.cpu_count()}


def _model_dir(model: str | None) -> Path:
    family = builtin.preset_family(model or builtin.PRESET_PREFIX)
    if family is not None:
        return builtin.builtin_model_dir(family)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise HetrunError(f"'{model}' is not a model directory (config.json) nor a built-in model "
                          f"({', '.join(builtin.builtin_names())}); both servers need one")
    return path.resolve()


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or built-in model (default: tiny)")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent streams (default 1,8,32)")
    p.add_argument("--rounds", type=int, default=2, help="completions each stream sends back to back (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    p.add_argument("--profile", default="cpu", help="hetrun's profile (default cpu)")
    p.add_argument("--precision", default="fp32", help="hetrun's precision (default fp32; 'none': per device)")
    p.add_argument("--threads", type=int, default=1,
                   help="hetrun serve --threads: threads per expert session (default 1: the tiny model's expert calls "
                        "are too small to split; 0: the backend's default)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers serve")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _main(a: argparse.Namespace) -> int:
    concurrency = comma_list(a.concurrency, int)
    if not concurrency or min(concurrency) < 1 or a.rounds < 1 or a.max_tokens < 2 or a.threads < 0:
        raise HetrunError("--concurrency needs positive counts, --rounds at least 1, --max-tokens at least 2 and "
                          "--threads 0 or more")
    precision = None if a.precision == "none" else a.precision
    console = None if a.json else Console(stderr=True)
    result = run(a.model, concurrency, a.rounds, a.max_tokens, a.profile, precision, a.threads or None,
                 not a.no_reference, console)
    if a.json:
        print_json(result)
    else:
        _print(result)
    return 0


def _print(r: dict) -> None:
    c = Console()
    hetrun_rows = {row["concurrency"]: row for row in r["results"]["hetrun"]}
    ref_rows = {row["concurrency"]: row for row in r["results"].get("transformers", [])}
    threads = f", {r['threads']} thread(s) per expert session" if r.get("threads") else ""
    t = Table(title=f"{r['max_tokens']}-token streamed completions: hetrun serve ({r['profile']} profile, "
                    f"{r['precision']}{threads}) and transformers serve (continuous batching)")
    for col in ("streams", "server", "tok/s", "ratio", "TTFT ms p50/p90", "TPOT ms p50/p90"):
        t.add_column(col, justify="right", no_wrap=True)
    for n, h in hetrun_rows.items():
        ref = ref_rows.get(n)
        for name, row in (("hetrun", h), ("transformers", ref)):
            if row is None:
                continue
            ratio = f"{h['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and name == "hetrun" else ""
            t.add_row(str(n) if name == "hetrun" else "", name, f"{row['tokens_per_s']:.0f}", ratio,
                      _pp(row["ttft_ms"]), _pp(row["tpot_ms"]))
    c.print(t)
    lo, hi = min(hetrun_rows), max(hetrun_rows)
    if hi > lo:
        scale = hetrun_rows[hi]["tokens_per_s"] / hetrun_rows[lo]["tokens_per_s"]
        target = f" (goal >= {SCALING_TARGET:g}x at 32 against 1)" if (lo, hi) == (1, 32) else ""
        c.print(f"hetrun: {hi} streams give {scale:.2f}x the tokens/s of {lo}{target}")
    for n in (8, 32):
        if n in hetrun_rows and n in ref_rows:
            ratio = hetrun_rows[n]["tokens_per_s"] / ref_rows[n]["tokens_per_s"]
            c.print(f"hetrun / transformers serve at {n} streams: {ratio:.2f}x (goal >= {REFERENCE_TARGET:g}x)")
    if r["reference_skipped"]:
        c.print(f"reference skipped: {r['reference_skipped']}")
    before, after = r["load_average"]["before"][0], r["load_average"]["after"][0]
    c.print(f"{r['cpus']} CPUs; load average {before:.1f} before, {after:.1f} after: other work on this machine "
            "skews every figure (the servers ran one after the other, on the same cores)")


def _pp(p: dict) -> str:
    return f"{p['p50']:.0f} / {p['p90']:.0f}" if p else "-"


BENCHMARKS = {
    "serve": Benchmark(
        "hetrun serve at 1, 8 and 32 concurrent streams, against transformers serve with continuous batching",
        _arguments, _main,
        "  hetrun bench serve\n  hetrun bench serve --concurrency 1,32 --max-tokens 128 --no-reference\n"
        "  hetrun bench serve --model path/to/model-dir --profile mixed-demo --precision none --json"),
}
