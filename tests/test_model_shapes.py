"""Models of other shapes than the tiny presets: per family, a seeded random shape (expert counts, top-k, widths, head
sizes, groups, shared experts, tied embeddings) deployed in FP32 on the `cpu` profile (onnxruntime and OpenVINO, the
dense part and attention on onnxruntime where they can go) must give transformers' logits and greedy tokens.

A random sweep of this kind found that 8-wide attention heads broke onnxruntime's GroupQueryAttention."""

import copy
import random

import pytest
import torch

import hetrun
from hetrun.spec import AttentionSpec, MoESpec, RouterSpec
from hetrun.tiny_models import FAMILY_SPECS, random_model
from tests.conftest import FAMILIES


def random_shape(family: str, seed: int) -> MoESpec:
    """A small random shape of `family`, the same for the same seed."""
    rng = random.Random(f"{family}-{seed}")
    base = FAMILY_SPECS[family]
    experts = rng.choice([4, 6, 8, 12, 16])
    layers = rng.randint(1, 3)
    shape = dict(num_layers=layers, hidden_size=rng.choice([40, 56, 64, 72, 96]),
                 moe_intermediate_size=rng.choice([16, 24, 40, 48]), num_experts=experts,
                 tie_word_embeddings=rng.random() < 0.3, vocab_size=rng.choice([97, 256, 300]))
    top_k = rng.randint(1, min(4, experts))
    if family == "minimax_m2":  # one group, always normalised, no scaling: all its config can say
        shape["router"] = RouterSpec("sigmoid_grouped", top_k, True, fp32_logits=False)
    elif family == "ernie4_5_moe":  # no groups or scaling in its config; MoE layers from a start, at an interval
        shape.update(router=RouterSpec("softmax_biased", top_k, True, fp32_logits=True),
                     num_shared_experts=rng.choice([0, 1, 2]), shared_intermediate_size=shape["moe_intermediate_size"],
                     first_dense_layers=rng.randint(0, layers - 1), dense_intermediate_size=64)
        odd_layer = any(i % 2 for i in range(shape["first_dense_layers"], layers))  # (i + 1) % 2 == 0
        shape["moe_layer_step"] = rng.choice([1, 2]) if odd_layer else 1
    elif family == "gpt_oss":  # softmax over the top-k logits: normalised; a clamp that bites, or gpt-oss's own
        shape.update(router=RouterSpec("softmax_topk", top_k, True), swiglu_limit=rng.choice([1.0, 7.0]))
    elif base.first_dense_layers:  # DeepSeek-V2/V3, GLM: groups, scaling, shared experts, a leading dense layer
        groups = rng.choice([g for g in (1, 2, 4) if experts % g == 0 and experts // g >= 2])
        chosen = rng.randint(1, groups)
        norm = family != "deepseek_v2" and rng.random() < 0.5  # DeepSeek-V2's router never normalises
        shape["router"] = RouterSpec(base.router.kind, min(top_k, chosen * (experts // groups)), norm,
                                                groups, chosen, rng.choice([1.0, 2.5]), base.router.fp32_logits)
        shape.update(num_shared_experts=rng.choice([0, 1, 2]), shared_intermediate_size=shape["moe_intermediate_size"],
                     first_dense_layers=rng.randint(0, min(1, layers - 1)), dense_intermediate_size=64)
    else:
        shape["router"] = RouterSpec("softmax_topk", top_k, rng.random() < 0.5)
        if base.shared_expert_gate:  # Qwen2-MoE, Qwen3-Next: one gated shared expert
            shape["shared_intermediate_size"] = rng.choice([24, 88])
        if family in ("qwen2_moe", "qwen3_moe") and layers >= 2 and rng.random() < 0.4:  # decoder_sparse_step 2
            shape.update(moe_layer_step=2, dense_intermediate_size=64)
    if base.attention.kind == "gqa":
        heads = rng.choice([2, 4])
        head_dim = rng.choice([8, 16, 32])
        if family == "olmoe":  # its q/k norms span hidden_size: heads x head size must equal it
            head_dim = shape["hidden_size"] // heads
        shape["attention"] = AttentionSpec("gqa", heads, rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
                                           head_dim)
    return base.replace(name=f"{base.name}-shape{seed}", **shape)


# Shapes the two seeds do not draw: ERNIE 4.5 with MoE layers between dense ones (every other layer)
INTERLEAVED = [("ernie4_5_moe", 5), ("ernie4_5_moe", 10)]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # DeepSeek's MLP for 0 shared experts
@pytest.mark.parametrize("family,seed", [(f, s) for f in FAMILIES for s in (1, 2)] + INTERLEAVED)
def test_a_model_of_another_shape_equals_transformers(family, seed):
    spec = random_shape(family, seed)
    if (family, seed) in INTERLEAVED:
        assert spec.moe_layer_step == 2 and spec.num_dense_layers > spec.first_dense_layers
    model = random_model(spec, seed=seed)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    deployed = hetrun.deploy(copy.deepcopy(model), "cpu", precision="fp32", threads=1)
    with torch.no_grad():
        got = deployed(ids).logits
        got_gen = deployed.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), spec
    assert torch.equal(got_gen, want_gen), spec
