"""Live rebalancing under torchrun: every rank switches to the same plan at the same step, agreed through the step
headers, and logits and greedy tokens stay bit-identical to one process running the static plan."""

import json

import pytest
import torch

import hetrun
from hetrun.placement.planner import plan
from hetrun.tiny_models import FAMILY_SPECS
from tests.test_distributed import Ranks

FAMILIES = ["qwen3_moe", "deepseek_v3"]
PROMPTS = [[17, 3, 250, 9, 41], [5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 1, 99]]
MAX_NEW = 12


def profile(dense: str, rebalance: bool) -> dict:
    """Two ranks with one onnxruntime device each: a moved expert computes the same bits on either."""
    out = {"name": "live-2", "devices": [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
                                         {"id": "b", "type": "host-cpu", "backend": "onnxruntime"}],
           "distributed": {"ranks": "per_device", "dense": dense, "timeout_s": 60}}
    if rebalance:
        out["rebalance"] = {"window_steps": 2, "ema": 0.8, "threshold": 0.0, "max_move_gb": 1.0}
    return out


@pytest.fixture(scope="module")
def ranks():
    r = Ranks()
    yield r
    r.close()


@pytest.mark.parametrize("dense", ["rank0", "every_rank"])
def test_ranks_switch_together_and_match_one_static_process(ranks, fresh, tmp_path, dense):
    plans = {f: plan(FAMILY_SPECS[f], profile(dense, False), redundant_experts=2, precision="fp32") for f in FAMILIES}
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"families": FAMILIES, "profile": profile(dense, True), "prompts": PROMPTS,
                                "max_new_tokens": MAX_NEW, "plans": {f: p.to_json() for f, p in plans.items()},
                                "out": str(tmp_path)}))
    codes = ranks.run(2, tmp_path, "equivalence", [str(case)])
    assert all(c == 0 for c in codes.values()), {r: (tmp_path / f"rank{r}.err").read_text()[-2000:] for r in codes}
    got = torch.load(tmp_path / "results.pt")
    for family in FAMILIES:
        static = hetrun.deploy(fresh(family), profile(dense, False), precision="fp32", plan=plans[family], threads=1)
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = static(ids).logits
                tokens = static.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)
            assert torch.equal(got["results"][family][i][0], logits), (family, i)
            assert torch.equal(got["results"][family][i][1], tokens), (family, i)
        switches = [s["switches"] for s in got["stats"][family]]
        assert switches[0] and switches[0] == switches[1], switches  # the same versions at the same steps
        assert sum(moves for _, _, moves in switches[0]) > 0  # experts moved, not only token shares
