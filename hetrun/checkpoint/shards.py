"""A checkpoint's safetensors files: the index, every shard's header checked up front, tensors read on demand.

Tensors are read with pread(2) into memory the caller owns, never through a memory map: a map keeps every page it
touched resident (and counted in the process's RSS) for as long as it is open, so reading a model expert by
expert through one would end up holding the whole model. Reading what one expert needs and dropping it keeps the
process at the size of what it converts and keeps.

Names are resolved through `model.safetensors.index.json`'s weight_map only (shard file names vary: DeepSeek's
`-of-000163`); a directory with a single `model.safetensors` and no index works too. Every problem is a one-line
CheckpointError naming the file and the tensor: a missing shard, a truncated or corrupt file, an index that names a
tensor its shard lacks.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from hetrun.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 2**20  # safetensors caps headers at 100 MB
OWN_PAGES_BYTES = 1 << 20  # reads this large get pages of their own (_read_buffer)

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1), "F8_E8M0": (torch.float8_e8m0fnu, 1),
    "U16": (torch.uint16, 2), "U32": (torch.uint32, 4), "U64": (torch.uint64, 8),
}
# numpy views of dtypes numpy lacks
_NUMPY = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
          "F8_E8M0": ml_dtypes.float8_e8m0fnu}
FLOATS = ("F32", "BF16", "F16", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its shard, dtype code, shape, and absolute byte range in the file."""

    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors code: BF16, F8_E4M3, I32, ...
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class Shards:
    """The tensors of one checkpoint directory, by name, read on demand; `reads` counts what was read."""

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root)
        self.weight_map, self.infos = _weight_map(self.root)
        if not self.infos:  # sharded: every shard's header; a single file's was read with its tensor names
            for file in sorted(set(self.weight_map.values())):
                self.infos.update(_read_header(self.root, file))
        lacking = [n for n, f in self.weight_map.items() if n not in self.infos or self.infos[n].file != f]
        if lacking:
            raise CheckpointError(f"{self.root / INDEX}: names tensor '{lacking[0]}' in shard "
                                  f"'{self.weight_map[lacking[0]]}', which does not hold it; the checkpoint is "
                                  "incomplete or its index is stale")
        self.reads: Counter[str] = Counter()  # tensor name -> times read (tests count what a process read)
        self.bytes_read = 0
        self.read_s = 0.0  # seconds spent in reads (hetrun bench load: read throughput against dd)

    def narrow_to(self, prefix: str) -> None:
        """Keep only the tensors named under `prefix` (a multimodal checkpoint's language model), named without it."""
        self.weight_map = {n.removeprefix(prefix): f for n, f in self.weight_map.items() if n.startswith(prefix)}
        self.infos = {n.removeprefix(prefix): i for n, i in self.infos.items() if n.startswith(prefix)}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name` lies; a CheckpointError when the checkpoint has no such tensor."""
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"checkpoint '{self.root}' has no tensor '{name}'") from None

    def read(self, name: str, index: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name` (or its slice `index` along the first dimension; then of that, `rows` along the next first
        one, a step-1 slice) in a fresh tensor of its stored dtype."""
        info = self.info(name)
        start, nbytes, shape = info.start, info.nbytes, info.shape
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CheckpointError(f"{info.file}: tensor '{name}' of shape {list(shape)} has no row {index}")
            nbytes //= shape[0]
            start += index * nbytes
            shape = shape[1:]
        first = 0
        if rows is not None:
            first, stop, _ = rows.indices(shape[0])
            stop = max(first, stop)
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, nbytes, shape = start + first * row_bytes, (stop - first) * row_bytes, (stop - first, *shape[1:])
        buf = _read_buffer(nbytes)  # [nbytes] uint8
        view = memoryview(buf.numpy())
        path = self.root / info.file
        t0 = time.perf_counter()
        fd = _open(path)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], start + done)
                if n <= 0:
                    raise _truncated(path, name, start + nbytes, start + done)
                done += n
        finally:
            os.close(fd)
        self.read_s += time.perf_counter() - t0
        self.reads[name] += rows is None or (first == 0 and nbytes > 0)  # a tensor read by rows counts once
        self.bytes_read += nbytes
        return buf.view(DTYPES[info.dtype][0]).reshape(shape)

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor `name` as a private, copy-on-write memory map of its shard (its stored dtype): pages are read from
        the file when first touched and only those are resident, as llama.cpp maps its weights; for a table that is
        looked up, not read whole, at every step (the input embeddings). The shard must not change while mapped."""
        info = self.info(name)
        dtype, width = DTYPES[info.dtype]
        if info.start % width or not hasattr(mmap, "MAP_PRIVATE"):
            return self.read(name)  # unaligned values (or no mmap flags here): read as any other
        path = self.root / info.file
        fd = _open(path)
        try:
            size = os.fstat(fd).st_size
            if size < info.start + info.nbytes:  # a map past the end would fault on first touch
                raise _truncated(path, name, info.start + info.nbytes, size)
            first = info.start - info.start % mmap.ALLOCATIONGRANULARITY
            pages = mmap.mmap(fd, info.start + info.nbytes - first, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=first)
        finally:
            os.close(fd)
        self.reads[name] += 1
        return torch.frombuffer(pages, dtype=dtype, count=info.nbytes // width,
                                offset=info.start - first).reshape(info.shape)

    def numpy(self, name: str, index: int | None = None, rows: slice | None = None) -> np.ndarray:
        """read() as a numpy array; BF16 and FP8 come as ml_dtypes arrays of the same bytes."""
        t = self.read(name, index, rows)
        code = self.info(name).dtype
        return t.view(torch.uint8).numpy().view(_NUMPY[code]) if code in _NUMPY else t.numpy()


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code (ml_dtypes' for BF16 and FP8, which numpy lacks)."""
    return np.dtype(_NUMPY[code]) if code in _NUMPY else torch.empty(0, dtype=DTYPES[code][0]).numpy().dtype


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None


def _truncated(path: Path, name: str, end: int, size: int) -> CheckpointError:
    return CheckpointError(f"{path}: is truncated: tensor '{name}' ends at byte {end}, the file ends at byte {size}; "
                           "re-download or re-save the checkpoint")


def _weight_map(root: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    # (tensor name -> shard file, the single file's tensor infos when there is no index: its header, read once)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory '{root}' not found")
    index = root / INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{index}: is not valid JSON ({' '.join(str(e).split())[:120]})") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in wmap.items()):
            raise CheckpointError(f"{index}: has no weight_map of tensor names to shard files")
        for name, file in wmap.items():
            if Path(file).name != file or file in (".", ".."):
                raise CheckpointError(f"{index}: shard '{file[:80]}' of tensor '{name[:80]}' is not a file name in "
                                      "the checkpoint directory")
        missing = sorted({f for f in wmap.values() if not (root / f).is_file()})
        if missing:
            first = next(n for n, f in wmap.items() if f == missing[0])
            more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
            raise CheckpointError(f"{index}: shard '{missing[0]}' (tensor '{first}') is missing{more}; "
                                  "re-download the checkpoint")
        return dict(wmap), {}
    if (root / SINGLE).is_file():
        infos = _read_header(root, SINGLE)
        return {name: SINGLE for name in infos}, infos
    if any(root.glob("*.safetensors")):
        raise CheckpointError(f"'{root}' has safetensors files but neither {INDEX} nor {SINGLE}; save the model with "
                              "save_pretrained, which writes the index")
    raise CheckpointError(f"'{root}' has no *.safetensors weights; hetrun reads safetensors only (no pickle files): "
                          "re-save the model with save_pretrained(..., safe_serialization=True)")


def _read_header(root: Path, file: str) -> dict[str, TensorInfo]:
    """Every tensor of one shard, its header checked: known dtypes, sizes that match shapes, data inside the file."""
    path = root / file
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: is not a safetensors file (header length {n} in a file of {size} "
                                      "bytes); it is truncated or corrupt")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: has a corrupt safetensors header ({' '.join(str(e).split())[:100]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: has a corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name[:80]}' has a malformed header entry") from None
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name[:80]}' has dtype {str(code)[:20]}, which hetrun cannot "
                                  f"read (known: {', '.join(DTYPES)})")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[code][1]
        if begin < 0 or end - begin != want or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: tensor '{name[:80]}' ({code} {list(shape)}) spans {end - begin} bytes, "
                                  f"its shape needs {want}; the file is corrupt")
        if base + end > size:
            raise _truncated(path, name[:80], base + end, size)
        out[name] = TensorInfo(name, file, code, shape, base + begin, end - begin)
    return out


class StoredRows:
    """A 2-D tensor of a checkpoint that is read when sliced, a range of rows at a time (numpy of its stored dtype:
    BF16 as ml_dtypes.bfloat16), or whole by np.asarray: row-wise quantizers never hold all of it at once."""

    def __init__(self, shards: Shards, name: str):
        self.shards, self.name = shards, name
        info = shards.info(name)
        self.shape, self.dtype = info.shape, numpy_dtype(info.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("StoredRows takes a slice of rows with step 1")
        return self.shards.numpy(self.name, rows=rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.shards.numpy(self.name)
        return whole if dtype is None else whole.astype(dtype, copy=False)


def _read_buffer(nbytes: int) -> torch.Tensor:
    """A fresh uint8 tensor of nbytes to read a tensor into. Large ones are pages of their own (an anonymous mmap,
    unmapped when the tensor goes): read, converted and dropped one after another while experts are compiled, heap
    buffers would each leave their pages resident in malloc's free lists until the next malloc_trim."""
    if nbytes < OWN_PAGES_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MB pages where the kernel has them: a 23 MB read 7 ms, not 24 (faults)
        pages.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8)
