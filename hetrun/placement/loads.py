"""Expert load tables: [L, E] routed tokens per expert of every MoE layer, from a file, an array or a run's statistics.

Accepted sources: a path to a .npy array (no pickle), a .csv or .tsv file (one row of token counts per MoE layer,
numbers only, lines starting with # are comments), or a JSON file holding a list of rows or an object with
`tokens_per_expert` (as `DispatchStats.to_dict()` and `hetrun run --json` write it) or `load`; a numpy array,
nested lists or a torch tensor; a `DispatchStats` (its `tokens_per_expert`); a dict like the JSON object.
Every problem is a one-line PlacementError that says what is wrong and how to fix it. A file larger than
MAX_LOAD_BYTES is refused before it is read; JSON may not give a key twice, nor NaN or Infinity.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from hetrun.errors import PlacementError
from hetrun.files import strict_json
from hetrun.spec import MAX_EXPERTS, MAX_LAYERS, MoESpec

# The largest table a model hetrun handles can have ([MAX_LAYERS, MAX_EXPERTS] as JSON text), with room to spare.
MAX_LOAD_BYTES = 64 * MAX_LAYERS * MAX_EXPERTS
TEXT_TABLES = {".csv": ",", ".tsv": "\t"}  # text tables by suffix: their column delimiter


def read_load(source) -> np.ndarray:
    """The [L, E] float64 table held by `source` (a path, array, DispatchStats or dict), shape not yet checked."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    if hasattr(source, "tokens_per_expert"):  # DispatchStats
        source = source.tokens_per_expert
    if isinstance(source, dict):
        source = _from_object(source, "load table")
    if hasattr(source, "detach"):  # torch tensor
        source = source.detach().cpu().numpy()
    try:
        table = _numbers(source)
    except (TypeError, ValueError) as e:
        raise PlacementError(f"load table is not a table of numbers ({' '.join(str(e).split())[:100]}); "
                             "pass an [layers, experts] array of token counts") from None
    return table


def _numbers(rows) -> np.ndarray:
    # float64, refusing text: numpy would read the string "6" as 6.0
    table = np.asarray(rows)
    if table.dtype.kind in "USO":
        raise ValueError(f"it holds {'text' if table.dtype.kind in 'US' else 'objects'}, not numbers")
    return table.astype(np.float64, copy=False)


def check_model_load(table: np.ndarray, spec: MoESpec, what: str = "load table") -> np.ndarray:
    """`table` as [L, E] float64 after checking it fits `spec` and holds finite token counts >= 0, not all zero."""
    L, E = spec.num_moe_layers, spec.num_experts
    w = np.asarray(table, dtype=np.float64)
    if w.shape != (L, E):
        raise PlacementError(f"{what} has shape {list(w.shape)} but model '{spec.name}' has {L} MoE layers x {E} "
                             f"experts; give a [{L}, {E}] table of token counts recorded on this model")
    bad = ~np.isfinite(w)
    if bad.any():
        l, e = np.argwhere(bad)[0]
        raise PlacementError(f"{what} has NaN or infinite entries (first at MoE layer {l}, expert {e}); "
                             "pass finite token counts")
    if (w < 0).any():
        l, e = np.argwhere(w < 0)[0]
        raise PlacementError(f"{what} has negative entries (first at MoE layer {l}, expert {e}: {w[l, e]:g}); "
                             "token counts must be >= 0")
    if not w.any():
        raise PlacementError(f"{what} is zero everywhere, so it says nothing about load; record routing statistics "
                             "first, or leave the load out for a uniform one")
    return w


def load_matrix(weight, uniform_zero_rows: bool = True) -> np.ndarray:
    """[L, E] float64 copy of a load table, or PlacementError saying what is wrong with it.

    Rows that are zero everywhere become uniform when ``uniform_zero_rows`` (a layer without
    statistics is placed as if all experts were equally hot); a table that is zero everywhere
    is rejected."""
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().numpy()
    w = np.array(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise PlacementError(f"expert load must be a non-empty [layers, experts] table, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise PlacementError("expert load has negative, NaN or infinite entries; pass token counts >= 0")
    if not w.any():
        raise PlacementError("expert load is zero everywhere; record routing statistics first or pass a uniform load")
    if uniform_zero_rows:
        w[~w.any(axis=1)] = 1.0
    return w


def model_load(source, spec: MoESpec) -> np.ndarray | None:
    """The checked [L, E] table of `source` for `spec`, or None (uniform) when `source` is None."""
    if source is None:
        return None
    where = f"load table '{source}'" if isinstance(source, (str, os.PathLike)) else "load table"
    return check_model_load(read_load(source), spec, where)


def _read_file(p: Path) -> np.ndarray:
    if not p.is_file():
        raise PlacementError(f"load table '{p}' not found; give a .npy, .csv or .json file of [layers, experts] "
                             "token counts")
    try:
        size = p.stat().st_size
        if size > MAX_LOAD_BYTES:
            raise PlacementError(f"load table '{p}' is {size} bytes, more than the {MAX_LOAD_BYTES} a table of "
                                 f"{MAX_LAYERS} layers x {MAX_EXPERTS} experts needs; not a load table")
        if p.suffix == ".npy":
            table = np.load(p, allow_pickle=False)
        elif p.suffix in TEXT_TABLES:
            with warnings.catch_warnings():  # an empty file: numpy warns, then the shape check below says it
                warnings.simplefilter("ignore")
                table = np.loadtxt(p, delimiter=TEXT_TABLES[p.suffix], dtype=np.float64, ndmin=2, encoding="utf-8")
        else:
            raw = strict_json(p.read_text())
            table = _numbers(_from_object(raw, f"load table '{p}'") if isinstance(raw, dict) else raw)
    except (ValueError, TypeError, OSError, UnicodeDecodeError, RecursionError, EOFError) as e:
        raise PlacementError(f"load table '{p}' cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
                             "give a .npy array, a CSV of numbers only (one row per MoE layer) or a JSON list of rows "
                             "of token counts") from None
    if table.dtype == object or not np.issubdtype(table.dtype, np.number):
        raise PlacementError(f"load table '{p}' must hold numbers, got {table.dtype}")
    return table.astype(np.float64)


def _from_object(raw: dict, what: str):
    for key in ("tokens_per_expert", "load"):
        if key in raw:
            return raw[key]
    raise PlacementError(f"{what} is an object without 'tokens_per_expert' or 'load'; give one of those keys "
                         "or a plain list of rows")

