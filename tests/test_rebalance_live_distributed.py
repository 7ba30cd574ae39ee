"""Live rebalancing under torchrun: every rank switches to the same plan at the same step, agreed through the step
headers, and logits and greedy tokens stay bit-identical to one process running the static plan; every move is in
the merged trace and the report; a moved expert's weights are read again from the receiving rank's own source (the
checkpoint), never sent over the collective."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hetrun
from hetrun.checkpoint.writer import save_checkpoint
from hetrun.placement.planner import plan
from hetrun.tiny_models import FAMILY_SPECS, tiny_model
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
                                "out": str(tmp_path), "step_logits": True}))
    codes = ranks.run(2, tmp_path, "equivalence", [str(case)])
    assert all(c == 0 for c in codes.values()), {r: (tmp_path / f"rank{r}.err").read_text()[-2000:] for r in codes}
    got = torch.load(tmp_path / "results.pt")
    for family in FAMILIES:
        static = hetrun.deploy(fresh(family), profile(dense, False), precision="fp32", plan=plans[family], threads=1)
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = static(ids).logits
                gen = static.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)
            assert torch.equal(got["results"][family][i][0], logits), (family, i)
            assert torch.equal(got["results"][family][i][1], gen.sequences), (family, i)
            # every decode step's logits, bit for bit: before, during (a job preparing) and after each switch
            assert torch.equal(got["results"][family][i][2], torch.stack(gen.logits)), (family, i)
        switches = [s["switches"] for s in got["stats"][family]]
        assert switches[0] and switches[0] == switches[1], switches  # the same versions at the same steps
        assert sum(moves for _, _, moves in switches[0]) > 0  # experts moved, not only token shares


def test_launch_trace_and_report_carry_every_move(ranks, tmp_path):
    """`torchrun -m hetrun.launch --trace --report` with a `rebalance:` profile: each rank's lane of the merged Chrome
    trace has every plan switch with its moves (expert, from, to, bytes), the same on both ranks, and the report's
    per-rank switches agree."""
    import yaml

    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(profile("every_rank", True)))
    codes = ranks.run(2, tmp_path, "launch", [
        "--model", "tiny:qwen3_moe", "--profile", str(path), "--precision", "fp32", "--threads", "1",
        "--redundant-experts", "2", "--max-new-tokens", str(MAX_NEW), "--prompt-ids",
        ";".join(",".join(map(str, p)) for p in PROMPTS), "--trace", str(tmp_path / "t.json"),
        "--report", str(tmp_path / "r.json")])
    assert codes == {0: 0, 1: 0}, {r: (tmp_path / f"rank{r}.err").read_text()[-2000:] for r in codes}
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    switches = {r: [e for e in events if e.get("pid") == r and e["name"].startswith("rebalance v")] for r in (0, 1)}
    agreed = {r: [{k: v for k, v in e["args"].items() if k != "prepare_s"} for e in switches[r]] for r in (0, 1)}
    assert switches[0] and agreed[0] == agreed[1]  # each rank prepared its own copies, in its own time
    moves = [m for e in switches[0] for m in e["args"]["moves"]]
    assert moves and all(set(m) == {"layer", "expert", "from", "to", "bytes"} and m["from"] != m["to"]
                         and m["bytes"] > 0 for m in moves)
    for e in switches[0]:
        assert e["args"]["count"] == len(e["args"]["moves"]) and e["args"]["bytes"] == sum(
            m["bytes"] for m in e["args"]["moves"])
    report = json.loads((tmp_path / "r.json").read_text())
    for rank in report["ranks"]:
        assert [[v, n] for v, _, n in rank["switches"]] == [[int(e["name"].split("v")[1]), e["args"]["count"]]
                                                             for e in switches[0]]


def test_moved_experts_are_read_again_from_the_checkpoint_on_their_new_rank(tmp_path):
    """Two real ranks (torchrun) deploy a checkpoint directory, the dense part on rank 0 alone. Each rank reads its
    own experts at deploy, and each expert live rebalancing moves onto its device once more, from the files: every
    (layer, expert) is read exactly (held at deploy) + (moves onto this rank) times, plus once for a plan prepared in
    the background but not yet switched to when generation ended. Tokens equal one process running
    the static plan of the same directory."""
    family = "qwen3_moe"
    ckpt = save_checkpoint(tiny_model(family), tmp_path / "ckpt", max_shard_bytes=200_000)
    prof = profile("rank0", True)
    p = plan(FAMILY_SPECS[family], profile("rank0", False), redundant_experts=2, precision="fp32")
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"model": str(ckpt), "profile": prof, "plan": p.to_json(), "prompts": PROMPTS,
                                "max_new_tokens": MAX_NEW, "out": str(tmp_path)}))
    helper = Path(__file__).parent / "rebalance_rank.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(helper),
           str(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["moves"] and ranks[0]["moves"] == ranks[1]["moves"]  # the same moves at the same steps
    layers = FAMILY_SPECS[family].moe_layer_ids
    moved_in = [0, 0]
    for r, got in enumerate(ranks):
        (d,) = got["local_devices"]
        dev = p.device_ids[d]
        for li, layer in enumerate(layers):
            for e in range(p.spec.num_experts):
                held = int(e in p.phy2log[li][p.device_of[li] == d].tolist())
                moves = sum(1 for m in got["moves"] if (m["layer"], m["expert"], m["to"]) == (li, e, dev))
                prepared = sum(1 for m in got["prepared"] if (m["layer"], m["expert"], m["to"]) == (li, e, dev))
                moved_in[r] += moves
                name = f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"
                assert got["reads"].get(name, 0) == held + moves + prepared, (r, name, held, moves, prepared)
    assert sum(moved_in) == len(ranks[0]["moves"]) > 0
    static = hetrun.deploy(str(ckpt), profile("rank0", False), precision="fp32", plan=p, threads=1)
    for prompt, got in zip(PROMPTS, ranks[0]["tokens"]):
        with torch.no_grad():
            want = static.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                   do_sample=False)
        assert got == want[0].tolist()
