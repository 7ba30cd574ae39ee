"""GPTQ (Frantar et al., 2022): INT4 weights quantized column by column, each column's rounding
error spread over the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X^T X.
"""

from __future__ import annotations

import numpy as np

from .int4 import Int4Tensor, int4_codes, int4_grid


def gptq_quantize_int4(
    w: np.ndarray,
    x_calib: np.ndarray,
    group: int = 128,
    symmetric: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> Int4Tensor:
    """Quantize ``w [N, K]`` to group-wise INT4 so that ``x_calib [M, K] @ w.T`` changes least.

    - Each group's grid (scale, zero point) comes from its weights as updated by the errors of
      the groups before it, the moment the group's first column is reached.
    - ``damp`` adds ``damp * mean(diag(H))`` to H's diagonal.
    - Inputs that are always zero (``H_ii = 0``) have their weights set to 0 (they never matter).
    - Updates are applied lazily in batches of ``block`` columns, rounded to a multiple of
      ``group`` so that no group straddles two batches.
    """
    w = np.array(w, dtype=np.float64)  # [N, K], updated in place
    x = np.asarray(x_calib, dtype=np.float64)  # [M, K]
    n, k = w.shape
    h = 2.0 * x.T @ x  # [K, K]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # [K, K] upper, H^-1 = U^T U

    n_groups = -(-k // group)
    codes = np.zeros((n, k), dtype=np.uint8)
    scale = np.zeros((n, n_groups), dtype=np.float32)
    zp = np.zeros((n, n_groups), dtype=np.uint8)
    batch = max(group, block // group * group)
    for b0 in range(0, k, batch):
        b1 = min(b0 + batch, k)
        wb = w[:, b0:b1]  # [N, B] view, updated in place
        err = np.zeros_like(wb)  # [N, B]
        for j in range(b1 - b0):
            col = b0 + j
            g = col // group
            if col % group == 0:
                s, z = int4_grid(wb[:, j : j + group].astype(np.float32), symmetric)  # [N], [N]
                scale[:, g], zp[:, g] = s, z
            c = int4_codes(wb[:, j].astype(np.float32), scale[:, g], zp[:, g])  # [N], rounded as RTN does
            codes[:, col] = c
            q = (c.astype(np.float64) - zp[:, g]) * scale[:, g]  # [N]
            err[:, j] = (wb[:, j] - q) / u[col, col]
            wb[:, j:] -= np.outer(err[:, j], u[col, col : b1])
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return Int4Tensor(codes, scale, zp, group, symmetric)
