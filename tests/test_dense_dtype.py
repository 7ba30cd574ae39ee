"""The dense part's torch ops in FP32 where the CPU emulates the model's 16-bit dtype (hetrun.runtime.dense_dtype):
what is cast, what is not, and that the answer only gets closer to the FP32 model's."""

import copy

import pytest
import torch
from hetrun.backends import host_cpu

import hetrun
from hetrun.tiny_models import tiny_model

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
ORT = [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"}]


def _deploy(model, monkeypatch, native: bool, dense_precision: str = "auto"):
    monkeypatch.setattr(host_cpu, "native_float", lambda dtype: native or dtype in (torch.float32, torch.float64))
    profile = {"name": "dense-dtype", "devices": ORT, "dense_precision": dense_precision}
    return hetrun.deploy(copy.deepcopy(model), profile, precision="int8-w8a8")


def _dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_an_emulated_bf16_model_computes_its_dense_part_in_fp32_with_the_embedding_kept_compact(family, monkeypatch):
    model = tiny_model(family).to(torch.bfloat16).eval()
    table = model.get_input_embeddings().weight
    deployed = _deploy(model, monkeypatch, native=False)
    assert deployed.hetrun.dense.upcast_from == torch.bfloat16
    assert set(_dtypes(deployed).values()) == {torch.float32}  # norms, gates, biases
    embedding = deployed.get_input_embeddings().weight  # a buffer now, still narrow
    assert embedding.dtype == torch.bfloat16 and embedding.shape == table.shape
    assert deployed.dtype == torch.float32  # what transformers sizes its caches by
    with torch.no_grad():
        logits = deployed(IDS).logits
        tokens = deployed.generate(IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and tokens.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_fp32_compute_is_at_least_as_close_to_the_fp32_model_as_bf16_compute(family, monkeypatch):
    model = tiny_model(family).eval()
    with torch.no_grad():
        ref = model(IDS).logits  # [1, S, V] the FP32 model
    bf16 = model.to(torch.bfloat16)
    errors = {}
    for native in (True, False):  # True: the host would compute BF16 natively, so the model stays BF16
        deployed = _deploy(bf16, monkeypatch, native=native)
        assert deployed.hetrun.dense.upcast_from == (None if native else torch.bfloat16)
        with torch.no_grad():
            out = deployed(IDS).logits.float()
        errors[native] = float((out - ref).norm() / ref.norm())
    print(f"{family}: logits error, dense part in BF16 {errors[True]:.4f}, in FP32 {errors[False]:.4f}")
    assert errors[False] <= errors[True] * 1.05 and errors[False] < 0.1


def test_continuous_batching_serves_the_fp32_computing_model(monkeypatch):
    # transformers' paged cache takes model.dtype: it must be the activations' FP32, not the narrow table's BF16
    import asyncio

    import transformers

    from hetrun.serve.builtin import builtin_model_dir
    from hetrun.serve.engine import Engine, EngineConfig

    # the built-in trained model: its logits have margins, so greedy tokens do not flip on summation order
    model = transformers.AutoModelForCausalLM.from_pretrained(builtin_model_dir(), local_files_only=True,
                                                              dtype=torch.bfloat16).eval()
    deployed = _deploy(model, monkeypatch, native=False)
    ids = IDS[0].tolist()
    with torch.no_grad():
        want = deployed.generate(IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(ids):].tolist()

    async def served(engine):
        last = None
        async for step in engine.generate(ids, 6, None):
            last = step
        return last

    engine = Engine(deployed, [-1], EngineConfig(context_length=64))  # no EOS: exactly 6 tokens
    engine.start()
    try:
        got = asyncio.run(served(engine))
    finally:
        engine.stop()
    assert list(got.tokens) == want


def test_a_native_host_or_dense_precision_model_leaves_the_dtype_alone(monkeypatch):
    model = tiny_model("mixtral").to(torch.bfloat16).eval()
    native = _deploy(model, monkeypatch, native=True)
    assert native.hetrun.dense.upcast_from is None and set(_dtypes(native).values()) == {torch.bfloat16}
    kept = _deploy(model, monkeypatch, native=False, dense_precision="model")
    assert kept.hetrun.dense is None and set(_dtypes(kept).values()) == {torch.bfloat16}


def test_an_fp32_model_is_not_touched(monkeypatch):
    deployed = _deploy(tiny_model("mixtral").eval(), monkeypatch, native=False)
    assert deployed.hetrun.dense.upcast_from is None and set(_dtypes(deployed).values()) == {torch.float32}
