"""Collective backends (gloo, nccl, hccl): probes that never raise, and the device token buffers live on."""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.distributed as dist

from hetrun.backends.base import Availability
from hetrun.errors import BackendUnavailable
from hetrun.once import warn_once

log = logging.getLogger("hetrun")

COLLECTIVES = ("gloo", "nccl", "hccl")


def probe_collective(name: str) -> Availability:
    """Whether torch.distributed can run collective backend `name` in this process, and why not. Never raises."""
    if not dist.is_available():
        return Availability(False, "this torch build has no torch.distributed")
    if name == "gloo":
        if not dist.is_gloo_available():
            return Availability(False, "this torch build has no gloo backend")
        return Availability(True, devices=("cpu",))
    if name == "nccl":
        if not dist.is_nccl_available():
            return Availability(False, "this torch build has no NCCL (a CPU wheel); install a CUDA build of torch")
        if not torch.cuda.is_available():
            return Availability(False, "NCCL is built in but no CUDA device is visible")
        return Availability(True, devices=tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    if name == "hccl":
        if importlib.util.find_spec("torch_npu") is None:
            return Availability(False, "torch_npu is not installed (Ascend's torch plugin; it needs Huawei's CANN)")
        try:
            import torch_npu  # noqa: F401 -- registers the hccl backend and torch.npu
        except Exception as e:  # noqa: BLE001 -- without CANN, importing torch_npu fails in many ways
            return Availability(False, f"torch_npu is installed but does not load ({type(e).__name__}: "
                                       f"{' '.join(str(e).split())[:160]}); install Huawei's CANN toolkit")
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return Availability(False, "torch_npu loads but sees no Ascend NPU")
        return Availability(True, devices=tuple(f"npu:{i}" for i in range(npu.device_count())))
    return Availability(False, f"unknown collective backend '{name}'; use one of {', '.join(COLLECTIVES)}")


def choose_collective(wanted: str, explicit: bool) -> str:
    """The backend to start: `wanted` when it probes fine; else gloo with a warning, or an error when asked for."""
    avail = probe_collective(wanted)
    if avail.ok:
        return wanted
    if explicit or wanted == "gloo":
        raise BackendUnavailable(f"collective backend '{wanted}' is not available here: {avail.reason}; "
                                 "set distributed.collective to gloo (or auto) in the profile")
    warn_once(("collective", wanted), "collective backend '%s' is not available here (%s); using gloo", wanted,
              avail.reason)
    gloo = probe_collective("gloo")
    if not gloo.ok:
        raise BackendUnavailable(f"neither {wanted} nor gloo is available here: {avail.reason}; {gloo.reason}")
    return "gloo"


def buffer_device(collective: str, local_rank: int):
    """The torch device that token buffers must live on for this collective backend."""
    if collective == "nccl":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if collective == "hccl":
        return torch.device("npu", local_rank % max(torch.npu.device_count(), 1))
    return torch.device("cpu")
