"""Expert parallelism across real processes: gloo on this CPU, 2 and 4 ranks, one on onnxruntime, one on OpenVINO.

Ranks are forked by tests/distributed_ranks.py (torchrun's environment contract, imports paid once per module).
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hetrun
from hetrun.distributed.ranks import resolve_layout
from hetrun.errors import ProfileError
from hetrun.placement.plan import Plan
from hetrun.placement.planner import simple_plan
from hetrun.placement.precisions import plan_precisions
from hetrun.profile import load_profile
from hetrun.tiny_models import FAMILY_SPECS
from tests.conftest import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"},
           {"id": "ov", "type": "host-cpu", "backend": "openvino"},
           {"id": "sim", "type": "h100-sxm", "count": 2, "backend": "simulated"}]
RANKS = {2: [["ort", "sim:0"], ["ov", "sim:1"]], 4: "per_device"}
PROMPTS = [[17, 3, 250, 9, 41], [5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 1, 99]]  # uneven lengths
MAX_NEW = 20


def profile(world: int, dense: str, timeout: float = 30.0) -> dict:
    return {"name": "ep-test", "devices": DEVICES,
            "distributed": {"ranks": RANKS[world], "dense": dense, "timeout_s": timeout}}


def replicated_plan(family: str, prof: dict) -> Plan:
    """Experts 0 and 1 get a second slot on the next device (always another rank here), with uneven shares."""
    spec, p = FAMILY_SPECS[family], load_profile(prof)
    n_dev, e, layers, s = len(p.devices), spec.num_experts, spec.num_moe_layers, spec.num_shared_experts
    phy2log = np.tile(np.concatenate([np.arange(e), [0, 1]]), (layers, 1))  # [L, E+2]
    base = (np.arange(e)[None, :] + np.arange(layers)[:, None]) % n_dev  # [L, E]
    device_of = np.concatenate([base, (base[:, :2] + 1) % n_dev], axis=1)  # [L, E+2]
    share = np.ones((layers, e + 2))
    share[:, [0, e]] = [0.3, 0.7]
    share[:, [1, e + 1]] = [0.5, 0.5]
    shared = (np.arange(s)[None, :] + np.arange(layers)[:, None] + 1) % n_dev  # [L, S]
    return Plan(spec, p.name, tuple(d.id for d in p.devices), plan_precisions(p, "fp32"), phy2log, device_of, share,
                shared.reshape(layers, s))


class Ranks:
    """Client of the forking helper; one per test module."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.distributed_ranks"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._line(180) == "ready"

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the rank launcher did not answer"
        return self.proc.stdout.readline().strip()

    def start(self, nproc: int, out: Path, target: str, args: list[str], deadline: float = 90.0, **extra) -> None:
        self.proc.stdin.write(json.dumps({"nproc": nproc, "out": str(out), "target": target, "args": args,
                                          "deadline": deadline, **extra}) + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 120.0) -> dict[int, int | None]:
        return {int(r): c for r, c in json.loads(self._line(timeout))["exit"].items()}

    def run(self, nproc: int, out: Path, target: str, args: list[str], deadline: float = 90.0):
        self.start(nproc, out, target, args, deadline)
        return self.wait(deadline + 30)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def ranks():
    r = Ranks()
    yield r
    r.close()


def _pids(out: Path, nproc: int, timeout: float = 60) -> dict[int, int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = (out / "pids").read_text().split() if (out / "pids").exists() else []
        if len(lines) == 2 * nproc:
            return {int(lines[i]): int(lines[i + 1]) for i in range(0, len(lines), 2)}
        time.sleep(0.05)
    raise AssertionError("ranks did not start")


def _wait_for(path: Path, text: str, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"'{text}' never appeared in {path}: {path.read_text() if path.exists() else '(none)'}")


# ---- the layout is a property of the profile ----------------------------------------------------------------------

def test_layout_from_profile_and_bad_layouts():
    lay = resolve_layout(profile(2, "rank0"))
    assert lay.ranks == (("ort:0", "sim:0"), ("ov:0", "sim:1"))
    assert lay.dense_ranks == (0,) and lay.rank_of("sim:1") == 1
    assert resolve_layout(profile(4, "every_rank")).ranks == (("ort:0",), ("ov:0",), ("sim:0",), ("sim:1",))
    assert resolve_layout({"name": "x", "devices": DEVICES}) is None
    with pytest.raises(ProfileError, match="leaves ov:0 on no rank"):
        load_profile({**profile(2, "rank0"), "distributed": {"ranks": [["ort", "sim"]]}})
    with pytest.raises(ProfileError, match="on rank 0 and rank 1"):
        load_profile({**profile(2, "rank0"), "distributed": {"ranks": [["ort", "sim"], ["ov", "sim:1"]]}})
    with pytest.raises(ProfileError, match="names 'gpu'"):
        load_profile({**profile(2, "rank0"), "distributed": {"ranks": [["ort", "sim", "gpu"], ["ov"]]}})


def test_one_process_runs_a_distributed_profile_whole(fresh):
    """Outside torchrun the same profile deploys in one process: the reference the ranks must match."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = fresh("olmoe")(ids).logits
        got = hetrun.deploy(fresh("olmoe"), profile(4, "every_rank"), precision="fp32")(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# ---- equivalence with the one-process run ------------------------------------------------------------------------

_REFERENCE: dict = {}


def _reference(fresh, family: str, plan: Plan, prof: dict) -> dict:
    key = (family, plan.to_json())
    if key in _REFERENCE:
        return _REFERENCE[key]
    model = hetrun.deploy(fresh(family), prof, precision="fp32", plan=plan, threads=1)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 busy cores, 2 intra-op threads make each tiny index_add_ take ~30 ms
    try:
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([p])
            with torch.no_grad():
                out[i] = (model(ids).logits,
                          model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False))
    finally:
        torch.set_num_threads(threads)
    _REFERENCE[key] = out
    return out


@pytest.mark.parametrize("world,dense", [(2, "rank0"), (4, "every_rank")])
def test_ranks_match_one_process_for_every_family(ranks, fresh, tmp_path, world, dense):
    """Logits and 20 greedy tokens are bit-identical to one process, with replicated experts split across ranks.

    2 ranks: rank 0 holds the dense parts and all three prompts, rank 1 serves experts only.
    4 ranks (DP-attention + EP): prompts of 5, 9 and 3 tokens go to ranks 0-2; rank 3 has none and only serves.
    """
    prof = profile(world, dense)
    plans = {f: replicated_plan(f, prof) if (f, world) != ("mixtral", 2) else simple_plan(FAMILY_SPECS[f], prof, "fp32")
             for f in FAMILIES}
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"families": FAMILIES, "profile": prof, "prompts": PROMPTS, "max_new_tokens": MAX_NEW,
                                "plans": {f: p.to_json() for f, p in plans.items()}, "out": str(tmp_path)}))
    codes = ranks.run(world, tmp_path, "equivalence", [str(case)])
    errs = {r: (tmp_path / f"rank{r}.err").read_text()[-2000:] for r in codes}
    assert all(c == 0 for c in codes.values()), errs
    got = torch.load(tmp_path / "results.pt")
    for family in FAMILIES:
        want = _reference(fresh, family, plans[family], prof)
        for i in range(len(PROMPTS)):
            assert torch.equal(got["results"][family][i][0], want[i][0]), (family, i)
            assert torch.equal(got["results"][family][i][1], want[i][1]), (family, i)
        stats = got["stats"][family]
        assert [s["rank"] for s in stats] == list(range(world))
        assert sum(s["tokens_sent"] for s in stats) == sum(s["tokens_received"] for s in stats) > 0
        assert sum(s["tokens_routed"] for s in stats) == sum(s["tokens_computed"] for s in stats)
        assert any(s["empty_slots"] > 0 for s in stats), "some rank should have had idle expert slots"
        assert len({s["steps"] for s in stats}) == 1  # lockstep
        if dense == "rank0":
            assert stats[1]["holds_dense"] is False and stats[1]["tokens_routed"] == 0 < stats[1]["tokens_computed"]
            assert f"{family}: rank 1 holds experts only" in (tmp_path / "refused1.txt").read_text()
        else:
            routed = [s["tokens_routed"] for s in stats]
            assert routed[3] == 0 < stats[3]["tokens_computed"] and len(set(routed[:3])) == 3  # uneven per rank


# ---- launch: statistics, trace, and a rank that dies -----------------------------------------------------------

def test_torchrun_launch_prints_rank_stats_and_writes_one_merged_trace(tmp_path):
    """The real entry point: torchrun -m hetrun.launch, planning 2 replicas itself; tokens equal a one-process run of the
    plan it wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hetrun.launch", "--model", "tiny:qwen3_moe", "--profile", "loopback-2", "--threads", "1",
           "--prompt-ids", "3,4,5;6,7,8,9,10", "--trace", str(tmp_path / "t.json"), "--report", str(tmp_path / "r.json"),
           "--plan-out", str(tmp_path / "p.json"), "--redundant-experts", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("per-rank statistics (2 ranks, collective gloo") == 1  # rank 0 alone prints
    table = out.split("per-rank statistics")[1].splitlines()
    assert any(line.split()[:2] == ["0", "ort:0"] for line in table)
    assert any(line.split()[:2] == ["1", "ov:0"] for line in table)
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    assert {(e["pid"], e["cat"]) for e in spans} >= {(r, lane) for r in (0, 1) for lane in ("moe", "comm", "experts")}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in spans)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["generated_on"] == [0, 1] and all(len(o) == MAX_NEW for o in report["outputs"])
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    split = [e for e in range(plan.spec.num_experts) if len(set(plan.device_of[0][plan.phy2log[0] == e])) > 1]
    assert split  # the planner replicated experts across both devices, i.e. both ranks
    from hetrun.tiny_models import tiny_model
    model = hetrun.deploy(tiny_model("qwen3_moe"), "loopback-2", plan=plan, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for prompt, want in zip(report["prompts"], report["outputs"]):
            with torch.no_grad():
                gen = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                     do_sample=False)
            assert gen[0, len(prompt):].tolist() == want
    finally:
        torch.set_num_threads(threads)


def test_wrong_world_size_and_unavailable_collectives(ranks, tmp_path, caplog):
    from hetrun.distributed.collectives import choose_collective, probe_collective
    from hetrun.distributed.ranks import wanted_collective
    from hetrun.errors import BackendUnavailable

    codes = ranks.run(2, tmp_path, "launch", ["--model", "tiny:olmoe", "--profile", "loopback-4"], deadline=60)
    assert codes == {0: 2, 1: 2}
    err = (tmp_path / "rank0.err").read_text()
    assert "profile 'loopback-4' lays out 4 ranks but 2 processes were started" in err and "Traceback" not in err
    nv = load_profile({"name": "nv", "devices": [{"id": "g", "type": "h100-sxm", "count": 2, "backend": "nvidia"}],
                       "distributed": {"ranks": "per_device"}})
    npu = load_profile({"name": "a", "devices": [{"id": "n", "type": "ascend-910b2", "count": 2, "backend": "ascend"}],
                        "distributed": {}})
    mixed = load_profile({"name": "m", "devices": [{"id": "g", "type": "h100-sxm", "backend": "nvidia"},
                                                    {"id": "n", "type": "ascend-910b2", "backend": "ascend"}],
                          "distributed": {}})
    assert [wanted_collective(p, resolve_layout(p)) for p in (nv, npu, mixed)] == ["nccl", "hccl", "gloo"]
    assert wanted_collective(load_profile("loopback-4"), resolve_layout("loopback-4")) == "gloo"
    assert probe_collective("gloo").ok
    for name in ("nccl", "hccl"):
        avail = probe_collective(name)
        if avail.ok:
            continue
        assert avail.reason and "\n" not in avail.reason
        with pytest.raises(BackendUnavailable, match=f"collective backend '{name}' is not available here"):
            choose_collective(name, explicit=True)
        assert choose_collective(name, explicit=False) == "gloo"  # auto falls back, with one warning
        assert any(f"collective backend '{name}' is not available" in r.message for r in caplog.records)


LAUNCH_3 = {"name": "three", "devices": [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"},
                                         {"id": "ov", "type": "host-cpu", "backend": "openvino"},
                                         {"id": "sim", "type": "h100-sxm", "backend": "simulated"}],
            "distributed": {"ranks": "per_group", "dense": "rank0", "timeout_s": 30}}


@pytest.mark.parametrize("how", ["killed", "hung", "failed"])
def test_a_failed_rank_stops_the_others_with_its_name(ranks, tmp_path, how):
    """A SIGKILLed rank (the others see its connections drop), a SIGSTOPped one (their collectives time out after
    the profile's timeout) or one whose expert backend raises with no replica or fallback to fail over to: every
    other rank exits by itself with an error naming it, and files written earlier stay whole."""
    import yaml

    prof = {**LAUNCH_3, "distributed": {**LAUNCH_3["distributed"], "timeout_s": 3 if how == "hung" else 30}}
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(prof))
    (tmp_path / "r.json").write_text('{"earlier": "report"}')
    args = ["--model", "tiny:deepseek_v3", "--profile", str(tmp_path / "three.yaml"), "--threads", "1",
            "--repeat", "10000", "--plan-out", str(tmp_path / "p.json"), "--report", str(tmp_path / "r.json"),
            "--trace", str(tmp_path / "t.json")]
    ranks.start(3, tmp_path, "launch", args, deadline=60, **({"break_openvino_on": 1} if how == "failed" else {}))
    pids = _pids(tmp_path, 3)
    _wait_for(tmp_path / "rank0.err", "generating")
    plan_text = (tmp_path / "p.json").read_text()
    if how != "failed":
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        if how == "hung":
            _wait_for(tmp_path / "rank0.err", "error")
            _wait_for(tmp_path / "rank2.err", "error")
    finally:
        if how == "hung":
            os.kill(pids[1], signal.SIGKILL)
        codes = ranks.wait(90)
    want = {"killed": "stopped responding", "hung": "stopped responding",
            "failed": "failed: HetrunError: device 'ov:0' failed on expert"}[how]  # the first cause, not a symptom
    assert codes[1] == (2 if how == "failed" else -signal.SIGKILL)
    for r in (0, 2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert codes[r] == 3, err  # exited by itself, before the launcher's deadline
        line = [x for x in err.splitlines() if x.startswith(f"hetrun: error: rank {r}:")]
        assert line and "rank 1 (ov:0; pid" in line[0] and want in line[0], err
    assert (tmp_path / "p.json").read_text() == plan_text and Plan.from_json(plan_text)
    assert json.loads((tmp_path / "r.json").read_text()) == {"earlier": "report"}
    assert not (tmp_path / "t.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
