"""A graph bundle -- a model exported as one onnxruntime graph (`hetrun export --graph`, hetrun.bundle.graph_export)
-- run without torch or transformers: onnxruntime, numpy and hetrun's light modules alone.

A process that imports torch and transformers holds about 0.4 GB before it reads a weight (0.44 GB measured on the
`bench generate` model's host); a graph bundle's runner about 0.05 GB, so a small model's resident memory is mostly
its weights, as with llama.cpp. Layout of the folder:

    manifest.json    format, the model's shape, precisions, end-of-sequence ids, sha256 + size of every other file
    model.onnx       the graph (hetrun.runtime.model_graph), its weights as external data in
    weights.bin
    embedding.npy    the embedding table [V, D] float32, never loaded: each token's row is read from the file
    rope_cos.npy     the rotary tables [P, Dh/2] float32 GroupQueryAttention reads, for P positions
    rope_sin.npy

Every file is checked against the manifest (size, sha256) before anything is loaded: a changed or truncated file
is a one-line error naming it. That proves the folder is what was exported, not who exported it (anyone who edits
it can rewrite the manifest); a signature (`hetrun export --graph --sign KEY`, checked with `hetrun run --trust
KEY.pub`, as for bundles: manifest.sig over manifest.json's bytes) proves who did.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from hetrun.backends.graph_files import DATA_FILE as WEIGHTS
from hetrun.backends.graph_files import MODEL_FILE as MODEL
from hetrun.backends.ort_binding import HostBindings
from hetrun.bundle.integrity import file_digest, read_file
from hetrun.bundle.manifest import MANIFEST, FileEntry
from hetrun.errors import BundleError, HetrunError
from hetrun.files import strict_json
from hetrun.profile import StrictModel, first_error

GRAPH_FORMAT = "hetrun-model-graph"
FORMAT_VERSION = 1
EMBEDDING, ROPE_COS, ROPE_SIN = "embedding.npy", "rope_cos.npy", "rope_sin.npy"
FILES = (MODEL, WEIGHTS, EMBEDDING, ROPE_COS, ROPE_SIN)
MAX_MANIFEST_BYTES = 2**20  # (a signature's bytes too)


class GraphShape(StrictModel):
    layers: int = Field(ge=1, le=1024)
    hidden: int = Field(ge=1, le=2**20)
    heads: int = Field(ge=1, le=4096)
    kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=2, le=4096)
    experts: int = Field(ge=1, le=2**16)
    top_k: int = Field(ge=1, le=2**16)
    vocab: int = Field(ge=1, le=2**24)


class GraphManifest(StrictModel):
    format: Literal["hetrun-model-graph"]
    format_version: int
    hetrun_version: str
    created_utc: str
    model: str  # the preset or directory it was exported from
    profile: str  # the profile's name
    precision: str  # the experts'
    dense_precision: str  # the dense linear layers'
    shape: GraphShape
    positions: int = Field(ge=1, le=2**24)  # rows of the rotary tables: the longest sequence it runs
    eos_token_id: list[int] = []
    files: dict[str, FileEntry]


def read_graph_manifest(folder: "str | os.PathLike", trust=None) -> GraphManifest:
    """The manifest of the graph bundle at `folder`, checked (one-line BundleError otherwise). With `trust` (public
    key files or keys), its bytes must first carry a valid signature by one of them (hetrun.bundle.signing)."""
    return _manifest_and_bytes(folder, trust)[0]


def check_graph_bundle(folder: "str | os.PathLike", trust=None) -> tuple[GraphManifest, bytes]:
    """(manifest, the manifest's bytes) of the graph bundle at `folder` once its manifest (and with `trust` its
    signature) and every file it lists have passed (size, sha256, plain file); a one-line BundleError otherwise."""
    root = Path(folder)
    man, data = _manifest_and_bytes(root, trust)
    for rel in FILES:
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"graph bundle '{folder}': {rel} is missing or not a plain file; export it again")
        digest, _ = file_digest(path, rel, man.files[rel])
        if digest != man.files[rel].sha256:
            raise BundleError(f"graph bundle '{folder}': {rel} does not match its manifest (changed after export); "
                              "export it again")
    return man, data


def sign_graph_bundle(folder: "str | os.PathLike", key_path: "str | os.PathLike") -> str:
    """Check the whole graph bundle, then sign exactly the manifest bytes that passed (manifest.sig, written
    atomically, replacing an older signature); the signing key's fingerprint."""
    from hetrun.bundle.signing import SIGNATURE, fingerprint, load_private_key, signature_document
    from hetrun.files import write_atomic

    key = load_private_key(key_path)
    _, data = check_graph_bundle(folder)
    write_atomic(Path(folder) / SIGNATURE, signature_document(data, key))
    return fingerprint(key.public_key())


def _manifest_and_bytes(folder: "str | os.PathLike", trust) -> tuple[GraphManifest, bytes]:
    root = Path(folder)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"'{folder}' is not a graph bundle: it has no {MANIFEST}; write one with `hetrun export "
                          "MODEL --profile P -o DIR --graph`")
    data = read_file(root, MANIFEST, limit=MAX_MANIFEST_BYTES)
    if trust is not None:
        from hetrun.bundle.signing import SIGNATURE, trusted_keys, verify_signature  # cryptography: only to check

        signature = read_file(root, SIGNATURE, limit=MAX_MANIFEST_BYTES) if (root / SIGNATURE).exists() else None
        verify_signature(data, signature, trusted_keys(trust))
    try:
        doc = strict_json(data)
    except ValueError as e:
        raise BundleError(f"graph bundle '{folder}': {MANIFEST} is not valid JSON ({e})") from None
    try:
        man = GraphManifest.model_validate(doc)
    except ValidationError as e:
        where, msg = first_error(e)
        raise BundleError(f"graph bundle '{folder}': {MANIFEST}: {where}: {msg}") from None
    if man.format_version != FORMAT_VERSION:
        raise BundleError(f"graph bundle '{folder}' has format version {man.format_version}; this hetrun reads "
                          f"{FORMAT_VERSION}: export it again with this hetrun")
    missing = [f for f in FILES if f not in man.files]
    if missing or set(man.files) - set(FILES):
        raise BundleError(f"graph bundle '{folder}': {MANIFEST} must list exactly {', '.join(FILES)}")
    return man, data


def is_graph_bundle(folder: "str | os.PathLike") -> bool:
    """Whether `folder`'s manifest says it is a graph bundle (nothing else is checked)."""
    try:
        with open(Path(folder) / MANIFEST, "rb") as f:
            return json.loads(f.read(MAX_MANIFEST_BYTES)).get("format") == GRAPH_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class GraphModel:
    """A graph bundle loaded for greedy generation on this CPU (checked first, file by file; with `trust`, its
    signature before anything else)."""

    def __init__(self, folder: "str | os.PathLike", threads: int | None = None, trust=None):
        import onnxruntime as ort  # heavy: only when a bundle loads

        from hetrun.backends.ort_threads import session_options

        root = Path(folder)
        self.manifest = man = check_graph_bundle(root, trust)[0]
        sh = man.shape
        self._embedding, self._embedding_at = self._table(root, EMBEDDING, (sh.vocab, sh.hidden))  # [V, D] on disk
        self.cos = self._whole(root, ROPE_COS, (man.positions, sh.head_dim // 2))  # [P, Dh/2]
        self.sin = self._whole(root, ROPE_SIN, (man.positions, sh.head_dim // 2))
        try:
            self.session = ort.InferenceSession(str(root / MODEL), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own classes for a graph it cannot load
            raise BundleError(f"graph bundle '{folder}': onnxruntime cannot load {MODEL}: "
                              f"{str(e).splitlines()[0][:200]}") from None
        self.folder = str(folder)
        self._check_graph()

    def _check_graph(self) -> None:
        # the graph's inputs and outputs are what the manifest's shape says (a manifest edited without a signature
        # could say otherwise, and the first call would fail inside onnxruntime)
        sh = self.manifest.shape
        cache = [1, sh.kv_heads, "C", sh.head_dim]
        want_in = {"hidden": ["S", sh.hidden], "rows": ["R"], "seqlens_k": [1], "total_sequence_length": [1],
                   "cos_cache": ["P", sh.head_dim // 2], "sin_cache": ["P", sh.head_dim // 2],
                   **{f"past_{kv}_{i}": cache for i in range(sh.layers) for kv in ("key", "value")}}
        want_out = {"logits": ["R", sh.vocab], "expert_ids": [sh.layers, "S", sh.top_k],
                    **{f"present_{kv}_{i}": cache for i in range(sh.layers) for kv in ("key", "value")}}
        for want, got in ((want_in, self.session.get_inputs()), (want_out, self.session.get_outputs())):
            found = {a.name: list(a.shape) for a in got}
            if found != want:
                raise BundleError(f"graph bundle '{self.folder}': {MODEL} does not take and give what its manifest "
                                  "describes (layers, heads, hidden size or vocabulary differ): export it again")

    def close(self) -> None:
        """Let the embedding table's file go (the session goes with the object)."""
        if self._embedding >= 0:
            os.close(self._embedding)
            self._embedding = -1

    def __del__(self):
        if getattr(self, "_embedding", -1) >= 0:
            self.close()

    def _table(self, root: Path, rel: str, shape: tuple[int, int]) -> "tuple[int, int]":
        # (open file descriptor, offset of the data) of a float32 [rows, cols] .npy table, checked
        fd = -1
        try:
            fd = os.open(root / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(os.dup(fd), "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                found, fortran, dtype = read_header(f)
                offset, size = f.tell(), os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            if fd >= 0:
                os.close(fd)
            raise BundleError(f"graph bundle '{root}': {rel} is not a numpy array file ({e})") from None
        if tuple(found) != shape or dtype != np.float32 or fortran or size - offset != 4 * shape[0] * shape[1]:
            os.close(fd)
            raise BundleError(f"graph bundle '{root}': {rel} holds {dtype} {list(found)}, not float32 {list(shape)}")
        return fd, offset

    def _whole(self, root: Path, rel: str, shape: tuple[int, int]) -> np.ndarray:
        # a float32 [rows, cols] .npy table, checked, then read whole
        os.close(self._table(root, rel, shape)[0])
        return np.load(root / rel, allow_pickle=False)

    def rows(self, ids: "list[int] | range") -> np.ndarray:
        """Embedding rows [n, D] of token `ids`, read from the file: the table is never mapped (mapped, the kernel
        brought in about 1.2 MB of it per token looked up, 73 MB of the benchmark model's 131 MB table after 64
        tokens), and the page cache it reads through is not this process's memory."""
        return _read_rows(self._embedding, self._embedding_at, self.manifest.shape.hidden, ids)

    def generate(self, ids: list[int], max_new_tokens: int, eos: "set[int] | None" = None) -> list[int]:
        """Greedy: up to `max_new_tokens` new token ids after the prompt `ids`, stopping after an end-of-sequence id
        (the manifest's, or `eos`)."""
        return self.run(ids, max_new_tokens, eos)[0]

    def run(self, ids: list[int], max_new_tokens: int, eos: "set[int] | None" = None) -> tuple[list[int], np.ndarray]:
        """(the new token ids, the logits [V] at the prompt's last position) of greedy generation."""
        sh, man = self.manifest.shape, self.manifest
        eos = set(man.eos_token_id) if eos is None else set(eos)
        if not ids or min(ids) < 0 or max(ids) >= sh.vocab:
            raise HetrunError(f"prompt token ids must be between 0 and {sh.vocab - 1} (the model's vocabulary), and "
                              "there must be one at least")
        total = len(ids) + max_new_tokens
        if total > man.positions:
            raise HetrunError(f"{len(ids)} prompt tokens and {max_new_tokens} new ones exceed the {man.positions} "
                              f"positions graph bundle '{self.folder}' was exported for")
        step = _Steps(self, total)
        logits = step(self.rows(ids), len(ids) - 1)  # [1, V]
        first, out = logits[0].copy(), []
        while len(out) < max_new_tokens:
            token = int(logits[0].argmax())
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
            logits = step(self.rows([token]), 0)
        return out, first


class _Steps:
    """Forward passes of one sequence: KV buffers for `total` tokens, bound once; each call binds its tokens."""

    def __init__(self, model: GraphModel, total: int):
        sh = model.manifest.shape
        self.model, self.cached = model, 0
        self.bindings = b = HostBindings(model.session)
        self.lengths, self.total = np.zeros(1, np.int32), np.zeros(1, np.int32)
        self.logits = np.empty((1, sh.vocab), np.float32)  # [1, V]
        self.hidden = np.empty((1, sh.hidden), np.float32)  # [1, D] a decode step's token
        self.rows = np.zeros(1, np.int64)  # [1] the position whose logits are wanted
        self.kv = [np.empty((1, sh.kv_heads, total, sh.head_dim), np.float32) for _ in range(2 * sh.layers)]
        for name, a in (("seqlens_k", self.lengths), ("total_sequence_length", self.total), ("cos_cache", model.cos),
                        ("sin_cache", model.sin), ("rows", self.rows)):
            b.input(name, a)
        b.output("logits", self.logits)
        for i in range(sh.layers):
            for j, kv in enumerate(("key", "value")):
                b.input(f"past_{kv}_{i}", self.kv[2 * i + j])
                b.output(f"present_{kv}_{i}", self.kv[2 * i + j])
        self.ids = np.empty((sh.layers, 1, sh.top_k), np.int64)

    def __call__(self, hidden: np.ndarray, row: int) -> np.ndarray:
        # the logits [1, V] of position `row` of `hidden` [S, D], the tokens after those cached
        s = hidden.shape[0]
        if s == 1:
            self.hidden[:] = hidden
            hidden = self.hidden
        if self.ids.shape[1] != s:
            self.ids = np.empty((self.ids.shape[0], s, self.ids.shape[2]), np.int64)  # [L, S, K]
        self.bindings.output("expert_ids", self.ids)
        self.bindings.input("hidden", hidden)
        self.rows[0] = row
        self.lengths[0], self.total[0] = self.cached + s - 1, self.cached + s
        self.bindings.run()
        self.cached += s
        if not math.isfinite(float(self.logits.sum())) and not np.isfinite(self.logits).all():
            raise HetrunError(f"graph bundle '{self.model.folder}' produced NaN or infinite logits (a precision too "
                              "narrow for its activations?); export it with --precision fp32 and compare")
        return self.logits


def _read_rows(fd: int, offset: int, width: int, ids) -> np.ndarray:
    # rows [n, width] float32 of the table at `offset` in file `fd`, one read each
    out = np.empty((len(ids), width), np.float32)
    row = 4 * width
    view = memoryview(out).cast("B")
    for k, i in enumerate(ids):
        got = os.preadv(fd, [view[k * row:(k + 1) * row]], offset + row * i)
        if got != row:
            raise BundleError(f"graph bundle table ended early (read {got} of {row} bytes): export it again")
    return out
