"""export(): write a self-contained deployment bundle for one model on one profile, atomically.

Layout of a bundle directory:
    manifest.json                      format, MoE spec, plan, precisions, sha256 + size of every other file
    config.json                        the transformers config
    generation_config.json             greedy-generation defaults (eos, bos), when the model has them
    profile.yaml                       the profile the plan was made for
    dense.safetensors                  every weight except routed and shared experts (embeddings, attention, norms,
                                       routers, dense MLPs)
    experts/L{layer}/E{e}.{precision}.onnx   routed expert e of decoder layer `layer`
    experts/L{layer}/S{s}.{precision}.onnx   shared expert s
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from hetrun.backends.registry import backend_class
from hetrun.bundle.integrity import file_digest
from hetrun.bundle.manifest import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ExpertEntry,
    FileEntry,
    Manifest,
    ModelEntry,
    needed_graphs,
)
from hetrun.bundle.signing import load_private_key
from hetrun.bundle.target import check_target, write_folder
from hetrun.checkpoint import load_model, open_checkpoint
from hetrun.errors import HetrunError, SpecError
from hetrun.placement.planner import plan as make_plan
from hetrun.profile import Profile, load_profile
from hetrun.runtime import graphs
from hetrun.runtime.weights import find_moe_blocks, layer_weights_from_block
from hetrun.spec import PRESETS, SUPPORTED_FAMILIES, MoESpec
from hetrun.tiny_models import random_config, random_model

log = logging.getLogger("hetrun")

# Random weights are only useful for shapes that fit a workstation; real models come from a directory.
MAX_RANDOM_PARAMS = 500_000_000
DENSE_FILE = "dense.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from, with its config read cheaply and the weights built only on demand."""

    kind: str  # preset, directory, module
    name: str
    config: Any  # transformers PretrainedConfig
    build: Callable[[], Any]  # -> torch.nn.Module
    seed: int | None = None


def preset_model(name: str, seed: int = 0, bias_scale: float = 0.1):
    """A random transformers model of a preset's shape, the same for the same (name, seed) in every process."""
    return random_model(_preset_spec(name), seed, bias_scale)


def _preset_spec(name: str) -> MoESpec:
    spec = MoESpec.from_preset(name)
    if spec.family not in SUPPORTED_FAMILIES:
        raise SpecError(f"preset '{name}' is a {spec.family} model, which transformers models in hetrun do not cover; "
                        f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
    params = spec.total_params()
    if params > MAX_RANDOM_PARAMS:
        raise SpecError(f"preset '{name}' has {params / 1e9:.1f}B parameters; hetrun builds random weights only for "
                        f"presets under {MAX_RANDOM_PARAMS / 1e9:.1f}B (tiny, tiny-mixtral, mixtral-bench); export a "
                        "local transformers model directory with real weights instead")
    return spec


def model_source(model: Any, seed: int = 0) -> ModelSource:
    """Resolve MODEL: a transformers module, a local model directory (safetensors), or a preset name."""
    if hasattr(model, "config") and hasattr(model, "state_dict"):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        return ModelSource("module", str(name), model.config, lambda: model)
    text = str(model)
    path = Path(text)
    if path.is_dir():
        return _directory_source(path)
    if os.sep in text or text.startswith(".") or path.exists():
        raise SpecError(f"model directory '{text}' not found; give a local transformers model directory or a preset "
                        f"name ({', '.join(_preset_names())})")
    spec = _preset_spec(text)
    return ModelSource("preset", text, random_config(spec), lambda: preset_model(text, seed), seed)


def _preset_names() -> list[str]:
    return [k for k, v in PRESETS.items() if v.family in SUPPORTED_FAMILIES and v.total_params() <= MAX_RANDOM_PARAMS]


def _directory_source(path: Path) -> ModelSource:
    """A checkpoint directory, opened (config, quantization, every shard's header checked) before anything is built;
    build() reads the dense part only, each expert is read when its graph is built (hetrun.checkpoint)."""
    ckpt = open_checkpoint(path)
    return ModelSource("directory", str(path), ckpt.config, lambda: load_model(ckpt))


# ---- target directory ------------------------------------------------------------------------------

class _Writer:
    """Writes files into the bundle's temporary directory and records their sha256 and size."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, FileEntry] = {}

    def bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        with open(path, "wb") as f:
            f.write(data)
        self._record(rel, path)

    def file(self, rel: str, write: Callable[[Path], None]) -> None:
        path = self._path(rel)
        write(path)
        self._record(rel, path)

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, rel: str, path: Path) -> None:
        digest, size = file_digest(path)
        self.files[rel] = FileEntry(sha256=digest, size=size)


# ---- export -----------------------------------------------------------------------------------------

def export(model: Any, profile: "str | Profile | dict", out: "str | os.PathLike", *, precision: str | None = None,
           load: Any = None, redundant_experts: int = 0, force: bool = False, progress: bool = True,
           seed: int = 0, sign: "str | os.PathLike | None" = None) -> Manifest:
    """Write a deployment bundle of `model` (preset name, model directory or transformers module) planned for `profile`.

    `load`, `redundant_experts` and `precision` go to hetrun.plan (a load table: [L, E] array, .npy/.json path or
    DispatchStats). Every user error (bad profile, load table, model, existing output) is raised before any weight
    is built, and so is an output that cannot be written or a signing key that cannot be read.
    The bundle is written to a temporary directory beside `out` and moved into place at the end (atomically, also
    over an old bundle with `force`: hetrun.bundle.target), so an interrupted export never leaves a directory that
    `hetrun run` accepts. `sign`: an Ed25519 private key file; the bundle gets manifest.sig, which
    `hetrun run --trust KEY.pub` checks. Returns the manifest.
    """
    start = export_inputs(model, profile, out, force, seed, sign)
    prof, source, spec = start.profile, start.source, start.spec
    plan = make_plan(spec, prof, load=load, redundant_experts=redundant_experts, precision=precision)
    fallback = prof.fallback_device
    fallback_id = fallback.id if fallback is not None and fallback.id in plan.device_ids else None
    targets = graph_targets(prof, plan)
    keys = _graph_keys(plan, targets, fallback_id)

    # reserved before any weight is built: an unwritable output fails there
    return write_folder(start.out, force, lambda tmp: _write(tmp, source.build(), source, spec, prof, plan, targets,
                                                             fallback_id, keys, progress), start.key)


@dataclass(frozen=True)
class ExportInputs:
    """What an export checks before it builds a weight: its output, its signing key, the profile, the model."""

    out: Path
    key: Any  # Ed25519PrivateKey or None
    profile: Profile
    source: "ModelSource"
    spec: MoESpec


def export_inputs(model: Any, profile: "str | Profile | dict", out: "str | os.PathLike", force: bool, seed: int,
                  sign: "str | os.PathLike | None") -> ExportInputs:
    """An export's inputs, each checked (one-line errors): the output can be written (or replaced with `force`), the
    key read, the profile valid, the model found (its config read, no weight built)."""
    out = Path(out)
    check_target(out, force)
    key = load_private_key(sign) if sign is not None else None
    prof = load_profile(profile)
    source = model_source(model, seed)
    return ExportInputs(out, key, prof, source, MoESpec.from_hf_config(source.config))


def _write(tmp: Path, module, source: ModelSource, spec: MoESpec, prof: Profile, plan, targets: dict[str, str],
           fallback_id: str | None, keys, progress: bool) -> Manifest:
    blocks = find_moe_blocks(module)
    if len(blocks) != plan.num_layers:
        raise SpecError(f"model has {len(blocks)} MoE blocks but its config describes {plan.num_layers} MoE layers; "
                        "hetrun needs transformers 5 MoE blocks (a router `gate` and stacked `experts`)")
    w = _Writer(tmp)
    w.bytes("config.json", module.config.to_json_string(use_diff=False).encode())
    generation = getattr(module, "generation_config", None)
    if generation is not None:
        w.bytes("generation_config.json", generation.to_json_string(use_diff=False).encode())
    w.bytes("profile.yaml", yaml.safe_dump(prof.model.model_dump(mode="json", exclude_defaults=True),
                                           sort_keys=False).encode())
    w.file(DENSE_FILE, lambda p: _save_dense(module, [path for _, path, _ in blocks], p))

    experts = _write_experts(w, spec, plan, blocks, keys, source.name, progress)
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SpecError(f"model weights are {dtype}; hetrun bundles hold float32, bfloat16 or float16 models")
    manifest = Manifest(
        format=BUNDLE_FORMAT, format_version=FORMAT_VERSION, hetrun_version=version("hetrun"),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelEntry(name=source.name, source=source.kind, family=spec.family, dtype=dtype, seed=source.seed),
        spec=_jsonable(spec.to_dict()), plan=_jsonable(plan.to_dict()), precision=dict(plan.precision), targets=targets,
        fallback_device=fallback_id,
        profile="profile.yaml", config="config.json", dense=[DENSE_FILE], experts=experts, files=dict(w.files),
        generation_config="generation_config.json" if generation is not None else None)
    with open(tmp / MANIFEST, "w") as f:
        f.write(manifest.to_json())
    return manifest


def graph_targets(prof: Profile, plan) -> dict[str, str]:
    """Device id -> the graph `target` its backend asks for (see hetrun.runtime.graphs.build_expert_graph).

    A backend that cannot be set up here (not installed, no device) gets its name as the target: standard ONNX.
    """
    devices = {d.id: d for d in prof.devices}
    out = {}
    for did in plan.device_ids:
        dev = devices[did]
        try:
            cls = backend_class(dev.backend)
            out[did] = cls(dev, plan.precision[did], None).graph_target() if cls is not None else dev.backend
        except (HetrunError, ImportError, OSError, RuntimeError) as e:
            out[did] = dev.backend
            log.warning("backend '%s' of device '%s' cannot tell its graph target here (%s); exporting standard ONNX "
                        "for it", dev.backend, did, " ".join(str(e).split())[:120])
    return out


def _graph_keys(plan, targets: dict[str, str], fallback_id: str | None) -> list[tuple[int, str, int, str, str]]:
    """(moe_layer, kind, index, precision, target) of every graph the plan runs (fallback graphs included)."""
    keys: dict[tuple[int, str, int, str, str], None] = {}
    for li in range(plan.num_layers):
        for e, d in zip(plan.phy2log[li].tolist(), plan.device_of[li].tolist()):
            did = plan.device_ids[d]
            keys[(li, "routed", int(e), plan.precision[did], targets[did])] = None
        if fallback_id is not None:
            for e in range(plan.spec.num_experts):
                keys[(li, "routed", e, plan.precision[fallback_id], targets[fallback_id])] = None
        for s, d in enumerate(plan.shared_device_of[li].tolist()):
            did = plan.device_ids[d]
            keys[(li, "shared", s, plan.precision[did], targets[did])] = None
    assert {k[:4] for k in keys} == set(needed_graphs(plan, fallback_id))
    return sorted(keys)


def _write_experts(w: _Writer, spec: MoESpec, plan, blocks, keys, name: str, progress: bool) -> list[ExpertEntry]:
    by_layer: dict[int, list] = {}
    for k in keys:
        by_layer.setdefault(k[0], []).append(k)
    entries = []
    bar = tqdm(total=len(keys), desc=f"exporting {name} experts", unit="graph", file=sys.stderr, disable=not progress,
               mininterval=0.2)
    with bar:
        for li, (layer, _, block) in enumerate(blocks):
            weights = layer_weights_from_block(spec, layer, block)
            written: dict[tuple[str, int, str], list[tuple[str, str]]] = {}  # (kind, idx, precision) -> [(sha, path)]
            for _, kind, idx, prec, target in by_layer.get(li, []):
                pool = weights.experts if kind == "routed" else weights.shared
                if idx >= len(pool):
                    raise SpecError(f"plan needs {kind} expert {idx} of layer {layer}, the model has {len(pool)}")
                graph = graphs.build_expert_graph(pool[idx], prec, target=target)
                onnx.checker.check_model(graph.model, full_check=True)
                _check_graph_shape(graph.model)
                data = graph.serialize()
                digest = hashlib.sha256(data).hexdigest()
                same = written.setdefault((kind, idx, prec), [])
                rel = next((path for sha, path in same if sha == digest), None)
                if rel is None:  # graphs of two targets that came out identical share one file
                    stem = f"experts/L{layer}/{'E' if kind == 'routed' else 'S'}{idx}.{prec}"
                    rel = f"{stem}.onnx" if not same else f"{stem}.{_safe_name(target)}.onnx"
                    w.bytes(rel, data)
                    same.append((digest, rel))
                entries.append(ExpertEntry(layer=layer, moe_layer=li, kind=kind, index=idx, precision=prec,
                                           target=target, path=rel, meta=_jsonable(graph.meta)))
                bar.update(1)
    return entries


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40] or "target"


def _check_graph_shape(model) -> None:
    """Every exported graph is opset 21+ with a dynamic token axis; anything else is a builder bug."""
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if version < 21 or not dim.dim_param:
        raise RuntimeError(f"expert graph has opset {version} and token axis {dim}; expected opset >= 21, dynamic")


def _save_dense(module, moe_paths: list[str], path: Path) -> None:
    """Every tensor of the state dict except routed and shared expert weights, tied tensors stored once."""
    tensors, seen = {}, {}
    for key, t in module.state_dict().items():
        if is_expert_key(key, moe_paths):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:  # tied to a tensor already stored (e.g. lm_head and embed_tokens)
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})  # one key: safetensors orders several at random


def is_expert_key(key: str, moe_paths: list[str]) -> bool:
    """Whether a state-dict key holds routed or shared expert weights (which the bundle keeps as ONNX graphs)."""
    for p in moe_paths:
        prefix = f"{p}." if p else ""
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("experts.", "shared_experts.", "shared_expert.")):
                return True
    return False


def _jsonable(obj):
    """Plain JSON values: numpy scalars and arrays become Python ones, non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
