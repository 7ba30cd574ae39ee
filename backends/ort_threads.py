"""Which thread pool this process's onnxruntime sessions compute on: one pool shared by every session (the default),
or a pool per session (HETRUN_ORT_THREAD_POOL=per-session).

A deployment holds many small sessions: the benchmark model (2 layers, 8 experts each) has 16 expert sessions and
the dense part's beside them. With a pool each, every session's pool thread sleeps until that session's next call,
so each call of a decode step wakes a different cold thread (19 threads for 16 expert sessions at 2 threads). One
shared pool keeps one warm: a one-token INT4 expert call, 16 sessions in turn, took 0.26-0.27 ms against 0.31-0.32,
and a decode token of the benchmark model with INT4 experts and dense part on onnxruntime 5.3-5.8 ms against
5.9-9.7 (three alternated pairs of processes; its expert calls 1.2-1.4 ms against 1.8-2.4), on a 2-core AVX2 host.

The shared pool's threads spin for a moment between calls (onnxruntime's default for a shared pool, which its Python
API cannot change; a pool per session here does not spin). Where another runtime computes on the same cores at the
same time (the `cpu` profile: onnxruntime and OpenVINO, each with half the experts) that costs prefill and still
gains decode, three and two alternated pairs of processes: INT4 experts 875-939 prefill tokens/s against 1,121-1,321
with a pool per session, decode 140-174 against 115-130; INT8 (the default there) 901-937 against 1,006-1,068,
decode 139-152 against 121-127.

onnxruntime makes that choice for the whole process, once: while a shared pool exists, every session must use it,
so a session opened with default options anywhere in the process fails ("use_per_session_threads must be false
when using a global thread pool"). Sessions opened through hetrun get the right options; code of the user's that
opens its own sessions in the same process sets `use_per_session_threads = False` (plain_session_options() below
does) or runs with HETRUN_ORT_THREAD_POOL=per-session.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from hetrun.errors import HetrunError
from hetrun.once import warn_once

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("hetrun")
POOL_CHOICES = ("shared", "per-session")
_shared_threads: "int | None" = None  # intra-op threads of the process's shared pool, once a session made it


def pool_choice() -> str:
    """HETRUN_ORT_THREAD_POOL, checked: "shared" (the default) or "per-session"."""
    choice = os.environ.get("HETRUN_ORT_THREAD_POOL", "shared").strip().lower() or "shared"
    if choice not in POOL_CHOICES:
        raise HetrunError(f"HETRUN_ORT_THREAD_POOL={choice!r} is not a thread pool choice: set it to "
                          f"{' or '.join(POOL_CHOICES)}, or unset it")
    return choice


def use_thread_pool(opts: "onnxruntime.SessionOptions", threads: int | None) -> None:
    """Set `opts` to compute on this process's onnxruntime thread pool: the shared one, made at the first session
    with `threads` intra-op threads (None: one per physical core), or, with HETRUN_ORT_THREAD_POOL=per-session, one
    of the session's own. A later request for another thread count gets the shared pool as it is, said once; None
    then asks for none."""
    global _shared_threads
    if _shared_threads is None and pool_choice() == "per-session":
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return
    want = threads or 0  # 0: onnxruntime's default (None asks for no count: the pool as it is, once one exists)
    if _shared_threads is None:
        import onnxruntime as ort  # heavy: only when a session opens

        ort.set_global_thread_pool_sizes(want, 1)  # its threads spin briefly between calls: onnxruntime's default
        _shared_threads = want
        log.info("onnxruntime sessions of this process share one thread pool (%s threads): a session opened "
                 "elsewhere in it needs use_per_session_threads = False; HETRUN_ORT_THREAD_POOL=per-session gives "
                 "each session its own", want or "default")
    elif threads and want != _shared_threads:
        warn_once(("ort-pool", want), "onnxruntime sessions that ask for a thread count of %s compute on this "
                  "process's shared onnxruntime thread pool, sized %s by its first session "
                  "(HETRUN_ORT_THREAD_POOL=per-session gives each session a pool of its own)",
                  want, _shared_threads or "by default")
    opts.use_per_session_threads = False


def plain_session_options(threads: int | None = None) -> "onnxruntime.SessionOptions":
    """Plain onnxruntime SessionOptions that may open a session in a process where hetrun's sessions run."""
    import onnxruntime as ort  # heavy: only when a session opens

    opts = ort.SessionOptions()
    use_thread_pool(opts, threads)
    return opts


def session_options(threads: int | None):
    """onnxruntime session options for expert graphs that share the host's cores with torch."""
    import onnxruntime as ort  # heavy: loaded only on probe or load, so the registry stays light

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    use_thread_pool(opts, threads)
    # No per-session memory arena: each session's arena keeps the intermediates of its largest call for good, so a
    # 1,024-token prefill left the benchmark model's 16 expert sessions (and the dense part's) 170-220 MB above
    # where a model without arenas peaks (decode and prefill speed within the VM's noise, four runs each).
    opts.enable_cpu_mem_arena = False
    # Idle ORT threads must not spin: torch runs routing and combine on the same cores right after each call (a
    # session of its own pool; the shared pool's threads spin as onnxruntime's global default has them).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Fold DequantizeLinear of FP8/INT8 weights into FP32 at load: otherwise onnxruntime dequantizes FP8 on every
    # call (slow) and rewrites INT8 DequantizeLinear+MatMul into MatMulNBits with INT8 activations (0.5% error).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.log_severity_level = 3
    return opts
