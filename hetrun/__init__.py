"""hetrun: deploy one Mixture-of-Experts model across mixed accelerators."""

import os

# torch auto-loads torch_npu at `import torch`; without Huawei's CANN that import fails and takes hetrun down before
# the Ascend backend's probe can explain what is missing. The Ascend backend imports torch_npu itself.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from hetrun.errors import HetrunError
from hetrun.profile import Profile, load_profile
from hetrun.spec import MoESpec, RouterSpec

__version__ = "0.1.0"

__all__ = ["HetrunError", "MoESpec", "Profile", "RouterSpec", "deploy", "load_profile", "plan", "load", "__version__"]


def __getattr__(name):
    # Heavy pieces (torch, onnx, runtimes) load on first use, not at import.
    if name == "deploy":
        from hetrun.deployment import deploy
        return deploy
    if name == "plan":
        from hetrun.planner import plan
        return plan
    if name == "load":
        from hetrun.bundle import load
        return load
    if name == "dispatch":
        import hetrun.dispatch as dispatch
        return dispatch
    raise AttributeError(f"module 'hetrun' has no attribute {name!r}")
