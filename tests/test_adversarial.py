"""Hostile and unlucky inputs (issue 20): each ends in a one-line error with exit 2, or in a correct result.

Resource exhaustion (oversized files, YAML alias bombs, huge manifests and device counts, allocation before
validation), input checks (non-finite floats, duplicate keys, custom operator domains, unwritable outputs, bad
numbers on every command and on the launcher), the atomic `--force` swap and the clean-up of killed exports, and
hetrun's exchanges between ranks (JSON, never pickle). The hypothesis suites at the end try over a thousand
generated cases across profiles, bundles and the command line; most run in-process through hetrun.cli.main.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from onnx import TensorProto, helper

import hetrun.bundle.integrity as integrity
import hetrun.bundle.target as target
from hetrun.bundle import MANIFEST, export, generate_key_pair
from hetrun.bundle.target import Staging, clean_leftovers, exchange
from hetrun.cli import main

REPO = Path(__file__).resolve().parents[1]
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line(capsys, argv, code: int = 2) -> str:
    """Run the CLI in-process; a user error is exactly one stderr line and exit 2. Returns stderr (or stdout)."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, (argv, rc, err[-600:])
    if currently_in_test_context():  # counted per hypothesis test (--hypothesis-show-statistics)
        event("refused, one line, exit 2" if code == 2 else "correct result, exit 0")
    if code == 2:
        assert err.startswith("hetrun: error:") and err.count("\n") == 1 and "Traceback" not in err, err[-600:]
        return err
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv") / "b"
    export("tiny", "mixed-demo", root, progress=False)
    return root


@pytest.fixture
def bundle(pristine, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(pristine, root)
    return root


def graph_path(root: Path) -> str:
    return sorted(e["path"] for e in json.loads((root / MANIFEST).read_text())["experts"])[0]


def rehash(root: Path, rel: str) -> None:
    man = json.loads((root / MANIFEST).read_text())
    data = (root / rel).read_bytes()
    man["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (root / MANIFEST).write_text(json.dumps(man, indent=1))


def write_profile(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


BOMB = """\
name: bomb
devices: [{id: a, type: host-cpu}]
extra:
  a: &a [x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


# ---- resource exhaustion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["graph", "dense.safetensors"])
def test_oversized_files_are_refused_before_a_byte_is_read(bundle, which, capsys, monkeypatch):
    rel = graph_path(bundle) if which == "graph" else which
    os.truncate(bundle / rel, 3 * 10**9)  # sparse: 3 GB that take no disk
    touched = []
    for name in ("read_file", "file_digest"):
        real = getattr(integrity, name)
        monkeypatch.setattr(integrity, name, lambda root, r=None, *a, _real=real, **k:
                            touched.append(str(r)) or _real(root, r, *a, **k))
    capsys.readouterr()
    assert main(["inspect", str(bundle), "--json"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("hetrun: error:") and err.count("\n") == 1
    files = {f["path"]: f for f in json.loads(out)["files"]}
    assert files[rel]["status"] == "changed" and "3000000000 bytes" in files[rel]["message"]
    assert not [t for t in touched if t.endswith(rel)], touched  # compared by size, never read or hashed
    assert "3000000000 bytes" in one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2"])


def test_sizes_beyond_the_limits_are_refused_from_the_manifest(bundle, capsys):
    man = json.loads((bundle / MANIFEST).read_text())
    man["files"][graph_path(bundle)]["size"] = 2**31
    (bundle / MANIFEST).write_text(json.dumps(man))
    assert "2147483647" in one_line(capsys, ["inspect", str(bundle)])
    man["files"][graph_path(bundle)]["size"] = 2**40
    (bundle / MANIFEST).write_text(json.dumps(man))
    assert "274877906944" in one_line(capsys, ["inspect", str(bundle)])


def test_yaml_alias_bombs_are_refused_everywhere_yaml_is_read(bundle, tmp_path, capsys):
    prof = write_profile(tmp_path / "bomb.yaml", BOMB)
    t0 = time.perf_counter()
    for argv in (["plan", "--model", "tiny", "--profile", prof, "-o", "-"],
                 ["export", "tiny", "--profile", prof, "-o", str(tmp_path / "out")],
                 ["simulate", "--profile", prof], ["run", str(bundle), "--prompt-ids", "1", "--profile", prof]):
        assert "aliases" in one_line(capsys, argv)
    workload = write_profile(tmp_path / "w.yaml", "name: w\nprompt: &p {mean: 10}\noutput: *p\n")
    assert "aliases" in one_line(capsys, ["simulate", "--workload", workload])
    (bundle / "profile.yaml").write_text(BOMB)
    rehash(bundle, "profile.yaml")
    assert "aliases" in one_line(capsys, ["inspect", str(bundle)])
    assert time.perf_counter() - t0 < 60  # refused at parse time: an expansion would take minutes and gigabytes


def test_deep_nesting_and_huge_yaml_are_one_line_errors(tmp_path, capsys):
    deep = write_profile(tmp_path / "deep.yaml", "name: x\ndevices: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "nested deeper than 64" in one_line(capsys, ["plan", "--model", "tiny", "--profile", deep, "-o", "-"])
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(17 * 2**20)
    assert "bytes" in one_line(capsys, ["plan", "--model", "tiny", "--profile", str(big), "-o", "-"])


def test_manifests_with_too_many_entries_are_refused_at_once(bundle, capsys):
    man = json.loads((bundle / MANIFEST).read_text())
    entry = next(iter(man["files"].values()))
    man["files"].update({f"x/{i}": entry for i in range(300_000)})
    (bundle / MANIFEST).write_text(json.dumps(man))
    t0 = time.perf_counter()
    assert "262144" in one_line(capsys, ["inspect", str(bundle), "--json"])
    assert "262144" in one_line(capsys, ["inspect", str(bundle)])
    assert time.perf_counter() - t0 < 60


def test_inspect_table_stays_short_with_many_failures(bundle, capsys):
    for i in range(500):
        (bundle / f"extra{i}").write_text("x")
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 2
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 600 and "more not shown" in out  # 500 rows would take over 1,000 lines


@pytest.mark.parametrize("devices", [[{"id": "a", "type": "h100-sxm", "count": 100_000}],
                                     [{"id": "a", "type": "h100-sxm", "count": 3000},
                                      {"id": "b", "type": "h800", "count": 3000}]])
def test_device_counts_beyond_the_limit_fail_at_once_naming_it(devices, tmp_path, capsys):
    prof = tmp_path / "many.yaml"
    prof.write_text(yaml.safe_dump({"name": "many", "devices": devices}))
    t0 = time.perf_counter()
    assert "4096" in one_line(capsys, ["plan", "--model", "deepseek-r1", "--profile", str(prof), "-o", "-"])
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.__setitem__("vocab_size", 2_000_000_000), "vocab_size"),
    (lambda c: c.__setitem__("vocab_size", 1000), "another shape"),
    (lambda c: c.__setitem__("num_attention_heads", 4096), "shape"),
    (lambda c: c.__setitem__("n_routed_experts", 10**9), "num_experts"),
])
def test_bundle_configs_are_checked_before_anything_is_allocated(bundle, change, needle, capsys, monkeypatch):
    import torch
    import transformers

    cfg = json.loads((bundle / "config.json").read_text())
    change(cfg)
    (bundle / "config.json").write_text(json.dumps(cfg))
    rehash(bundle, "config.json")
    built = []  # the default device of every model build: "meta" allocates nothing
    real = transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", lambda *a, **k: built.append(
        torch.empty(0).device.type) or real(*a, **k))
    assert needle in one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2"])
    assert "cpu" not in built, built


# ---- input checks ---------------------------------------------------------------------------------------

def test_nan_during_generation_is_an_error_not_wrong_tokens(pristine, capsys, monkeypatch):
    import hetrun.bundle.loader as loader

    real = loader.load

    def poisoned(*a, **k):  # logits turn NaN at the second generated token, after a finite prompt
        model = real(*a, **k)
        calls = []
        model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(1) or
                                            (out * float("nan") if len(calls) == 3 else out))
        return model

    monkeypatch.setattr(loader, "load", poisoned)
    err = one_line(capsys, ["run", str(pristine), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"])
    assert "generated token 2" in err


def test_custom_operator_domains_are_user_errors(bundle, capsys):
    rel = graph_path(bundle)
    model = onnx.load(str(bundle / rel))
    model.graph.node[0].domain = "evil.custom"
    model.opset_import.append(helper.make_opsetid("evil.custom", 1))
    onnx.save(model, str(bundle / rel))
    rehash(bundle, rel)
    assert "evil.custom" in one_line(capsys, ["inspect", str(bundle)])
    assert "evil.custom" in one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2"])


def test_duplicate_keys_are_refused_in_yaml_and_json(bundle, tmp_path, capsys):
    prof = write_profile(tmp_path / "dup.yaml", "name: a\ndevices: [{id: a, type: host-cpu, id: b}]\n")
    assert "duplicate key 'id'" in one_line(capsys, ["plan", "--model", "tiny", "--profile", prof, "-o", "-"])
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"format": "hetrun-bundle",', '"format": "hetrun-bundle", '
                                                '"fallback_device": "x",', 1))
    assert "twice" in one_line(capsys, ["inspect", str(bundle)])
    load = tmp_path / "load.json"
    load.write_text('{"load": [[1, 2]], "load": [[3, 4]]}')
    assert "twice" in one_line(capsys, ["plan", "--model", "tiny", "--profile", "mixed-demo", "--load", str(load),
                                        "-o", "-"])


@pytest.mark.parametrize("out", ["/proc/hetrun-x", "/proc/self/status/x", "{tmp}/file/x"])
def test_unwritable_export_targets_fail_before_the_model_is_built(out, tmp_path, capsys, monkeypatch):
    import hetrun.bundle.exporter as exporter

    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setattr(exporter, "preset_model", lambda *a, **k: pytest.fail("built the model"))
    one_line(capsys, ["export", "tiny", "--profile", "mixed-demo", "-o", out.format(tmp=tmp_path)])


@pytest.mark.parametrize("argv,needle", [
    (["--out", "/nonexistent-dir/host.yaml"], "does not exist"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "/proc/host.yaml"], "cannot write"),
    (["--precisions", "fp7"], "fp7"),
    (["--precisions", "fp32,"], None),
    (["--backends", "cuda"], "cuda"),
    (["--threads", "-1"], "negative"),
    (["--threads", "0"], "threads"),
    (["--threads", "nan"], "whole number"),
])
def test_calibrate_refuses_bad_requests_before_measuring(argv, needle, tmp_path, capsys, monkeypatch):
    import hetrun.calibrate.run as run

    monkeypatch.setattr(run, "measure_experts", lambda *a, **k: pytest.fail("measured"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    if needle is None:  # a trailing comma is no precision at all: calibrate fp32 only, so stop at measuring
        with pytest.raises(pytest.fail.Exception):
            main(["calibrate", "--quick", "--out", str(tmp_path / "h.yaml"), *argv])
        return
    assert needle in one_line(capsys, ["calibrate", "--quick", *argv] + ([] if "--out" in argv else
                                                                          ["--out", str(tmp_path / "h.yaml")]))


@pytest.mark.parametrize("argv", [["accuracy", "--threads", "-2"], ["accuracy", "--threads", "0"],
                                  ["accuracy", "--prompts", "0"], ["demo", "--tokens", "-1"],
                                  ["run", "b", "--prompt-ids", "1", "--threads", "-3"],
                                  ["bench", "moe", "--bogus"], ["bench", "nosuch", "--bogus"], ["bench", "--bogus"],
                                  ["export", "tiny", "--profile", "cpu", "-o", "x", "--redundant", "99999"],
                                  ["plan", "--step-tokens", "0"]])
def test_bad_numbers_and_flags_are_one_line(argv, capsys):
    one_line(capsys, argv)


# ---- the launcher ---------------------------------------------------------------------------------------

def launch(argv, capsys) -> str:
    from hetrun.launch import main as launch_main

    capsys.readouterr()
    rc = launch_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hetrun: error: rank 0:") and err.count("\n") == 1, (rc, err[-500:])
    return err


@pytest.mark.parametrize("extra,needle", [
    (["--model", "some-org/some-hub-name"], "never downloads"),
    (["--model", "tiny:mixtral", "--threads", "-4"], "--threads"),
    (["--model", "tiny:mixtral", "--timeout", "nan"], "--timeout"),
    (["--model", "tiny:mixtral", "--timeout", "inf"], "--timeout"),
    (["--model", "tiny:mixtral", "--timeout", "-1"], "--timeout"),
    (["--model", "tiny:mixtral", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--model", "tiny:mixtral", "--bogus"], "unrecognized"),
])
def test_launcher_bad_input_is_one_line_and_never_contacts_a_hub(extra, needle, capsys, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("contacted a hub or loaded a model"))
    assert needle in launch(["--profile", "loopback-2", *extra], capsys)


def test_launcher_loads_local_folders_with_safetensors_only(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    assert "safetensors" in launch(["--profile", "loopback-2", "--model", str(tmp_path / "m")], capsys)


def test_a_non_finite_distributed_timeout_is_one_line_on_every_rank(tmp_path):
    prof = yaml.safe_load((REPO / "profiles" / "loopback-2.yaml").read_text())
    prof["distributed"]["timeout_s"] = float("inf")
    (tmp_path / "inf.yaml").write_text(yaml.safe_dump(prof))
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(logs), "--redirects", "3", "-m", "hetrun.launch", "--model", "tiny:mixtral",
                           "--profile", str(tmp_path / "inf.yaml")], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode != 0
    errs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(errs) == ["0", "1"], (errs, proc.stderr[-800:])
    # Every rank that got as far as reading the profile says it in one line. The first rank to exit makes torchrun
    # stop the other, which on a loaded machine may still be importing and then dies before it can say anything.
    said = {rank: err for rank, err in errs.items() if err.strip()}
    assert said, errs
    for rank, err in said.items():
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"hetrun: error: rank {rank}:"), err
        assert "timeout_s" in lines[0] and "finite" in lines[0]


# ---- the --force swap and killed exports -----------------------------------------------------------------

def fake_bundle(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(tag)
    return path


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    a, b = fake_bundle(tmp_path / "a", "A"), fake_bundle(tmp_path / "b", "B")
    if not exchange(a, b):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE); the fallback is tested below")
    assert (a / MANIFEST).read_text() == "B" and (b / MANIFEST).read_text() == "A"


@pytest.mark.parametrize("atomic", [True, False])
def test_a_kill_during_the_force_swap_leaves_a_bundle_in_place(atomic, tmp_path, monkeypatch):
    out = fake_bundle(tmp_path / "out", "old")
    if not atomic:
        monkeypatch.setattr(target, "exchange", lambda a, b: False)
    elif not exchange(fake_bundle(tmp_path / "x", "x"), fake_bundle(tmp_path / "y", "y")):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE); the fallback swap is the atomic=False case")
    staging = Staging.reserve(out, force=True)
    (staging.tmp / MANIFEST).write_text("new")
    renames = []
    real_rename = os.rename

    def killed_after_first(a, b):  # SIGKILL right after the first step of the swap
        renames.append(b)
        real_rename(a, b)
        raise KeyboardInterrupt

    monkeypatch.setattr(target.os, "rename", killed_after_first)
    monkeypatch.setattr(target.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        staging.install(force=True)
    monkeypatch.undo()
    os.close(staging._fd)  # the process is gone: its lock with it
    if atomic:
        assert (out / MANIFEST).read_text() == "new"  # one step: the old bundle or the new one, never neither
    else:
        assert not out.exists()  # between the two renames: the old bundle waits beside it, and says so
        with pytest.raises(Exception, match="mv "):
            integrity.bundle_root(out)
    again = Staging.reserve(out, force=True)  # the next export cleans up (and puts the old bundle back)
    assert (out / MANIFEST).read_text() == ("new" if atomic else "old")
    again.abort()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []


def test_leftovers_of_killed_exports_are_removed_and_running_exports_are_not(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from hetrun.bundle.target import Staging
        s = Staging.reserve({str(out)!r}, force=False)
        open(os.path.join(s.tmp, "half-written"), "w").write("x")
        print(s.tmp, flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    dead_tmp = Path(killed.stdout.strip())
    assert dead_tmp.exists() and list(tmp_path.glob(".out.export-*.lock"))
    running = subprocess.Popen([sys.executable, "-c", script, "live"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        live_tmp = Path(running.stdout.readline().strip())
        assert not dead_tmp.exists() and live_tmp.exists()  # the next export removed what the killed one left
        (tmp_path / ".out.partial-abc123").mkdir()  # an older hetrun's leftover: no lock, so not provably dead
        assert clean_leftovers(out) == []
        assert live_tmp.exists() and (tmp_path / ".out.partial-abc123").exists()  # a running export is untouched
    finally:
        running.kill()
        running.wait()
    clean_leftovers(out)
    assert not live_tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-abc123"]


def test_force_export_replaces_a_bundle_and_leaves_nothing_beside_it(pristine, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(pristine, out)
    one_line(capsys, ["export", "tiny", "--profile", "cpu", "-o", str(out), "--force", "--no-progress"], code=0)
    assert json.loads((out / MANIFEST).read_text())["plan"]["profile"] == "cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---- exchanges between ranks ------------------------------------------------------------------------------

def test_ranks_never_exchange_pickles():
    for path in list((REPO / "hetrun").rglob("*.py")):
        text = path.read_text()
        for fn in ("gather_object", "all_gather_object", "broadcast_object_list", "scatter_object_list",
                   "send_object_list", "recv_object_list"):
            assert f"dist.{fn}" not in text and f"distributed.{fn}" not in text, (path, fn)


def test_json_exchange_round_trips_plain_data_and_refuses_objects():
    import torch.distributed as dist

    from hetrun.distributed.world import World

    class Layout:
        timeout_s, startup_timeout_s, heartbeat_s, ranks = 30.0, 30.0, 0.25, [["cpu:0"]]

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = World(Layout(), "gloo", 0, 1, 0, None)
        doc = {"stats": {"rank": 0, "tokens": np.int64(5), "rows": np.arange(3)}, "payload": {"outputs": [[0, [1]]]}}
        assert world.gather_json("t", doc) == [{"stats": {"rank": 0, "tokens": 5, "rows": [0, 1, 2]},
                                                "payload": {"outputs": [[0, [1]]]}}]
        assert world.all_gather_json("t", ["é", None, 1.5]) == [["é", None, 1.5]]
        with pytest.raises(TypeError):
            world.gather_json("t", {"code": object()})
    finally:
        dist.destroy_process_group()


# ---- hypothesis: over a thousand generated cases -----------------------------------------------------------

FLOAT_FIELDS = [
    ("device_types", "big", "memory_gb"), ("device_types", "big", "memory_bw_gbs"), ("device_types", "big", "tdp_w"),
    ("device_types", "big", "idle_w"), ("device_types", "big", "price_per_hour"),
    ("device_types", "big", "compute_efficiency"), ("device_types", "big", "memory_efficiency"),
    ("device_types", "big", "launch_overhead_us"), ("device_types", "big", "tflops", "fp32"),
    ("device_types", "big", "scale_up", "bandwidth_gbs"), ("device_types", "big", "scale_up", "latency_us"),
    ("device_types", "big", "scale_up", "efficiency"), ("devices", 0, "price_per_hour"),
    ("devices", 0, "reserved_gb"), ("links", "intra_node", "bandwidth_gbs"), ("grid_kg_co2_per_kwh",),
    ("distributed", "timeout_s"), ("distributed", "startup_timeout_s"), ("distributed", "heartbeat_s"),
]
HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, -1.0, 1e-320, 1e6 + 1, 2.0**63,
                  -(2.0**63), 10**400]


def base_profile() -> dict:
    return {"name": "num", "devices": [{"id": "a", "type": "big", "count": 2}, {"id": "h", "type": "h100-sxm"}],
            "links": {"intra_node": {"bandwidth_gbs": 50.0}},
            "distributed": {"timeout_s": 30.0, "startup_timeout_s": 60.0, "heartbeat_s": 0.5},
            "device_types": {"big": {"name": "big", "vendor": "other", "kind": "cpu", "tflops": {"fp32": 10.0},
                                     "precisions": ["fp32"], "memory_gb": 64.0, "memory_bw_gbs": 100.0,
                                     "scale_up": {"bandwidth_gbs": 10.0}, "tdp_w": 100.0,
                                     "price_per_hour": 1.0, "sources": ["test"]}}}


def put(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return np.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    return not (isinstance(obj, int) and abs(obj) >= 2**62)


@settings(max_examples=300, **FUZZ)
@given(field=st.sampled_from(FLOAT_FIELDS),
       value=st.one_of(st.sampled_from(HOSTILE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(["x", "1e999", True, None, [], {}])))
def test_every_float_of_a_profile_is_finite_and_bounded(field, value, tmp_path_factory, capsys):
    d = tmp_path_factory.mktemp("f")
    doc = base_profile()
    put(doc, field, value)
    text = yaml.safe_dump(doc).replace("1e999", ".inf") if value == "1e999" else yaml.safe_dump(doc)
    (d / "p.yaml").write_text(text)
    capsys.readouterr()
    rc = main(["plan", "--model", "tiny", "--profile", str(d / "p.yaml"), "-o", "-", "--json"])
    out, err = capsys.readouterr()
    assert rc in (0, 2), err
    event("refused, one line, exit 2" if rc == 2 else "legal value: plan with finite numbers, exit 0")
    if rc == 2:
        assert err.startswith("hetrun: error:") and err.count("\n") == 1, err
    else:  # accepted: then it was a legal value and every number that comes out is a real one
        optional = value is None and field == ("devices", 0, "price_per_hour")  # None: the device type's price
        assert optional or (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value))
        assert finite_numbers(json.loads(out)) and "-9223372036854775808" not in out


YAML_ATTACKS = st.one_of(
    st.builds(lambda n, k: "name: a\ndevices: &d [{id: a, type: host-cpu}]\nextra: {" +
              ", ".join(f"k{i}: *d" for i in range(n)) + "}\n" + ("name: b\n" if k else ""),
              st.integers(1, 50), st.booleans()),
    st.builds(lambda key, lvl: "name: a\n" + "devices: [{id: a, type: host-cpu}]\n" +
              ("extra:\n" + "  " * lvl + f"{key}: 1\n" + "  " * lvl + f"{key}: 2\n" if lvl else f"{key}: 1\n"),
              st.sampled_from(["name", "devices", "x", "1", "'q'"]), st.integers(0, 1)),
    st.builds(lambda n, ch: "name: a\ndevices: " + ch[0] * n + ch[1] * n + "\n",
              st.integers(2000, 60000), st.sampled_from(["[]", "{}"])),
    st.builds(lambda tag: f"name: !!{tag} a\ndevices: [{{id: a, type: host-cpu}}]\n",
              st.sampled_from(["python/object:os.system", "python/name:os.system", "binary", "set",
                               "python/tuple", "omap"])),
    st.builds(lambda c: f"name: a\ndevices: [{{id: a, type: host-cpu, count: {c}}}]\n",
              st.sampled_from(["1e400", "100000", "4097", "-1", "0", ".inf", ".nan", "99999999999999999999999"])),
    st.builds(lambda junk: "name: a\ndevices: [{id: a, type: host-cpu}]\n" + junk,
              st.sampled_from(["\x00", "\t- x", "{", ": :", "a: [b", "\ufeff", "&a", "<<: *x"])),
)


@settings(max_examples=220, **FUZZ)
@given(text=YAML_ATTACKS, command=st.sampled_from(["plan", "export", "simulate"]))
def test_hostile_profile_yaml_is_one_line(text, command, tmp_path_factory, capsys, monkeypatch):
    import hetrun.bundle.exporter as exporter

    monkeypatch.setattr(exporter, "preset_model", lambda *a, **k: pytest.fail("built the model"))
    d = tmp_path_factory.mktemp("y")
    (d / "p.yaml").write_text(text)
    argv = {"plan": ["plan", "--model", "tiny", "--profile", str(d / "p.yaml"), "-o", "-"],
            "export": ["export", "tiny", "--profile", str(d / "p.yaml"), "-o", str(d / "out")],
            "simulate": ["simulate", "--profile", str(d / "p.yaml")]}[command]
    one_line(capsys, argv)


MANIFEST_TARGETS = [("files", "*", "size"), ("files", "*", "sha256"), ("spec", "num_experts"), ("spec", "num_layers"),
                    ("spec", "hidden_size"), ("spec", "vocab_size"), ("spec", "moe_intermediate_size"),
                    ("plan", "spec", "num_experts"), ("plan", "spec", "vocab_size"), ("plan", "spec", "num_layers"),
                    ("experts", "*", "layer"), ("experts", "*", "moe_layer"), ("experts", "*", "index"),
                    ("experts", "*", "precision"), ("experts", "*", "kind"), ("experts", "*", "path"),
                    ("experts", "*", "meta", "hidden"), ("format_version",), ("precision", "*"), ("targets", "*")]
HOSTILE_VALUES = st.one_of(st.sampled_from([-1, 10**9, 2**31, 2**63, 2**64, 10**30, 1e308, 0.5, "x", "", None, True,
                                            [], {}, [[[[[]]]]], "../../etc/passwd", "a" * 5000]),
                           st.integers(-(2**70), 2**70), st.text(max_size=20))


def resolve(doc, path, draw_index):
    """The container and key a manifest path names ('*': an element chosen by draw_index)."""
    for key in path[:-1]:
        if key == "*":
            keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
            key = keys[draw_index % len(keys)]
        doc = doc[key]
    last = path[-1]
    if last == "*":
        keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
        last = keys[draw_index % len(keys)]
    return doc, last


@settings(max_examples=220, **FUZZ)
@given(path=st.sampled_from(MANIFEST_TARGETS), value=HOSTILE_VALUES, index=st.integers(0, 10**6),
       as_text=st.sampled_from([None, "NaN", "Infinity", "dup"]))
def test_hostile_manifest_values_are_one_line(path, value, index, as_text, pristine, capsys):
    man = json.loads((pristine / MANIFEST).read_text())
    holder, key = resolve(man, path, index)
    changed = not (holder[key] == value and type(holder[key]) is type(value))
    holder[key] = value
    text = json.dumps(man)
    if as_text in ("NaN", "Infinity"):
        text = text.replace('"format_version": 1', f'"format_version": {as_text}')
        changed = True
    elif as_text == "dup":
        text = text.replace('"format": "hetrun-bundle"', '"format": "hetrun-bundle", "format": "hetrun-bundle"')
        changed = True
    original = (pristine / MANIFEST).read_bytes()
    try:
        (pristine / MANIFEST).write_text(text)
        if changed:
            one_line(capsys, ["inspect", str(pristine), "--json"])
        else:
            one_line(capsys, ["inspect", str(pristine), "--json"], code=0)
    finally:
        (pristine / MANIFEST).write_bytes(original)


@pytest.fixture(scope="module")
def signed(pristine, tmp_path_factory):
    d = tmp_path_factory.mktemp("signed")
    private, public, _ = generate_key_pair(d / "key")
    root = d / "b"
    shutil.copytree(pristine, root)
    assert main(["sign", str(root), "--key", str(private)]) == 0
    return root, public


def leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, prefix + (k,))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from leaves(v, prefix + (i,))
    else:
        yield prefix


@settings(max_examples=150, **FUZZ)
@given(index=st.integers(0, 10**6), value=st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none(),
                                                     st.floats(allow_nan=False, allow_infinity=False)))
def test_any_change_to_a_signed_manifest_is_refused_under_trust(index, value, signed, capsys):
    root, public = signed
    original = (root / MANIFEST).read_bytes()
    man = json.loads(original)
    paths = list(leaves(man))
    path = paths[index % len(paths)]
    holder = man
    for k in path[:-1]:
        holder = holder[k]
    if holder[path[-1]] == value and type(holder[path[-1]]) is type(value):
        value = [value]
    holder[path[-1]] = value
    try:
        (root / MANIFEST).write_text(json.dumps(man, indent=1))
        err = one_line(capsys, ["inspect", str(root), "--trust", str(public)])
        assert "manifest.sig" in err
    finally:
        (root / MANIFEST).write_bytes(original)


FILE_ATTACKS = ["truncate", "extend", "sparse", "flip", "symlink", "directory", "empty", "custom-op"]


@settings(max_examples=150, **FUZZ)
@given(which=st.integers(0, 10**6), attack=st.sampled_from(FILE_ATTACKS), size=st.integers(1, 10**12),
       rehashed=st.booleans())
def test_tampered_bundle_files_are_refused(which, attack, size, rehashed, signed, tmp_path_factory, capsys):
    root, public = signed
    d = tmp_path_factory.mktemp("t") / "b"
    shutil.copytree(root, d, symlinks=True)
    man = json.loads((d / MANIFEST).read_text())
    rel = sorted(man["files"])[which % len(man["files"])]
    path = d / rel
    data = path.read_bytes()
    if attack == "truncate":
        path.write_bytes(data[: size % max(len(data), 1)])
    elif attack == "extend":
        path.write_bytes(data + bytes(size % 4096 + 1))
    elif attack == "sparse":
        os.truncate(path, len(data) + size % 10**11)
    elif attack == "flip":
        b = bytearray(data)
        b[size % len(b)] ^= 0xFF
        path.write_bytes(bytes(b))
    elif attack == "symlink":
        path.unlink()
        path.symlink_to(root / rel)  # same bytes, through a link
    elif attack == "directory":
        path.unlink()
        path.mkdir()
    elif attack == "empty":
        path.write_bytes(b"")
    else:
        model = onnx.ModelProto()
        model.graph.CopyFrom(helper.make_graph([helper.make_node("Boom", ["x"], ["y"], domain="evil")], "g",
                                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
        model.opset_import.extend([helper.make_opsetid("", 21), helper.make_opsetid("evil", 1)])
        path.write_bytes(model.SerializeToString())
    can_rehash = path.is_file() and not path.is_symlink() and path.stat().st_size < 2**24
    if rehashed and can_rehash:
        rehash(d, rel)
        one_line(capsys, ["inspect", str(d), "--trust", str(public)])  # a signature catches what checksums cannot
        if attack == "custom-op" and rel.endswith(".onnx"):
            assert "evil" in one_line(capsys, ["inspect", str(d)])
    else:
        one_line(capsys, ["inspect", str(d)])


# Not "--": Python 3.11's argparse reads `--threads=--` as no value at all, i.e. the default (an argparse quirk).
BAD_NUMBERS = ["-1", "-4", "nan", "inf", "-inf", "1e9", "0x10", "", " ", "１", "1.5", "99999999999999999999",
               "٣", "1_000_000_000_000"]
NUMBER_OPTIONS = [
    (["run", "BUNDLE", "--prompt-ids", "1"], "--threads", 1), (["run", "BUNDLE", "--prompt-ids", "1"],
                                                                "--max-new-tokens", 0),
    (["export", "tiny", "--profile", "cpu", "-o", "OUT"], "--seed", 0),
    (["export", "tiny", "--profile", "cpu", "-o", "OUT"], "--redundant", 0),
    (["plan", "--model", "tiny", "-o", "-"], "--step-tokens", 1), (["accuracy"], "--threads", 1),
    (["accuracy"], "--prompts", 1), (["accuracy"], "--tokens", 1), (["accuracy"], "--seed", 0),
    (["demo"], "--tokens", 1), (["calibrate", "--quick", "--out", "OUT"], "--threads", 1),
]


@settings(max_examples=200, **FUZZ)
@given(case=st.sampled_from(NUMBER_OPTIONS), value=st.one_of(st.sampled_from(BAD_NUMBERS),
                                                              st.integers(-(10**30), -1).map(str),
                                                              st.integers(10**13, 10**40).map(str)))
def test_bad_numbers_on_every_command_are_one_line(case, value, pristine, tmp_path_factory, capsys, monkeypatch):
    import hetrun.bundle.exporter as exporter
    import hetrun.calibrate.run as run

    monkeypatch.setattr(exporter, "preset_model", lambda *a, **k: pytest.fail("built the model"))
    monkeypatch.setattr(run, "measure_experts", lambda *a, **k: pytest.fail("measured"))
    base, option, _minimum = case
    out = str(tmp_path_factory.mktemp("n") / "o")
    argv = [a.replace("BUNDLE", str(pristine)).replace("OUT", out) for a in base]
    one_line(capsys, [*argv, f"{option}={value}"])  # every value drawn is below `minimum`, too large or no number
