"""Deployed memory against the plan: what a CPU device's compiled experts add to this process's resident memory, as
deploy measures it (model.hetrun.memory), within 10% of the expert bytes `hetrun plan` predicts for that device.

The experts are large enough (69 MB each in FP32) that a session's fixed cost does not count. The format here is
one onnxruntime holds as stored (FP32), so any FP32 or BF16 copy of an expert left alive -- in hetrun, in the
transformers module, in the runtime's Python wrapper -- shows as a ratio of 2 or more.
"""

import json

import pytest
import torch
import transformers
import yaml

import hetrun
from hetrun.checkpoint.writer import random_checkpoint
from hetrun.cli import main

PROFILE = {"name": "ort-only", "devices": [{"id": "ort", "type": "host-cpu", "count": 1, "backend": "onnxruntime"}],
           "dense_device": "ort"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.MixtralConfig(hidden_size=1024, intermediate_size=5632, num_local_experts=4,
                                        num_experts_per_tok=2, num_hidden_layers=1, vocab_size=256,
                                        num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    return random_checkpoint(config, tmp_path_factory.mktemp("mem") / "model", torch.bfloat16, shards=2)


def test_measured_resident_memory_matches_hetrun_plan(checkpoint, tmp_path, capsys):
    profile = tmp_path / "ort.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    assert main(["plan", "--model", str(checkpoint), "--profile", str(profile), "--precision", "fp32", "--json",
                 "-o", str(tmp_path / "plan.json")]) == 0
    planned = {d: v["weight_bytes"] for d, v in json.loads(capsys.readouterr().out)["devices"].items()}
    model = hetrun.deploy(checkpoint, str(profile), precision="fp32", threads=1)
    report = model.hetrun.memory.report(model.hetrun.plan)
    assert set(report) == set(planned) == {"ort:0"}
    for device, rec in report.items():
        print(f"{device}: measured {rec['measured_bytes'] / 1e6:.1f} MB, hetrun plan {planned[device] / 1e6:.1f} MB, "
              f"ratio {rec['ratio']:.3f}")
        assert rec["predicted_bytes"] == planned[device] and rec["experts"] == 4
        assert 0.9 <= rec["measured_bytes"] / planned[device] <= 1.1
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
