"""Test helper: real ranks started quickly, forked from one process that imported torch, transformers and hetrun once.

`python -m tests.distributed_ranks` imports everything, prints `ready`, then reads one JSON request per line:
    {"nproc": W, "out": DIR, "target": "launch" | "equivalence", "args": [...], "deadline": S,
     "break_openvino_on": RANK (optional: that rank's OpenVINO sessions raise)}
and for each starts a world of W ranks, like torchrun's agent: a separate process hosts the rendezvous store
(TORCHELASTIC_USE_AGENT_STORE) and each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, then
joins with init_method="env://" exactly as under torchrun. Targets: `launch` runs hetrun.launch.main(args) on
every rank; `equivalence` runs equivalence_rank(args[0]). Each rank writes DIR/rank{r}.out and .err; DIR/pids
gets 'rank pid' lines as soon as the ranks exist. When every rank has exited (or at the deadline, when the rest
are killed), it answers one JSON line {"exit": {rank: code or null}}.
Forking skips each rank's imports, which on a 2-core machine are most of a small distributed test.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import sys
import time


def equivalence_rank(case_path: str) -> int:
    """Deploy each family's tiny model with the case's profile and plan; generate; rank 0 saves every rank's output."""
    import torch

    import hetrun
    from hetrun.placement.plan import Plan

    with open(case_path) as f:
        case = json.load(f)
    rank = int(os.environ["RANK"])
    results, stats = {}, {}
    for family in case["families"]:
        plan = Plan.from_json(case["plans"][family])
        model = hetrun.deploy(copy.deepcopy(_MODELS[family]), case["profile"], precision="fp32", plan=plan, threads=1)
        rt = model.hetrun
        mine = {}
        if rt.holds_dense:
            dense = rt.layout.dense_ranks
            for i, prompt in enumerate(case["prompts"]):
                if i % len(dense) != dense.index(rank):
                    continue
                ids = torch.tensor([prompt])
                with torch.no_grad():
                    logits = model(ids).logits
                    gen = model.generate(ids, max_new_tokens=case["max_new_tokens"], do_sample=False,
                                         min_new_tokens=case["max_new_tokens"], return_dict_in_generate=True,
                                         output_logits=bool(case.get("step_logits")))
                mine[str(i)] = {"logits": logits.tolist(), "dtype": str(logits.dtype).removeprefix("torch."),
                                "gen": gen.sequences.tolist()}  # ranks exchange JSON, never pickles
                if case.get("step_logits"):  # every generation step's logits [steps, 1, V]
                    mine[str(i)]["step_logits"] = torch.stack(gen.logits).tolist()
        else:  # an expert-only rank has served until rank 0 finished; running the model here is refused
            try:
                model(torch.tensor([[1, 2]]))
            except hetrun.HetrunError as e:
                with open(os.path.join(case["out"], f"refused{rank}.txt"), "a") as f:
                    f.write(f"{family}: {e}\n")
        gathered = rt.finish(payload=mine)
        if rank == 0:
            results[family] = {int(i): (torch.tensor(out["logits"], dtype=getattr(torch, out["dtype"])),
                                        torch.tensor(out["gen"]),
                                        torch.tensor(out.get("step_logits", []), dtype=getattr(torch, out["dtype"])))
                               for g in gathered for i, out in (g["payload"] or {}).items()}
            stats[family] = [g["stats"] for g in gathered]
    if rank == 0:
        torch.save({"results": results, "stats": stats}, os.path.join(case["out"], "results.pt"))
    from hetrun.distributed.world import current_world

    current_world().close()
    return 0


_MODELS: dict = {}


def _prepare() -> None:
    """Imports (and for equivalence, the tiny models) done once, before forking; no threads started yet."""
    import torch

    torch.set_num_threads(1)
    import onnxruntime  # noqa: F401
    import openvino  # noqa: F401
    import transformers

    import hetrun.deployment  # noqa: F401
    import hetrun.distributed.moe  # noqa: F401
    import hetrun.launch  # noqa: F401
    from hetrun.tiny_models import FAMILY_SPECS, tiny_model

    transformers.logging.set_verbosity_error()
    for family in FAMILY_SPECS:  # also imports each family's modeling code, the slow part of building one
        _MODELS[family] = tiny_model(family)


def _run_rank(target: str, args: list[str]) -> int:
    if target == "launch":
        from hetrun.launch import main

        return main(args)
    if target == "equivalence":
        return equivalence_rank(args[0])
    raise SystemExit(f"unknown target {target}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redirect(out_path: str | None, err_path: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else null, fd)


def _host_store(port: int, nproc: int) -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore

    _redirect(None, None)
    store = TCPStore("127.0.0.1", port, nproc, True, timedelta(seconds=600), wait_for_workers=False)
    while store is not None:
        time.sleep(3600)


def start_world(req: dict) -> dict:
    """Fork the store host and `nproc` ranks; wait for them (killing the rest at the deadline); their exit codes."""
    nproc, out = req["nproc"], req["out"]
    port = _free_port()
    store_pid = os.fork()
    if store_pid == 0:
        try:
            _host_store(port, nproc)
        finally:
            os._exit(0)
    pids = {}
    for r in range(nproc):
        pid = os.fork()
        if pid == 0:  # the rank
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                              GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                              TORCHELASTIC_USE_AGENT_STORE="True")
            code = 1
            try:
                _redirect(os.path.join(out, f"rank{r}.out"), os.path.join(out, f"rank{r}.err"))
                if req.get("break_openvino_on") == r:  # this rank's OpenVINO expert sessions raise
                    from hetrun.backends.openvino import OvSession

                    def broken(self, x):
                        raise RuntimeError("injected OpenVINO fault")

                    OvSession.forward = broken
                code = _run_rank(req["target"], req["args"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[r] = pid
    with open(os.path.join(out, "pids"), "w") as f:
        f.write("".join(f"{r} {pid}\n" for r, pid in pids.items()))
    codes: dict[int, int | None] = {}
    end = time.monotonic() + req.get("deadline", 120)
    while len(codes) < nproc and time.monotonic() < end:
        for r, pid in pids.items():
            if r not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[r] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for r, pid in pids.items():
        if r not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[r] = None
    os.kill(store_pid, signal.SIGKILL)
    os.waitpid(store_pid, 0)
    return {"exit": {str(r): codes[r] for r in sorted(codes)}}


def main() -> int:
    _prepare()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(start_world(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
