"""The checks that a bundle directory is exactly what its manifest says.

Paths in the manifest are relative POSIX paths that stay inside the bundle: no `..`, no absolute paths, no symlinks.
Every listed file has the manifest's size and sha256, nothing unlisted is there, and ONNX files may only reference
external data that is itself a file of the bundle and use only the operator domains hetrun writes.

Nothing is read before its size is known to be the manifest's (from lstat/fstat), and every size and count has a
ceiling (hetrun.bundle.manifest), so a hostile bundle cannot make a check read or hash gigabytes it did not declare.
These checks prove a bundle is intact, not who made it: the checksums live inside the bundle, and whoever edits it
can recompute them. With trusted keys (`--trust KEY.pub`), the manifest must carry a valid signature by one of them
(hetrun.bundle.signing) before anything else is read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto

from hetrun.bundle.manifest import (
    MANIFEST,
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_ENTRIES,
    FileEntry,
    Manifest,
    manifest_plan,
    needed_graphs,
    parse_json,
    parse_manifest,
)
from hetrun.bundle.signing import (
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    fingerprint,
    load_private_key,
    parse_signature,
    signature_document,
    trusted_keys,
    verify_signature,
)
from hetrun.bundle.target import interrupted_swap
from hetrun.errors import BundleError, HetrunError
from hetrun.files import write_atomic
from hetrun.formats import PRECISIONS
from hetrun.profile import Profile, load_profile, parse_yaml

_CHUNK = 4 * 2**20
# Operator domains of the graphs hetrun writes (hetrun.runtime.graphs): standard ONNX, and onnxruntime's contrib ops
# (MatMulNBits). A graph with any other domain needs a custom-op library no backend here loads.
GRAPH_DOMAINS = ("", "ai.onnx", "com.microsoft")


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
        old = interrupted_swap(p)
        if old is not None:
            raise BundleError(f"bundle '{p}' does not exist: an `hetrun export --force` was killed while it replaced "
                              f"it, and left the previous bundle at '{old}'; move it back with `mv {old} {p}`, or "
                              "export again")
        raise BundleError(f"bundle '{p}' does not exist; write one with `hetrun export MODEL --profile P -o {p}`")
    if not p.is_dir():
        raise BundleError(f"bundle '{p}' is not a directory; a bundle is the directory `hetrun export` wrote")
    return p.resolve()


# ---- sizes and digests ----------------------------------------------------------------------------

def read_file(root: Path, rel: str, expected: FileEntry | None = None, limit: int | None = None) -> bytes:
    """A bundle file's bytes, read without following symlinks; checked against its manifest entry when given.

    The size (fstat) is compared with the manifest's, or with `limit`, before a byte is read.
    """
    path = resolve_inside(root, rel, rel)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise BundleError(f"{rel}: cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if expected is not None:
            _check_size(rel, size, expected)
            data = f.read(expected.size + 1)  # +1: a file that grew since fstat is caught below
        else:
            if limit is None:
                raise ValueError("read_file needs the manifest entry or a limit")
            if size > limit:
                raise BundleError(f"{rel}: is {size} bytes, larger than the {limit} hetrun reads; not a hetrun file")
            data = f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleError(f"{rel}: is larger than {limit} bytes; not a hetrun file")
    if expected is not None:
        check_bytes(rel, data, expected)
    return data


def _check_size(rel: str, size: int, expected: FileEntry) -> None:
    if size != expected.size:
        raise _tagged("changed", f"{rel}: has {size} bytes, the manifest says {expected.size}; "
                                 "the file was changed or truncated: re-export the bundle")


def check_bytes(rel: str, data: bytes, expected: FileEntry) -> None:
    """Raise a BundleError naming `rel` unless `data` has the manifest's size and sha256."""
    _check_size(rel, len(data), expected)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.sha256:
        raise _tagged("changed", f"{rel}: sha256 {digest[:12]}... does not match the manifest's {expected.sha256[:12]}...; "
                          "the file was changed: re-export the bundle")


def file_digest(path: Path, rel: str | None = None, expected: FileEntry | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks without following a final symlink.

    With `expected`, a size other than the manifest's is refused (BundleError naming `rel`) before any byte is read,
    and no more than that many bytes are hashed.
    """
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if expected is not None:
            _check_size(rel or str(path), os.fstat(f.fileno()).st_size, expected)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if expected is not None and size > expected.size:  # grew since fstat
                _check_size(rel or str(path), size, expected)
    return h.hexdigest(), size


# ---- the manifest -------------------------------------------------------------------------------

def read_manifest(root: Path, trust=None) -> Manifest:
    """Parse and validate manifest.json: schema, paths, and that it names every graph its plan needs.

    With `trust` (public key files or keys), the manifest's bytes must first carry a valid signature by one of them.
    """
    return _read_manifest(root, trust)[0]


def _read_manifest(root: Path, trust) -> tuple[Manifest, dict, bytes]:
    """(manifest, signature status, bytes) from one read of manifest.json: the bytes verified are those parsed."""
    try:
        st = os.lstat(root / MANIFEST)
    except FileNotFoundError:
        raise BundleError(f"{MANIFEST}: missing in '{root}'; it is not a hetrun bundle, or its export did not finish "
                          "(re-run `hetrun export`)") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{MANIFEST}: is not a regular file (symlinks are refused)")
    data = read_file(root, MANIFEST, limit=MAX_MANIFEST_BYTES)
    signature = _signature_bytes(root)
    if trust is not None:
        key = verify_signature(data, signature, trusted_keys(trust))
        status = {"signed": True, "key": key, "verified": True, "detail": "signed by a trusted key"}
    elif signature is None:
        status = {"signed": False, "key": None, "verified": False,
                  "detail": "unsigned: trust it only as far as you trust where it came from"}
    else:
        try:
            key = parse_signature(signature)["key"]
            status = {"signed": True, "key": key, "verified": False,
                      "detail": "signed, not verified: pass --trust with the signer's public key to check it"}
        except BundleError as e:
            status = {"signed": True, "key": None, "verified": False, "detail": str(e)}
    man = parse_manifest(data)
    _check_consistency(man)
    return man, status, data


def _signature_bytes(root: Path) -> bytes | None:
    """manifest.sig's bytes, or None when the bundle has none."""
    try:
        os.lstat(root / SIGNATURE)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundleError(f"{SIGNATURE}: cannot read it: {e.strerror}") from None
    return read_file(root, SIGNATURE, limit=MAX_SIGNATURE_BYTES)


def _check_consistency(man: Manifest) -> None:
    for rel in man.files:
        check_relative(rel, f"{MANIFEST}: files")
        if rel in (MANIFEST, SIGNATURE):
            raise BundleError(f"{MANIFEST}: the manifest cannot list itself or its signature ('{rel}') under 'files'")
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
        if man.files[e.path].size > MAX_GRAPH_BYTES:
            raise BundleError(f"{MANIFEST}: expert graph '{e.path}' is {man.files[e.path].size} bytes, more than the "
                              f"{MAX_GRAPH_BYTES} one ONNX graph can hold; keep large weights as external data")
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
    unused = set(man.targets.values()) - {e.target for e in man.experts}
    if unused:
        raise BundleError(f"{MANIFEST}: 'targets' names graph target '{sorted(unused)[0][:40]}', for which the bundle "
                          "has no graph; the manifest was edited: re-export")
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
    data = parse_yaml(text, man.profile, BundleError, "bundled profile")  # no aliases, no duplicate keys
    try:
        return load_profile(data if isinstance(data, dict) else {"profile": data})
    except HetrunError as e:
        raise BundleError(f"{man.profile}: {e}") from None


# ---- headers ------------------------------------------------------------------------------------

def check_safetensors_header(rel: str, path: Path, size: int) -> dict:
    """The safetensors header (tensor name -> dtype, shape, data_offsets) of a bundle file, or a BundleError naming
    `rel` unless it starts with a well-formed one (no pickle, ever)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 * 2**20):
            raise BundleError(f"{rel}: is not a valid safetensors file (bad header length)")
        try:
            header = parse_json(f.read(n), rel)
        except BundleError as e:
            raise BundleError(f"{rel}: is not a valid safetensors file (header: {str(e).split(': ', 1)[-1]})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{rel}: is not a valid safetensors file (header is not an object)")
    for key, t in header.items():
        if key == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise BundleError(f"{rel}: is not a valid safetensors file (tensor '{str(key)[:60]}' lies outside it)")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BundleError(f"{rel}: is not a valid safetensors file (tensor '{str(key)[:60]}' has no shape)")
    return header


def _json_object(rel: str, data: bytes) -> None:
    if not isinstance(parse_json(data, rel), dict):
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


def check_graph_ops(rel: str, model) -> None:
    """A BundleError naming `rel` unless every operator of the graph is from a domain hetrun writes (GRAPH_DOMAINS)
    and the standard opset is one this onnx knows: a custom-op domain needs a library no backend here loads."""
    for o in model.opset_import:
        if o.domain not in GRAPH_DOMAINS:
            raise _tagged("unsafe", f"{rel}: imports operator domain '{o.domain[:60]}', which hetrun never writes "
                                    f"(it writes {', '.join(repr(d) for d in GRAPH_DOMAINS)}); refusing the graph")
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= onnx.defs.onnx_opset_version():
            raise BundleError(f"{rel}: uses ONNX opset {o.version}; this onnx knows 1..{onnx.defs.onnx_opset_version()}")
    if len(model.functions):
        raise _tagged("unsafe", f"{rel}: defines ONNX functions, which hetrun never writes; refusing the graph")
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            if n.domain not in GRAPH_DOMAINS:
                raise _tagged("unsafe", f"{rel}: node '{n.name[:40]}' is operator '{n.op_type[:40]}' of custom domain "
                                        f"'{n.domain[:60]}', which hetrun never writes; refusing the graph")
            for a in n.attribute:
                stack.extend([a.g] if a.HasField("g") else [])
                stack.extend(a.graphs)


def _check_graph_width(rel: str, model, hidden) -> None:
    """The graph's input is [tokens, hidden] with the width its manifest entry states (what backends charge for)."""
    if hidden is None:
        return
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(dims) != 2 or dims[1].dim_value != hidden:
        shown = [d.dim_value or d.dim_param for d in dims]
        raise BundleError(f"{rel}: takes input {shown}, but the manifest says its experts are {hidden} wide")


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
    signature: dict = field(default_factory=dict)  # signed, key, verified, detail
    manifest_sha256: str = ""  # of the manifest.json bytes that were checked

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


def check_bundle(bundle_dir: "str | os.PathLike", trust=None) -> BundleReport:
    """Check every file: the manifest is valid, each listed file is present, unchanged and inside the bundle, no file
    is there that the manifest does not list, and ONNX files use no external data from outside the bundle and no
    custom operator domain. Sizes are compared (lstat) before any file is read or hashed.

    With `trust` (public key files or Ed25519 keys), a manifest that no trusted key signed raises BundleError before
    any other file is read. A malformed or missing manifest raises BundleError; per-file problems are collected in
    the report.
    """
    root = bundle_root(bundle_dir)
    man, signature, data = _read_manifest(root, trust)
    report = BundleReport(root, man, signature=signature, manifest_sha256=hashlib.sha256(data).hexdigest())
    onnx_paths = {e.path for e in man.experts}
    hidden = {e.path: e.meta.get("hidden") for e in man.experts}
    for rel, entry in sorted(man.files.items()):
        try:
            path = resolve_inside(root, rel, rel)
            _check_size(rel, os.lstat(path).st_size, entry)
            if rel in onnx_paths or rel.endswith(".onnx"):  # read once: checksum, then parse
                if entry.size > MAX_GRAPH_BYTES:
                    raise BundleError(f"{rel}: is {entry.size} bytes, more than one ONNX graph can hold")
                model = parse_onnx(rel, read_file(root, rel, entry))
                check_graph_ops(rel, model)
                _check_graph_width(rel, model, hidden.get(rel))
                check_external_data(root, rel, model, man.files)
            else:  # possibly large: checksum in chunks
                digest, size = file_digest(path, rel, entry)
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
    listed = set(man.files) | {MANIFEST, SIGNATURE}
    listed_dirs = {str(parent) for p in listed for parent in PurePosixPath(p).parents} - {"."}
    found = []
    seen = 0
    for here, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(here, root).replace(os.sep, "/")
        seen += len(dirnames) + len(filenames)
        if seen > 2 * MAX_MANIFEST_ENTRIES:
            found.append(FileCheck(rel_dir + "/", 0, "extra", f"the bundle directory holds more than "
                                   f"{2 * MAX_MANIFEST_ENTRIES} entries; stopped looking at '{rel_dir}/'"))
            break
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


def verify(bundle_dir: "str | os.PathLike", trust=None) -> Manifest:
    """Check the whole bundle (see check_bundle) and return its manifest; the first problem raises a BundleError.

    With `trust` (public key files), the bundle must also carry a valid signature by one of those keys."""
    report = check_bundle(bundle_dir, trust)
    report.raise_first()
    return report.manifest


def sign_bundle(bundle_dir: "str | os.PathLike", key_path: "str | os.PathLike") -> str:
    """Check the whole bundle, then sign exactly the manifest bytes that passed with an Ed25519 private key file
    (writes manifest.sig atomically, replacing an older signature). Returns the signing key's fingerprint."""
    key = load_private_key(key_path)
    report = check_bundle(bundle_dir)
    report.raise_first()
    data = read_file(report.root, MANIFEST, limit=MAX_MANIFEST_BYTES)
    if hashlib.sha256(data).hexdigest() != report.manifest_sha256:
        raise BundleError(f"{MANIFEST}: changed while the bundle was being checked; sign it again")
    write_atomic(report.root / SIGNATURE, signature_document(data, key))
    return fingerprint(key.public_key())
