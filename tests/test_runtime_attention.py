"""Attention on the dense device (hetrun.runtime.attention): which layers and calls it takes over, that what it
computes is transformers' attention, and the in-place KV cache layer under every cache operation generate uses."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import hetrun
from hetrun.runtime import attention
from hetrun.runtime.attention import InPlaceKVLayer, RuntimeAttention
from hetrun.spec import AttentionSpec
from hetrun.tiny_models import FAMILY_SPECS, random_model, tiny_model

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
ORT = [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"}]
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def _profile(dense_precision: str = "fp32", devices=ORT) -> dict:
    return {"name": f"attention-{dense_precision}", "devices": devices, "dense_precision": dense_precision}


def _attention_calls(model) -> list[int]:
    return [m.forward.calls for m in model.modules() if isinstance(getattr(m, "forward", None), RuntimeAttention)]


@pytest.fixture(scope="module")
def mixtral_fp32():
    model = tiny_model("mixtral")
    deployed = hetrun.deploy(copy.deepcopy(model), _profile(), precision="fp32")
    return model, deployed


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_fp32_attention_on_the_runtime_is_transformers_attention(family, mixtral_fp32):
    if family == "mixtral":
        model, deployed = mixtral_fp32
    else:  # Qwen2-MoE: q/k/v biases; Qwen3-MoE: per-head q/k norms
        model = tiny_model(family)
        deployed = hetrun.deploy(copy.deepcopy(model), _profile(), precision="fp32")
    assert deployed.hetrun.dense.attention_layers == model.config.num_hidden_layers
    before = _attention_calls(deployed)
    with torch.no_grad():
        ref, out = model(IDS), deployed(IDS)
        ref_tokens = model.generate(IDS, max_new_tokens=24, **GEN)
        tokens = deployed.generate(IDS, max_new_tokens=24, **GEN)
    # every layer's prefill and decode steps ran on the runtime (1 + 1 + 23 calls each)
    assert [a - b for a, b in zip(_attention_calls(deployed), before)] == [25] * model.config.num_hidden_layers
    assert float((out.logits - ref.logits).abs().max() / ref.logits.abs().max()) < 1e-5
    assert torch.equal(tokens, ref_tokens)
    layers = out.past_key_values.layers
    assert all(type(layer) is InPlaceKVLayer for layer in layers)
    ref_layers = ref.past_key_values.layers
    for mine, theirs in zip(layers, ref_layers):  # the cache holds what transformers' would (rotated keys)
        assert mine.keys.shape == theirs.keys.shape
        assert float((mine.keys - theirs.keys).abs().max()) < 1e-5 * float(theirs.keys.abs().max())
        assert float((mine.values - theirs.values).abs().max()) < 1e-5 * float(theirs.values.abs().max())


def test_a_padded_batch_runs_transformers_attention_and_matches(mixtral_fp32):
    model, deployed = mixtral_fp32
    ids = torch.tensor([[0, 0, 0, 5, 9, 21, 33], [4, 8, 15, 16, 23, 42, 7]])
    mask = (ids != 0).long()
    mask[1] = 1
    before = _attention_calls(deployed)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN)
        out = deployed.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN)
    assert torch.equal(out, ref)
    assert _attention_calls(deployed) == before  # a mask: every call was transformers' own


def test_long_generation_grows_the_cache_and_the_rotary_tables(mixtral_fp32, monkeypatch):
    model, deployed = mixtral_fp32
    monkeypatch.setattr(attention, "KV_HEADROOM", 4)
    for m in deployed.modules():  # tables of 8 positions to start from, doubled as the sequence grows
        if isinstance(getattr(m, "forward", None), RuntimeAttention):
            m.forward.shared.cos = m.forward.shared.sin = torch.empty(0)
    monkeypatch.setattr(attention, "ROTARY_ROWS", 8)
    with torch.no_grad():
        ref = model.generate(IDS, max_new_tokens=40, **GEN)
        out = deployed.generate(IDS, max_new_tokens=40, **GEN)
    assert torch.equal(out, ref)
    shared = next(m.forward.shared for m in deployed.modules() if isinstance(getattr(m, "forward", None),
                                                                            RuntimeAttention))
    assert shared.cos.shape[0] == 64  # 8 -> 16 -> 32 -> 64 for 50 positions


def test_the_model_reads_its_rotary_rows_from_the_tables(mixtral_fp32, monkeypatch):
    model, deployed = mixtral_fp32
    table = deployed.model.rotary_emb
    assert isinstance(table, attention.RotaryTable) and table.rotary is not model.model.rotary_emb
    monkeypatch.setattr(attention, "ROTARY_ROWS", 8)
    table.shared.cos = table.shared.sin = torch.empty(0)  # tables of 8 positions: the calls below grow them
    x = torch.zeros(2, 3, model.config.hidden_size)
    for positions in (torch.tensor([[5], [900]]), torch.tensor([[0, 1, 2], [40, 41, 42]]), torch.tensor([[7]])):
        for mine, theirs in zip(table(x, positions), model.model.rotary_emb(x, positions)):
            assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    assert table.shared.cos_rows.shape[0] == 1024  # grown to hold position 900
    negative = torch.tensor([[-3, 0, 1]])  # the module's own values, not a wrapped-around row
    for mine, theirs in zip(table(x, negative), model.model.rotary_emb(x, negative)):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(table(x.bfloat16(), torch.tensor([[3]])), model.model.rotary_emb(x.bfloat16(),
                                                                                       torch.tensor([[3]]))):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs)


def test_int8_attention_errs_as_transformers_attention_on_the_same_projections(mixtral_fp32):
    model, _ = mixtral_fp32
    deployed = hetrun.deploy(copy.deepcopy(model), _profile("int8-w8a8"), precision="fp32")
    assert deployed.hetrun.dense.attention_layers == model.config.num_hidden_layers
    with torch.no_grad():
        ref, on = model(IDS).logits, deployed(IDS).logits
        for m in deployed.modules():  # the same deployment with transformers' attention between the projections
            if isinstance(getattr(m, "forward", None), RuntimeAttention):
                m.forward = m.forward.original
        off = deployed(IDS).logits
    err_on, err_off = (float((x - ref).norm() / ref.norm()) for x in (on, off))
    print(f"logits error with INT8 dense linears: runtime attention {err_on:.4f}, transformers' {err_off:.4f}")
    assert err_on < 0.1 and abs(err_on - err_off) < 0.01  # W8A8 projections (both measured 0.054)


@pytest.mark.parametrize("spec", [
    FAMILY_SPECS["olmoe"],  # q/k norms over all heads
    FAMILY_SPECS["deepseek_v3"],  # multi-head latent attention
    # onnxruntime's CPU GroupQueryAttention takes head sizes in multiples of 16 only, and says so when it runs
    FAMILY_SPECS["mixtral"].replace(attention=AttentionSpec("gqa", 4, 2, 8))], ids=["olmoe", "mla", "8-wide heads"])
def test_other_attention_stays_transformers(spec):
    model = random_model(spec)
    deployed = hetrun.deploy(copy.deepcopy(model), _profile(), precision="fp32")
    assert deployed.hetrun.dense.layers and deployed.hetrun.dense.attention_layers == 0
    with torch.no_grad():
        ref, out = model(IDS).logits, deployed(IDS).logits
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        assert torch.equal(deployed.generate(IDS, max_new_tokens=4, **GEN), model.generate(IDS, max_new_tokens=4, **GEN))


def test_a_rotary_table_that_is_not_rotate_half_is_left_alone(mixtral_fp32):
    model, _ = mixtral_fp32
    interleaved = copy.deepcopy(model)
    rotary = interleaved.model.rotary_emb
    own = rotary.forward

    def forward(x, position_ids):  # each frequency repeated in pairs (GPT-J style), not in halves
        cos, sin = own(x, position_ids)
        half = cos.shape[-1] // 2
        return tuple(t[..., :half].repeat_interleave(2, dim=-1) for t in (cos, sin))

    rotary.forward = forward
    deployed = hetrun.deploy(interleaved, _profile(), precision="fp32")
    assert deployed.hetrun.dense.layers and deployed.hetrun.dense.attention_layers == 0


def test_eager_attention_is_left_alone(mixtral_fp32):
    model, _ = mixtral_fp32
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"  # transformers then builds a mask for every call
    deployed = hetrun.deploy(eager, _profile(), precision="fp32")
    assert deployed.hetrun.dense.layers and deployed.hetrun.dense.attention_layers == 0


def test_dense_linears_in_torch_leave_attention_alone():
    deployed = hetrun.deploy(tiny_model("mixtral"), _profile("model"), precision="fp32")
    assert deployed.hetrun.dense is None and _attention_calls(deployed) == []


def _kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, tokens, 4, generator=torch.Generator().manual_seed(seed))  # [B, H, S, Dh]


def test_the_in_place_layer_is_a_dynamic_layer_under_every_cache_operation(monkeypatch):
    monkeypatch.setattr(attention, "KV_HEADROOM", 2)
    mine, ref = InPlaceKVLayer(), DynamicLayer()

    def both(op, *args):
        for layer in (mine, ref):
            getattr(layer, op)(*args)
        assert mine.get_seq_length() == ref.get_seq_length()
        if ref.keys is None:
            assert mine.keys is None
        else:
            assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)

    both("update", _kv(5, 0), _kv(5, 1))
    buffer = mine._kbuf
    for step in range(12):  # appends in place until the buffer is full, then one copy into a larger one
        both("update", _kv(1, 2 * step + 2), _kv(1, 2 * step + 3))
    assert mine._kbuf is not buffer and mine._kbuf.shape[2] >= 17
    both("crop", -3)
    both("update", _kv(2, 40), _kv(2, 41))
    both("reorder_cache", torch.tensor([1, 0]))  # a beam reorder replaces the views: adopted into new buffers
    both("update", _kv(1, 42), _kv(1, 43))
    both("batch_repeat_interleave", 2)
    both("update", _kv(1, 44).repeat_interleave(2, 0), _kv(1, 45).repeat_interleave(2, 0))
    both("batch_select_indices", torch.tensor([0, 3]))
    both("update", _kv(1, 46), _kv(1, 47))
    assert mine.keys.data_ptr() == mine._kbuf.data_ptr()  # still views of its buffers
    both("reset")
    both("update", _kv(3, 48), _kv(3, 49))


def test_a_cache_layer_of_another_kind_is_left_to_transformers(mixtral_fp32):
    model, deployed = mixtral_fp32
    cache = DynamicCache(config=deployed.config)
    with torch.no_grad():
        model(IDS[:, :4], cache=cache, use_cache=True)  # filled by transformers: DynamicLayers
        before = _attention_calls(deployed)
        out = deployed(IDS[:, 4:], cache=cache, use_cache=True).logits
        ref = model(IDS).logits[:, 4:]
    assert _attention_calls(deployed) == before
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_beam_search_reorders_the_in_place_cache(mixtral_fp32):
    model, deployed = mixtral_fp32
    before = _attention_calls(deployed)
    with torch.no_grad():
        ref = model.generate(IDS, max_new_tokens=10, num_beams=3, **GEN)
        out = deployed.generate(IDS, max_new_tokens=10, num_beams=3, **GEN)
    assert torch.equal(out, ref)
    assert all(after > b for after, b in zip(_attention_calls(deployed), before))  # 3 beams on the runtime


def test_continuous_batching_runs_transformers_attention_on_its_paged_cache(mixtral_fp32):
    import asyncio

    from hetrun.serve.engine import Engine, EngineConfig

    model, deployed = mixtral_fp32
    prompts = [IDS[0, :6].tolist(), IDS[0, 2:].tolist()]
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=8, **GEN)[0, len(p):].tolist() for p in prompts]

    async def both(engine):
        async def one(ids):
            steps = [step async for step in engine.generate(ids, 8)]
            return steps[-1].tokens
        return await asyncio.gather(*(one(p) for p in prompts))

    before = _attention_calls(deployed)
    engine = Engine(deployed, [-1], EngineConfig(context_length=64))  # no EOS: exactly 8 tokens each
    engine.start()
    try:
        got = asyncio.run(both(engine))
    finally:
        engine.stop()
    assert got == want
    assert _attention_calls(deployed) == before  # the paged cache is transformers': none taken over
