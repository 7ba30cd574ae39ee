"""onnxruntime sessions share one thread pool per process, unless HETRUN_ORT_THREAD_POOL=per-session asks otherwise
(hetrun.backends.ort_threads)."""

import json
import os
import subprocess
import sys

import pytest
from hetrun.backends import ort_threads

from hetrun import once
from hetrun.errors import HetrunError

# A fresh process (onnxruntime's pool choice is made once per process): threads before any session, after one
# expert session, after five more, and whether a session opened with onnxruntime's default options still opens.
CHILD = r"""
import json, os, sys
import numpy as np
from hetrun.backends.onnxruntime import inference_session, session_options
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.weights import ExpertWeights

def threads():
    return len(os.listdir("/proc/self/task"))

rng = np.random.default_rng(0)
w = ExpertWeights(*(rng.standard_normal(s).astype(np.float32) for s in ((32, 16), (32, 16), (16, 32))))
graph = build_expert_graph(w, "fp32").serialize()
out = {"start": threads()}
sessions = [inference_session(graph, session_options(2), ["CPUExecutionProvider"])]
out["one"] = threads()
sessions += [inference_session(graph, session_options(2), ["CPUExecutionProvider"]) for _ in range(5)]
out["six"] = threads()
x = np.ones((1, 16), np.float32)
out["same"] = all(np.array_equal(s.run(None, {"x": x})[0], sessions[0].run(None, {"x": x})[0]) for s in sessions)
print(json.dumps(out))
"""


def _child(pool: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HETRUN_ORT_THREAD_POOL"}
    if pool is not None:
        env["HETRUN_ORT_THREAD_POOL"] = pool
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_sessions_share_one_pool_by_default_and_have_their_own_when_asked():
    shared, own = _child(None), _child("per-session")
    assert shared["same"] and own["same"]
    assert shared["six"] == shared["one"]  # five more sessions, no more threads
    assert own["six"] - own["one"] >= 5  # a pool thread per session (2 threads: the caller and one more)


def test_a_bad_pool_choice_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HETRUN_ORT_THREAD_POOL", "global")
    with pytest.raises(HetrunError, match="HETRUN_ORT_THREAD_POOL='global' .* shared or per-session"):
        ort_threads.pool_choice()
    monkeypatch.setenv("HETRUN_ORT_THREAD_POOL", " Per-Session ")
    assert ort_threads.pool_choice() == "per-session"


def test_another_thread_count_gets_the_shared_pool_said_once(monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.delenv("HETRUN_ORT_THREAD_POOL", raising=False)
    once.said.clear()
    opts = ort.SessionOptions()
    ort_threads.use_thread_pool(opts, 2)  # this test process's pool: made here, or by an earlier test
    size = ort_threads._shared_threads
    assert size is not None and not opts.use_per_session_threads
    other = size + 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="hetrun"):
        for _ in range(3):
            ort_threads.use_thread_pool(ort.SessionOptions(), other)
        ort_threads.use_thread_pool(ort.SessionOptions(), None)  # no count asked: the pool as it is, nothing said
    said = [r.getMessage() for r in caplog.records if "shared onnxruntime thread pool" in r.getMessage()]
    assert len(said) == 1 and f"a thread count of {other} " in said[0]
