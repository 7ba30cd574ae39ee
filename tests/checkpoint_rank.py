"""Test helper, run on every rank by torchrun: deploy a checkpoint directory and record what this rank read.

    torchrun --standalone --nproc-per-node 2 tests/checkpoint_rank.py MODEL_DIR OUT_DIR

The profile puts one device on each rank and the dense part on rank 0 alone. Rank 0 generates a few tokens; every
rank writes OUT_DIR/rank{r}.json: the tensors it read (name -> times) and the plan's device of each expert.
"""

import json
import os
import sys

import torch

import hetrun

PROFILE = {"name": "ckpt-ranks", "dense_device": "ort",
           "devices": [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"},
                       {"id": "ov", "type": "host-cpu", "backend": "openvino"}],
           "distributed": {"ranks": "per_device", "dense": "rank0", "collective": "gloo", "timeout_s": 120}}


def main(model_dir: str, out: str) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model = hetrun.deploy(model_dir, PROFILE, precision="fp32", threads=1)  # rank 1 serves inside, until rank 0 ends
    rt = model.hetrun
    tokens = []
    if rt.holds_dense:
        with torch.no_grad():
            tokens = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False)[0].tolist()
        rt.finish()
    plan = rt.plan
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"reads": dict(model.hetrun_checkpoint.shards.reads), "tokens": tokens,
                   "device_ids": list(plan.device_ids), "phy2log": plan.phy2log.tolist(),
                   "device_of": plan.device_of.tolist(), "moe_layers": list(plan.spec.moe_layer_ids)}, f)
    from hetrun.distributed.world import current_world

    current_world().close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
