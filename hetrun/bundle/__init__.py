"""Deployment bundles: export a model for a profile once, verify it, load and run it anywhere the plan fits.

    hetrun.bundle.export("tiny", "mixed-demo", "bundle/")      # manifest.json, experts/*.onnx, dense.safetensors, ...
    model = hetrun.load("bundle/")                              # verified, then rebuilt; experts run from the ONNX files
    hetrun.bundle.inspect_bundle("bundle/")                     # what is inside, and which checks pass
    hetrun.bundle.generate_key_pair("key")                      # key (private, 0600) and key.pub
    hetrun.bundle.export(..., sign="key"); hetrun.load("bundle/", trust=["key.pub"])   # signed, and checked
    hetrun.bundle.export_graph("tiny-mixtral", "one-ort.yaml", "graph/")   # the whole model as one graph
    hetrun.bundle.GraphModel("graph/").generate([1, 2, 3], 8)             # run without torch (graph_runner)

Names load lazily, from the module that holds each: `import hetrun.bundle` (which the command line does at start)
imports nothing, checking a bundle (integrity, summary) needs no torch, and only export and load bring in torch,
transformers and the runtime.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "export": "exporter", "preset_model": "exporter",
    "BundleRuntime": "loader", "check_profile_fits": "loader", "greedy": "loader", "load": "loader",
    "BUNDLE_FORMAT": "manifest", "FORMAT_VERSION": "manifest", "MANIFEST": "manifest", "Manifest": "manifest",
    "manifest_plan": "manifest",
    "BundleReport": "integrity", "check_bundle": "integrity", "verify": "integrity", "sign_bundle": "integrity",
    "inspect_bundle": "summary",
    "export_graph": "graph_export", "GraphModel": "graph_runner", "is_graph_bundle": "graph_runner",
    "SIGNATURE": "signing", "generate_key_pair": "signing", "load_public_key": "signing", "fingerprint": "signing",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
