"""`hetrun bench generate`'s rounds: every system runs once per round in alternating order, and keeps its fastest."""

from hetrun.backends import host_cpu

from hetrun.bench import generate


def test_rounds_alternate_and_each_system_keeps_its_fastest(monkeypatch):
    order, speeds = [], {"transformers bf16": [50.0, 70.0], "hetrun default": [80.0, 60.0]}
    monkeypatch.setattr(generate, "write_checkpoint", lambda folder: None)

    def one(system, folder, threads, missing, prompt_tokens, dense_precision):
        order.append(system)
        tps = speeds[system][sum(s == system for s in order) - 1]
        return {"decode_tps": tps, "prefill_tps": tps * 10, "peak_rss_gb": tps / 100, "tokens": [1, 2]}
    monkeypatch.setattr(generate, "_one_system", one)
    out = generate.run(["transformers bf16", "hetrun default"], threads=2, rounds=2)
    assert order == ["transformers bf16", "hetrun default", "hetrun default", "transformers bf16"]
    tf, het = out["systems"]["transformers bf16"], out["systems"]["hetrun default"]
    assert tf["decode_tps"] == 70.0 and tf["decode_tps_rounds"] == [50.0, 70.0] and tf["prefill_tps"] == 700.0
    assert het["decode_tps"] == 80.0 and het["peak_rss_gb"] == 0.8  # the larger peak of its rounds


def test_a_system_that_fails_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(generate, "write_checkpoint", lambda folder: None)
    monkeypatch.setattr(generate, "_one_system", lambda system, *a: "failed: boom" if system == "hetrun int4" else
                        {"decode_tps": 1.0, "prefill_tps": 1.0, "peak_rss_gb": 1.0, "tokens": []})
    out = generate.run(["hetrun int4", "transformers bf16"], threads=1, rounds=3)
    assert out["skipped"] == {"hetrun int4": "failed: boom"} and list(out["systems"]) == ["transformers bf16"]


def test_the_decode_split_counts_moe_layers_dense_linears_and_the_rest():
    import hetrun
    from hetrun.tiny_models import tiny_model

    model = hetrun.deploy(tiny_model("mixtral"), {"name": "split", "devices": [
        {"id": "ort", "type": "host-cpu", "backend": "onnxruntime"}]}, precision="int8-w8a8")
    out = generate._run_torch_model(model, [3, 14, 15, 92, 65], model.hetrun.stats)
    split = out["split_ms"]
    assert out["decode_tps"] > 0 and set(split) == {"total", "moe_layers", "expert_calls", "dense_linears",
                                                     "model_graph", "rest"}
    assert split["moe_layers"] > 0 and split["expert_calls"] > 0 and split["dense_linears"] > 0  # each part is timed
    assert split["model_graph"] == 0.0  # no whole-model graph here
    assert abs(split["total"] - split["moe_layers"] - split["dense_linears"] - split["rest"]) < 1e-9
    model.hetrun.stats.reset()
    assert model.hetrun.stats.dense_s == 0.0


def test_the_prompt_length_reaches_every_system_and_is_checked(monkeypatch, capsys):
    from hetrun.cli import main

    monkeypatch.setattr(generate, "write_checkpoint", lambda folder: None)
    seen = []
    monkeypatch.setattr(generate, "_one_system", lambda system, folder, threads, missing, prompt_tokens, dense: seen.append(
        prompt_tokens) or {"decode_tps": 1.0, "prefill_tps": 1.0, "peak_rss_gb": 1.0, "tokens": []})
    out = generate.run(["transformers bf16", "hetrun default"], threads=1, rounds=1, prompt_tokens=1024)
    assert seen == [1024, 1024] and out["prompt_tokens"] == 1024
    assert len(generate.prompt_ids(length=1024)) == 1024 and generate.prompt_ids()[:8] == generate.prompt_ids(
        length=1024)[:8]
    for bad in ("3", "4033"):  # at least 8; with the 64 new tokens within the model's 4096 positions
        assert main(["bench", "generate", "--prompt-tokens", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--prompt-tokens must be between 8 and 4032" in err[0]


def test_a_target_is_checked_on_the_fastest_variant_of_its_system():
    ran = {"hetrun int4": {"decode_tps": 80.0}, "hetrun int4 onnxruntime": {"decode_tps": 120.0},
           "hetrun int4 openvino": {"decode_tps": 60.0}, "hetrun int8 onnxruntime": {"decode_tps": 500.0},
           "hetrun default": {"decode_tps": 90.0}}
    assert generate.fastest_variant(ran, "hetrun int4") == "hetrun int4 onnxruntime"
    assert generate.fastest_variant(ran, "hetrun default") == "hetrun default"
    assert generate.fastest_variant(ran, "hetrun fp32") is None
    # every FP32 and low-precision system names its devices: the cpu profile, or one runtime alone
    for name in ("hetrun fp32", "hetrun int8", "hetrun int4"):
        variants = [s for s in generate.SYSTEMS if s.startswith(name)]
        assert variants == [name, f"{name} onnxruntime", f"{name} openvino", f"{name} graph", f"{name} graph bundle"]
        assert all(generate.SYSTEMS[s][3] in ("cpu profile", "onnxruntime", "openvino", "graph") for s in variants)
    ran["hetrun int4 graph"] = {"decode_tps": 150.0}  # the whole model as one onnxruntime graph is a variant too
    assert generate.fastest_variant(ran, "hetrun int4") == "hetrun int4 graph"


def test_matching_dense_precision_is_the_format_of_the_llama_cpp_file_each_system_is_held_against():
    assert generate.dense_precision_of("hetrun int4 onnxruntime", "matching") == "int4-w4a8"  # Q4_0: all INT4
    assert generate.dense_precision_of("hetrun int4", "matching") == "int4-w4a8"
    assert generate.dense_precision_of("hetrun int8 openvino", "matching") == "int8-w8a8"  # Q8_0
    assert generate.dense_precision_of("hetrun fp32", "matching") == "auto"
    assert generate.dense_precision_of("hetrun default", "matching") == "auto"
    assert generate.dense_precision_of("hetrun int4", "auto") == "auto"  # asked for: every system alike


def test_each_system_reports_its_logits_error_against_transformers_fp32(monkeypatch):
    monkeypatch.setattr(generate, "write_checkpoint", lambda folder: None)
    logits = {"transformers fp32": [3.0, 4.0], "hetrun int4": [3.0, 4.5]}
    monkeypatch.setattr(generate, "_one_system", lambda system, *a: {
        "decode_tps": 1.0, "prefill_tps": 1.0, "peak_rss_gb": 1.0, "tokens": [7], "logits": logits[system]})
    out = generate.run(["transformers fp32", "hetrun int4"], threads=1, rounds=1)
    got = out["systems"]["hetrun int4"]
    assert abs(got["logits_error_vs_transformers_fp32"] - 0.5 / 5.0) < 1e-6
    assert out["systems"]["transformers fp32"]["logits_error_vs_transformers_fp32"] == 0.0
    assert all("logits" not in r for r in out["systems"].values())  # 32,000 numbers each: not in the output


def test_peak_memory_is_also_held_against_each_systems_library_floor(capsys):
    result = {"cpu": host_cpu.describe(), "threads": 2, "rounds": 1, "systems": {
        "hetrun int4 onnxruntime": {"decode_tps": 150.0, "prefill_tps": 1200.0, "peak_rss_gb": 0.73, "floor_gb": 0.46},
        "llama.cpp Q4_0": {"decode_tps": 430.0, "prefill_tps": 1900.0, "peak_rss_gb": 0.27, "floor_gb": 0.04}},
        "skipped": {}}
    generate._print(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "peak RSS hetrun int4 onnxruntime / llama.cpp Q4_0: 2.70 (target <= 1.5) missed" in out
    assert "above each one's floor 0.27 / 0.23 GB = 1.17" in out
    assert "hetrun int4 variants meeting both targets against llama.cpp Q4_0 (decode >= 0.6, peak <= 1.5): none" in out


def test_a_variant_that_meets_both_targets_is_named_when_the_fastest_misses_one(capsys):
    result = {"cpu": host_cpu.describe(), "threads": 2, "rounds": 1, "skipped": {}, "systems": {
        "hetrun fp32": {"decode_tps": 68.0, "prefill_tps": 1.0, "peak_rss_gb": 1.67},  # fastest, but holds more
        "hetrun fp32 onnxruntime": {"decode_tps": 63.0, "prefill_tps": 1.0, "peak_rss_gb": 1.33},
        "hetrun fp32 openvino": {"decode_tps": 50.0, "prefill_tps": 1.0, "peak_rss_gb": 1.10},  # too slow
        "llama.cpp F32": {"decode_tps": 90.0, "prefill_tps": 1.0, "peak_rss_gb": 0.92}}}
    generate._print(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "peak RSS hetrun fp32 / llama.cpp F32: 1.82 (target <= 1.5) missed" in out
    assert "hetrun fp32 variants meeting both targets against llama.cpp F32 (decode >= 0.6, peak <= 1.5): " \
           "hetrun fp32 onnxruntime" in out


def test_a_graph_bundle_system_exports_once_and_runs_in_a_process_without_torch(monkeypatch, tmp_path):
    small = generate.SPEC.replace(hidden_size=128, moe_intermediate_size=256, vocab_size=512)
    monkeypatch.setattr(generate, "SPEC", small)
    generate.write_checkpoint(tmp_path)
    result = generate._one_system("hetrun int4 graph bundle", tmp_path, 1, "", prompt_tokens=16)
    assert isinstance(result, dict), result
    assert result["decode_tps"] > 0 and len(result["tokens"]) == generate.NEW_TOKENS
    assert result["dense_linears"] == "int4-w4a8" and result["floor_gb"] < 0.2  # no torch in that process
    bundles = [p for p in tmp_path.iterdir() if p.name.startswith("graph-bundle-")]
    assert [p.name for p in bundles if p.is_dir()] == ["graph-bundle-int4-matching"]
