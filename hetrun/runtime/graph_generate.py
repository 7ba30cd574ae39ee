"""generate() for a model deployed as one graph (hetrun.runtime.model_graph): greedy decoding of one sequence runs
in a loop of its own -- embed the token, one graph call, argmax -- instead of transformers' generation loop, whose
per-token bookkeeping (input preparation, logits processors, stopping criteria, mask updates, output objects) cost
0.25-0.35 ms a token on the 2-layer benchmark model, about a tenth of a decode step there.

It takes only what greedy search does with nothing on top: no sampling, one beam, one sequence, no padding, and a
generation config that differs from transformers' defaults in nothing but its length, its special token ids and
sampling settings greedy search ignores. Every other request goes to transformers' generate unchanged. The tokens
are what transformers' greedy search picks from the same logits (torch.argmax: the first of equal maxima).
"""

from __future__ import annotations

import copy

import torch

# generation-config fields a greedy request may set: any value, or (for the tuple-valued) one of these
ANY_VALUE = {"max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
             "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
             "transformers_version", "_from_model_config"}
ONE_OF = {"do_sample": (None, False), "num_beams": (None, 1), "num_return_sequences": (None, 1),
          "use_cache": (None, True), "output_attentions": (None, False), "output_hidden_states": (None, False),
          "output_scores": (None, False), "output_logits": (None, False), "return_dict_in_generate": (None, False)}


class GreedyGenerate:
    """Stands as the model's generate(): greedy requests of one sequence run here, every other one in
    `original` (transformers' generate)."""

    def __init__(self, model: torch.nn.Module, runner, original):
        self.model, self.runner, self.original = model, runner, original
        self.calls = 0  # requests served here (the tests read it)

    def __call__(self, inputs=None, generation_config=None, **kwargs):
        request = self._greedy(inputs, generation_config, kwargs)
        if request is None:
            return self.original(inputs, generation_config=generation_config, **kwargs)
        self.calls += 1
        ids, new, eos = request
        return self.decode(ids, new, eos)

    def decode(self, ids: torch.Tensor, new: int, eos: set[int]) -> torch.Tensor:
        """[1, S + n] the prompt ids [1, S] and up to `new` greedy tokens, stopping after one of `eos`."""
        from transformers.cache_utils import DynamicCache

        runner, table = self.runner, self.model.model.embed_tokens.weight  # [V, D]
        layers = runner.cache_layers(DynamicCache())
        last = torch.zeros(1, dtype=torch.int64)  # [1] the one position whose logits are wanted
        prompt = ids[0].tolist()
        with torch.no_grad():
            logits = runner.run(table[ids[0]].float(), torch.tensor([len(prompt) - 1]), layers, 0)  # [1, V]
            out = []
            while True:
                token = int(logits[0].argmax())
                out.append(token)
                if token in eos or len(out) == new:
                    break
                logits = runner.run(table[token:token + 1].float(), last, layers, layers[0].length())
        return torch.tensor([prompt + out], dtype=ids.dtype)

    def _greedy(self, inputs, generation_config, kwargs: dict) -> "tuple[torch.Tensor, int, set[int]] | None":
        # (prompt ids [1, S], new tokens at most, end-of-sequence ids) of a greedy request; None for any other
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 \
                or ids.dtype != torch.int64 or ids.device.type != "cpu":
            return None
        config = copy.deepcopy(generation_config if generation_config is not None else self.model.generation_config)
        rest = config.update(**{k: v for k, v in kwargs.items() if k != "input_ids"})
        mask = rest.pop("attention_mask", None)
        if rest or (mask is not None and (mask.shape != ids.shape or not bool(mask.all()))):
            return None  # model inputs beyond ids and a full mask, or arguments transformers' generate takes itself
        for key, value in config.to_diff_dict().items():
            if key not in ANY_VALUE and (key not in ONE_OF or value not in ONE_OF[key]):
                return None
        if int(ids.max()) >= self.model.model.embed_tokens.num_embeddings or int(ids.min()) < 0:
            return None  # transformers' error, not an index error here
        new = config.max_new_tokens if config.max_new_tokens is not None else \
            (config.max_length - ids.shape[1] if config.max_length is not None else None)
        if new is None or new <= 0:
            return None
        eos = config.eos_token_id
        return ids, new, set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
