"""`hetrun calibrate`: measure this machine, fit the measurements, write the host profile.

The one entry point of calibration, `calibrate`, runs the steps in order: choose what to measure, measure it
(`hetrun.calibrate.measure`), fit it into a host profile (`hetrun.calibrate.fit`), validate the profile and write it
(`write_profile`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from hetrun.calibrate.fit import build_host_profile, fit_dispatch
from hetrun.calibrate.measure import (
    BACKENDS,
    DEFAULT_PRECISIONS,
    QUICK_TOKENS,
    SHAPES,
    SWEEPS,
    TOKENS,
    cache_bytes,
    measure_copy_bandwidth,
    measure_dispatch,
    measure_experts,
    memory_gb,
)
from hetrun.errors import HetrunError
from hetrun.files import write_atomic
from hetrun.formats import FORMATS
from hetrun.profile import load_profile


def write_profile(path: str | Path, profile: dict) -> Path:
    """Validate the profile, then write it as YAML atomically."""
    load_profile(profile)  # refuse to write something hetrun cannot read back
    path = Path(path)
    write_atomic(path, yaml.safe_dump(profile, sort_keys=False, width=120))
    return path


def check_request(out: str | Path, backends, precisions, threads: int | None) -> None:
    """Refuse, before minutes of measuring, a calibration whose result could not be written or that names what
    calibration cannot measure."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise HetrunError(f"cannot calibrate backend '{(unknown or [''])[0]}'; calibration measures the CPU backends "
                          f"{', '.join(BACKENDS)}")
    unknown = [p for p in precisions if p not in FORMATS]
    if unknown or not precisions:
        raise HetrunError(f"cannot calibrate precision '{(unknown or [''])[0]}'; use one or more of "
                          f"{', '.join(FORMATS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise HetrunError(f"threads must be a whole number of at least 1, got {threads!r}")
    path = Path(out)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise HetrunError(f"cannot write the host profile to '{path}': it is a directory; give a file name (.yaml)")
    if not folder.is_dir():
        raise HetrunError(f"cannot write the host profile to '{path}': folder '{folder}' does not exist; create it first")
    try:  # what write_atomic will do at the end
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HetrunError(f"cannot write the host profile to '{path}': {e.strerror or e}") from None


def calibrate(out: str | Path, quick: bool = False, backends=BACKENDS, precisions=DEFAULT_PRECISIONS,
              threads: int | None = None, progress=None, tokens=None, shapes=None) -> tuple[Path, dict]:
    """Measure, fit, write the host profile to `out`; returns (path, profile dict).

    What cannot work (an output that cannot be written, an unknown backend or precision, bad threads) is a one-line
    HetrunError before anything is measured."""
    check_request(out, backends, precisions, threads)
    # what to measure
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    shapes = shapes or (SHAPES if not quick else SHAPES[1:3])
    dispatch_tokens = (1, 64, 512) if quick else (1, 4, 16, 64, 256, 1024, 2048)
    # measure
    samples = measure_experts(backends, precisions, tokens, shapes, rounds=1 if quick else SWEEPS, threads=threads,
                              progress=progress)
    copy = measure_copy_bandwidth(64 * 2 ** 20 if quick else 256 * 2 ** 20)
    disp_rows = measure_dispatch(backends[0] if backends else "onnxruntime", tokens=dispatch_tokens,
                                 reps=3 if quick else 15, threads=threads)
    # fit
    dispatch = fit_dispatch(disp_rows)
    dispatch["samples"] = disp_rows
    note = "Quick calibration (fewer token counts and repetitions)." if quick else ""
    prof = build_host_profile(samples, copy, dispatch, cache_bytes(), memory_gb(), note)
    # write
    return write_profile(out, prof), prof
