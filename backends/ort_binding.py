"""An onnxruntime session's I/O binding over host buffers that stay put between calls (KV caches, rotary tables,
position counters): each name is bound again only when its buffer moved or changed shape, so a decode step binds
what is new in it and nothing else. Takes torch tensors and numpy arrays alike, without importing torch (a graph
bundle runs without it)."""

from __future__ import annotations

import numpy as np

# element types onnxruntime's bind_input/bind_output take, by the buffer's dtype name (torch's print as "torch.x")
_NUMPY_TYPES = {"float32": np.float32, "int32": np.int32, "int64": np.int64}


class HostBindings:
    """session.io_binding() with the names bound so far remembered by (address, shape)."""

    def __init__(self, session):
        self.session = session
        self.binding = session.io_binding()
        self._bound: dict[str, tuple] = {}  # input or output name -> (address, shape) bound

    def input(self, name: str, buffer) -> None:
        """Bind host `buffer` (a contiguous torch tensor or numpy array) as input `name`, unless it already is."""
        self._bind(self.binding.bind_input, name, buffer)

    def output(self, name: str, buffer) -> None:
        """Bind host `buffer` as output `name` (the session writes into it), unless it already is."""
        self._bind(self.binding.bind_output, name, buffer)

    def run(self) -> None:
        """Run the session on what is bound."""
        self.session.run_with_iobinding(self.binding)

    def _bind(self, bind, name: str, buffer) -> None:
        address = buffer.data_ptr() if hasattr(buffer, "data_ptr") else buffer.ctypes.data
        key = (address, tuple(buffer.shape))
        if self._bound.get(name) != key:
            bind(name, "cpu", 0, _NUMPY_TYPES[str(buffer.dtype).removeprefix("torch.")], list(key[1]), address)
            self._bound[name] = key
