"""MODEL for `hetrun serve`: a built-in model, a transformers model directory or a bundle, deployed, with its tokenizer.

    (none), tiny, tiny:FAMILY   a built-in model (hetrun.serve.builtin), a model directory once cached
    path/to/model-dir           config.json + *.safetensors (from_pretrained, local files only) + the tokenizer
    path/to/bundle              a hetrun bundle (hetrun.load); bundles hold no tokenizer: give --tokenizer DIR

The tokenizer comes from the model directory (tokenizer.json / tokenizer_config.json, through transformers); a model
without one is a one-line error at start, before anything is deployed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import hetrun
from hetrun.bundle.manifest import MANIFEST
from hetrun.errors import HetrunError
from hetrun.profile import Profile
from hetrun.serve import builtin

log = logging.getLogger("hetrun")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServedModel:
    """A deployed model ready to serve: `model.hetrun` is its runtime."""

    name: str  # the id /v1/models lists and requests may name
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    kind: str  # builtin, directory, bundle
    path: Path

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def load_served_model(model: str | None, profile: "str | Profile", precision: str | None = None,
                      tokenizer: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                      served_name: str | None = None, threads: int | None = None) -> ServedModel:
    """Resolve MODEL (see the module doc), load its tokenizer, deploy it on `profile`; one-line errors."""
    if dtype not in DTYPES:
        raise HetrunError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    family = builtin.preset_family(model or builtin.PRESET_PREFIX)
    if family is not None:
        path, kind, name = builtin.builtin_model_dir(family), "builtin", model or builtin.PRESET_PREFIX
    else:
        path = Path(model)
        if not path.is_dir():
            raise HetrunError(f"MODEL '{model}' is neither a model directory, a bundle nor a built-in model "
                              f"({', '.join(builtin.builtin_names())})")
        kind = "bundle" if (path / MANIFEST).is_file() else "directory"
        name = path.resolve().name
    tok = load_tokenizer(Path(tokenizer) if tokenizer else path, kind, bool(tokenizer))
    if kind == "bundle":
        if precision is not None:
            raise HetrunError("a bundle fixes each device's precision when it is exported; drop --precision "
                              "(or export again with `hetrun export ... --precision`)")
        if dtype != "auto":
            raise HetrunError("a bundle fixes the model's dtype when it is exported; drop --dtype")
        deployed = hetrun.load(path, profile, threads=threads)
    else:
        # read from the directory expert by expert (hetrun.checkpoint): the whole model is never in memory
        deployed = hetrun.deploy(str(path), profile, precision=precision, threads=threads).eval()
        if DTYPES[dtype] != "auto":
            deployed = deployed.to(DTYPES[dtype])
    context = _context_length(deployed, tok, max_model_len)
    return ServedModel(served_name or name, deployed, tok, context, kind, path)


def load_tokenizer(path: Path, kind: str, explicit: bool):
    """The tokenizer of `path` (tokenizer.json / tokenizer_config.json), or a one-line error saying what to do."""
    if not path.is_dir():
        raise HetrunError(f"tokenizer directory '{path}' not found")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        hint = ("bundles hold no tokenizer: pass --tokenizer DIR, the model directory the bundle was exported from"
                if kind == "bundle" and not explicit else
                "save one there with tokenizer.save_pretrained(DIR), or pass --tokenizer DIR")
        raise HetrunError(f"'{path}' has no tokenizer (tokenizer.json or tokenizer_config.json); {hint}")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises OSError, ValueError, KeyError... for a bad tokenizer
        raise HetrunError(f"cannot load the tokenizer in '{path}': {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}") from None


def _context_length(model, tokenizer, max_model_len: int | None) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < 10**8:  # transformers puts 1e30 there when the tokenizer has no limit
        limits.append(tok_max)
    known = [n for n in limits if isinstance(n, int) and n > 0]
    if not known and max_model_len is None:
        raise HetrunError("the model's config gives no max_position_embeddings; pass --max-model-len")
    context = min(known) if known else max_model_len
    if max_model_len is not None:
        if max_model_len > context:
            raise HetrunError(f"--max-model-len {max_model_len} is longer than the model's context ({context})")
        context = max_model_len
    return context
