"""The bundle manifest: its schema, reading and writing manifest.json, and what the plan in it means.

A bundle is a directory of plain files. `manifest.json` lists every other file with its sha256 and size; nothing
else may be there. The checks that a bundle directory is exactly what its manifest says are in
hetrun.bundle.integrity.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, ValidationError

from hetrun.errors import BundleError, HetrunError
from hetrun.files import strict_json
from hetrun.placement.plan import Plan
from hetrun.profile import StrictModel, first_error

BUNDLE_FORMAT = "hetrun-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
# DeepSeek-V3 with a fallback graph of every routed expert for two backend targets needs about 60,000 graphs.
MAX_MANIFEST_ENTRIES = 2**18  # files, and expert graphs
MAX_FILE_BYTES = 2**38  # 256 GiB: DeepSeek-V3's dense (non-expert) weights take about 30 GB
MAX_GRAPH_BYTES = 2**31 - 1  # one ONNX graph file: protobuf cannot parse a larger message


class FileEntry(StrictModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_FILE_BYTES)


class ExpertEntry(StrictModel):
    """One expert graph: which expert of which layer, at which precision, for which backend target.

    `target` is what the backend's graph_target() asked for at export (hetrun.runtime.graphs.build_expert_graph); `meta`
    is the graph's meta (sizes the backend charges). Graphs of two targets that came out identical share a path.
    """

    layer: int = Field(ge=0)  # decoder layer index in the model
    moe_layer: int = Field(ge=0)  # row of the plan (index among MoE layers)
    kind: Literal["routed", "shared"]
    index: int = Field(ge=0)
    precision: str
    target: str = Field(min_length=1, max_length=64)
    path: str
    meta: dict[str, str | int | float | bool | None]

    @property
    def key(self) -> tuple[int, str, int, str]:
        return (self.moe_layer, self.kind, self.index, self.precision)


class ModelEntry(StrictModel):
    name: str  # the preset name or directory the bundle was exported from
    source: Literal["preset", "directory", "module"]
    family: str
    dtype: Literal["float32", "bfloat16", "float16"]
    seed: int | None = None  # random presets only


class Manifest(StrictModel):
    format: Literal["hetrun-bundle"]
    format_version: int
    hetrun_version: str
    created_utc: str
    model: ModelEntry
    spec: dict
    plan: dict
    precision: dict[str, str]
    targets: dict[str, str]  # device id -> graph target its backend asked for at export
    fallback_device: str | None = None  # device id that takes a failed device's tokens; every routed expert has a graph there
    profile: str  # YAML of the profile the plan was made for
    config: str  # transformers config.json
    generation_config: str | None = None  # transformers generation_config.json (eos, bos) when the model has one
    dense: list[str] = Field(min_length=1)  # safetensors files: every weight except the routed and shared experts
    experts: list[ExpertEntry] = Field(min_length=1)
    files: dict[str, FileEntry]

    def expert_index(self) -> dict[tuple[int, str, int, str], dict[str, ExpertEntry]]:
        """(moe_layer, kind, index, precision) -> {target: entry}."""
        out: dict[tuple[int, str, int, str], dict[str, ExpertEntry]] = {}
        for e in self.experts:
            out.setdefault(e.key, {})[e.target] = e
        return out

    def to_json(self) -> str:
        """The text of manifest.json."""
        return json.dumps(self.model_dump(mode="json"), indent=1, allow_nan=False)


def parse_manifest(data: bytes) -> Manifest:
    """manifest.json's bytes as a Manifest of this format version, or a one-line BundleError naming manifest.json.

    The schema only: hetrun.bundle.integrity.read_manifest also checks that its paths and plan agree.
    """
    raw = parse_json(data, MANIFEST)
    if not isinstance(raw, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{MANIFEST}: format {str(raw.get('format'))[:40]!r} is not '{BUNDLE_FORMAT}'; "
                          "not a hetrun bundle")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{MANIFEST}: bundle format version {str(version)[:20]} is not {FORMAT_VERSION}, which this "
                          "hetrun reads; re-export the bundle with this hetrun")
    for key in ("files", "experts"):
        n = len(raw[key]) if isinstance(raw.get(key), (list, dict)) else 0
        if n > MAX_MANIFEST_ENTRIES:
            raise BundleError(f"{MANIFEST}: lists {n} {key}, more than the {MAX_MANIFEST_ENTRIES} hetrun reads; "
                              "not a bundle hetrun wrote")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        loc, msg = first_error(e)
        raise BundleError(f"{MANIFEST}: field '{loc[:80]}': {msg[:160]}") from None


def parse_json(data: bytes, rel: str):
    """A bundle JSON file's bytes as plain data, or a one-line BundleError naming `rel`: UTF-8, no NaN or
    Infinity, no key given twice in one object."""
    try:
        return strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{rel}: is not valid JSON ({' '.join(str(e).split())[:160]})") from None


def manifest_plan(man: Manifest) -> Plan:
    """The manifest's Plan, or a BundleError naming manifest.json."""
    try:
        plan = Plan.from_dict(man.plan)
        shared = plan.shared_device_of  # [L, S]
        if shared.shape != (plan.num_layers, plan.spec.num_shared_experts) or \
                (shared.size and (shared.min() < 0 or shared.max() >= len(plan.device_ids))):
            raise BundleError(f"{MANIFEST}: bad plan: shared_device_of must be [layers, shared experts] device indices")
        return plan
    except BundleError:
        raise
    except HetrunError as e:
        raise BundleError(f"{MANIFEST}: bad plan: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        raise BundleError(f"{MANIFEST}: bad plan: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None


def needed_graphs(plan: Plan, fallback_id: str | None = None) -> list[tuple[int, str, int, str]]:
    """(moe_layer, kind, index, precision) of every graph a plan runs, in a stable order.

    With `fallback_id` (a device of the plan), every routed expert also gets a graph at that device's precision,
    so that a failing device's tokens can move there.
    """
    keys: dict[tuple[int, str, int, str], None] = {}
    for li in range(plan.num_layers):
        for e, d in zip(plan.phy2log[li].tolist(), plan.device_of[li].tolist()):
            keys[(li, "routed", int(e), plan.precision[plan.device_ids[d]])] = None
        if fallback_id is not None and fallback_id in plan.precision:
            for e in range(plan.spec.num_experts):
                keys[(li, "routed", e, plan.precision[fallback_id])] = None
        for s, d in enumerate(plan.shared_device_of[li].tolist()):
            keys[(li, "shared", s, plan.precision[plan.device_ids[d]])] = None
    return sorted(keys)
