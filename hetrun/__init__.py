"""hetrun: deploy one Mixture-of-Experts model across mixed accelerators."""

import importlib.machinery
import importlib.util
import os
import sys
from importlib.metadata import version

# torch auto-loads torch_npu at `import torch`; without Huawei's CANN that import fails and takes hetrun down before
# the Ascend backend's probe can explain what is missing. The Ascend backend imports torch_npu itself.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def _map_source_kernels() -> None:
    # hetrun.kernels is the top-level kernels/ folder. It has no __init__.py on purpose: Python puts the working
    # directory first on sys.path, and a regular package there would shadow Hugging Face's `kernels` distribution,
    # which transformers imports. A folder without __init__.py is only a namespace portion, and the import system
    # prefers any regular package of that name wherever it is installed. A wheel installs the folder as
    # hetrun/kernels/; setuptools' editable finder cannot map a namespace subpackage (pypa/setuptools#4248), so in a
    # source checkout or an editable install hetrun maps it here.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(os.path.join(root, "kernels")):
        return
    spec = importlib.machinery.PathFinder.find_spec(f"{__name__}.kernels", [root])  # a namespace spec for root/kernels
    if spec is not None:
        sys.modules[spec.name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_map_source_kernels()

from hetrun.errors import HetrunError
from hetrun.profile import Profile, load_profile
from hetrun.spec import MoESpec, RouterSpec

__version__ = version("hetrun")  # one source: pyproject.toml

__all__ = ["HetrunError", "MoESpec", "Profile", "RouterSpec", "deploy", "load_profile", "plan", "load", "__version__"]


def __getattr__(name):
    # Heavy pieces (torch, onnx, runtimes) load on first use, not at `import hetrun`.
    if name == "deploy":
        from hetrun.deployment import deploy  # imports torch or onnx: `import hetrun` stays light
        return deploy
    if name == "plan":
        from hetrun.placement.planner import plan  # imports torch or onnx: `import hetrun` stays light
        return plan
    if name == "load":
        from hetrun.bundle import load  # imports torch or onnx: `import hetrun` stays light
        return load
    if name == "dispatch":
        import hetrun.runtime.dispatch as dispatch  # imports torch: `import hetrun` stays light
        return dispatch
    raise AttributeError(f"module 'hetrun' has no attribute {name!r}")
