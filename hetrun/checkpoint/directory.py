"""A model directory opened for reading: config.json, its quantization, its shards; nothing of the weights read yet."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetrun.checkpoint.config import config_dict, config_from_dict
from hetrun.checkpoint.linears import check_dtypes
from hetrun.checkpoint.quant import Quantization, quantization_of
from hetrun.checkpoint.shards import Shards
from hetrun.errors import CheckpointError
from hetrun.spec import MoESpec


@dataclass(frozen=True)
class Checkpoint:
    """One model directory: its transformers config (quantization_config removed: hetrun reads the quantized
    tensors itself), the MoE spec it describes, how its linears are stored, and its tensors by name."""

    root: Path
    config: Any  # transformers PretrainedConfig
    spec: MoESpec
    quant: Quantization
    shards: Shards

    @property
    def family(self) -> str:
        return self.spec.family


def is_model_dir(path: Any) -> bool:
    """Whether `path` (a str or PathLike) names a directory with a config.json."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "config.json").is_file()


def open_checkpoint(path: "str | os.PathLike") -> Checkpoint:
    """Open a model directory: config.json checked, quantization parsed, every shard's header read and checked
    (dtypes included).

    One-line CheckpointError for a missing directory or config, an unsupported family or quantization, a missing,
    truncated or corrupt shard.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"model directory '{root}' not found")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{root}' has no config.json; give a transformers model directory (save_pretrained "
                              "writes one)")
    raw = config_dict(cfg_file.read_bytes(), str(cfg_file))
    quant = quantization_of(raw, str(cfg_file))
    config = config_from_dict(raw, str(cfg_file))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    multimodal = config.model_type == "llama4"  # Llama 4's release: its language model under language_model.
    if multimodal:
        config = config.get_text_config()
    spec = MoESpec.from_hf_config(config)
    if quant.method == "mxfp4" and spec.family != "gpt_oss":
        raise CheckpointError(f"{cfg_file}: mxfp4 quantization is read for gpt-oss checkpoints only, not "
                              f"{spec.family}")
    shards = Shards(root)
    if multimodal:
        shards.narrow_to("language_model.")  # the text model's tensors by their own names; the vision tower left out
    check_dtypes(shards, quant)
    return Checkpoint(root, config, spec, quant, shards)
