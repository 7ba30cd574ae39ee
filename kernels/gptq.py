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


# ---- the GPTQ checkpoint layout (AutoGPTQ / GPTQModel / optimum) ---------------------------------------------
# qweight int32 [K * bits / 32, N]: codes packed along K, the lowest k in the lowest bits;
# qzeros  int32 [G, N * bits / 32]: zero points packed along N the same way;
# scales  [G, N]; g_idx int32 [K]: the group of every input column (act-order: not k // group).
# The `gptq` (v1) format stores zero - 1 (zero_offset 1), `gptq_v2` the zero itself (zero_offset 0).

def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Codes uint8 from int32 words holding 32 / bits of them each, lowest bits first, unpacked along `axis` (0 or 1)."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)  # [32 / bits]
    words = np.asarray(packed).view(np.uint32)
    if axis == 0:  # [R, C] -> [R * per, C]
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, per, C]
        return codes.reshape(-1, words.shape[1]).astype(np.uint8)
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, per]
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """The inverse of unpack_int32: codes [R, C] (values below 2**bits) into int32 words along `axis`."""
    per = 32 // bits
    c = np.asarray(codes, dtype=np.uint32)
    if c.shape[axis] % per:
        raise ValueError(f"{c.shape[axis]} codes along axis {axis} do not fill whole {bits}-bit words of {per}")
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    if axis == 0:
        words = (c.reshape(-1, per, c.shape[1]) << shifts[None, :, None]).sum(axis=1, dtype=np.uint64)
    else:
        words = (c.reshape(c.shape[0], -1, per) << shifts[None, None, :]).sum(axis=2, dtype=np.uint64)
    return words.astype(np.uint32).view(np.int32)


def gptq_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
                    zero_offset: int) -> np.ndarray:
    """W [N, K] float32 = scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)), g = g_idx[k] (exact for bits 2, 4, 8)."""
    q = unpack_int32(qweight, bits, 0).astype(np.float32)  # [K, N]
    z = unpack_int32(qzeros, bits, 1).astype(np.float32) + zero_offset  # [G, N]
    g = np.asarray(g_idx, dtype=np.int64)  # [K]
    s = np.asarray(scales, dtype=np.float32)  # [G, N]
    return np.ascontiguousarray((s[g] * (q[: len(g)] - z[g][:, : q.shape[1]])).T)  # [N, K]


def gptq_pack(t: Int4Tensor, order: np.ndarray | None = None, zero_offset: int = 1) -> dict[str, np.ndarray]:
    """A GPTQ checkpoint's tensors for one Linear from INT4 codes quantized group by group in column order `order`.

    `t` holds codes [N, K] whose groups run along `order` (act-order: the columns GPTQ visited, in that order);
    None: the natural order. Returns qweight, qzeros, scales (float16) and g_idx as the GPTQ layout stores them:
    columns back in their original order, g_idx[k] the group column k was quantized in.
    """
    n, k = t.codes.shape
    order = np.arange(k) if order is None else np.asarray(order, dtype=np.int64)
    codes = np.empty_like(t.codes)
    codes[:, order] = t.codes  # [N, K] original column order
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // t.group
    zeros = t.zero_point.astype(np.int64) - zero_offset  # [N, G]
    if zeros.min() < 0:
        raise ValueError("the gptq (v1) format stores zero - 1 and cannot hold a zero point of 0; use gptq_v2")
    return {"qweight": pack_int32(codes.T, 4, 0), "qzeros": pack_int32(zeros.T, 4, 1),
            "scales": t.scale.T.astype(np.float16), "g_idx": g_idx}


def gptq_int4(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, group: int,
              zero_offset: int) -> tuple[Int4Tensor, np.ndarray | None] | None:
    """A 4-bit GPTQ Linear as an Int4Tensor [N, K] of contiguous groups, codes, scales and zero points unchanged.

    Returns (tensor, order): with act-order, tensor's columns are the input columns `order` (sorted by group), so
    y = x[:, order] @ tensor.T; order is None when g_idx is already k // group. None when the layout has no such
    form: zero points above 15 (a v1 zero point of 0 stored as -1), or groups of unequal size.
    """
    q = unpack_int32(qweight, 4, 0)[: len(g_idx)]  # [K, N]
    z = unpack_int32(qzeros, 4, 1)[:, : q.shape[1]].astype(np.int64) + zero_offset  # [G, N]
    if z.max(initial=0) > 15:
        return None
    k = len(g_idx)
    natural = np.arange(k) // group
    g = np.asarray(g_idx, dtype=np.int64)
    order = None
    if not np.array_equal(g, natural):
        order = np.argsort(g, kind="stable")
        if not np.array_equal(g[order], natural):
            return None
        q = q[order]
    t = Int4Tensor(np.ascontiguousarray(q.T), np.asarray(scales, dtype=np.float32).T.copy(),
                   z.T.astype(np.uint8), group, symmetric=False)
    return t, order
