"""`hetrun accuracy` and `hetrun bench precision` from the command line."""

import json

import pytest

import hetrun.bench
from hetrun.cli import main
from hetrun.formats import expert_bytes


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def mixed_demo():
    """`hetrun accuracy --model tiny --profile mixed-demo --json`, run once for the module."""
    from hetrun.cli.accuracy import accuracy_report

    return accuracy_report("tiny", "mixed-demo")


def test_mixed_demo_report(mixed_demo, capsys):
    r = mixed_demo
    by_prec = {d["precision"]: d for d in r["devices"]}
    assert [d["device"] for d in r["devices"]] == ["h100:0", "ascend:0", "xeon:0"]
    assert set(by_prec) == {"fp8", "fp16", "bf16"}
    # Each device's experts, on the hidden states the model feeds them, within the bounds.
    assert by_prec["fp16"]["expert_rel_err_max"] < 0.002
    assert by_prec["bf16"]["expert_rel_err_max"] < 0.01
    assert 0.03 < by_prec["fp8"]["expert_rel_err_max"] < 0.08
    assert sum(d["experts"] for d in r["devices"]) == 2 * (12 + 2)  # 2 MoE layers x (12 routed + 2 shared)
    # Bytes follow precision: FP8 a quarter of FP32 (tiny matrices: one block scale each), FP16/BF16 half.
    for d in r["devices"]:
        ratio = d["weight_bytes"] / d["fp32_weight_bytes"]
        assert ratio == pytest.approx({"fp8": 0.25, "fp16": 0.5, "bf16": 0.5}[d["precision"]], abs=0.002)
    dep = r["deployment"]
    assert dep["positions"] == 200 and dep["nonfinite_logits"] == 0
    print(f"mixed-demo: top-1 agreement {dep['top1']:.3f} ({dep['agree']}/200), logits error {dep['logits_rel_err']:.4f}")
    assert by_prec["fp16"]["alone"]["top1"] >= 0.95 and by_prec["bf16"]["alone"]["top1"] >= 0.95
    assert dep["top1"] >= 0.95  # the bound, on the trained tiny model (measured 0.985-0.99)


def test_random_weights_option_is_reported(capsys):
    r = run_json(capsys, ["accuracy", "--model", "tiny-mixtral", "--weights", "random", "--profile", "cpu",
                          "--precision", "fp16", "--prompts", "2", "--tokens", "4", "--json"])
    assert r["weights"] == "random" and r["deployment"]["positions"] == 8


def test_accuracy_json_and_text(capsys):
    r = run_json(capsys, ["accuracy", "--model", "tiny", "--profile", "cpu", "--precision", "int8",
                          "--prompts", "2", "--tokens", "5", "--json"])
    assert [d["backend"] for d in r["devices"]] == ["onnxruntime", "openvino"]
    assert all(d["precision"] == "int8" and d["expert_rel_err_max"] < 0.03 for d in r["devices"])
    assert r["deployment"]["positions"] == 10
    assert main(["accuracy", "--model", "tiny", "--profile", "cpu", "--prompts", "1", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "weight bytes" in out and "ort:0" in out and "top-1 agreement" in out


def test_every_tiny_family_is_an_accuracy_model():
    from hetrun.cli.accuracy import MODELS
    from hetrun.tiny_models import FAMILY_SPECS

    assert MODELS == {spec.name: family for family, spec in FAMILY_SPECS.items()}


def test_accuracy_errors_are_one_line(capsys):
    assert main(["accuracy", "--profile", "mixed-demo", "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ascend:0" in err and "fp16, bf16, int8, fp32" in err
    assert main(["accuracy", "--model", "gpt2"]) == 2
    assert "unknown model 'gpt2'" in capsys.readouterr().err


def test_bench_dispatch_errors(capsys, monkeypatch, tmp_path):
    assert main(["bench", "nonesuch"]) == 2
    assert "unknown benchmark 'nonesuch'" in capsys.readouterr().err
    (tmp_path / "later.py").write_text("import hetrun_bench_dependency_not_installed\n")  # a benchmark module
    monkeypatch.setattr(hetrun.bench, "__path__", [*hetrun.bench.__path__, str(tmp_path)])  # whose needs are missing
    assert main(["bench", "later"]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "precision", "--tokens", "0"]) == 2
    assert main(["bench", "precision", "--no-such-option"]) == 2


def test_bench_precision_runs_every_precision_on_both_runtimes(capsys):
    r = run_json(capsys, ["bench", "precision", "--hidden", "64", "--intermediate", "128", "--tokens", "1,3",
                          "--rounds", "1", "--seconds", "0.001", "--json"])
    got = {(x["runtime"], x["precision"]) for x in r["results"]}
    from hetrun.formats import FORMATS
    assert got == {(rt, p) for rt in ("onnxruntime", "openvino") for p in FORMATS} - set(r["skipped"])
    for x in r["results"]:
        assert x["weight_bytes"] == expert_bytes(x["precision"], 64, 128)
        assert set(x["seconds"]) == {"1", "3"} and all(s > 0 for s in x["seconds"].values())
        if x["precision"] == "bf16":
            assert x["vs_bf16"] == {"1": 1.0, "3": 1.0}
        assert x["rel_err"] is not None and x["rel_err"] < 0.25
        assert (x["resident_bytes"] > 0) if x["runtime"] == "onnxruntime" else x["resident_bytes"] is None
    assert r["bandwidth_gbs"] == 35
