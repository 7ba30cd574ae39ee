"""load(): verify a bundle completely, rebuild the model from its config and dense weights, run its ONNX experts.

Nothing is allocated before it is validated: config.json must describe the plan's model, and a model built on the
meta device (no memory) must want exactly the tensors, of exactly the shapes, that the dense safetensors headers
hold, before the real model is built and its weights are read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import transformers
from onnx.external_data_helper import load_external_data_for_model
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from hetrun.bundle.exporter import is_expert_key
from hetrun.bundle.integrity import (
    bundled_profile,
    check_bundle,
    check_safetensors_header,
    onnx_external_refs,
    parse_onnx,
    read_file,
    resolve_inside,
)
from hetrun.bundle.manifest import Manifest, manifest_plan
from hetrun.checkpoint.config import config_from_json
from hetrun.errors import BundleError, HetrunError
from hetrun.formats import base_precision
from hetrun.once import warn_once
from hetrun.placement.precisions import device_precision
from hetrun.profile import Profile, load_profile
from hetrun.runtime.attention import run_attention
from hetrun.runtime.dense import compute_rest_in_fp32, run_dense_linears
from hetrun.runtime.dispatch import ExpertRuntime, swap_moe_blocks
from hetrun.runtime.weights import MoELayerWeights, find_moe_blocks, router_tensors
from hetrun.spec import MoESpec

log = logging.getLogger("hetrun")


class GraphStore:
    """The bundle's expert graphs, read on demand and checked against the manifest's sha256 as they are read."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.index = manifest.expert_index()

    def graph(self, moe_layer: int, kind: str, index: int, precision: str, target: str) -> tuple[bytes, dict]:
        """Serialized ONNX graph and its backend meta for one expert at one precision, built for `target`.

        When the bundle has the expert at that precision but for another target (another backend than the profile
        it was made for), that graph runs, with one warning: same format, possibly not the same last bits.
        """
        by_target = self.index.get((moe_layer, kind, index, precision))
        if not by_target:
            raise BundleError(f"bundle '{self.root}' has no {precision} graph of {kind} expert {index} of MoE layer "
                              f"{moe_layer}; export a bundle for this profile with `hetrun export`")
        entry = by_target.get(target)
        if entry is None:
            entry = by_target[sorted(by_target)[0]]
            warn_once(("bundle target", target, entry.target), "bundle '%s' has no expert graphs built for backend "
                      "target '%s'; running those built for '%s' (re-export for this profile for exact numerics)",
                      self.root, target, entry.target)
        data = read_file(self.root, entry.path, self.manifest.files[entry.path])
        model = parse_onnx(entry.path, data)
        if onnx_external_refs(model):  # locations were checked to stay inside the bundle when it was verified
            load_external_data_for_model(model, str(self.root / PurePosixPath(entry.path).parent))
            data = model.SerializeToString()
        return data, dict(entry.meta)


@dataclass(frozen=True)
class BundledExpert:
    """Stands where ExpertWeights would: the runtime compiles this expert from the bundle's graph instead."""

    store: GraphStore
    moe_layer: int
    kind: str  # routed or shared
    index: int


class BundleRuntime(ExpertRuntime):
    """An ExpertRuntime whose experts come as prebuilt ONNX graphs from a bundle, not from weights."""

    def placeable(self) -> np.ndarray:
        """[L, E, D] whether the bundle holds a graph of each routed expert at each device's precision: live
        rebalancing and the cache build copies only there."""
        out = np.ones((self.plan.num_layers, self.plan.spec.num_experts, len(self.devices)), dtype=bool)
        for li, layer in enumerate(self.layers):
            for e, ex in enumerate(layer.weights.experts):
                if isinstance(ex, BundledExpert):
                    out[li, e] = [(ex.moe_layer, ex.kind, ex.index, self.plan.precision[d.id]) in ex.store.index
                                  for d in self.devices]
        return out

    def compile(self, device: int, expert, name: str, measure: bool = True):
        if not isinstance(expert, BundledExpert):
            return super().compile(device, expert, name, measure)
        backend = self.backends[device]
        data, meta = expert.store.graph(expert.moe_layer, expert.kind, expert.index, backend.precision,
                                        backend.graph_target())
        try:
            return backend.load(data, name, meta)
        except HetrunError:
            raise
        except Exception as e:  # noqa: BLE001 -- runtimes raise their own types (onnxruntime's derive from Exception)
            raise BundleError(f"bundle '{expert.store.root}': the {backend.precision} graph of {expert.kind} expert "
                              f"{expert.index} of MoE layer {expert.moe_layer} does not load on backend "
                              f"'{type(backend).__name__}': {type(e).__name__}: {' '.join(str(e).split())[:160]}; "
                              "re-export the bundle") from None


def check_profile_fits(plan, profile: Profile) -> None:
    """Raise a one-line BundleError unless every device of the plan is in `profile` and runs the plan's precision."""
    have = {d.id: d for d in profile.devices}
    problems = []
    for did in plan.device_ids:
        want = plan.precision[did]
        dev = have.get(did)
        if dev is None:
            problems.append(f"no device '{did}'")
            continue
        if base_precision(want) not in dev.type.precisions:
            problems.append(f"'{did}' is a {dev.type.name}, which has no {want}")
        elif dev.precision is not None and dev.precision != want:
            problems.append(f"'{did}' asks for {dev.precision} but the bundle holds {want} graphs for it")
        else:
            try:
                device_precision(dev, want)
            except HetrunError:
                problems.append(f"backend '{dev.backend}' of '{did}' cannot run {want}")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise BundleError(f"the bundle's plan (made for profile '{plan.profile_name}') does not fit profile "
                          f"'{profile.name}': {'; '.join(problems[:3])}{more}; re-plan for it with "
                          f"`hetrun plan --model MODEL --profile {profile.source}` and export a new bundle with "
                          f"`hetrun export MODEL --profile {profile.source} -o DIR`")


def _dense_model(root: Path, man: Manifest, moe_paths_of, plan):
    """The transformers model from config.json with the bundle's dense weights; expert weights stay unloaded."""
    config = config_from_json(read_file(root, man.config, man.files[man.config]), man.config, BundleError)
    _check_before_allocating(root, man, config, plan, moe_paths_of)
    with torch.random.fork_rng(devices=[]):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, man.model.dtype)).eval()
    if man.generation_config is not None:
        gen = read_file(root, man.generation_config, man.files[man.generation_config])
        try:
            model.generation_config = transformers.GenerationConfig.from_dict(json.loads(gen.decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise BundleError(f"{man.generation_config}: not a valid generation config ({type(e).__name__})") from None
    moe_paths = moe_paths_of(model)
    own = model.state_dict()
    loaded: dict = {}
    for rel in man.dense:
        try:
            tensors = load_safetensors(read_file(root, rel, man.files[rel]))
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BundleError(f"{rel}: is not a valid safetensors file ({' '.join(str(e).split())[:120]})") from None
        for key, t in tensors.items():
            if key not in own:
                raise BundleError(f"{rel}: holds tensor '{key[:80]}', which the model of config.json does not have")
            if is_expert_key(key, moe_paths):
                raise BundleError(f"{rel}: holds expert weight '{key[:80]}'; experts belong in ONNX graphs")
            if tuple(t.shape) != tuple(own[key].shape):
                raise BundleError(f"{rel}: tensor '{key[:80]}' has shape {tuple(t.shape)}, the model wants "
                                  f"{tuple(own[key].shape)}")
            loaded[key] = t
    model.load_state_dict(loaded, strict=False)
    for key, t in loaded.items():  # keep each tensor's stored dtype (models keep some weights in fp32)
        if own[key].dtype != t.dtype:
            path, _, name = key.rpartition(".")
            getattr(model.get_submodule(path) if path else model, name).data = t
    stored = {_ident(own[k]) for k in loaded}
    missing = [k for k in own if k not in loaded and not is_expert_key(k, moe_paths) and _ident(own[k]) not in stored]
    if missing:
        raise BundleError(f"{man.dense[0]}: lacks tensor '{missing[0][:80]}' ({len(missing)} missing); re-export")
    return model


def _check_before_allocating(root: Path, man: Manifest, config, plan, moe_paths_of) -> None:
    """A BundleError unless config.json describes the plan's model and the model it builds wants exactly the dense
    files' tensors and shapes: checked on the meta device, so a config of absurd sizes allocates nothing."""
    try:
        spec = MoESpec.from_hf_config(config)
    except HetrunError as e:
        raise BundleError(f"{man.config}: {e}") from None
    if spec.replace(name=plan.spec.name) != plan.spec:
        raise BundleError(f"{man.config}: describes a model of another shape than the bundle's plan; re-export")
    have: dict[str, tuple] = {}
    for rel in man.dense:
        header = check_safetensors_header(rel, resolve_inside(root, rel, rel), man.files[rel].size)
        have.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, man.model.dtype))
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise BundleError(f"{man.config}: cannot build its model ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]})") from None
    want = skeleton.state_dict(keep_vars=True)  # tied weights are one Parameter under two keys
    moe_paths = moe_paths_of(skeleton)
    stored = {id(want[k]) for k in have if k in want}
    for key, shape in have.items():
        if key not in want:
            raise BundleError(f"{man.dense[0]}: holds tensor '{key[:80]}', which the model of config.json does not have")
        if tuple(want[key].shape) != shape:
            raise BundleError(f"{man.dense[0]}: tensor '{key[:80]}' has shape {shape}, the model of config.json wants "
                              f"{tuple(want[key].shape)}")
    missing = [k for k, t in want.items() if k not in have and not is_expert_key(k, moe_paths) and id(t) not in stored]
    if missing:
        raise BundleError(f"{man.dense[0]}: lacks tensor '{missing[0][:80]}' ({len(missing)} missing) that the model of "
                          f"config.json wants; re-export")


def _ident(t) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def load(bundle_dir: "str | os.PathLike", profile: "str | Profile | dict | None" = None, threads: int | None = None,
         progress: bool = False, trust=None):
    """Load a bundle and return a transformers model whose experts run from the bundle's ONNX graphs.

    The whole bundle is verified first (checksums, no missing or extra files, every path inside the bundle); nothing
    is loaded from a bundle that fails. With `trust` (public key files, see hetrun.bundle.signing), the bundle must
    also be signed by one of those keys: checksums alone show a bundle is intact, not who made it. `profile=None` runs on the profile the bundle was made for; another profile
    is accepted only if every device of the plan is in it and runs the plan's precision.
    The runtime is attached as `model.hetrun`, the manifest as `model.hetrun_manifest`.
    """
    report = check_bundle(bundle_dir, trust)
    report.raise_first()
    root, man = report.root, report.manifest
    plan = manifest_plan(man)
    prof = bundled_profile(root, man) if profile is None else load_profile(profile)
    check_profile_fits(plan, prof)
    if getattr(prof.model, "distributed", None) is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        raise BundleError(f"bundles run in one process; profile '{prof.name}' lays out torchrun ranks: load the model "
                          "and use hetrun.deploy() under torchrun instead")

    model = _dense_model(root, man, lambda m: [p for _, p, _ in find_moe_blocks(m)], plan)
    spec = MoESpec.from_hf_config(model.config)
    if spec.replace(name=plan.spec.name) != plan.spec:
        raise BundleError(f"{man.config}: describes a model of another shape than the bundle's plan; re-export")
    blocks = find_moe_blocks(model)
    if len(blocks) != plan.num_layers:
        raise BundleError(f"{man.config}: gives {len(blocks)} MoE blocks, the plan has {plan.num_layers}; re-export")

    store = GraphStore(root, man)
    weights = []
    for li, (layer, _, block) in enumerate(blocks):
        gate, bias, shared_gate, gate_bias = router_tensors(block)
        weights.append(MoELayerWeights(
            layer, gate, bias, tuple(BundledExpert(store, li, "routed", e) for e in range(spec.num_experts)),
            tuple(BundledExpert(store, li, "shared", s) for s in range(plan.shared_device_of.shape[1])), shared_gate,
            gate_bias))
    paths = [path for _, path, _ in blocks]
    runtime = BundleRuntime(plan, prof, None, threads=threads)
    runtime.dense = run_dense_linears(model, runtime, paths)  # as deploy() runs them (first), from the bundle's
    runtime.compile_layers(weights, progress)  # dense weights
    swap_moe_blocks(model, paths, runtime.layers)
    compute_rest_in_fp32(model, runtime)
    run_attention(model, runtime)
    model.hetrun = runtime
    model.hetrun_manifest = man
    return model


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy generation from one prompt: the new token ids, the logits [V] at the prompt's last position, and
    `nonfinite_step`: the first generated position whose logits held NaN or infinity (None when all were finite;
    a token chosen from such logits is meaningless)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, T]
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()  # [V]
        new: list[int] = []
        bad = None
        if max_new_tokens > 0:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad if pad is not None else 0, output_logits=True,
                                 return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:].tolist()
            bad = next((i for i, step in enumerate(out.logits) if not bool(torch.isfinite(step).all())), None)
    return {"new_ids": new, "last_logits": logits.tolist(), "nonfinite_step": bad}
