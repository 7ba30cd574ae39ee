"""Model checkpoint directories, read without ever holding the whole model.

  shards.py     the safetensors index and every shard's header, checked; tensors read on demand with pread
  naming.py     tensor names on disk per family (per-expert and stacked layouts) against transformers 5's modules
  quant.py      config.json's quantization_config (fp8 block-scaled, gptq) parsed, anything else a one-line error
  linears.py    one Linear's weight as stored (float, FP8 + block scales, GPTQ parts), checked against its format
  experts.py    CheckpointExpert: one expert read when compiled, in the form the checkpoint stores it
  config.py     config.json -> a transformers config of a supported family
  directory.py  open_checkpoint(): a model directory opened for reading
  skeleton.py   load_model(): the transformers model with its dense part read and its experts left on disk
  writer.py     write checkpoints in the real on-disk formats (BF16 hub layout, DeepSeek FP8, GPTQ), streaming

hetrun.deploy("path/to/model-dir", profile) and `hetrun export DIR` go through open_checkpoint and load_model:
each expert is read, converted to its device's precision, handed to the backend and dropped.
"""

from hetrun.checkpoint.directory import Checkpoint, is_model_dir, open_checkpoint
from hetrun.checkpoint.skeleton import load_model

__all__ = ["Checkpoint", "is_model_dir", "load_model", "open_checkpoint"]
