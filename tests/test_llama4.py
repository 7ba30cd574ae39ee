"""Llama 4: the multimodal checkpoint directory Meta releases deploys as transformers reads its language model."""

import torch
import transformers

import hetrun
from hetrun.tiny_models import FAMILY_SPECS, random_config


def test_multimodal_checkpoint_deploys_as_its_language_model(tmp_path):
    """language_model.* beside vision_model.* tensors and a llama4 config whose text_config is the language model's:
    hetrun reads the text model's tensors alone; logits and greedy tokens as transformers' AutoModelForCausalLM of
    the same directory (MoE every other layer, each token's input scaled by its top-1 sigmoid score)."""
    vision = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=28, patch_size=14,
                                             projector_input_dim=32, projector_output_dim=48, vision_output_dim=32,
                                             intermediate_layers_indices=[0])
    config = transformers.Llama4Config(text_config=random_config(FAMILY_SPECS["llama4_text"]).to_dict(),
                                       vision_config=vision.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.Llama4ForConditionalGeneration(config).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # the language model alone
    ids = torch.randint(0, config.text_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        want_gen = ref.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    model = hetrun.deploy(str(tmp_path), "cpu", precision="fp32")
    assert model.hetrun.plan.spec.moe_layer_ids == (1, 3)
    with torch.no_grad():
        got = model(ids).logits.float()
        got_gen = model.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert torch.equal(got_gen, want_gen)
