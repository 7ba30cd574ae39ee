"""Quantized checkpoints: DeepSeek-V3 FP8 and GPTQ go onto devices of their format unchanged, bit for bit, and are
dequantized once for any other device."""

import logging

import numpy as np
import pytest
import torch
from hetrun.backends.graph_matrices import read_expert_matrices
from hetrun.kernels.gptq import unpack_int32
from onnx import numpy_helper

import hetrun
from hetrun import once
from hetrun.bench.precision import cpu_backend
from hetrun.checkpoint import load_model, open_checkpoint
from hetrun.checkpoint.experts import CheckpointExpert
from hetrun.checkpoint.shards import Shards
from hetrun.checkpoint.writer import TensorSpec, save_checkpoint, write_shards
from hetrun.runtime.graphs import build_expert_graph
from hetrun.runtime.weights import QuantizedExpert
from hetrun.tiny_models import tiny_model

RUNTIMES = ["onnxruntime", "openvino"]


def rewrite(d, drop=(), add=None):
    """Rewrite checkpoint `d` with tensors dropped and added (real shards and index, as the writer lays them out)."""
    shards = Shards(d)
    tensors = {n: shards.read(n) for n in shards.names() if n not in drop}
    tensors.update(add or {})
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    write_shards(d, [TensorSpec(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()], 50_000)


def inits(graph) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.model.graph.initializer}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- FP8 ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """Tiny DeepSeek-V3 in BF16, quantized to E4M3 in 32x32 blocks (several blocks per matrix, ragged edges), in
    DeepSeek's hub layout: per-expert weight + weight_scale_inv, attention and shared experts quantized too."""
    d = tmp_path_factory.mktemp("fp8")
    save_checkpoint(tiny_model("deepseek_v3").to(torch.bfloat16), d, "fp8", block=32, max_shard_bytes=50_000)
    return d


def test_fp8_graph_initializers_are_the_checkpoints_bytes(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)
    src = CheckpointExpert(ckpt, 1, 7)
    g = build_expert_graph(src, "fp8")
    assert g.quantizer == "fp8-checkpoint"
    base = "model.layers.1.mlp.experts.7"
    codes = {p: ckpt.shards.numpy(f"{base}.{p}.weight").view(np.uint8) for p in ("gate_proj", "up_proj", "down_proj")}
    scales = {p: ckpt.shards.numpy(f"{base}.{p}.weight_scale_inv") for p in codes}
    dq = [n for n in g.model.graph.node if n.op_type == "DequantizeLinear"]
    got = inits(g)
    # gate_up: gate rows then up rows; K = 72 in 32-wide blocks: two full blocks, then an 8-wide tail node
    gu = [d for d in dq if got[d.input[0]].shape[0] == 2 * 48]
    stored = np.concatenate([got[d.input[0]].view(np.uint8) for d in gu], axis=1)
    np.testing.assert_array_equal(stored, np.concatenate([codes["gate_proj"], codes["up_proj"]]))  # bit for bit
    row_scales = np.concatenate([got[d.input[1]] for d in gu], axis=1)
    want = np.concatenate([np.repeat(scales[p], 32, axis=0)[:48] for p in ("gate_proj", "up_proj")])
    np.testing.assert_array_equal(row_scales, want)  # the checkpoint's scales, repeated per row as ONNX wants
    down = [d for d in dq if got[d.input[0]].shape[0] == 72]
    np.testing.assert_array_equal(np.concatenate([got[d.input[0]].view(np.uint8) for d in down], 1), codes["down_proj"])
    assert g.weight_bytes == sum(c.nbytes for c in codes.values()) + sum(s.nbytes for s in scales.values())


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp8_weights_run_exactly_as_stored(fp8_dir, runtime):
    """fp8-w8a16 (FP32 activations): the graph computes with codes x scales exactly; on a BF16 device the expert is
    the dequantized FP32 weights rounded to BF16 once."""
    src = CheckpointExpert(open_checkpoint(fp8_dir), 2, 3)
    w = src.weights()
    x = np.random.default_rng(0).standard_normal((9, 72)).astype(np.float32)
    be = cpu_backend(runtime, "fp8-w8a16", 1)
    g = build_expert_graph(src, "fp8-w8a16", target=be.graph_target())
    assert rel(be.load(g.serialize(), "t", g.meta).run(x), w.reference(x)) < 1e-5
    bf16 = build_expert_graph(src, "bf16")
    assert bf16.quantizer == "" and rel(bf16.weight_bytes, 2 * 3 * 72 * 48) == 0.0


def test_transformers_fp8_layouts_read_the_same(fp8_dir, tmp_path):
    """transformers' own FP8 save stacks the expert scales per layer ([E, 2 ceil(I/b), ...] for gate_up); fully
    stacked experts keep codes [E, 2I, D] with them. All layouts give the same expert, codes and scales unchanged."""
    import shutil

    ckpt = open_checkpoint(fp8_dir)
    want = CheckpointExpert(ckpt, 1, 4).read()
    for layout in ("scales", "all"):
        d = tmp_path / layout
        shutil.copytree(fp8_dir, d)
        sh = Shards(d)
        drop, add = set(), {}
        for layer in (1, 2):
            p = f"model.layers.{layer}.mlp.experts"
            e_n = range(12)
            gu_s = torch.stack([torch.cat([sh.read(f"{p}.{e}.gate_proj.weight_scale_inv"),
                                           sh.read(f"{p}.{e}.up_proj.weight_scale_inv")]) for e in e_n])
            add[f"{p}.gate_up_proj_scale_inv"] = gu_s
            add[f"{p}.down_proj_scale_inv"] = torch.stack([sh.read(f"{p}.{e}.down_proj.weight_scale_inv") for e in e_n])
            drop |= {f"{p}.{e}.{q}.weight_scale_inv" for e in e_n for q in ("gate_proj", "up_proj", "down_proj")}
            if layout == "all":
                add[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sh.read(f"{p}.{e}.gate_proj.weight"),
                                                                   sh.read(f"{p}.{e}.up_proj.weight")]) for e in e_n])
                add[f"{p}.down_proj"] = torch.stack([sh.read(f"{p}.{e}.down_proj.weight") for e in e_n])
                drop |= {f"{p}.{e}.{q}.weight" for e in e_n for q in ("gate_proj", "up_proj", "down_proj")}
        rewrite(d, drop, add)
        got = CheckpointExpert(open_checkpoint(d), 1, 4).read()
        assert isinstance(got, QuantizedExpert) and got.kind == "fp8"
        for m in ("gate", "up", "down"):
            a, b = getattr(got, m), getattr(want, m)
            np.testing.assert_array_equal(a.codes.view(np.uint8), b.codes.view(np.uint8))
            np.testing.assert_array_equal(a.scale, b.scale)


def test_fp8_checkpoint_deploys_on_mixed_devices(fp8_dir):
    """mixed-demo: the H100 runs the checkpoint's FP8 experts as stored, the 910B (FP16) and the Xeon (BF16)
    dequantize them once; logits stay within FP8's error of the dequantized model run in FP32."""
    ckpt = open_checkpoint(fp8_dir)
    reference = load_model(ckpt).float()  # dense part and lazily read experts, dequantized
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    deployed = hetrun.deploy(fp8_dir, "mixed-demo")
    with torch.no_grad():
        got, want = deployed(ids).logits.float(), reference(ids).logits
    assert deployed.hetrun.plan.precision["h100:0"] == "fp8"
    assert rel(got.numpy(), want.numpy()) < 0.15  # FP8 activations, FP16/BF16 devices, BF16 dense part


# ---- GPTQ -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("gptq", True, True), ("gptq_v2", False, False)],
                ids=["v1-sym-actorder", "v2-asym"])
def gptq_dir(request, tmp_path_factory):
    """Tiny Mixtral as GPTQ 4-bit in groups of 32 (several groups per row), experts and attention quantized."""
    fmt, sym, desc_act = request.param
    d = tmp_path_factory.mktemp(f"gptq_{fmt}")
    save_checkpoint(tiny_model("mixtral"), d, "gptq", group=32, sym=sym, desc_act=desc_act, checkpoint_format=fmt,
                    max_shard_bytes=50_000)
    return d


def test_gptq_graph_holds_the_checkpoints_codes_scales_and_zeros(gptq_dir):
    ckpt = open_checkpoint(gptq_dir)
    g = build_expert_graph(CheckpointExpert(ckpt, 1, 5), "int4-g32")
    assert g.quantizer == "gptq-checkpoint"
    base = "model.layers.1.block_sparse_moe.experts.5.w2"  # down [64, 96]: 3 groups of 32 along K
    qweight, qzeros, scales, g_idx = (ckpt.shards.numpy(f"{base}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx"))
    node = [n for n in g.model.graph.node if n.op_type == "MatMulNBits"][1]
    got = inits(g)
    order = np.argsort(g_idx, kind="stable")
    act_order = not np.array_equal(g_idx, np.arange(96) // 32)
    assert act_order == ckpt.quant.desc_act
    gather = [n for n in g.model.graph.node if n.op_type == "Gather" and n.output[0] == node.input[0]]
    if act_order:  # the input columns in group order; g_idx itself unchanged in meaning
        np.testing.assert_array_equal(got[gather[0].input[1]], order)
    else:
        assert not gather
    b = got[node.input[1]]  # [N, blocks, 16] two codes a byte, low nibble first
    codes = np.stack([b & 0xF, b >> 4], -1).reshape(64, 96)  # [N, K in group order]
    np.testing.assert_array_equal(codes, unpack_int32(qweight, 4, 0)[order].T)
    np.testing.assert_array_equal(got[node.input[2]].reshape(64, 3), scales.astype(np.float32).T)  # fp16 -> fp32 exact
    z = got[node.input[3]]
    zeros = np.stack([z & 0xF, z >> 4], -1).reshape(64, -1)[:, :3]
    np.testing.assert_array_equal(zeros, unpack_int32(qzeros, 4, 1).T + ckpt.quant.zero_offset)
    w = CheckpointExpert(ckpt, 1, 5).weights()  # torch-path backends read the same weights back out of the graph
    np.testing.assert_array_equal(read_expert_matrices(g.model).down, w.down.T)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_gptq_runs_as_its_dequantization(gptq_dir, runtime):
    src = CheckpointExpert(open_checkpoint(gptq_dir), 0, 2)
    x = np.random.default_rng(1).standard_normal((11, 64)).astype(np.float32)
    be = cpu_backend(runtime, "int4-g32", 1)
    g = build_expert_graph(src, "int4-g32", target=be.graph_target())
    assert rel(be.load(g.serialize(), "t", g.meta).run(x), src.weights().reference(x)) < 1e-5


def test_gptq_elsewhere_is_dequantized_once(gptq_dir, caplog, monkeypatch):
    monkeypatch.setattr(once, "said", set())
    src = CheckpointExpert(open_checkpoint(gptq_dir), 0, 1)
    w = src.weights()
    g = build_expert_graph(src, "fp32")
    np.testing.assert_array_equal(inits(g)[g.model.graph.node[0].input[1]][:, :96], w.gate.T)
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        assert build_expert_graph(src, "int4").quantizer == "rtn"  # another group size: quantized again, said once
    assert any("quantized again" in r.message for r in caplog.records)


def test_gptq_checkpoint_deploys_onto_int4_devices(gptq_dir):
    profile = {"name": "int4-g32", "devices": [
        {"id": "ort", "type": "host-cpu", "backend": "onnxruntime", "precision": "int4-g32"},
        {"id": "ov", "type": "host-cpu", "backend": "openvino", "precision": "int4-g32"}],
        "dense_precision": "model"}  # the experts' path alone: attention as the checkpoint has it, not INT8
    ckpt = open_checkpoint(gptq_dir)
    reference = load_model(ckpt)  # attention dequantized, experts read and dequantized per call
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    deployed = hetrun.deploy(gptq_dir, profile)
    with torch.no_grad():
        got, want = deployed(ids).logits, reference(ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_next"])
def test_a_one_output_linear_stays_unquantized_in_a_gptq_checkpoint(family, tmp_path):
    """The shared-expert gate [1, D] cannot pack GPTQ's zero points (8 per int32 along outputs): it stays as it is,
    as GPTQ quantizers leave it, and the checkpoint deploys as its own dequantized model computes."""
    save_checkpoint(tiny_model(family), tmp_path, "gptq", group=32)
    ckpt = open_checkpoint(tmp_path)
    assert "model.layers.0.mlp.shared_expert_gate.weight" in ckpt.shards
    assert "model.layers.0.mlp.experts.0.gate_proj.qweight" in ckpt.shards
    reference = load_model(ckpt)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    deployed = hetrun.deploy(str(tmp_path), "cpu", precision="fp32")
    with torch.no_grad():
        got, want = deployed(ids).logits, reference(ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_quantization_configs(tmp_path):
    from hetrun.checkpoint.quant import quantization_of
    from hetrun.errors import CheckpointError

    q = quantization_of({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                 "desc_act": True, "format": "gptq_v2"}}, "c")
    assert (q.method, q.zero_offset, q.desc_act) == ("gptq", 0, True)
    q = quantization_of({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                                 "activation_scheme": "dynamic"}}, "c")
    assert q.block == (128, 128) and q.describe == "fp8 128x128 blocks"
    for bad, needle in [({"quant_method": "awq", "bits": 4}, "'awq' is not supported"),
                        ({"quant_method": "gptq", "bits": 3}, "bits=3"),
                        ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
                        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "e5m2"),
                        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin")]:
        with pytest.raises(CheckpointError, match=needle):
            quantization_of({"quantization_config": bad}, "config.json")
    assert quantization_of({}, "c").describe == "unquantized"
