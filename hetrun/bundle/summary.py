"""inspect_bundle(): what a bundle holds and which of its checks pass, as plain data (no torch needed)."""

from __future__ import annotations

import os
from collections import Counter

from hetrun.bundle.integrity import bundled_profile, check_bundle
from hetrun.bundle.manifest import manifest_plan
from hetrun.errors import HetrunError


def inspect_bundle(bundle_dir: "str | os.PathLike", trust=None) -> dict:
    """What a bundle holds (model, devices, precisions, sizes), its signature, and the outcome of every file check,
    as plain data.

    A missing or malformed manifest raises BundleError, and so does a signature that no key of `trust` (public key
    files) made; problems with single files are reported in `files`.
    """
    report = check_bundle(bundle_dir, trust)
    man = report.manifest
    plan = manifest_plan(man)
    types: dict[str, tuple[str, str]] = {}
    try:
        types = {d.id: (d.type.name, d.backend) for d in bundled_profile(report.root, man).devices}
    except HetrunError:
        pass  # the file check below already says what is wrong with profile.yaml
    graph_bytes, graph_count = Counter(), Counter()
    for path, precision in {e.path: e.precision for e in man.experts}.items():
        graph_bytes[precision] += man.files[path].size
        graph_count[precision] += 1
    devices = []
    for d, did in enumerate(plan.device_ids):
        devices.append({"id": did, "type": types.get(did, ("?", "?"))[0], "backend": types.get(did, ("?", "?"))[1],
                        "precision": plan.precision[did], "graph_target": man.targets.get(did, "?"),
                        "routed_slots": int((plan.device_of == d).sum()),
                        "shared_experts": int((plan.shared_device_of == d).sum())})
    spec = plan.spec
    return {
        "bundle": str(report.root), "ok": report.ok, "signature": report.signature,
        "format_version": man.format_version, "hetrun_version": man.hetrun_version, "created_utc": man.created_utc,
        "model": {"name": man.model.name, "source": man.model.source, "family": man.model.family,
                  "dtype": man.model.dtype, "layers": spec.num_layers, "moe_layers": spec.num_moe_layers,
                  "hidden_size": spec.hidden_size, "experts": spec.num_experts, "top_k": spec.top_k,
                  "shared_experts": spec.num_shared_experts},
        "profile": plan.profile_name,
        "devices": devices,
        "graphs": {p: {"count": graph_count[p], "bytes": n}
                   for p, n in sorted(graph_bytes.items())},
        "size_bytes": sum(f.size for f in man.files.values()),
        "files": [{"path": f.path, "size": f.size, "status": f.status, "message": f.message} for f in report.files],
    }
