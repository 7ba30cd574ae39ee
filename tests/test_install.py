"""A fresh install from the repo root: the top-level kernels/ folder must never shadow another distribution's `kernels`."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import kernels  # resolved from the repo root, where the working directory is first on sys.path
import transformers
import hetrun
from hetrun.kernels.fp8 import quantize_fp8  # the project's own kernels, still mapped to hetrun.kernels
from hetrun.tiny_models import tiny_model
import torch

model = hetrun.deploy(tiny_model("deepseek_v3"), "cpu", precision="fp32")
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({"kernels": kernels.__file__, "hetrun_kernels": sys.modules["hetrun.kernels.fp8"].__file__,
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def test_kernels_folder_does_not_shadow_the_installed_library_from_the_repo_root():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` distribution is not installed (transformers < 5.25 does not need it)")
    installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
    # `python -c` in the repo root puts the working directory first on sys.path, as `python -m pytest` and scripts do.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["kernels"]).resolve() == installed
    assert Path(got["hetrun_kernels"]).resolve().parent.name == "kernels"
    assert got["finite"]


def test_kernels_folder_is_a_namespace_portion_not_a_regular_package():
    # A regular package (with __init__.py) in the working directory wins over every installed one of that name.
    assert not (REPO / "kernels" / "__init__.py").exists()
