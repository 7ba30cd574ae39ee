"""gpt-oss: its MXFP4 release and its BF16 layout read from disk, against transformers' own reading of them."""

import json

import numpy as np
import pytest
import torch
import transformers

import hetrun
from hetrun.checkpoint.gpt_oss import FP4_E2M1, dequantize_mxfp4, quantize_mxfp4
from hetrun.checkpoint.writer import save_checkpoint
from hetrun.errors import CheckpointError
from hetrun.tiny_models import FAMILY_SPECS, random_model

# MXFP4 blocks 32 values along each matrix's input: hidden and intermediate sizes that divide into them
SPEC = FAMILY_SPECS["gpt_oss"].replace(hidden_size=64, moe_intermediate_size=32)


def test_mxfp4_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)  # [E, out, in/32, 16]
    scales = rng.integers(120, 134, (3, 10, 4), dtype=np.uint8)  # [E, out, in/32]
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2).numpy())  # [E, out, in]


def test_mxfp4_quantizer_rounds_to_its_grid():
    rng = np.random.default_rng(1)
    on_grid = FP4_E2M1[rng.integers(0, 16, (5, 64))] * np.float32(2.0 ** -3)  # [5, 64]
    on_grid[:, ::32] = 6 * 2.0 ** -3  # every block's amax sets its exponent to -3
    np.testing.assert_array_equal(dequantize_mxfp4(*quantize_mxfp4(on_grid)), on_grid)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    back = dequantize_mxfp4(*quantize_mxfp4(w))
    exponent = np.floor(np.log2(np.abs(w).reshape(7, 3, 32).max(-1))).astype(np.int32) - 2  # [7, 3] OCP MX's
    unit = np.repeat(np.ldexp(np.float32(1.0), exponent), 32, 1)  # [7, 96] the grid's unit in each block
    # half E2M1's widest spacing (2 units), or the 2 units a block's largest values lose saturating at 6
    assert np.all(np.abs(back - w) <= 2 * unit) and np.mean(np.abs(back - w) <= unit / 4 + 1e-12) > 0.3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    model = random_model(SPEC).to(torch.bfloat16)
    save_checkpoint(model, root / "bf16")
    save_checkpoint(model, root / "mxfp4", "mxfp4")
    return root


@pytest.mark.parametrize("kind", ["bf16", "mxfp4"])
def test_checkpoint_deploys_as_transformers_reads_it(checkpoints, kind):
    """OpenAI's MXFP4 layout (as transformers reads it, dequantized) and the BF16 one, deployed from the directory on
    onnxruntime and OpenVINO at FP32: transformers' logits and greedy tokens."""
    folder = checkpoints / kind
    assert json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get(
        "quant_method") == (None if kind == "bf16" else "mxfp4")
    # transformers dequantizes MXFP4 where it has no MXFP4 kernels; asked to, it needs no accelerate either
    dequantize = {} if kind == "bf16" else {"quantization_config": transformers.Mxfp4Config(dequantize=True)}
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **dequantize).eval()
    ids = torch.randint(0, SPEC.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        want_gen = ref.generate(ids[:1], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    model = hetrun.deploy(str(folder), "cpu", precision="fp32")
    with torch.no_grad():
        got = model(ids).logits.float()
        got_gen = model.generate(ids[:1], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert torch.equal(got_gen, want_gen)


def test_bad_mxfp4_checkpoints_are_one_line_errors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints / "mxfp4" / "config.json").read_text())
    tensors = load_file(checkpoints / "mxfp4" / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    tensors[name] = tensors[name][:, :, :1].contiguous()  # one block of scales per row, not two
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is U8 .* needs U8 \\[E, 64, 2\\]") as e:
        hetrun.deploy(str(folder), "cpu", precision="fp32")
    assert "\n" not in str(e.value)
    config = json.loads((checkpoints / "bf16" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    config = {**FAMILY_SPECS["mixtral"].to_hf_config().to_dict(), "quantization_config": config["quantization_config"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mxfp4 quantization is read for gpt-oss checkpoints only"):
        hetrun.deploy(str(folder), "cpu")
