"""`hetrun serve` with live rebalancing and a hot-expert cache (the profile's `rebalance:` and `cache:` sections): the
real server in a child process, its greedy FP32 answers the untouched model's while plans switch and experts load
into the cache, and every move, byte and cache hit counted in /metrics."""

import re

import pytest
import yaml

from hetrun.formats import expert_bytes
from hetrun.profile import device_catalog
from hetrun.spec import MoESpec
from tests.test_serve import Server, greedy_text, metric, model_dir, reference  # noqa: F401 -- two are fixtures

openai = pytest.importorskip("openai", reason="the openai package (pip install -e '.[test]') is the client under test")

# Two onnxruntime devices (a moved or cached expert computes the same bits on either); `fast` is modeled 4x faster
# but holds only half the experts, so moves follow the hot ones there and its cache saves modeled time. A short
# window and no threshold: plans switch many times in a few requests.
_HOST = device_catalog()["host-cpu"].model_dump()
PROFILE = {
    "name": "live-serve",
    "device_types": {"fast-cpu": {**_HOST, "name": "fast-cpu", "description": "this CPU, modeled 4x faster",
                                  "tflops": {k: 4 * v for k, v in _HOST["tflops"].items()},
                                  "memory_bw_gbs": 4 * _HOST["memory_bw_gbs"],
                                  "memory_gb": 0.0005}},  # half of the tiny model's 24 FP32 experts
    "devices": [{"id": "slow", "type": "host-cpu", "backend": "onnxruntime"},
                {"id": "fast", "type": "fast-cpu", "backend": "onnxruntime"}],
    "dense_device": "slow",
    "rebalance": {"window_steps": 4, "ema": 0.8, "threshold": 0.0, "max_move_gb": 1.0},
    "cache": {"device": "fast", "slots": 4, "half_life_steps": 4},
}
PROMPTS = ["The harbour master", "The lamp keeper", "Who reads the words?", "The clock maker", "The baker",
           "At night the sea"]


def test_serving_moves_and_caches_experts_counts_them_and_answers_as_the_untouched_model(reference, model_dir,  # noqa: F811
                                                                                       tmp_path):
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    s = Server(["--profile", str(path), "--precision", "fp32", "--threads", "1"], log_path=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt in PROMPTS:  # one at a time: every answer spans several windows, switches and cache loads
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
            want, _, _ = greedy_text(reference, reference[1](prompt)["input_ids"], 24)
            assert r.choices[0].text == want, prompt
        text = s.get("/metrics")[1].decode()
    finally:
        assert s.stop() == 0, s.output()

    switches, moves = metric(text, "hetrun_rebalance_switches_total"), metric(text, "hetrun_rebalance_moves_total")
    assert switches >= 2 and moves >= 1, text
    assert metric(text, "hetrun_rebalance_plan_version") == switches
    assert metric(text, "hetrun_rebalance_failures_total") == 0
    pairs = dict(((m[0], m[1]), float(m[2])) for m in
                 re.findall(r'^hetrun_rebalance_moves_total{from="([^"]*)",to="([^"]*)"} (\S+)$', text, re.M))
    assert sum(pairs.values()) == moves and all(a != b for a, b in pairs)  # a move goes between two devices
    spec = MoESpec.from_hf_config(reference[0].config)
    one = expert_bytes("fp32", spec.hidden_size, spec.moe_intermediate_size)
    assert metric(text, "hetrun_rebalance_bytes_total") == moves * one  # every copy one FP32 expert

    hits, misses = metric(text, "hetrun_cache_hits_total"), metric(text, "hetrun_cache_misses_total")
    loads = metric(text, "hetrun_cache_loads_total")
    assert hits > 0 and misses > 0 and loads > 0
    assert metric(text, "hetrun_cache_hit_rate") == pytest.approx(hits / (hits + misses))
    assert metric(text, "hetrun_cache_loaded_bytes_total") == loads * one
    assert metric(text, "hetrun_cache_saved_modeled_seconds_total") > 0  # hits ran on the modeled-faster device
    assert metric(text, "hetrun_cache_load_modeled_seconds_total") > 0
    # never more than its 4 slots; possibly none at this moment: a plan switch that moves the cached (hot) experts
    # home to the fast device drops their cached copies, and the slots refill as the next loads finish
    assert 0 <= metric(text, 'hetrun_cache_experts{device="fast:0"}') <= 4
