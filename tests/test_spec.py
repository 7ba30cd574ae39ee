import pytest
import transformers

from hetrun.errors import SpecError
from hetrun.spec import PRESETS, SUPPORTED_FAMILIES, MoESpec
from hetrun.tiny_models import FAMILY_SPECS


@pytest.mark.parametrize("name,billions,moe_layers,experts,top_k", [
    ("mixtral-8x7b", 46.7, 32, 8, 2),
    ("mixtral-8x22b", 141.0, 56, 8, 2),
    ("qwen3-30b-a3b", 30.5, 48, 128, 8),
    ("qwen3-235b-a22b", 235.0, 94, 128, 8),
    ("deepseek-v2-lite", 15.7, 26, 64, 6),
    ("deepseek-v2", 236.0, 59, 160, 6),
    ("glm-4.5-air", 106.0, 45, 128, 8),
    ("minimax-m2", 230.0, 62, 256, 8),
    ("deepseek-r1", 671.0, 58, 256, 8),
])
def test_presets_have_published_shapes(name, billions, moe_layers, experts, top_k):
    spec = MoESpec.from_preset(name)
    assert spec.num_moe_layers == moe_layers and spec.num_experts == experts and spec.top_k == top_k
    assert spec.total_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_kimi_k2_preset_is_its_published_trillion():
    spec = MoESpec.from_preset("kimi-k2")  # "1T total parameters" on its model card, rounded
    assert spec.num_moe_layers == 60 and spec.num_experts == 384 and spec.top_k == 8
    assert spec.total_params() / 1e12 == pytest.approx(1.0, rel=0.03)


def test_tiny_preset_is_deepseek_style():
    spec = MoESpec.from_preset("tiny")
    assert spec.family == "deepseek_v3" and spec.router.kind == "sigmoid_grouped" and spec.num_shared_experts == 2
    assert spec.hidden_size % 64 != 0


def test_every_supported_family_has_a_tiny_model():
    assert list(FAMILY_SPECS) == list(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_hf_config_round_trip(family):
    spec = FAMILY_SPECS[family]
    back = MoESpec.from_hf_config(spec.to_hf_config())
    for f in ("num_layers", "hidden_size", "moe_intermediate_size", "num_experts", "router", "num_shared_experts",
              "first_dense_layers", "shared_expert_gate"):
        assert getattr(back, f) == getattr(spec, f), f


def test_unknown_preset_and_unsupported_family_are_one_line_errors():
    with pytest.raises(SpecError, match="unknown model preset 'gpt-5'; choose one of: tiny"):
        MoESpec.from_preset("gpt-5")
    with pytest.raises(SpecError, match="model family 'llama' is not supported; hetrun supports: mixtral"):
        MoESpec.from_hf_config(transformers.LlamaConfig())


def test_dict_round_trip_and_bad_dict():
    for spec in PRESETS.values():
        assert MoESpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="malformed model spec"):
        MoESpec.from_dict({"name": "x"})


def test_deepseek_v2_routing_methods():
    cfg = FAMILY_SPECS["deepseek_v2"].to_hf_config()
    assert cfg.topk_method == "group_limited_greedy" and MoESpec.from_hf_config(cfg).router.n_group == 4
    cfg.topk_method = "greedy"  # every expert competes, whatever n_group says
    assert MoESpec.from_hf_config(cfg).router.n_group == 1
    cfg.topk_method = "noaux_tc"
    with pytest.raises(SpecError, match="deepseek_v2 topk_method 'noaux_tc' is not supported"):
        MoESpec.from_hf_config(cfg)
