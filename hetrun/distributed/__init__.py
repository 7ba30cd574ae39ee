"""Expert parallelism across processes and hosts on torch.distributed.

The layout is a property of the profile (its `distributed:` section): under torchrun, `hetrun.deploy(model, profile)`
makes each rank compile only its own devices' experts and move tokens with all_to_all_single. Outside torchrun the
same profile runs in one process. Under torchrun:

    model = hetrun.deploy(model, "loopback-2")      # expert-only ranks (dense: rank0) serve in here until rank 0 ends
    if model.hetrun.holds_dense:
        model.generate(...)                          # logits bit-identical to one process with the same plan
    report = model.hetrun.finish()                   # serve until every rank is done; rank 0 gets per-rank stats

A rank that dies, hangs (distributed.timeout_s) or fails makes the others raise RankFailure naming it.
`python -m hetrun.launch` wraps all this; `hetrun bench distributed` measures it.

    ranks.py        which devices each rank owns, who holds the dense parts
    collectives.py  gloo / nccl / hccl probes and the device token buffers live on
    world.py        process groups with the profile's timeout, heartbeats, RankFailure naming the failed rank
    moe.py          CollectiveExchange (dispatch and combine with all_to_all_single around MoELayer's compute)
                    and DistributedRuntime (this rank's devices, its world, finish())
    stats.py        per-rank statistics, gathered to rank 0
    trace.py        per-rank Chrome-trace spans, merged on rank 0
"""

from hetrun.distributed.ranks import RankLayout, resolve_layout

__all__ = ["RankLayout", "resolve_layout", "RankFailure", "DistributedRuntime", "set_tracing", "current_world",
           "probe_collective"]


def __getattr__(name):
    # torch.distributed loads on first use, not at import.
    if name == "RankFailure":
        from hetrun.distributed.world import RankFailure  # imports torch.distributed: only on first use
        return RankFailure
    if name == "current_world":
        from hetrun.distributed.world import current_world  # imports torch.distributed: only on first use
        return current_world
    if name in ("DistributedRuntime", "set_tracing"):
        import hetrun.distributed.moe as moe  # imports torch.distributed: only on first use
        return getattr(moe, name)
    if name == "probe_collective":
        from hetrun.distributed.collectives import probe_collective  # imports torch.distributed: only on first use
        return probe_collective
    raise AttributeError(f"module 'hetrun.distributed' has no attribute {name!r}")
