"""export_graph(): write a graph bundle -- a model as one onnxruntime graph with what runs it without torch
(hetrun.bundle.graph_runner has the layout) -- for a profile whose deployment can run as one graph
(hetrun.runtime.model_graph.why_not), atomically: the folder is written beside its place and moved in at the end
(hetrun.bundle.target), so an interrupted export never leaves a folder that `hetrun run` accepts."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from hetrun.bundle.exporter import export_inputs
from hetrun.bundle.graph_runner import (
    EMBEDDING,
    FILES,
    FORMAT_VERSION,
    GRAPH_FORMAT,
    ROPE_COS,
    ROPE_SIN,
    GraphManifest,
    GraphShape,
)
from hetrun.bundle.integrity import file_digest
from hetrun.bundle.manifest import MANIFEST, FileEntry
from hetrun.bundle.target import write_folder
from hetrun.errors import BundleError
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import Profile
from hetrun.runtime.attention import ROTARY_ROWS, SharedGqa
from hetrun.runtime.dense import dense_precision
from hetrun.runtime.dispatch import ExpertRuntime
from hetrun.runtime.model_graph import build_model_graph, decoder_shape, why_not
from hetrun.runtime.weights import model_layer_weights
from hetrun.spec import MoESpec


def export_graph(model: Any, profile: "str | Profile | dict", out: "str | os.PathLike", *, precision: str | None = None,
                 force: bool = False, seed: int = 0, threads: int | None = None,
                 sign: "str | os.PathLike | None" = None) -> GraphManifest:
    """Write the graph bundle of `model` (preset name, model directory or transformers module) for `profile` (whose
    plan must put every expert and the dense part on one onnxruntime CPU device) into `out`; its manifest.

    `precision` is the experts' (default: the device's best); the dense linear layers run as the profile's
    `dense_precision` resolves. `sign`: an Ed25519 private key file; the bundle gets manifest.sig (`hetrun run
    --trust KEY.pub` checks it). Every user error is raised before any weight is built."""
    start = export_inputs(model, profile, out, force, seed, sign)
    plan = make_plan(start.spec, start.profile, precision=precision)
    # reserved before any weight is built: an unwritable output fails there
    return write_folder(start.out, force, lambda tmp: _write(tmp, start.source.build(), start.source.name, start.spec,
                                                             start.profile, plan, threads), start.key)


def _write(tmp: Path, module, name: str, spec: MoESpec, prof: Profile, plan, threads: int | None) -> GraphManifest:
    weights = [w for _, w in model_layer_weights(spec, module)]
    runtime = ExpertRuntime(plan, prof, None, threads=threads)  # the device's backend, not a session
    reason = why_not(module, spec, runtime, weights)
    if reason:
        raise BundleError(f"cannot export '{name}' as one graph for profile '{prof.name}': {reason}; export a "
                          "bundle without --graph instead")
    shape = decoder_shape(module, spec)
    device = plan.device_ids[0]
    dense = dense_precision(runtime)
    positions = max(int(getattr(module.config, "max_position_embeddings", 0) or 0), ROTARY_ROWS)
    # the tables before the graph: building it releases the dense weights of a model read from a directory
    cos, sin = SharedGqa(None, shape.heads, shape.kv_heads, shape.head_dim, module.model.rotary_emb, None,
                         device).tables(positions)  # [P', Dh/2] each, P' >= positions
    np.save(tmp / ROPE_COS, np.ascontiguousarray(cos[:positions].numpy()))
    np.save(tmp / ROPE_SIN, np.ascontiguousarray(sin[:positions].numpy()))
    np.save(tmp / EMBEDDING, module.model.embed_tokens.weight.detach().float().numpy())  # [V, D]
    graph = build_model_graph(module, weights, shape, spec.router, plan.precision[device], dense, folder=tmp)
    graph.sink.save()
    eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    files = {}
    for rel in FILES:
        digest, size = file_digest(tmp / rel)
        files[rel] = FileEntry(sha256=digest, size=size)
    manifest = GraphManifest(
        format=GRAPH_FORMAT, format_version=FORMAT_VERSION, hetrun_version=version("hetrun"),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), model=name, profile=prof.name,
        precision=plan.precision[device], dense_precision=dense,
        shape=GraphShape(layers=shape.layers, hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
                         head_dim=shape.head_dim, experts=shape.experts, top_k=shape.top_k, vocab=shape.vocab),
        positions=positions, eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        files=files)
    with open(tmp / MANIFEST, "w") as f:
        f.write(manifest.model_dump_json(indent=1))
    return manifest
