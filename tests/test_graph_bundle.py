"""Graph bundles (`hetrun export --graph`, `hetrun run`): the model as one graph, run without torch, checked first."""

import json
import subprocess
import sys

import pytest
import torch

from hetrun.bundle.graph_export import export_graph
from hetrun.bundle.graph_runner import GraphModel, is_graph_bundle
from hetrun.cli import main
from hetrun.errors import BundleError, HetrunError
from hetrun.spec import MoESpec
from hetrun.tiny_models import random_model

SPEC = MoESpec.from_preset("mixtral-bench").replace(name="mixtral-graph", num_layers=2, hidden_size=128,
                                                    moe_intermediate_size=256, vocab_size=512)
PROFILE = {"name": "one-ort", "devices": [{"id": "cpu", "type": "host-cpu", "backend": "onnxruntime"}],
           "dense_precision": "fp32"}


@pytest.fixture(scope="module")
def reference():
    return random_model(SPEC, seed=5).float().eval()


@pytest.fixture(scope="module")
def fp32_bundle(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("graph") / "fp32"
    export_graph(random_model(SPEC, seed=5).float().eval(), PROFILE, out, precision="fp32")
    return out


def test_a_graph_bundle_generates_transformers_greedy_tokens_and_logits(reference, fp32_bundle):
    assert is_graph_bundle(fp32_bundle)
    model = GraphModel(fp32_bundle, threads=1)
    ids = torch.randint(3, SPEC.vocab_size, (1, 21), generator=torch.Generator().manual_seed(1))
    new, last = model.run(ids[0].tolist(), 16, eos=set())
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = reference(ids).logits[0, -1]
    assert new == want[0, 21:].tolist()
    assert ((torch.from_numpy(last) - logits).norm() / logits.norm()).item() < 1e-5
    eos = new[3]  # the manifest's end-of-sequence ids stop it; here one the sequence reaches
    assert model.generate(ids[0].tolist(), 16, eos={eos}) == new[:new.index(eos) + 1]
    assert model.run(ids[0].tolist(), 0)[0] == []  # the prompt alone


def test_int4_bundle_matches_the_one_graph_deployment(reference, tmp_path):
    import dataclasses

    from hetrun.deployment import deploy
    from hetrun.placement.planner import plan
    from hetrun.profile import load_profile

    profile = {**PROFILE, "dense_precision": "int4-w4a8"}
    export_graph(random_model(SPEC, seed=5).float().eval(), profile, tmp_path / "b", precision="int4-w4a8")
    prof = load_profile({**profile, "model_graph": "on"})
    deployed = deploy(random_model(SPEC, seed=5).float().eval(), prof, threads=1,
                      plan=dataclasses.replace(plan(SPEC, prof), precision={d.id: "int4-w4a8" for d in prof.devices}))
    ids = list(range(7, 30))
    new, last = GraphModel(tmp_path / "b", threads=1).run(ids, 8, eos=set())
    with torch.no_grad():
        want = deployed(torch.tensor([ids])).logits[0, -1]
        tokens = deployed.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ((torch.from_numpy(last) - want).norm() / want.norm()).item() < 1e-5
    assert new == tokens[0, len(ids):].tolist()


def test_run_reads_a_graph_bundle_without_importing_torch(fp32_bundle):
    code = ("import sys; from hetrun.cli import main; rc = main(['run', sys.argv[1], '--prompt-ids', '5,6,7', "
            "'--max-new-tokens', '3', '--json']); assert 'torch' not in sys.modules and 'transformers' not in "
            "sys.modules, 'torch loaded'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(fp32_bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["graph"] is True and len(doc["new_ids"]) == 3


def test_a_changed_file_is_refused_in_one_line_naming_it(fp32_bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    data = bytearray((copy / "weights.bin").read_bytes())
    data[5000] ^= 1  # same size, one bit
    (copy / "weights.bin").write_bytes(bytes(data))
    assert main(["run", str(copy), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.bin does not match its manifest" in err[0]
    shutil.copy(fp32_bundle / "weights.bin", copy / "weights.bin")
    (copy / "embedding.npy").write_bytes((fp32_bundle / "embedding.npy").read_bytes()[:-4])  # truncated
    with pytest.raises(BundleError, match="embedding.npy"):
        GraphModel(copy)


def test_bad_requests_are_one_line_errors(fp32_bundle, tmp_path, capsys):
    model = GraphModel(fp32_bundle, threads=1)
    with pytest.raises(HetrunError, match="between 0 and 511"):
        model.generate([3, SPEC.vocab_size], 2)
    with pytest.raises(HetrunError, match="positions"):
        model.generate([3] * 10, model.manifest.positions)
    assert main(["run", str(fp32_bundle), "--prompt-ids", "1,2", "--profile", "cpu"]) == 2
    assert "leave out --profile" in capsys.readouterr().err
    assert main(["export", "tiny", "--profile", "mixed-demo", "-o", str(tmp_path / "x"), "--graph"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot export 'tiny' as one graph" in err[0] and not (tmp_path / "x").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(PROFILE))
    assert main(["export", "tiny-mixtral", "--profile", str(profile), "-o", str(tmp_path / "busy"), "--graph"]) == 2
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text('{"format": "hetrun-model-graph", "format_version": 1}')
    with pytest.raises(BundleError, match="manifest.json: "):
        GraphModel(tmp_path / "m")


def test_export_replaces_a_graph_bundle_only_with_force(fp32_bundle, tmp_path, capsys):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(PROFILE))
    out = tmp_path / "b"
    args = ["export", "tiny-mixtral", "--profile", str(profile), "-o", str(out), "--graph", "--no-progress"]
    assert main(args) == 0 and is_graph_bundle(out)
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--force", "--precision", "int8-w8a8"]) == 0
    assert json.loads((out / "manifest.json").read_text())["precision"] == "int8-w8a8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "p.json"]  # no staging folder left


def test_a_signed_graph_bundle_runs_only_for_its_signers_key(tmp_path, capsys):
    for name in ("mine", "other"):
        assert main(["keygen", "-o", str(tmp_path / name)]) == 0
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(PROFILE))
    out = tmp_path / "signed"
    assert main(["export", "tiny-mixtral", "--profile", str(profile), "-o", str(out), "--graph", "--sign",
                 str(tmp_path / "mine")]) == 0
    assert (out / "manifest.sig").is_file()
    capsys.readouterr()
    assert main(["run", str(out), "--prompt-ids", "1,2", "--trust", str(tmp_path / "mine.pub")]) == 0
    assert main(["run", str(out), "--prompt-ids", "1,2", "--trust", str(tmp_path / "other.pub")]) == 2
    assert "not among the 1 trusted key" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["eos_token_id"] = [1]  # a change the checksums cannot see: the signature does
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run", str(out), "--prompt-ids", "1,2", "--trust", str(tmp_path / "mine.pub")]) == 2
    assert "changed after it was signed" in capsys.readouterr().err


def test_a_manifest_edited_to_another_shape_is_refused_before_any_call(fp32_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shape"]["layers"] = 1  # every file still matches its checksum
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not take and give what its manifest describes"):
        GraphModel(copy)


def test_inspect_and_sign_take_a_graph_bundle(fp32_bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    assert main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "graph bundle" in out and "2 layers" in out and "unsigned" in out and "all checks pass" in out
    assert main(["keygen", "-o", str(tmp_path / "key")]) == 0
    assert main(["sign", str(copy), "--key", str(tmp_path / "key")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(copy), "--trust", str(tmp_path / "key.pub"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["graph"] is True and doc["signature"] == "signed by a trusted key" and doc["shape"]["layers"] == 2
    (copy / "rope_sin.npy").write_bytes(b"x")
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 2
    assert "rope_sin.npy" in capsys.readouterr().err
