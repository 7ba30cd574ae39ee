"""Checkpoint directories: written by the tests in the real on-disk formats, read lazily, deployed and exported."""

import copy
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import hetrun
from hetrun.bundle import export, load
from hetrun.checkpoint import load_model, open_checkpoint
from hetrun.checkpoint.experts import CheckpointExpert
from hetrun.checkpoint.naming import stacked_names
from hetrun.checkpoint.writer import save_checkpoint
from hetrun.placement.planner import simple_plan
from hetrun.profile import load_profile
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.weights import ExpertWeights, LazyExperts, model_layer_weights
from hetrun.tiny_models import FAMILY_SPECS, tiny_model

SHARD = 60_000  # bytes: a tiny model in several shards
REPO = Path(__file__).resolve().parents[1]


def ids_for(model, n=2, t=9, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """Each family's tiny model in BF16, sharded, as save_pretrained lays it out (hub names, per-expert tensors)."""
    out = {}
    for family in FAMILY_SPECS:
        d = tmp_path_factory.mktemp(f"bf16_{family}")
        save_checkpoint(tiny_model(family).to(torch.bfloat16), d, max_shard_bytes=SHARD)
        out[family] = d
    return out


def test_writer_lays_out_what_transformers_reads(bf16_dirs):
    """The test checkpoints are real: transformers' from_pretrained reads them back exactly, shards and index alike."""
    d = bf16_dirs["mixtral"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and index["metadata"]["total_size"] > 0
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    want = tiny_model("mixtral").to(torch.bfloat16)
    got = transformers.AutoModelForCausalLM.from_pretrained(d)
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_skeleton_holds_the_dense_part_and_reads_experts_lazily(bf16_dirs, family):
    ckpt = open_checkpoint(bf16_dirs[family])
    model = load_model(ckpt)
    assert ckpt.shards.reads.total() and not any(".experts." in n for n in ckpt.shards.reads)  # no expert read yet
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    blocks = [m for m in model.modules() if isinstance(m, LazyExperts)]
    assert len(blocks) == ckpt.spec.num_moe_layers
    ref = transformers.AutoModelForCausalLM.from_pretrained(bf16_dirs[family]).eval()
    for k, v in model.state_dict().items():  # same dtypes as from_pretrained (routers kept in FP32 where it keeps them)
        assert v.dtype == ref.state_dict()[k].dtype and torch.equal(v, ref.state_dict()[k]), k
    with torch.no_grad():
        assert close(model(ids_for(model)).logits.float(), ref(ids_for(model)).logits.float(), 2e-2)


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "qwen2_moe"])
def test_deploy_from_directory_equals_todays_path(bf16_dirs, family):
    """deploy("dir") against from_pretrained + deploy(model): FP32 logits within 1e-4 of their scale, greedy tokens
    identical (the same experts, compiled from the same bytes)."""
    d = bf16_dirs[family]
    today = hetrun.deploy(transformers.AutoModelForCausalLM.from_pretrained(d).eval(), "cpu", precision="fp32")
    new = hetrun.deploy(str(d), "cpu", precision="fp32")
    ids = ids_for(new)
    with torch.no_grad():
        want, got = today(ids).logits.float(), new(ids).logits.float()
        assert close(got, want)
        assert torch.equal(new.generate(ids[:1], max_new_tokens=6, do_sample=False),
                           today.generate(ids[:1], max_new_tokens=6, do_sample=False))
    reads = new.hetrun_checkpoint.shards.reads
    expert_reads = [n for n in reads if ".experts." in n]
    assert expert_reads and max(reads[n] for n in expert_reads) == 1  # each expert tensor read once, by its device


def test_kimi_k2_config_deploys_as_deepseek_v3(tmp_path):
    """Kimi K2's checkpoints are DeepSeek-V3's under model_type kimi_k2, which transformers does not know."""
    model = tiny_model("deepseek_v3")
    save_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    deployed = hetrun.deploy(str(tmp_path), "cpu", precision="fp32")
    ids = ids_for(deployed)
    with torch.no_grad():
        assert close(deployed(ids).logits.float(), model(ids).logits.float())


def test_stacked_layout_reads_expert_slices(tmp_path):
    """save_pretrained(save_original_format=False) keeps experts stacked: each expert is its slice, read alone."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path, save_original_format=False)
    ckpt = open_checkpoint(tmp_path)
    assert stacked_names(ckpt.shards, "qwen3_moe", 0) is not None
    ex = model.model.layers[0].mlp.experts
    i = ex.gate_up_proj.shape[1] // 2
    w = CheckpointExpert(ckpt, 0, 3).read()
    assert isinstance(w, ExpertWeights)
    np.testing.assert_array_equal(w.gate, ex.gate_up_proj[3, :i].detach().numpy())
    np.testing.assert_array_equal(w.down, ex.down_proj[3].detach().numpy())
    names = stacked_names(ckpt.shards, "qwen3_moe", 0)
    e = ex.gate_up_proj.shape[0]
    assert ckpt.shards.bytes_read == sum(ckpt.shards.info(n).nbytes // e for n in names)  # expert 3's slices only
    deployed = hetrun.deploy(tmp_path, "cpu", precision="fp32")
    with torch.no_grad():
        assert close(deployed(ids_for(model)).logits, model(ids_for(model)).logits)


def test_each_process_reads_only_its_devices_experts(bf16_dirs):
    """What a rank compiles is what it reads: a runtime running device 0 alone (as DistributedRuntime does for a
    rank's devices) reads exactly the experts the plan puts there, once each, and nothing of the others."""
    ckpt = open_checkpoint(bf16_dirs["deepseek_v3"])
    model = load_model(ckpt, dense=False)  # an expert-only rank: routers only
    dense_reads = set(ckpt.shards.reads)
    assert dense_reads and all(".mlp.gate." in n for n in dense_reads)
    profile = load_profile("cpu")
    plan = simple_plan(ckpt.spec, profile, "fp32")
    weights = [w for _, w in model_layer_weights(ckpt.spec, model)]
    ExpertRuntime(plan, profile, weights, threads=1, local_devices={0})
    read = {n for n in ckpt.shards.reads if n not in dense_reads}
    mine = {(w.layer, e) for li, w in enumerate(weights) for e, d in zip(plan.phy2log[li], plan.device_of[li]) if d == 0}
    want = {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for layer, e in mine
            for p in ("gate_proj", "up_proj", "down_proj")}
    shared = {n for n in read if "shared_experts" in n}  # a layer's shared MLP, where a part of it is on device 0
    assert read - shared == want and all(ckpt.shards.reads[n] == 1 for n in want)
    assert {int(n.split(".")[2]) for n in shared} == {w.layer for li, w in enumerate(weights)
                                                     if (plan.shared_device_of[li] == 0).any()}


def test_deploy_frees_a_modules_experts(fresh):
    """A passed-in model's stacked expert tensors are released once compiled: nothing in hetrun keeps them."""
    model = fresh("mixtral")
    refs = [weakref.ref(b.mlp.experts.gate_up_proj) for b in model.model.layers]
    deployed = hetrun.deploy(model, "cpu", precision="fp32")
    gc.collect()
    assert all(r() is None for r in refs)
    with torch.no_grad():
        deployed(torch.tensor([[1, 2, 3]]))  # still runs
    with pytest.raises(hetrun.HetrunError, match="released after deploy"):
        deployed.hetrun.layers[0].weights.experts[0].read()


def test_deploy_from_directory_never_materialises_experts(bf16_dirs):
    model = hetrun.deploy(bf16_dirs["olmoe"], "cpu", precision="bf16")
    assert not any(".experts." in n for n, _ in model.named_parameters())
    layer = model.hetrun.layers[0]
    assert isinstance(layer.weights.experts[0], CheckpointExpert)  # a name, not tensors: read again on failover
    mem = model.hetrun.memory.report(model.hetrun.plan)
    assert set(mem) == {"ort:0", "ov:0"} and all(m["experts"] > 0 and m["predicted_bytes"] > 0 for m in mem.values())


def test_export_from_directory_matches_deploy(bf16_dirs, tmp_path):
    """hetrun export DIR reads the dense part and one expert at a time; the bundle runs like deploy("dir")."""
    d = bf16_dirs["qwen2_moe"]
    export(d, "cpu", tmp_path / "bundle", precision="fp32", progress=False)
    bundled = load(tmp_path / "bundle")
    direct = hetrun.deploy(d, "cpu", precision="fp32")
    ids = ids_for(direct)
    with torch.no_grad():
        assert torch.equal(bundled(ids).logits, direct(ids).logits)


def test_deploy_keeps_a_modules_experts_only_for_a_fallback_device(fresh):
    profile = {"name": "fb", "fallback_device": "spare",
               "devices": [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
                           {"id": "spare", "type": "host-cpu", "backend": "onnxruntime"}]}
    deployed = hetrun.deploy(copy.deepcopy(fresh("qwen3_moe")), profile, precision="fp32")
    assert isinstance(deployed.hetrun.layers[0].weights.experts[0].read(), ExpertWeights)


def test_torchrun_ranks_read_only_their_experts_and_the_dense_part_where_it_runs(bf16_dirs, tmp_path):
    """Two real ranks (torchrun): rank 0 runs the dense part and device ort, rank 1 only device ov. Each reads exactly
    its own experts, once; rank 1 reads no dense tensor but the routers; tokens equal a one-process deploy."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "checkpoint_rank.py"), str(bf16_dirs["mixtral"]), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        expert_reads = {n: c for n, c in got["reads"].items() if ".experts." in n}
        want = {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}.weight"
                for li, layer in enumerate(got["moe_layers"])
                for e, d in zip(got["phy2log"][li], got["device_of"][li]) if d == r for p in ("w1", "w2", "w3")}
        assert set(expert_reads) == want and set(expert_reads.values()) == {1}, r
    dense1 = [n for n in ranks[1]["reads"] if ".experts." not in n]
    assert dense1 and all(".block_sparse_moe.gate." in n for n in dense1)  # routers only
    assert any("embed_tokens" in n for n in ranks[0]["reads"])
    one = hetrun.deploy(bf16_dirs["mixtral"], "cpu", precision="fp32", threads=1)
    with torch.no_grad():
        want = one.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False)[0].tolist()
    assert ranks[0]["tokens"] == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_graphs_built_from_stored_16_bit_weights_equal_those_from_fp32(tmp_path, dtype):
    """Graph builders take a 16-bit expert as stored (no whole FP32 copy of it is made): every format's graph, on
    either target, is byte for byte the graph built from the FP32 read, for checkpoint and module experts alike.
    F64 weights are read as FP32 both ways (rounding them straight to BF16 could differ)."""
    from hetrun.formats import FORMATS
    from hetrun.runtime.graphs import build_expert_graph
    from hetrun.runtime.weights import ModuleExpert

    model = tiny_model("qwen3_moe").to(dtype)
    save_checkpoint(model, tmp_path, max_shard_bytes=SHARD)
    stored = CheckpointExpert(open_checkpoint(tmp_path), 1, 2)
    ex = model.model.layers[0].mlp.experts
    i = ex.gate_up_proj.shape[1] // 2
    module = ModuleExpert(ex.gate_up_proj[:, :i].detach(), ex.gate_up_proj[:, i:].detach(), ex.down_proj.detach(), 3)
    assert stored.stored_readers() is not None  # per-expert tensors: each matrix read when its builder takes it
    for source in (stored, module):
        w = source.read_stored()
        width = 4 if dtype == torch.float64 else 2
        assert w.gate.dtype.itemsize == width and w.down.dtype.itemsize == width  # 16-bit ones not widened
        np.testing.assert_array_equal(w.gate.astype(np.float32), source.read().gate)
        for precision in FORMATS:
            for target in ("onnxruntime", "openvino", "torch"):
                got = build_expert_graph(source, precision, target=target)
                want = build_expert_graph(source.read(), precision, target=target)
                assert got.model.SerializeToString() == want.model.SerializeToString(), (precision, target)
                assert got.weight_bytes == want.weight_bytes


def test_int4_build_reads_each_matrix_only_when_it_quantizes_it(bf16_dirs, monkeypatch):
    """A checkpoint expert's INT4 graph reads gate, up and down one at a time, each only once the previous one is
    packed, so at most one stored matrix is held while the graph is built (the issue's deploy peak at INT4)."""
    import hetrun.kernels.int4 as int4

    from hetrun.runtime.graphs import build_expert_graph

    source = CheckpointExpert(open_checkpoint(bf16_dirs["mixtral"]), 1, 2)
    events, readers = [], source.stored_readers()

    def logged(i):
        def read():
            events.append(f"read {i}")
            return readers[i]()
        return read

    chunks = int4.fp32_row_chunks
    monkeypatch.setattr(int4, "fp32_row_chunks", lambda *a: (events.append("pack") or c for c in chunks(*a)))
    monkeypatch.setattr(source, "stored_readers", lambda: tuple(logged(i) for i in range(3)))
    got = build_expert_graph(source, "int4", "onnxruntime").model.SerializeToString()
    assert got == build_expert_graph(source.read(), "int4", "onnxruntime").model.SerializeToString()
    assert [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]] == \
        ["read 0", "pack", "read 1", "pack", "read 2", "pack"]


def test_large_reads_get_pages_of_their_own(bf16_dirs, monkeypatch):
    """Reads past OWN_PAGES_BYTES land in anonymous mappings (unmapped when dropped) and hold the stored bytes."""
    from safetensors.torch import load_file

    import hetrun.checkpoint.shards as shards_module

    monkeypatch.setattr(shards_module, "OWN_PAGES_BYTES", 1)
    ckpt = open_checkpoint(bf16_dirs["mixtral"])
    want = {}
    for f in sorted(Path(bf16_dirs["mixtral"]).glob("*.safetensors")):
        want.update(load_file(f))
    for name, tensor in want.items():
        got = ckpt.shards.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert not shards_module._read_buffer(4096).untyped_storage().resizable()  # an mmap, not torch's allocator
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"  # [I, D] BF16
    rows = shards_module.StoredRows(ckpt.shards, name)
    whole = want[name].view(torch.int16).numpy()
    assert rows.shape == tuple(want[name].shape) and rows.dtype.itemsize == 2
    for sl in (slice(0, 3), slice(5, None), slice(7, 7), slice(-2, None)):
        np.testing.assert_array_equal(rows[sl].view(np.int16), whole[sl])
    np.testing.assert_array_equal(np.asarray(rows).view(np.int16), whole)
    with pytest.raises(TypeError):
        rows[::2]


def test_input_embeddings_are_a_map_of_their_shard(bf16_dirs):
    """An untied input-embedding table is looked up a few rows a step: it stays a copy-on-write map of its shard
    (only touched rows resident, as llama.cpp maps weights), equal to the stored table; the shard is never written,
    and a table tied to the LM head (read whole every step) is read as any other tensor."""
    from hetrun.checkpoint.skeleton import _lookup_table_key

    d = bf16_dirs["mixtral"]
    shards_before = {f.name: f.read_bytes() for f in Path(d).glob("*.safetensors")}
    model = load_model(open_checkpoint(d))
    table = model.get_input_embeddings().weight
    assert not table.untyped_storage().resizable()  # a map, not one of torch's allocations
    want = tiny_model("mixtral").to(torch.bfloat16)
    assert torch.equal(table, want.get_input_embeddings().weight)
    with torch.no_grad():
        table[0].zero_()  # copy-on-write: the process's page changes, the file does not
        got = model(ids_for(model)).logits
    assert torch.isfinite(got).all()
    assert {f.name: f.read_bytes() for f in Path(d).glob("*.safetensors")} == shards_before
    tied = copy.deepcopy(want.config)
    tied.tie_word_embeddings = True
    assert _lookup_table_key(want, tied) is None
    assert _lookup_table_key(want, want.config) == "model.embed_tokens.weight"
