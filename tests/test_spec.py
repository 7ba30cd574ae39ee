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
    ("gpt-oss-120b", 116.8, 36, 128, 4),
    ("gpt-oss-20b", 20.9, 24, 32, 4),
    ("llama-4-maverick", 400.0, 24, 128, 1),
    ("ernie-4.5-300b-a47b", 300.0, 51, 64, 8),
    ("hunyuan-a13b", 80.0, 32, 64, 8),
])
def test_presets_have_published_shapes(name, billions, moe_layers, experts, top_k):
    spec = MoESpec.from_preset(name)
    assert spec.num_moe_layers == moe_layers and spec.num_experts == experts and spec.top_k == top_k
    assert spec.total_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_kimi_k2_preset_is_its_published_trillion():
    spec = MoESpec.from_preset("kimi-k2")  # "1T total parameters" on its model card, rounded
    assert spec.num_moe_layers == 60 and spec.num_experts == 384 and spec.top_k == 8
    assert spec.total_params() / 1e12 == pytest.approx(1.0, rel=0.03)


def test_presets_whose_published_totals_count_more_or_round():
    scout = MoESpec.from_preset("llama-4-scout")  # "109B total" counts its vision encoder, which hetrun does not place
    assert scout.num_moe_layers == 48 and scout.total_params() / 1e9 == pytest.approx(109.0, rel=0.02)
    assert scout.total_params() < 109e9
    ernie = MoESpec.from_preset("ernie-4.5-21b-a3b")  # its card says "21B"; transformers' own config for it: 21.8B
    assert ernie.num_moe_layers == 27 and ernie.total_params() / 1e9 == pytest.approx(21.0, rel=0.04)


# Published active parameters (each model's card), as printed: a figure counts to the precision it is given in.
# Cards count the embeddings differently (Mixtral, Qwen and DeepSeek both tables, OpenAI the output one only, some
# neither), so the figure must lie between active_params() less both embedding tables and active_params().
ACTIVE = {"mixtral-8x7b": "12.9", "mixtral-8x22b": "39", "qwen3-30b-a3b": "3.3", "qwen3-235b-a22b": "22",
          "deepseek-v2-lite": "2.4", "deepseek-v2": "21", "deepseek-v3": "37", "glm-4.5-air": "12",
          "minimax-m2": "10", "kimi-k2": "32", "gpt-oss-120b": "5.1", "gpt-oss-20b": "3.6", "llama-4-scout": "17",
          "llama-4-maverick": "17", "ernie-4.5-300b-a47b": "47", "ernie-4.5-21b-a3b": "3",
          "hunyuan-a13b": "13"}


@pytest.mark.parametrize("name,published", ACTIVE.items())
def test_presets_have_published_active_parameters(name, published):
    spec = MoESpec.from_preset(name)
    digits = len(published.partition(".")[2])
    half_unit = 0.5 * 10.0 ** -digits * 1e9
    tables = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    low, high = spec.active_params() - tables, spec.active_params()
    assert low - half_unit <= float(published) * 1e9 <= high + half_unit, (low / 1e9, high / 1e9)


def test_gpt_oss_and_ernie_read_from_their_configs():
    spec = MoESpec.from_hf_config(transformers.GptOssConfig())  # transformers' defaults: gpt-oss-120b's config
    assert spec.replace(name="gpt-oss-120b") == MoESpec.from_preset("gpt-oss-120b")
    ernie = MoESpec.from_hf_config(transformers.Ernie4_5_MoeConfig())  # and ERNIE-4.5-21B-A3B's
    assert ernie.replace(name="ernie-4.5-21b-a3b") == MoESpec.from_preset("ernie-4.5-21b-a3b")
    assert spec.expert_activation.kind == "clamped_swiglu" and spec.expert_activation.alpha == 1.702
    assert spec.expert_activation.limit == 7.0 and spec.expert_bias


@pytest.mark.parametrize("config", ["Llama4TextConfig", "Llama4Config"])  # the multimodal one: its text_config
def test_llama4_reads_from_its_configs(config):
    spec = MoESpec.from_hf_config(getattr(transformers, config)())  # transformers' defaults: Llama 4 Scout's
    assert spec.replace(name="llama-4-scout") == MoESpec.from_preset("llama-4-scout")
    assert spec.router.kind == "sigmoid_topk" and spec.router.scales_input


def test_interleaved_moe_layers():
    maverick = MoESpec.from_hf_config(transformers.Llama4TextConfig(interleave_moe_layer_step=2,
                                                                    num_local_experts=128))
    assert maverick.replace(name="llama-4-maverick") == MoESpec.from_preset("llama-4-maverick")
    assert maverick.moe_layer_ids == tuple(range(1, 48, 2)) and maverick.num_dense_layers == 24
    cfg = transformers.Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=3)  # layers 2 and 5 are MoE
    spec = MoESpec.from_hf_config(cfg)
    assert spec.moe_layer_ids == (2, 5) and spec.dense_intermediate_size == cfg.intermediate_size
    assert MoESpec.from_hf_config(spec.to_hf_config()).replace(name=spec.name) == spec
    with pytest.raises(SpecError, match="mlp_only_layers are not supported yet"):
        MoESpec.from_hf_config(transformers.Qwen2MoeConfig(mlp_only_layers=[1]))
    with pytest.raises(SpecError, match="leave no MoE layer"):
        MoESpec.from_preset("tiny-mixtral").replace(first_dense_layers=2)
    ernie = transformers.Ernie4_5_MoeConfig(moe_layer_end_index=20)
    with pytest.raises(SpecError, match="MoE layers end before the last layer"):
        MoESpec.from_hf_config(ernie)


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
