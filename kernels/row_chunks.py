"""A weight matrix read as FP32 a chunk of rows at a time, so that quantizers never hold a whole FP32 copy of it.

Rows are quantized independently by every group-wise format here (INT8 blocks, INT4 groups along K), so working
chunk by chunk changes no code or scale. The matrix may be numpy (any float dtype) or a torch tensor of any float
dtype, such as a BF16 LM head; torch is never imported here.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK_BYTES = 4 << 20  # FP32 scratch per chunk: rounding's temporaries are a few chunks (4 MB was faster than 16 too)


def rows_per_chunk(row_bytes: int) -> int:
    """Rows of `row_bytes` each that fit in CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // row_bytes)


def fp32_row_chunks(w, padded_k: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows [n, padded_k] float32) for w [N, K], CHUNK_BYTES at a time; columns K..padded_k are 0."""
    n, k = w.shape
    step = rows_per_chunk(padded_k * 4)
    for r in range(0, n, step):
        chunk = w[r:r + step]
        rows = np.zeros((chunk.shape[0], padded_k), np.float32)  # [n, padded_k]
        rows[:, :k] = chunk.float().numpy() if hasattr(chunk, "numpy") else chunk
        yield r, rows
