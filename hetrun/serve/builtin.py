"""The built-in models `hetrun serve` runs without a model directory: tiny MoE models that answer in readable text.

`tiny:FAMILY` (and `tiny`, the DeepSeek-V3-style default) is a tiny_models family's shape with a byte-level BPE
tokenizer built here, both trained briefly and deterministically on the short text hetrun ships
(training_text.txt, its question-and-answer lines also in chat form), so its answers read like that text. The first
use builds it in seconds and caches it under ~/.cache/hetrun/serve as an ordinary transformers model directory
(config, safetensors, tokenizer, chat template), which loads like any other; `transformers serve` can run the same
directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import torch
import transformers

from hetrun.errors import HetrunError
from hetrun.tiny_models import FAMILY_SPECS, random_config

log = logging.getLogger("hetrun")

PRESET_PREFIX = "tiny"
DEFAULT_FAMILY = "deepseek_v3"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")  # ids 0..5
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Only the assistant's turns end in </s>: a question mark in plain text is not taught to end the answer.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}</s>{% else %}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
BUILD_INFO = "hetrun_builtin.json"


@dataclass(frozen=True)
class Recipe:
    """How a built-in model is made; any change makes a new cache entry."""

    vocab_size: int = 384  # BPE vocabulary: 256 bytes, 6 specials, the rest merges learned from the text
    context: int = 512  # max_position_embeddings: the served context length
    steps: int = 200
    batch: int = 16
    window: int = 64  # tokens per training row
    lr: float = 3e-3
    seed: int = 0
    version: int = 2  # bump when the training code changes what it produces


def training_text() -> str:
    """The text the built-in models learn from (hetrun/serve/training_text.txt, written for hetrun)."""
    return files("hetrun.serve").joinpath("training_text.txt").read_text(encoding="utf-8")


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """The text's question-and-answer lines ("Question? Answer."), as (question, answer) pairs."""
    pairs = []
    for line in text.splitlines():
        question, mark, answer = line.partition("? ")
        if mark and answer.strip() and "." not in question:
            pairs.append((question.strip() + "?", answer.strip()))
    return pairs


def preset_family(name: str) -> str | None:
    """The family of a built-in model name (`tiny`, `tiny:FAMILY`), None when `name` is not one."""
    if name == PRESET_PREFIX:
        return DEFAULT_FAMILY
    prefix, colon, family = name.partition(":")
    if prefix != PRESET_PREFIX or not colon:
        return None
    if family not in FAMILY_SPECS:
        raise HetrunError(f"unknown built-in model '{name}'; choose one of: "
                          f"{', '.join(builtin_names())}")
    return family


def builtin_names() -> list[str]:
    return [PRESET_PREFIX] + [f"{PRESET_PREFIX}:{f}" for f in FAMILY_SPECS]


def build_tokenizer(text: str, recipe: Recipe = Recipe()):
    """A byte-level BPE tokenizer trained on `text`, with <pad> <s> </s> and chat role tokens, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # transformers' own dependency

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                              model_max_length=recipe.context)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def training_rows(tokenizer, text: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole text as one id sequence [N], and each Q&A pair as a chat exchange ending in </s> (ids [n])."""
    stream = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [N] (longer than a context)
    chats = []
    for question, answer in qa_pairs(text):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}], tokenize=True,
                                            return_dict=True)["input_ids"]
        chats.append(torch.tensor(ids, dtype=torch.long))
    return stream, chats


def train(family: str, tokenizer, text: str, recipe: Recipe = Recipe()) -> torch.nn.Module:
    """A tiny `family` model trained on `text` (plain windows, and the Q&A pairs as chats); the same every run."""
    spec = FAMILY_SPECS[family].replace(name=f"hetrun-{PRESET_PREFIX}-{family}",
                                        vocab_size=-(-len(tokenizer) // 64) * 64)
    cfg = random_config(spec)
    cfg.initializer_range = 0.02  # the usual init: training gives the margins here
    cfg.max_position_embeddings = recipe.context
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD))
    stream, chats = training_rows(tokenizer, text)
    w = recipe.window
    if len(stream) <= w:
        raise HetrunError(f"the training text is too short: {len(stream)} tokens, at least {w + 1} needed")
    threads = torch.get_num_threads()
    # One thread: the same weights on every machine (no thread-count-dependent sums), and no OpenMP barriers that a
    # busy machine turns into seconds per step. Denormal floats of the early steps slow CPU training 10-50x.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
            g = torch.Generator().manual_seed(recipe.seed)
            opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps,
                                                        pct_start=0.1)
            model.train()
            for _ in range(recipe.steps):
                ids, labels = _batch(stream, chats, recipe, cfg.pad_token_id, g)  # [B, W] each
                model(ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
    finally:
        torch.set_flush_denormal(False)  # torch's defaults again
        torch.set_num_threads(threads)
    model.generation_config = transformers.GenerationConfig(bos_token_id=cfg.bos_token_id,
                                                            eos_token_id=cfg.eos_token_id,
                                                            pad_token_id=cfg.pad_token_id, do_sample=False)
    return model.eval()


def _batch(stream: torch.Tensor, chats: list[torch.Tensor], recipe: Recipe, pad: int, g: torch.Generator):
    w, b = recipe.window, recipe.batch
    n_chat = b // 4 if chats else 0  # a quarter of each batch: chat exchanges, padded; the rest plain text windows
    starts = torch.randint(0, len(stream) - w, (b - n_chat,), generator=g).tolist()
    rows = [stream[s:s + w] for s in starts]
    labels = [r.clone() for r in rows]
    for i in torch.randint(0, len(chats), (n_chat,), generator=g).tolist():
        c = chats[i][:w]
        rows.append(torch.cat([c, torch.full((w - len(c),), pad, dtype=torch.long)]))
        labels.append(torch.cat([c, torch.full((w - len(c),), -100, dtype=torch.long)]))  # no loss on padding
    return torch.stack(rows), torch.stack(labels)


def cache_root() -> Path:
    """Where built-in models are cached: $HETRUN_CACHE_DIR, else $XDG_CACHE_HOME/hetrun, else ~/.cache/hetrun."""
    explicit = os.environ.get("HETRUN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "hetrun"


def builtin_key(family: str, text: str, recipe: Recipe) -> str:
    blob = json.dumps({"family": family, "spec": FAMILY_SPECS[family].to_dict(), "recipe": asdict(recipe),
                       "tokens": SPECIAL_TOKENS, "chat_template": CHAT_TEMPLATE,
                       "text": hashlib.sha256(text.encode()).hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def builtin_model_dir(family: str = DEFAULT_FAMILY, recipe: Recipe = Recipe()) -> Path:
    """The cached model directory of built-in model tiny:`family`, built (in seconds) when missing."""
    text = training_text()
    root = cache_root() / "serve"
    final = root / f"{PRESET_PREFIX}-{family}-{builtin_key(family, text, recipe)}"
    if (final / BUILD_INFO).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as e:
        raise HetrunError(f"cannot write the built-in model cache '{root}': {e.strerror or e}; "
                          "set HETRUN_CACHE_DIR to a writable folder") from None
    try:
        t0 = time.perf_counter()
        log.warning("building the built-in model tiny:%s (trained on hetrun's own text; cached in %s)", family, root)
        tokenizer = build_tokenizer(text, recipe)
        model = train(family, tokenizer, text, recipe)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"family": family, "recipe": asdict(recipe), "train_s": round(time.perf_counter() - t0, 1)}
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, final)  # whole or not at all; another process may have won the race
        except OSError:
            if not (final / BUILD_INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
