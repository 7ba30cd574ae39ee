"""Bad checkpoints: one line naming the file, the tensor and the format; exit 2; nothing written."""

import json
import shutil

import pytest
import torch

import hetrun
from hetrun.checkpoint.shards import Shards
from hetrun.checkpoint.writer import TensorSpec, save_checkpoint, write_shards
from hetrun.cli import main
from hetrun.errors import CheckpointError
from hetrun.tiny_models import tiny_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A BF16 and an FP8 (32x32 blocks) and a GPTQ (group 32) tiny DeepSeek-V3 checkpoint."""
    root = tmp_path_factory.mktemp("good")
    model = tiny_model("deepseek_v3").to(torch.bfloat16)
    save_checkpoint(model, root / "bf16", max_shard_bytes=40_000)
    save_checkpoint(model, root / "fp8", "fp8", block=32, max_shard_bytes=40_000)
    save_checkpoint(tiny_model("mixtral"), root / "gptq", "gptq", group=32, max_shard_bytes=40_000)
    return root


def broken(good, tmp_path, kind):
    d = tmp_path / "model"
    shutil.copytree(good / kind, d)
    return d


def config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


def retype(d, name, dtype):
    """Rewrite the checkpoint with tensor `name` stored in another dtype (the real format, a wrong content)."""
    sh = Shards(d)
    tensors = {n: sh.read(n) for n in sh.names()}
    tensors[name] = tensors[name].float().to(dtype)
    for f in d.glob("*.safetensors"):
        f.unlink()
    write_shards(d, [TensorSpec(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()], 40_000)


def shard_of(d, name):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"


def case_missing_shard(d):
    shard_of(d, EXPERT).unlink()
    return "is missing"


def case_truncated_shard(d):
    f = shard_of(d, EXPERT)
    f.write_bytes(f.read_bytes()[:-100])
    return "is truncated"


def case_corrupt_header(d):
    f = shard_of(d, EXPERT)
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    return "corrupt safetensors header"


def case_wrong_dtype(d):
    retype(d, EXPERT, torch.int32)
    return f"tensor '{EXPERT}' is I32"


def case_stale_index(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.experts.99.up_proj.weight"] = index["weight_map"][EXPERT]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "does not hold it"


def case_unknown_quantization(d):
    config(d, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})
    return "'awq' is not supported"


def case_fp8_block_mismatch(d):
    config(d, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [64, 64]})
    return "64x64 blocks"


def case_gptq_group_mismatch(d):
    config(d, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False,
                                   "sym": True})
    return "gptq 4-bit g16"


def case_fp8_weights_without_config(d):
    c = json.loads((d / "config.json").read_text())
    del c["quantization_config"]
    (d / "config.json").write_text(json.dumps(c))
    return "no fp8 quantization_config"


CASES = [("bf16", case_missing_shard), ("bf16", case_truncated_shard), ("bf16", case_corrupt_header),
         ("bf16", case_wrong_dtype), ("bf16", case_stale_index), ("bf16", case_unknown_quantization),
         ("fp8", case_fp8_block_mismatch), ("gptq", case_gptq_group_mismatch),
         ("fp8", case_fp8_weights_without_config)]


@pytest.mark.parametrize("kind,case", CASES, ids=[c.__name__.removeprefix("case_") for _, c in CASES])
def test_bad_checkpoint_is_one_line_and_exit_2(good, tmp_path, capsys, kind, case):
    d = broken(good, tmp_path, kind)
    needle = case(d)
    out = tmp_path / "bundle"
    assert main(["export", str(d), "--profile", "cpu", "--precision", "fp32", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetrun: error:") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[")):
        hetrun.deploy(d, "cpu", precision="fp32")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        hetrun.deploy(tmp_path / "nothing", "cpu")
    (tmp_path / "config.json").write_text(json.dumps(tiny_model("olmoe").config.to_dict(), default=str))
    with pytest.raises(CheckpointError, match="safetensors"):
        hetrun.deploy(tmp_path, "cpu")


LAUNCH_CASES = [case_missing_shard, case_truncated_shard, case_wrong_dtype, case_unknown_quantization]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=[c.__name__.removeprefix("case_") for c in LAUNCH_CASES])
def test_bad_checkpoint_through_the_run_command_is_one_line_and_exit_2(good, tmp_path, capsys, case):
    """The command that deploys a directory and runs it (`python -m hetrun.launch --model DIR`, torchrun's entry point,
    here in one process) says the same one line and exits 2."""
    from hetrun.launch import main as launch

    d = broken(good, tmp_path, "bf16")
    needle = case(d)
    report = tmp_path / "report.json"
    code = launch(["--model", str(d), "--profile", "loopback-2", "--prompt-ids", "1,2,3", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hetrun: error: rank 0:") and err.count("\n") == 1 and needle in err, err
    assert not report.exists()
