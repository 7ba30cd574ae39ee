"""A graph written to a folder with its weights as ONNX external data, for a runtime that reads them from a file.

Loading a graph from serialized bytes holds its weights three times at once on the way in: the proto, the bytes
and the runtime's parse of them, before the runtime's own copy replaces all three. Written as external data, each
weight goes from its array to a file once, and the runtime reads it from there (onnxruntime maps some of them in,
OpenVINO is asked to read them whole): the proto that reaches the runtime is a few kB, and a graph over protobuf's 2 GB limit (an FP32 LM head of a large vocabulary)
loads as any other. Measured on one Mixtral-bench-sized expert (2048 x 5632) with onnxruntime 1.32, the
resident set while its session was created peaked above where it ended by 27 MB (INT4), 44 MB
(INT8) and 132 MB (FP32) from bytes, and by 5, 11 and 44 MB from a folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
import onnx

from hetrun.once import warn_once

if TYPE_CHECKING:
    from hetrun.runtime.graphs import ExpertGraph

log = logging.getLogger("hetrun")
T = TypeVar("T")
MODEL_FILE, DATA_FILE = "model.onnx", "weights.bin"
ALIGN = 4096  # each tensor starts on a page: a runtime may map it in place
EXTERNAL_FROM = 1024  # initializers held in the proto move out from this many bytes (small constants stay)


def load_through_folder(graph: "bytes | onnx.ModelProto | ExpertGraph | StreamedGraph",
                        from_path: Callable[[str], T], from_bytes: Callable[[bytes], T]) -> T:
    """What a runtime makes of `graph`: from_path(model path) for a proto or an ExpertGraph (consumed: its weights
    are written out) written to a temporary folder, and for a StreamedGraph from its own folder, the folder removed
    once from_path returns; from_bytes for serialized bytes, and for protos and ExpertGraphs where no temporary
    folder can be written (said once: the weights are then held twice while the runtime reads them)."""
    if isinstance(graph, bytes):
        return from_bytes(graph)
    if isinstance(graph, StreamedGraph):
        return graph.read(from_path)
    model, arrays = (graph.model, graph.arrays) if hasattr(graph, "arrays") else (graph, {})
    try:
        folder = tempfile.TemporaryDirectory(prefix="hetrun-graph-", ignore_cleanup_errors=True)
    except OSError as e:  # no writable temporary folder
        return _from_bytes_after(e, model, arrays, from_bytes)
    with folder:
        try:
            path = write_external(model, arrays, folder.name)
        except OSError as e:  # the folder is full: every weight is still in `arrays`
            return _from_bytes_after(e, model, arrays, from_bytes)
        return from_path(str(path))


def _from_bytes_after(e: OSError, model: onnx.ModelProto, arrays: dict, from_bytes: Callable[[bytes], T]) -> T:
    warn_once(("graph files", "no folder"), "graphs load from serialized bytes, which holds each graph's weights "
              "twice while the runtime reads them: no temporary folder to write them to (%s); set TMPDIR to a "
              "writable folder with room for the largest graph", e)
    return from_bytes(filled(model, arrays).SerializeToString())


def write_external(model: onnx.ModelProto, arrays: dict[str, np.ndarray], folder: "str | os.PathLike") -> Path:
    """Write `model` into `folder` as MODEL_FILE, every weight in DATA_FILE beside it; returns the model's path.

    `arrays` holds initializers' bytes kept beside the proto (an in_process ExpertGraph's; their raw_data is
    empty). Initializers the proto holds from EXTERNAL_FROM bytes join them first. Once both files are written the
    arrays are let go (the dict emptied) and `model` keeps only references to DATA_FILE; when a write fails (OSError)
    every weight is still in `arrays`, so filled(model, arrays) gives the whole graph back."""
    folder = Path(folder)
    for t in model.graph.initializer:
        if t.name not in arrays and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_FROM:
            arrays[t.name] = np.frombuffer(t.raw_data, np.uint8)  # the bytes as stored
            t.ClearField("raw_data")
    moved = [t for t in model.graph.initializer if t.name in arrays]
    with open(folder / DATA_FILE, "wb") as data:
        places = [_append(data, arrays[t.name]) for t in moved]  # (offset, length) in DATA_FILE of each
    for t, place in zip(moved, places):
        _refer(t, *place)
    path = folder / MODEL_FILE
    try:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    except OSError:
        for t in moved:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        raise
    arrays.clear()
    return path


def _append(data, array: np.ndarray) -> tuple[int, int]:
    # write the array's bytes into the open DATA_FILE at the next page; (offset, length) [bytes]
    payload = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    offset = -(-data.tell() // ALIGN) * ALIGN
    data.seek(offset)
    data.write(memoryview(payload))
    return offset, payload.nbytes


def _refer(t: onnx.TensorProto, offset: int, length: int) -> None:
    # make initializer `t` read its bytes from DATA_FILE
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


class StreamedGraph:
    """A graph written into a folder while it is built: each weight goes into DATA_FILE when added (its array can be
    let go at once), so a graph of many weights is never held whole in memory. Without `folder`, a temporary folder
    that load_through_folder reads the graph from, then removes; with one (an export's), save() finishes it there.
    Creating one raises OSError where the folder cannot be written."""

    def __init__(self, model: onnx.ModelProto, folder: "str | os.PathLike | None" = None):
        self.model = model
        self._temporary = None if folder is not None else \
            tempfile.TemporaryDirectory(prefix="hetrun-graph-", ignore_cleanup_errors=True)
        self.folder = Path(folder) if folder is not None else Path(self._temporary.name)
        try:
            self._data = open(self.folder / DATA_FILE, "wb")
        except OSError:
            if self._temporary is not None:
                self._temporary.cleanup()
            raise

    def add(self, t: onnx.TensorProto, array: np.ndarray) -> None:
        """Write `array` as the bytes of initializer `t` (a tensor of `model`, its dims and type set)."""
        _refer(t, *_append(self._data, array))

    def save(self) -> Path:
        """Write the model beside its weights; its path."""
        self._data.close()
        path = self.folder / MODEL_FILE
        with open(path, "wb") as f:
            f.write(self.model.SerializeToString())
        return path

    def read(self, from_path: Callable[[str], T]) -> T:
        """from_path(the model's path) once saved; a temporary folder is removed after."""
        try:
            return from_path(str(self.save()))
        finally:
            self.close()

    def close(self) -> None:
        """Stop writing; remove a temporary folder."""
        self._data.close()
        if self._temporary is not None:
            self._temporary.cleanup()


def filled(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with the bytes of the initializers `arrays` holds moved into it (popped from the dict)."""
    for t in model.graph.initializer:
        if t.name in arrays:
            t.raw_data = np.ascontiguousarray(arrays.pop(t.name)).tobytes()
    return model
