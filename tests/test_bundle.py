"""Deployment bundles: export, layout, identical outputs to hetrun.deploy in a new process, profiles, atomic writes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

import hetrun
from hetrun.bundle import MANIFEST, export, greedy, inspect_bundle, load, preset_model, verify
from hetrun.cli import main
from hetrun.errors import BundleError, HetrunError
from hetrun.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
PROMPT = [7, 40, 9, 200, 13]


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory):
    """A tiny Qwen2-MoE (shared expert with a sigmoid gate) saved in bfloat16 with save_pretrained."""
    d = tmp_path_factory.mktemp("qwen2_moe")
    tiny_model("qwen2_moe", seed=3).to(torch.bfloat16).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, local_model_dir):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, model, profile in [("tiny", "tiny", "mixed-demo"), ("tiny-mixtral", "tiny-mixtral", "mixed-demo"),
                                 ("local", str(local_model_dir), "cpu")]:
        export(model, profile, root / name, progress=False)
        out[name] = (root / name, model, profile)
    return out


def _reference(model: str, profile: str, local_model_dir):
    import transformers

    if model == str(local_model_dir):
        m = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True, use_safetensors=True)
    else:
        m = preset_model(model)
    return hetrun.deploy(m.eval(), profile)


def test_layout_graphs_and_checksums(bundles):
    root, _, _ = bundles["tiny"]
    man = verify(root)
    assert man.format == "hetrun-bundle" and man.format_version == 1 and man.hetrun_version == hetrun.__version__
    assert man.model.name == "tiny" and man.spec["num_experts"] == 12
    listed = set(man.files) | {MANIFEST}
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == listed
    for rel, entry in man.files.items():
        data = (root / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.size
    for e in man.experts:
        model = onnx.load(root / e.path)
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic token axis
        assert e.path == f"experts/L{e.layer}/{'E' if e.kind == 'routed' else 'S'}{e.index}.{e.precision}.onnx"
    # every graph the plan runs is there: routed slots and shared experts at their device's precision
    from hetrun.placement.plan import Plan

    plan = Plan.from_dict(man.plan)
    have = {e.key for e in man.experts}
    for li in range(plan.num_layers):
        for e, d in zip(plan.phy2log[li], plan.device_of[li]):
            assert (li, "routed", int(e), plan.precision[plan.device_ids[d]]) in have
        for s, d in enumerate(plan.shared_device_of[li]):
            assert (li, "shared", s, plan.precision[plan.device_ids[d]]) in have
        for e in range(12):  # and every routed expert at the fallback device's precision
            assert (li, "routed", e, plan.precision[man.fallback_device]) in have
    assert man.fallback_device == "xeon:0" and len({e.precision for e in man.experts}) >= 2
    # dense weights: routers and correction biases yes, expert weights no
    from safetensors import safe_open

    with safe_open(root / "dense.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.gate.weight" in keys and "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer stays dense
    assert not [k for k in keys if ".experts." in k or "shared_experts" in k]
    # the profile it was made for
    prof = hetrun.load_profile(yaml.safe_load((root / "profile.yaml").read_text()))
    assert prof.name == "mixed-demo" and [d.id for d in prof.devices] == list(plan.device_ids)


def test_identical_to_deploy_in_a_new_process(bundles, local_model_dir):
    """Run every bundle through `hetrun run --json --logits` in a fresh interpreter; compare with deploy in memory."""
    script = ("import sys, hetrun.cli\n"
              "for b in sys.argv[1:]:\n"
              "    assert hetrun.cli.main(['run', b, '--prompt-ids', '7,40,9,200,13', '--max-new-tokens', '10', "
              "'--json', '--logits']) == 0\n")
    # the same torch threads as this process: on AVX-512 CPUs torch's reductions split by thread count, so the
    # last bits of a dense layer depend on it (deploy and bundle agree bit for bit at equal thread counts)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script, *[str(b[0]) for b in bundles.values()]], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    decoder, text, docs = json.JSONDecoder(), proc.stdout, []
    pos = 0
    while text[pos:].strip():
        doc, end = decoder.raw_decode(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
        docs.append(doc)
        pos = end
    assert len(docs) == len(bundles)
    for got, (name, (_, model, profile)) in zip(docs, bundles.items()):
        want = greedy(_reference(model, profile, local_model_dir), PROMPT, 10)
        assert got["prompt_ids"] == PROMPT
        assert got["new_ids"] == want["new_ids"] and len(got["new_ids"]) > 0, name
        assert got["last_logits"] == want["last_logits"], name  # bit-identical, not just close
        assert np.isfinite(got["last_logits"]).all()


def test_export_an_in_memory_model(tmp_path):
    """export() also takes a transformers module; OLMoE here, on the real CPU backends."""
    export(tiny_model("olmoe"), "cpu", tmp_path / "b", progress=False)
    want = greedy(hetrun.deploy(tiny_model("olmoe"), "cpu"), PROMPT, 6)
    assert greedy(load(tmp_path / "b"), PROMPT, 6) == want
    assert verify(tmp_path / "b").model.source == "module"


def test_load_aware_plan_with_replicas(tmp_path, capsys):
    """--load and --redundant go to the planner; replicated experts share graphs; outputs match deploy on that plan."""
    table = tmp_path / "load.json"
    rng = np.random.default_rng(0)
    table.write_text(json.dumps({"tokens_per_expert": (rng.zipf(1.5, (2, 12)) * 10).tolist()}))
    out = tmp_path / "b"
    assert main(["export", "tiny", "--profile", "mixed-demo", "-o", str(out), "--load", str(table), "--redundant", "4",
                 "--no-progress"]) == 0
    from hetrun.placement.plan import Plan

    man = verify(out)
    plan = Plan.from_dict(man.plan)
    assert plan.num_slots == 16 and (plan.logcnt > 1).any()  # hot experts got replicas
    want = greedy(hetrun.deploy(preset_model("tiny"), "mixed-demo", plan=plan), PROMPT, 6)
    assert greedy(load(out), PROMPT, 6) == want


def test_load_in_process_runs_on_the_bundled_profile(bundles):
    model = load(bundles["tiny"][0])
    assert model.hetrun.profile.name == "mixed-demo"
    assert model.hetrun_manifest.model.name == "tiny"
    out = greedy(model, [3, 4, 5], 4)
    assert len(out["new_ids"]) == 4
    stats = model.hetrun.stats
    assert stats.tokens_per_device.sum() == stats.tokens_per_expert.sum() > 0
    assert hetrun.load is load  # the top-level name routes here


def test_another_profile_only_when_every_device_maps(bundles, tmp_path):
    root = bundles["tiny"][0]
    base = yaml.safe_load((root / "profile.yaml").read_text())
    superset = {**base, "name": "bigger", "devices": base["devices"] + [{"id": "spare", "type": "host-cpu"}]}
    model = load(root, profile=superset)
    want = greedy(load(root), [9, 8, 7], 6)
    assert greedy(model, [9, 8, 7], 6) == want
    with pytest.raises(BundleError) as e:
        load(root, profile="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "h100:0" in msg and "ascend:0" in msg and "hetrun plan" in msg
    # same ids, but the Ascend group is now a Xeon, which has no FP16: the fp16 graphs cannot run there
    swapped = {**base, "name": "swapped", "devices": [dict(g, type="xeon-8480") if g["id"] == "ascend" else g
                                                        for g in base["devices"]]}
    with pytest.raises(BundleError, match=r"'ascend:0' is a xeon-8480, which has no fp16.*hetrun plan"):
        load(root, profile=swapped)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(swapped))
    assert main(["run", str(root), "--prompt-ids", "1,2", "--profile", str(path)]) == 2


def test_refuses_to_overwrite_unless_force(tmp_path, capsys):
    out = tmp_path / "b"
    export("tiny-mixtral", "mixed-demo", out, progress=False)
    before = verify(out).files["dense.safetensors"].sha256
    with pytest.raises(BundleError, match="already exists.*--force"):
        export("tiny-mixtral", "mixed-demo", out, progress=False)
    assert main(["export", "tiny-mixtral", "--profile", "mixed-demo", "-o", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("hetrun: error: bundle")
    assert main(["export", "tiny-mixtral", "--profile", "mixed-demo", "-o", str(out), "--no-progress", "--force",
                 "--seed", "1"]) == 0
    assert verify(out).files["dense.safetensors"].sha256 != before
    assert verify(out).model.seed == 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary or old directory left behind
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a hetrun bundle; refusing"):
        export("tiny-mixtral", "mixed-demo", other, progress=False, force=True)
    assert (other / "todo.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    export("tiny-mixtral", "mixed-demo", empty, progress=False)
    verify(empty)


def test_export_is_reproducible(tmp_path):
    a = export("tiny", "mixed-demo", tmp_path / "a", progress=False)
    b = export("tiny", "mixed-demo", tmp_path / "b", progress=False)
    assert a.files == b.files


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import hetrun.runtime.graphs

    real, calls = hetrun.runtime.graphs.build_expert_graph, []

    def failing(w, precision="fp32", *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if interrupted midway
        return real(w, precision, *args, **kwargs)

    monkeypatch.setattr(hetrun.runtime.graphs, "build_expert_graph", failing)
    with pytest.raises(KeyboardInterrupt):
        export("tiny", "mixed-demo", tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_bundle_run_accepts(tmp_path, capsys):
    """SIGKILL `hetrun export` once its progress bar has started: nothing there may pass as a bundle."""
    import transformers

    from hetrun.spec import MoESpec, RouterSpec

    spec = MoESpec.from_preset("tiny-mixtral").replace(num_layers=4, num_experts=64, hidden_size=32,
                                                        moe_intermediate_size=32, router=RouterSpec("softmax_topk", 2))
    src = tmp_path / "many-experts"
    transformers.AutoModelForCausalLM.from_config(spec.to_hf_config()).save_pretrained(src)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hetrun", "export", str(src), "--profile", "mixed-demo",
                             "-o", str(work / "bundle"), "--precision", "fp32"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
    seen = b""
    deadline = time.monotonic() + 120
    while b"experts:" not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 256)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert b"experts:" in seen, seen.decode(errors="replace")[-500:]
    assert proc.returncode == -signal.SIGKILL, "export finished before it was killed; make the model bigger"
    assert not (work / "bundle").exists()
    leftovers = list(work.iterdir())
    assert leftovers, "the partial export should be there (and rejected)"
    for d in [work / "bundle", *leftovers]:
        capsys.readouterr()
        assert main(["run", str(d), "--prompt-ids", "1,2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hetrun: error:") and err.count("\n") == 1
        with pytest.raises(BundleError):
            verify(d)


def test_cli_export_inspect_run(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["export", "tiny", "--profile", "mixed-demo", "-o", str(out), "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["graphs"] and doc["size_bytes"] > 0 and doc["model"]["name"] == "tiny"
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "h100:0" in text and "all checks pass" in text and "dense.safetensors" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and all(f["status"] == "ok" for f in info["files"])
    assert info == inspect_bundle(out)
    assert main(["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "generated:" in text and "ascend:0" in text
    assert main(["run", str(out), "--prompt-ids", "1,2,999"]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "run", "inspect"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"hetrun {command}" in out


@pytest.mark.parametrize("argv, needle", [
    (["export", "no-such-preset", "--profile", "mixed-demo", "-o", "{tmp}/x"], "unknown model preset"),
    (["export", "mixtral-8x7b", "--profile", "mixed-demo", "-o", "{tmp}/x"], "random weights only"),
    (["export", "{tmp}/missing-dir/", "--profile", "mixed-demo", "-o", "{tmp}/x"], "not found"),
    (["export", "tiny", "--profile", "no-such-profile", "-o", "{tmp}/x"], "unknown profile"),
    (["export", "tiny", "--profile", "mixed-demo", "-o", "{tmp}/x", "--precision", "fp64"], "invalid choice"),
    (["export", "tiny", "--profile", "mixed-demo", "-o", "{tmp}/x", "--redundant", "-1"], "negative"),
    (["run", "{tmp}/nothing", "--prompt-ids", "1"], "does not exist"),
    (["run", "{tmp}", "--prompt-ids", "1"], "manifest.json"),
    (["run", "{tmp}", "--prompt-ids", ""], "token ids"),
    (["run", "{tmp}", "--prompt-ids", "1,-2"], "negative"),
    (["inspect", "{tmp}/nothing"], "does not exist"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetrun: error:") and err.count("\n") == 1 and needle in err, err
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


def test_directory_without_safetensors_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    tiny_model("mixtral").config.save_pretrained(d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(HetrunError, match="safetensors only"):
        export(d, "mixed-demo", tmp_path / "out", progress=False)


def test_no_unsafe_loading_in_bundle_code():
    """No pickle anywhere in the bundle code: safetensors for weights, yaml.safe_load, torch.load only weights_only."""
    for path in (REPO / "hetrun" / "bundle").glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "yaml.load(" not in text and "allow_pickle=True" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)
