"""Run one MoE model across ranks: `torchrun --nnodes N --nproc-per-node M -m hetrun.launch --model M --profile P`.

Every rank loads the model and calls the same `hetrun.deploy(model, profile)`; the profile's `distributed:` section
says which devices each rank owns and whether rank 0 or every rank runs the dense parts. Ranks holding dense parts
generate greedily for their share of the prompts; rank 0 prints the tokens and per-rank statistics, and writes the
plan (--plan-out), the report (--report) and one merged Chrome trace (--trace), each atomically.

Without torchrun, one process runs every device: the reference a distributed run must match token for token.
Exit codes: 0 success, 2 bad input, 3 another rank failed (the message names it), 1 internal error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
import transformers

from hetrun.deployment import checkpoint_model, deploy
from hetrun.distributed.moe import set_tracing
from hetrun.distributed.stats import format_stats_table
from hetrun.distributed.trace import merge_chrome_trace
from hetrun.distributed.world import RankFailure, current_world, in_distributed_launch
from hetrun.errors import HetrunError
from hetrun.files import write_atomic
from hetrun.placement.plan import Plan
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import MAX_TIMEOUT_S, Profile, load_profile
from hetrun.spec import MAX_EXPERTS, MoESpec
from hetrun.tiny_models import FAMILY_SPECS, tiny_model

log = logging.getLogger("hetrun")

EXIT_RANK_FAILURE = 3
MAX_NEW_TOKENS = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage error is a user error: one line on every rank, exit 2
        raise HetrunError(f"{self.prog}: {message} (see --help)")


def _whole(minimum: int, maximum: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a whole number") from None
        if not minimum <= n <= maximum:
            raise argparse.ArgumentTypeError(f"{n} must be between {minimum} and {maximum}")
        return n

    parse.__name__ = "whole number"
    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a number of seconds") from None
    if not math.isfinite(v) or not 0 < v <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text[:40]} must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hetrun.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                    "examples:\n"
                                    "  torchrun --nproc-per-node 2 -m hetrun.launch --model tiny:mixtral "
                                    "--profile loopback-2 --trace trace.json\n"
                                    "  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host0:29500 "
                                    "-m hetrun.launch --model /models/mixtral --profile my-cluster.yaml"))
    p.add_argument("--model", required=True,
                   help=f"tiny:FAMILY ({', '.join(FAMILY_SPECS)}) or a local transformers "
                        "model folder (config.json + *.safetensors; never downloaded, never pickle)")
    p.add_argument("--profile", required=True, help="profile name or YAML path with a distributed: section")
    p.add_argument("--prompt-ids", default=None,
                   help="token ids, comma-separated, prompts separated by ';' (default: one random 8-token prompt)")
    p.add_argument("--max-new-tokens", type=_whole(1, MAX_NEW_TOKENS), default=20)
    p.add_argument("--precision", default=None, help="fp32 forces FP32 everywhere; default: each device's best")
    p.add_argument("--plan", default=None, help="a plan JSON (hetrun plan / Plan.to_json) instead of planning here")
    p.add_argument("--redundant-experts", type=_whole(0, MAX_EXPERTS), default=0,
                   help="replicas of hot experts when planning here")
    p.add_argument("--plan-out", default=None, help="rank 0 writes the plan it runs here (atomically)")
    p.add_argument("--report", default=None, help="rank 0 writes tokens and per-rank statistics here as JSON")
    p.add_argument("--trace", default=None, help="rank 0 writes one Chrome trace merging every rank here")
    p.add_argument("--timeout", type=_seconds, default=None, help="seconds before a silent rank is declared failed "
                   "(default: the profile's distributed.timeout_s)")
    p.add_argument("--threads", type=_whole(1, 4096), default=None, help="threads per expert session on each rank")
    p.add_argument("--repeat", type=_whole(1, 1_000_000), default=1,
                   help="generate for the prompts this many times (soak runs)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    return p


def parse_prompts(text: str | None, vocab: int) -> list[list[int]]:
    """Prompts from '1,2,3;4,5'; a seeded random 8-token prompt when None."""
    if text is None:
        return [torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(0)).tolist()]
    try:
        prompts = [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";") if part.strip()]
    except ValueError:
        raise HetrunError(f"--prompt-ids '{text}' is not comma-separated integers with ';' between prompts") from None
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if not prompts or any(not p for p in prompts) or bad:
        raise HetrunError(f"--prompt-ids needs non-empty prompts of ids in 0..{vocab - 1}"
                          + (f"; {bad[0]} is outside" if bad else ""))
    return prompts


def load_model(name: str, profile: "Profile | None" = None):
    """A transformers MoE model in eval mode: tiny:FAMILY, or a local model folder (safetensors only, as `hetrun
    export` reads it: nothing is downloaded, no pickle is loaded, the config's sizes are checked first; the dense
    part is read only where `profile` runs it on this rank, the experts when this rank's devices compile them)."""
    if name.startswith("tiny:"):
        family = name.split(":", 1)[1]
        if family not in FAMILY_SPECS:
            raise HetrunError(f"unknown tiny model '{family}'; use tiny:{' or tiny:'.join(FAMILY_SPECS)}")
        return tiny_model(family)
    if not Path(name).is_dir():
        raise HetrunError(f"model '{name[:200]}' is not a local model folder; hetrun never downloads models: fetch it "
                          "first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR, or use "
                          "tiny:FAMILY")
    return checkpoint_model(name, profile)


def _plan(args, spec, profile):
    if args.plan is None:
        return make_plan(spec, profile, precision=args.precision, redundant_experts=args.redundant_experts)
    try:
        with open(args.plan) as f:
            plan = Plan.from_json(f.read())
    except OSError as e:
        raise HetrunError(f"cannot read plan '{args.plan}': {e.strerror}") from None
    if plan.spec.num_experts != spec.num_experts or plan.num_layers != spec.num_moe_layers:
        raise HetrunError(f"plan '{args.plan}' was made for '{plan.spec.name}', not '{spec.name}'; re-plan")
    return plan


def _profile(args):
    profile = load_profile(args.profile)
    if profile.model.distributed is None:
        raise HetrunError(f"profile '{profile.name}' has no distributed: section saying which devices each rank owns; "
                          "add one (see profiles/loopback-2.yaml)")
    if args.timeout is not None:
        dist_spec = profile.model.distributed.model_copy(update={"timeout_s": args.timeout})
        profile = Profile(profile.model.model_copy(update={"distributed": dist_spec}), profile.devices, profile.source)
    return profile


def run(args) -> int:
    """One launch on this rank; returns the exit code."""
    transformers.logging.set_verbosity_error()
    profile = _profile(args)
    distributed = in_distributed_launch()
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    set_tracing(args.trace is not None)
    model = load_model(args.model, profile)
    spec = MoESpec.from_hf_config(model.config)
    prompts = parse_prompts(args.prompt_ids, model.config.vocab_size)
    plan = _plan(args, spec, profile)
    if rank == 0 and args.plan_out:
        write_atomic(args.plan_out, plan.to_json())
    model = deploy(model, profile, precision=args.precision, plan=plan, threads=args.threads)
    rt = model.hetrun
    holds_dense = getattr(rt, "holds_dense", True)
    layout = getattr(rt, "layout", None)
    mine: list[int] = list(range(len(prompts)))
    if layout is not None:
        dense = layout.dense_ranks
        mine = [i for i in mine if holds_dense and i % len(dense) == dense.index(rt.world.rank)]
    outputs: dict[int, list[int]] = {}
    if holds_dense:
        log.info("rank %d: generating %d prompt(s) x %d", rank, len(mine), args.repeat)
        print(f"hetrun: rank {rank}: deployed; generating {len(mine)} prompt(s)", file=sys.stderr, flush=True)
        for _ in range(args.repeat):
            for i in mine:
                ids = torch.tensor([prompts[i]])
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                         do_sample=False)
                outputs[i] = out[0, ids.shape[1]:].tolist()
    report = {"model": args.model, "profile": profile.name, "plan_sha256": hashlib.sha256(plan.to_json().encode()
                                                                                         ).hexdigest(),
              "prompts": prompts}
    if layout is None:  # one process
        report.update(world_size=1, outputs=[outputs[i] for i in range(len(prompts))],
                      dispatch=rt.stats.to_dict(rt.plan.device_ids))
        ranks = []
    else:
        gathered = rt.finish(payload={"outputs": sorted(outputs.items())})  # JSON: [[prompt index, tokens], ...]
        if rank != 0:
            current_world().close()
            return 0
        pairs = [(g["stats"]["rank"], i, o) for g in gathered for i, o in ((g["payload"] or {}).get("outputs") or [])]
        owner = {i: r for r, i, _ in pairs}
        merged = {i: o for _, i, o in pairs}
        ranks = [g["stats"] for g in gathered]
        report.update(world_size=len(gathered), layout={"ranks": [list(r) for r in layout.ranks],
                                                        "dense": layout.dense, "collective": rt.world.collective},
                      outputs=[merged[i] for i in range(len(prompts))],
                      generated_on=[owner[i] for i in range(len(prompts))],
                      ranks=ranks)
        if args.trace:
            labels = [f"rank {g['stats']['rank']}: {', '.join(g['stats']['devices'])} ({g['stats']['host']})"
                      for g in gathered]
            doc = merge_chrome_trace([g["trace"] for g in gathered], labels,
                                     {"model": args.model, "profile": profile.name})
            write_atomic(args.trace, json.dumps(doc))
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=1))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        for i, toks in enumerate(report["outputs"]):
            where = f" (rank {report['generated_on'][i]})" if "generated_on" in report else ""
            print(f"prompt {i}{where}: {len(prompts[i])} tokens -> {toks}")
        if ranks:
            print(f"per-rank statistics ({report['world_size']} ranks, collective {rt.world.collective}, "
                  f"dense parts on {layout.dense.replace('_', ' ')}):")
            print(format_stats_table(ranks))
        if args.trace and ranks:
            print(f"trace of every rank written to {args.trace}")
    sys.stdout.flush()
    if layout is not None:
        current_world().close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; under torchrun every rank runs it."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"hetrun[rank {rank}]: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except RankFailure as e:
        return _stop(f"hetrun: error: rank {rank}: {e}", EXIT_RANK_FAILURE)
    except HetrunError as e:
        world = current_world()
        if world is not None:
            world.post_failure(str(e))
        return _stop(f"hetrun: error: rank {rank}: {e}", 2)
    except KeyboardInterrupt:
        return _stop(f"hetrun: rank {rank} interrupted", 130)
    except Exception as e:  # noqa: BLE001 -- one line, and tell the other ranks
        world = current_world()
        msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if world is not None:
            world.post_failure(msg)
        return _stop(f"hetrun: internal error on rank {rank}: {msg}", 1)


def _stop(message: str, code: int) -> int:
    print(message, file=sys.stderr, flush=True)
    world = current_world()
    if world is not None:  # a broken process group can hang or abort in teardown: leave now
        world.stop_heartbeat()
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
