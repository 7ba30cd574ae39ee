"""config.json of a model directory or bundle: a transformers config of a supported family, never remote code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import transformers

from hetrun.errors import CheckpointError, SpecError
from hetrun.once import warn_once
from hetrun.spec import MODELED_APPROXIMATELY, PRESETS, SUPPORTED_FAMILIES, MoESpec

# model_types that name a supported family's architecture under another name: Moonshot's Kimi K2 is DeepSeek-V3's
# (its model card says to set model_type to deepseek_v3 where an engine lacks the name).
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def config_dict(data: bytes, where: str, error=CheckpointError) -> dict:
    """config.json's bytes as a dict of a supported family; `error` is the HetrunError class to raise."""
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{where}: is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(d, dict):
        raise error(f"{where}: expected a JSON object")
    mt = d.get("model_type")
    if isinstance(mt, str) and mt in MODEL_TYPE_ALIASES:
        d = {**d, "model_type": MODEL_TYPE_ALIASES[mt]}
        mt = d["model_type"]
    if mt not in SUPPORTED_FAMILIES + ("llama4",):  # llama4: Llama 4's multimodal config, read through its text
        raise error(f"{where}: model family {str(mt)[:40]!r} is not supported; hetrun supports: "
                    f"{', '.join(SUPPORTED_FAMILIES)}")
    return d


def config_from_json(data: bytes, where: str, error=CheckpointError):
    """A transformers config from config.json bytes, for a supported family only."""
    return config_from_dict(config_dict(data, where, error), where, error)


def config_from_dict(d: dict, where: str, error=CheckpointError):
    """A transformers config from config_dict's result."""
    mt = d["model_type"]
    try:
        return transformers.CONFIG_MAPPING[mt].from_dict(d)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise error(f"{where}: not a valid {mt} config ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def model_spec(name: str) -> MoESpec:
    """A MoESpec from a preset name, a transformers model directory or its config.json (a supported family's)."""
    spec = _model_spec(name)
    if spec.family in MODELED_APPROXIMATELY:
        warn_once(("modeled", spec.family), "%s as plan and simulate model it: %s", spec.name,
                  MODELED_APPROXIMATELY[spec.family])
    return spec


def _model_spec(name: str) -> MoESpec:
    path = Path(name)
    if name.lower() in PRESETS or not (path.exists() or os.sep in name or name.endswith(".json")):
        return MoESpec.from_preset(name)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise SpecError(f"model '{name}' is neither a preset nor a file or directory with config.json; "
                        f"use one of: {', '.join(PRESETS)}")
    try:
        data = config.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read model config '{config}': {' '.join(str(e).split())[:160]}") from None
    return MoESpec.from_hf_config(config_from_json(data, str(config), SpecError))
