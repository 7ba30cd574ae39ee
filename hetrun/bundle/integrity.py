"""The checks that a bundle directory is exactly what its manifest says.

Paths in the manifest are relative POSIX paths that stay inside the bundle: no `..`, no absolute paths, no symlinks.
Every listed file has the manifest's size and sha256, nothing unlisted is there, and ONNX files may only reference
external data that is itself a file of the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import onnx
import yaml
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto

from hetrun.bundle.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    manifest_plan,
    needed_graphs,
    parse_manifest,
)
from hetrun.errors import BundleError, HetrunError
from hetrun.formats import PRECISIONS
from hetrun.profile import Profile, load_profile

_CHUNK = 4 * 2**20


def _tagged(status: str, message: str) -> BundleError:
    """A BundleError that says which kind of check failed (missing, changed, unsafe) for `hetrun inspect`."""
    err = BundleError(message)
    err.status = status
    return err


# ---- paths ----------------------------------------------------------------------------------------

def check_relative(rel: object, what: str) -> PurePosixPath:
    """A manifest path as a clean relative POSIX path, or a BundleError naming it."""
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or not rel.isprintable():
        shown = repr(rel)[:80]
        raise _tagged("unsafe", f"{what}: path {shown} is not a plain file name; paths in a bundle are short "
                                "relative file names of printable characters")
    p = PurePosixPath(rel)
    if "\\" in rel or rel.startswith("/") or p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise _tagged("unsafe", f"{what}: path '{rel}' is absolute; every path must stay inside the bundle")
    if any(part in ("..", ".") for part in rel.split("/")) or "//" in rel or rel.endswith("/"):
        raise _tagged("unsafe", f"{what}: path '{rel}' escapes the bundle or is not normalized "
                                "(no '..', '.', '//' or trailing '/'); every path must stay inside the bundle")
    return p


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """The file `rel` under `root`, refusing symlinks anywhere on the way and anything but a regular file."""
    check_relative(rel, what)
    here = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise _tagged("missing", f"{rel}: file is missing from the bundle") from None
        except OSError as e:
            raise BundleError(f"{rel}: cannot read it: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(here)
            if not _within(Path(target), root):
                raise _tagged("unsafe", f"{rel}: is a symlink that escapes the bundle (to {target}); "
                                        "refusing to follow it")
            raise _tagged("unsafe", f"{rel}: is a symlink; bundles hold plain files only (copy it with `cp -rL`)")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{rel}: is not a regular file")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{rel}: '{'/'.join(parts[:i + 1])}' is not a directory")
    return here


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def bundle_root(bundle_dir: "str | os.PathLike") -> Path:
    """The bundle directory, resolved, or a BundleError when it is not one."""
    p = Path(bundle_dir)
    if not p.exists():
        raise BundleError(f"bundle '{p}' does not exist; write one with `hetrun export MODEL --profile P -o {p}`")
    if not p.is_dir():
        raise BundleError(f"bundle '{p}' is not a directory; a bundle is the directory `hetrun export` wrote")
    return p.resolve()


# ---- sizes and digests ----------------------------------------------------------------------------

def read_file(root: Path, rel: str, expected: FileEntry | None = None, limit: int | None = None) -> bytes:
    """A bundle file's bytes, read without following symlinks; checked against its manifest entry when given."""
    path = resolve_inside(root, rel, rel)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise BundleError(f"{rel}: cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleError(f"{rel}: is larger than {limit} bytes; not a hetrun manifest")
    if expected is not None:
        check_bytes(rel, data, expected)
    return data


def check_bytes(rel: str, data: bytes, expected: FileEntry) -> None:
    """Raise a BundleError naming `rel` unless `data` has the manifest's size and sha256."""
    if len(data) != expected.size:
        raise _tagged("changed", f"{rel}: has {len(data)} bytes, the manifest says {expected.size}; "
                          "the file was changed or truncated: re-export the bundle")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.sha256:
        raise _tagged("changed", f"{rel}: sha256 {digest[:12]}... does not match the manifest's {expected.sha256[:12]}...; "
                          "the file was changed: re-export the bundle")


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks without following a final symlink."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ---- the manifest -------------------------------------------------------------------------------

def read_manifest(root: Path) -> Manifest:
    """Parse and validate manifest.json: schema, paths, and that it names every graph its plan needs."""
    try:
        st = os.lstat(root / MANIFEST)
    except FileNotFoundError:
        raise BundleError(f"{MANIFEST}: missing in '{root}'; it is not a hetrun bundle, or its export did not finish "
                          "(re-run `hetrun export`)") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{MANIFEST}: is not a regular file (symlinks are refused)")
    man = parse_manifest(read_file(root, MANIFEST, limit=MAX_MANIFEST_BYTES))
    _check_consistency(man)
    return man


def _check_consistency(man: Manifest) -> None:
    for rel in man.files:
        check_relative(rel, f"{MANIFEST}: files")
        if rel == MANIFEST:
            raise BundleError(f"{MANIFEST}: the manifest cannot list itself under 'files'")
    listed = [man.profile, man.config, *man.dense]
    listed += [man.generation_config] if man.generation_config is not None else []
    graphs = {e.path for e in man.experts}
    for rel in listed + sorted(graphs):
        check_relative(rel, MANIFEST)
        if rel not in man.files:
            raise BundleError(f"{MANIFEST}: names '{rel}' but gives no sha256 for it under 'files'")
    if len(set(listed)) != len(listed) or set(listed) & graphs:
        raise BundleError(f"{MANIFEST}: one file is listed twice")
    for e in man.experts:
        if e.precision not in PRECISIONS:
            raise BundleError(f"{MANIFEST}: expert graph '{e.path}' has unknown precision {e.precision[:20]!r}")
        for k in ("hidden", "intermediate"):
            v = e.meta.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise BundleError(f"{MANIFEST}: expert graph '{e.path}' needs a positive integer meta.{k}")
    if sum(len(t) for t in man.expert_index().values()) != len(man.experts):
        raise BundleError(f"{MANIFEST}: two expert graphs claim the same layer, expert, precision and target")
    plan = manifest_plan(man)
    if plan.spec.to_dict() != man.spec:
        raise BundleError(f"{MANIFEST}: 'spec' and the plan's spec differ; the manifest was edited: re-export")
    if dict(plan.precision) != man.precision:
        raise BundleError(f"{MANIFEST}: 'precision' and the plan's precisions differ; the manifest was edited: re-export")
    if set(man.targets) != set(plan.device_ids):
        raise BundleError(f"{MANIFEST}: 'targets' must name a graph target for each device of the plan")
    spec, targets = plan.spec, set(man.targets.values())
    for e in man.experts:
        count = spec.num_experts if e.kind == "routed" else plan.shared_device_of.shape[1]
        if e.moe_layer >= plan.num_layers or e.index >= count or e.layer != spec.moe_layer_ids[e.moe_layer]:
            raise BundleError(f"{MANIFEST}: expert graph '{e.path}' claims {e.kind} expert {e.index} of layer "
                              f"{e.layer} (MoE layer {e.moe_layer}), which the model does not have")
        if e.target not in targets:
            raise BundleError(f"{MANIFEST}: expert graph '{e.path}' was built for target '{e.target[:40]}', which no "
                              "device of the bundle uses")
    index = man.expert_index()
    if man.fallback_device is not None and man.fallback_device not in plan.device_ids:
        raise BundleError(f"{MANIFEST}: fallback_device '{man.fallback_device[:40]}' is not a device of the plan")
    missing = [k for k in needed_graphs(plan, man.fallback_device) if k not in index]
    if missing:
        li, kind, e, p = missing[0]
        raise BundleError(f"{MANIFEST}: the plan needs the {p} graph of {kind} expert {e} of MoE layer {li}, "
                          f"which the bundle lacks ({len(missing)} missing in all); re-export")


def bundled_profile(root: Path, man: Manifest) -> Profile:
    """The profile stored in the bundle (YAML, safe loading only)."""
    text = read_file(root, man.profile, man.files[man.profile])
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleError(f"{man.profile}: is not valid YAML ({type(e).__name__})") from None
    try:
        return load_profile(data if isinstance(data, dict) else {"profile": data})
    except HetrunError as e:
        raise BundleError(f"{man.profile}: {e}") from None


# ---- headers ------------------------------------------------------------------------------------

def check_safetensors_header(rel: str, path: Path, size: int) -> None:
    """A BundleError naming `rel` unless it starts with a well-formed safetensors header (no pickle, ever)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 * 2**20):
            raise BundleError(f"{rel}: is not a valid safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BundleError(f"{rel}: is not a valid safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{rel}: is not a valid safetensors file (header is not an object)")
    for key, t in header.items():
        if key == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise BundleError(f"{rel}: is not a valid safetensors file (tensor '{str(key)[:60]}' lies outside it)")


def _json_object(rel: str, data: bytes) -> None:
    try:
        ok = isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        ok = False
    if not ok:
        raise BundleError(f"{rel}: is not a JSON object")


# ---- ONNX external data -------------------------------------------------------------------------

def onnx_external_refs(model) -> list[tuple[str, dict[str, str]]]:
    """(tensor name, external_data key/values) of every tensor of an ONNX model that keeps its data outside it."""
    out: list[tuple[str, dict[str, str]]] = []

    def tensor(t) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            out.append((t.name, {kv.key: kv.value for kv in t.external_data}))

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        nodes(g.node)

    def nodes(ns) -> None:
        for n in ns:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR or a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for g in a.graphs:
                    graph(g)
                if a.HasField("sparse_tensor"):
                    tensor(a.sparse_tensor.values)
                    tensor(a.sparse_tensor.indices)

    graph(model.graph)
    for fn in model.functions:
        nodes(fn.node)
    return out


def parse_onnx(rel: str, data: bytes):
    """An ONNX ModelProto from bundle bytes, external data not loaded."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise BundleError(f"{rel}: is not a valid ONNX model ({type(e).__name__})") from None
    if not model.HasField("graph"):
        raise BundleError(f"{rel}: is not a valid ONNX model (no graph)")
    return model


def check_external_data(root: Path, rel: str, model, files: dict[str, FileEntry]) -> list[str]:
    """Bundle paths of the external data an ONNX file uses; a BundleError naming it when any leaves the bundle."""
    used = []
    base = PurePosixPath(rel).parent
    for name, kv in onnx_external_refs(model):
        loc = kv.get("location")
        if not loc:
            raise BundleError(f"{rel}: tensor '{name[:60]}' keeps its data outside the model but names no location")
        shown = loc[:120]
        if loc.startswith("/") or "\\" in loc or PurePosixPath(loc).is_absolute() or (len(loc) > 1 and loc[1] == ":"):
            raise _tagged("unsafe", f"{rel}: tensor '{name[:60]}' reads external data from absolute path '{shown}', "
                              "outside the bundle; refusing it")
        joined = os.path.normpath(str(base / loc)) if str(base) != "." else os.path.normpath(loc)
        if joined.startswith("..") or os.path.isabs(joined) or ".." in loc.split("/"):
            raise _tagged("unsafe", f"{rel}: tensor '{name[:60]}' reads external data from '{shown}', outside the bundle; "
                              "refusing it")
        target = joined.replace(os.sep, "/")
        if target not in files:
            raise _tagged("unsafe", f"{rel}: tensor '{name[:60]}' reads external data from '{shown}', which the manifest "
                              "does not list; refusing it")
        resolve_inside(root, target, rel)
        try:
            offset, length = int(kv.get("offset", 0)), int(kv.get("length", -1))
        except ValueError:
            raise BundleError(f"{rel}: tensor '{name[:60]}' has a non-numeric external data offset or length") from None
        if offset < 0 or (length >= 0 and offset + length > files[target].size) or length < -1:
            raise BundleError(f"{rel}: tensor '{name[:60]}' reads outside the bounds of '{target}'")
        used.append(target)
    return used


# ---- the whole bundle -----------------------------------------------------------------------------

@dataclass
class FileCheck:
    path: str
    size: int
    status: str  # ok, missing, changed, extra, unsafe, invalid
    message: str = ""


@dataclass
class BundleReport:
    """The outcome of checking every file of a bundle against its manifest."""

    root: Path
    manifest: Manifest
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status == "ok" for f in self.files)

    @property
    def problems(self) -> list[FileCheck]:
        return [f for f in self.files if f.status != "ok"]

    def raise_first(self) -> None:
        """Raise a one-line BundleError for the first failed check, if any."""
        bad = self.problems
        if bad:
            more = f" ({len(bad) - 1} more problem{'s' if len(bad) > 2 else ''}; see `hetrun inspect {self.root}`)" \
                if len(bad) > 1 else ""
            raise BundleError(f"bundle '{self.root}': {bad[0].message}{more}")


def check_bundle(bundle_dir: "str | os.PathLike") -> BundleReport:
    """Check every file: the manifest is valid, each listed file is present, unchanged and inside the bundle, no file
    is there that the manifest does not list, and ONNX files use no external data from outside the bundle.

    A malformed or missing manifest raises BundleError; per-file problems are collected in the report.
    """
    root = bundle_root(bundle_dir)
    man = read_manifest(root)
    report = BundleReport(root, man)
    onnx_paths = {e.path for e in man.experts}
    for rel, entry in sorted(man.files.items()):
        try:
            path = resolve_inside(root, rel, rel)
            if rel in onnx_paths or rel.endswith(".onnx"):  # read once: checksum, then parse
                model = parse_onnx(rel, read_file(root, rel, entry))
                check_external_data(root, rel, model, man.files)
            else:  # possibly large: checksum in chunks
                digest, size = file_digest(path)
                if size != entry.size or digest != entry.sha256:
                    why = f"has {size} bytes, the manifest says {entry.size}" if size != entry.size else \
                        f"sha256 {digest[:12]}... does not match the manifest's {entry.sha256[:12]}..."
                    raise _tagged("changed", f"{rel}: {why}; the file was changed: re-export the bundle")
                if rel in man.dense:
                    check_safetensors_header(rel, path, size)
                elif rel in (man.config, man.generation_config):
                    _json_object(rel, read_file(root, rel, entry))
                elif rel == man.profile:
                    bundled_profile(root, man)
            report.files.append(FileCheck(rel, entry.size, "ok"))
        except BundleError as e:
            report.files.append(FileCheck(rel, entry.size, getattr(e, "status", "invalid"), str(e)))
    report.files.extend(_unlisted(root, man))
    return report


def _unlisted(root: Path, man: Manifest) -> list[FileCheck]:
    """Entries of the bundle directory the manifest does not account for, and any unlisted symlink."""
    listed = set(man.files) | {MANIFEST}
    listed_dirs = {str(parent) for p in listed for parent in PurePosixPath(p).parents} - {"."}
    found = []
    for here, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(here, root).replace(os.sep, "/")
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(here, name))
            if stat.S_ISLNK(st.st_mode):
                if rel in listed:
                    continue  # reported when the listed file is checked
                target = os.path.realpath(os.path.join(here, name))
                where = "escapes the bundle" if not _within(Path(target), root) else "points inside the bundle"
                found.append(FileCheck(rel, 0, "unsafe", f"{rel}: is a symlink that {where} (to {target}) and is "
                                                         "not in the manifest; bundles hold plain files only"))
            elif stat.S_ISDIR(st.st_mode):
                if rel not in listed_dirs:
                    found.append(FileCheck(rel + "/", 0, "extra", f"{rel}/: extra directory not in the manifest; "
                                                                  "remove it or re-export the bundle"))
                    dirnames.remove(name)
            elif rel not in listed:
                found.append(FileCheck(rel, st.st_size, "extra", f"{rel}: extra file not in the manifest; "
                                                                 "remove it or re-export the bundle"))
    return found


def verify(bundle_dir: "str | os.PathLike") -> Manifest:
    """Check the whole bundle (see check_bundle) and return its manifest; the first problem raises a BundleError."""
    report = check_bundle(bundle_dir)
    report.raise_first()
    return report.manifest
