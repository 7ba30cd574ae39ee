"""`hetrun serve` as its users run it: the real server in a child process on a free loopback port, FP32 on the cpu
profile (onnxruntime and OpenVINO experts), talked to with the real openai client and with raw HTTP.

One server serves every test of this module (with an API key, as HETRUN_API_KEY); test_serve_lifecycle.py has the
ones that stop theirs.
"""

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import transformers

openai = pytest.importorskip("openai", reason="the openai package (pip install -e '.[test]') is the client under test")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hetrun.serve.builtin import builtin_model_dir, training_text  # noqa: E402

API_KEY = "test-key-1234"
CONTEXT = 512  # the built-in model's context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m hetrun serve ARGS` on a free port; ready when /health answers."""

    def __init__(self, args: list[str], env: dict | None = None, log_path=None):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w+") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "hetrun", "serve", *args, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"hetrun serve exited with {self.proc.returncode}: {self.output()}"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"hetrun serve did not become healthy: {self.output()}")

    def output(self) -> str:
        if not self.log_path:
            return ""
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-2000:]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_path:
            self.log.close()
        return self.proc.returncode


def metric(text: str, name: str) -> float:
    """The value of one metric in Prometheus text, summed over its label sets (0 when it has no sample yet)."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="session")
def model_dir():
    return builtin_model_dir()  # trains the built-in model once (seconds), then it is cached


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(["--profile", "cpu", "--precision", "fp32", "--max-num-seqs", "32", "--max-queue", "64"],
               env={"HETRUN_API_KEY": API_KEY}, log_path=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The untouched transformers model and tokenizer of the same directory."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    return model, tok


def greedy_text(reference, ids: list[int], max_new: int) -> tuple[str, int, bool]:
    model, tok = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):].tolist()
    stopped = bool(out) and out[-1] == tok.eos_token_id
    return tok.decode(out, skip_special_tokens=True), len(out), stopped


def test_models_health_metrics_open_without_key(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = server.get("/metrics")
    assert status == 200
    text = body.decode()
    for name in ("hetrun_requests_total", "hetrun_prompt_tokens_total", "hetrun_generation_tokens_total",
                 "hetrun_queue_depth", "hetrun_time_to_first_token_seconds_bucket",
                 "hetrun_time_per_output_token_seconds_bucket", "hetrun_device_expert_tokens_total",
                 "hetrun_device_modeled_seconds_total", "hetrun_device_measured_seconds_total"):
        assert name in text
    assert 'hetrun_device_expert_tokens_total{device="ort:0"}' in text
    assert 'hetrun_device_expert_tokens_total{device="ov:0"}' in text


def test_completion_is_the_untouched_models_greedy_text_with_usage(client, reference):
    prompt = "The harbour master"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    ids = reference[1](prompt)["input_ids"]
    want, n, _ = greedy_text(reference, ids, 24)
    assert r.choices[0].text == want and want.strip()
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    known = set(re.findall(r"[a-z]+", training_text().lower()))
    said = re.findall(r"[a-z]+", want.lower())[:-1]  # the last word may be cut by max_tokens
    assert sum(w in known for w in said) >= 0.8 * len(said)  # it reads like the text it was trained on


def test_expert_load_trace_feeds_the_planner(server, client, model_dir, tmp_path):
    client.completions.create(model="tiny", prompt="The harbour master", max_tokens=8, temperature=0)
    assert server.get("/v1/expert_load")[0] == 401  # behind the API key, like /v1/models
    status, body = server.get("/v1/expert_load", headers={"Authorization": f"Bearer {API_KEY}"})
    trace = json.loads(body)
    table = trace["tokens_per_expert"]  # [L, E] as EPLB lays it out
    assert status == 200 and len(table) == trace["layers"] and {len(r) for r in table} == {trace["experts"]}
    assert sum(map(sum, table)) > 0
    (tmp_path / "load.json").write_bytes(body)
    from hetrun.cli import main
    assert main(["plan", "--model", str(model_dir), "--profile", "cpu", "--load", str(tmp_path / "load.json"),
                 "-o", str(tmp_path / "plan.json")]) == 0


def test_chat_applies_the_chat_template_and_stops_at_eos(client, reference):
    messages = [{"role": "user", "content": "What does the clock maker do?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0)
    ids = reference[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    want, n, stopped = greedy_text(reference, ids, 60)
    assert stopped, "the built-in model answers its training questions and ends with </s>"
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert "blue book" in want


def test_streams_give_the_same_text_and_usage(client):
    whole = client.completions.create(model="tiny", prompt="The lamp keeper", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="The lamp keeper", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Who reads the words?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert stream[-1].usage.completion_tokens == whole.usage.completion_tokens  # usage on the last chunk always


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt="The harbour master", max_tokens=40, temperature=0)
    text = full.choices[0].text
    words = text.split()
    stop = " " + words[3]  # a stop string a few words in
    cut = text[:text.index(stop)]
    r = client.completions.create(model="tiny", prompt="The harbour master", max_tokens=40, temperature=0,
                                  stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    chunks = list(client.completions.create(model="tiny", prompt="The harbour master", max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    kw = dict(model="tiny", prompt="The rope maker", max_tokens=24, temperature=1.2, top_p=0.9, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 24


def test_api_key_refused_and_accepted(server):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, body = server.request("POST", "/v1/completions", json.dumps({"prompt": "x"}).encode())
    assert status == 401 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200


def _post(server, body, path="/v1/completions"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.request("POST", path, raw, {"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", None),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "model": "gpt-4"}, "model", "model_not_found"),
    ({"prompt": list(range(1, 40)) * 14}, "prompt", "context_length_exceeded"),
    ({"prompt": "x", "max_tokens": CONTEXT}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "x", "n": 2}, "n", None),
    ({"prompt": "x", "temperature": 3}, "temperature", None),
])
def test_bad_requests_are_400_openai_errors(server, body, param, code):
    status, raw = _post(server, body)
    assert status == 400
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code


def test_no_cross_talk_32_concurrent_greedy_equal_alone(server):
    """32 different prompts at once, greedy FP32: each answer equals the same request served alone."""
    prompts = [f"{w} {i}" for i, w in enumerate(["The harbour", "Every word", "The clock maker", "A child",
                                                 "When the fog", "The grey island", "Two experts", "At the end"] * 4)]
    kw = dict(model="tiny", max_tokens=16, temperature=0)
    alone = [client_call(server, p, kw) for p in prompts]

    async def together():
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0,
                               timeout=300)
        rs = await asyncio.gather(*(c.completions.create(prompt=p, **kw) for p in prompts))
        await c.close()
        return [(r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) for r in rs]

    assert asyncio.run(together()) == alone
    assert len({a[0] for a in alone}) > 8  # different prompts, different answers


def client_call(server, prompt, kw):
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = c.completions.create(prompt=prompt, **kw)
    return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason


def test_a_client_that_disconnects_frees_its_slot_streamed_or_not(server):
    def metrics():
        return server.get("/metrics")[1].decode()

    def wait_cancelled(count):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric(metrics(), "hetrun_requests_cancelled_total") < count:
            time.sleep(0.1)
        text = metrics()
        assert metric(text, "hetrun_requests_cancelled_total") == count
        assert metric(text, "hetrun_requests_running") == 0 and metric(text, "hetrun_queue_depth") == 0

    cancelled = metric(metrics(), "hetrun_requests_cancelled_total")
    for stream in (True, False):
        body = json.dumps({"prompt": "The harbour", "max_tokens": 450, "stream": stream}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}"})
        if stream:  # read a few events, then hang up
            r = conn.getresponse()
            assert r.status == 200
            events = 0
            while events < 3:
                events += r.readline().startswith(b"data:")
        else:  # hang up while the answer is being generated
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and metric(metrics(), "hetrun_requests_running") < 1:
                time.sleep(0.02)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        cancelled += 1
        wait_cancelled(cancelled)


# ---- fuzzing: malformed requests -------------------------------------------------------------------------------
_not_int = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_not_number = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))
_bad_field = st.one_of(
    st.tuples(st.just("max_tokens"), st.one_of(_not_int, st.integers(max_value=0),
                                               st.integers(min_value=CONTEXT, max_value=10**12))),
    st.tuples(st.just("temperature"), st.one_of(_not_number, st.floats(min_value=2.001, max_value=1e6),
                                                st.floats(max_value=-0.001, min_value=-1e6))),
    st.tuples(st.just("top_p"), st.one_of(_not_number, st.floats(min_value=1.001, max_value=1e6),
                                          st.floats(max_value=0, min_value=-1e6))),
    st.tuples(st.just("n"), st.one_of(_not_int, st.integers(min_value=2, max_value=1000),
                                      st.integers(max_value=0))),
    st.tuples(st.just("stream"), st.one_of(st.text(max_size=3), st.integers(), st.floats(allow_nan=False))),
    st.tuples(st.just("stop"), st.one_of(st.integers(), st.lists(st.text(min_size=1), min_size=5, max_size=6),
                                         st.just(""), st.lists(st.integers(), min_size=1, max_size=2))),
    st.tuples(st.just("seed"), st.one_of(st.text(max_size=3), st.floats(allow_nan=False), st.booleans())),
    st.tuples(st.just("model"), st.one_of(st.text(min_size=1, max_size=8).filter(lambda s: s != "tiny"),
                                          st.integers(), st.booleans())),
    st.tuples(st.just("prompt"), st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                                           st.just(None), st.just(""), st.just([]),
                                           st.lists(st.integers(min_value=10**6), min_size=1, max_size=3),
                                           st.lists(st.text(max_size=3), min_size=2, max_size=3))),
    st.tuples(st.text(min_size=1, max_size=8).filter(lambda k: k not in {
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
        "user", "presence_penalty", "frequency_penalty", "logit_bias", "echo", "best_of", "logprobs", "suffix"}),
        st.integers()),  # an unknown field
)
_bad_chat = st.one_of(
    st.just({"messages": []}),
    st.just({"messages": "hello"}),
    st.builds(lambda role: {"messages": [{"role": role, "content": "hi"}]},
              st.text(max_size=6).filter(lambda r: r not in {"system", "developer", "user", "assistant"})),
    st.builds(lambda content: {"messages": [{"role": "user", "content": content}]},
              st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=2))),
    st.just({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
    st.just({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}),
)
_malformed = st.one_of(
    st.builds(lambda kv: ("/v1/completions", json.dumps({"prompt": "The harbour", "max_tokens": 4,
                                                         kv[0]: kv[1]}).encode()), _bad_field),
    st.builds(lambda body: ("/v1/chat/completions", json.dumps(body).encode()), _bad_chat),
    st.builds(lambda raw: ("/v1/completions", raw), st.binary(max_size=40).filter(lambda b: not _is_object(b))),
    st.builds(lambda v: ("/v1/chat/completions", json.dumps(v).encode()),
              st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3), st.none())),
)


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def test_fuzzed_malformed_requests_get_4xx_json_and_the_server_stays_up(server):
    seen = []

    @settings(max_examples=320, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(_malformed)
    def check(case):
        path, raw = case
        status, body = _post(server, raw, path)
        assert 400 <= status < 500, (status, raw, body)
        err = json.loads(body)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
        seen.append(status)

    check()
    assert len(seen) >= 300
    assert server.get("/health")[0] == 200
    status, body = _post(server, {"prompt": "The harbour", "max_tokens": 5})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 5


# ---- lifecycle: a server of its own --------------------------------------------------------------------------------
def test_full_queue_is_429_and_sigterm_drains_8_streams_then_exits_0(model_dir, tmp_path):
    import threading

    s = Server(["--profile", "cpu", "--precision", "fp32", "--max-num-seqs", "4", "--max-queue", "4",
                "--drain-timeout", "300"], log_path=tmp_path / "server.log")
    results = [None] * 8

    def stream(i):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=300)
        conn.request("POST", "/v1/completions",
                     json.dumps({"prompt": f"The harbour {i}", "max_tokens": 60, "stream": True}).encode())
        r = conn.getresponse()
        events = [line[6:].strip() for line in r.read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
        results[i] = (r.status, events)

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # all 8 admitted: 4 decoding, 4 waiting for a slot
            text = s.get("/metrics")[1].decode()
            if metric(text, "hetrun_queue_depth") + metric(text, "hetrun_requests_running") == 8:
                break
            time.sleep(0.05)
        status, body = s.request("POST", "/v1/completions", json.dumps({"prompt": "one more"}).encode())
        assert status == 429, body
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # no new connections once draining
            s.get("/health")
        for t in threads:
            t.join(timeout=300)
        assert s.proc.wait(timeout=120) == 0, s.output()
    finally:
        s.stop()
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        assert last["usage"]["completion_tokens"] == 60 or last["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model"], "neither a model directory, a bundle nor a built-in model"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_start_errors_are_one_line_exit_2(args, message):
    p = subprocess.run([sys.executable, "-m", "hetrun", "serve", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_a_model_directory_without_tokenizer_is_a_clear_error(model_dir, tmp_path):
    import shutil

    for f in model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, tmp_path / f.name)
    p = subprocess.run([sys.executable, "-m", "hetrun", "serve", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "has no tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_help_has_examples():
    p = subprocess.run([sys.executable, "-m", "hetrun", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "examples:" in p.stdout and "curl localhost:8000/v1/completions" in p.stdout
