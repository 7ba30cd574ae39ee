"""Test helper, run on every rank by torchrun: deploy a checkpoint directory with live rebalancing and record what this
rank read and moved.

    torchrun --standalone --nproc-per-node 2 tests/rebalance_rank.py CASE.json

CASE holds the model directory, the profile (one device per rank, dense part on rank 0 alone, a `rebalance:`
section), a plan JSON, prompts and the output directory. Rank 0 generates greedily for each prompt; every rank
writes OUT/rank{r}.json: the tensors it read (name -> times), its plan switches and moves, and the tokens (rank 0).
"""

import json
import os
import sys

import torch

import hetrun
from hetrun.placement.plan import Plan


def main(case_path: str) -> int:
    with open(case_path) as f:
        case = json.load(f)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    plan = Plan.from_json(case["plan"])
    model = hetrun.deploy(case["model"], case["profile"], precision="fp32", plan=plan, threads=1)  # rank 1 serves
    rt = model.hetrun
    tokens = []
    if rt.holds_dense:
        for prompt in case["prompts"]:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=case["max_new_tokens"],
                                     min_new_tokens=case["max_new_tokens"], do_sample=False)
            tokens.append(out[0].tolist())
        rt.finish()
    # A plan prepared in the background but not switched to when generation ended read its experts all the same
    # (more likely on a loaded machine): its moves onto this rank are counted apart.
    rb, prepared = rt.rebalancer, []
    if rb is not None:
        finished = rb.job.result() if rb.job is not None and rb.job.exception() is None else None
        for cand in (rb.ready, rb.scheduled, finished):
            if cand is not None:
                prepared += [m.to_dict(rt.plan.device_ids) for m in cand.moves.moves if rt.is_local(m.device)]
    with open(os.path.join(case["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"reads": dict(model.hetrun_checkpoint.shards.reads), "tokens": tokens, "prepared": prepared,
                   "switches": rt.stats.switches, "moves": rt.stats.moves,
                   "local_devices": sorted(rt.local_devices or ())}, f)
    from hetrun.distributed.world import current_world

    current_world().close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
