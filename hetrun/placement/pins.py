"""Pin rules: keep chosen experts on chosen devices, in the spirit of llama.cpp's `-ot` and KTransformers' YAML rules.

A rule (`hetrun.profile.PinRule`) names a device group or one device id and matches (MoE layer, expert) pairs:
  layers: MoE-layer indices (0-based among the MoE layers, as the rows of the load table), a list or "0-2" / "0,4-6";
  experts: expert indices, same forms;
  load_below_percentile / load_above_percentile: experts whose load in their layer is strictly below / above that
    percentile of the layer's loads (numpy's linear percentile; a uniform load matches none).
Conditions combine with AND. Matched experts may go only to the rule's devices (all their replicas); the others may
go anywhere. When several rules match a pair the first one wins; rules passed to `plan(pins=...)` come before the
profile's own.

On the command line a rule is written `device=GROUP[,layers=RANGES][,experts=RANGES][,below=P][,above=P]`, for
example `device=xeon,below=50` or `device=h100,layers=0-2` or `device=h100:0,experts=0,3,8-11`.
"""

from __future__ import annotations

import numpy as np
from pydantic import ValidationError

from hetrun.errors import PlacementError
from hetrun.profile import PinRule, first_error

_CLI_KEYS = {"device": "device", "layers": "layers", "experts": "experts",
             "below": "load_below_percentile", "above": "load_above_percentile"}


def pin_rules(pins) -> list[PinRule]:
    """PinRules from PinRule objects, dicts of PinRule fields or command-line strings; one-line errors otherwise."""
    if pins is None:
        return []
    if isinstance(pins, (PinRule, dict, str)):
        pins = [pins]
    out = []
    for p in pins:
        if isinstance(p, PinRule):
            out.append(p)
            continue
        data = parse_pin(p) if isinstance(p, str) else p
        if not isinstance(data, dict):
            raise PlacementError(f"pin {p!r} is neither a rule nor a dict of rule fields; "
                                 "give e.g. {'device': 'xeon', 'load_below_percentile': 50}")
        try:
            out.append(PinRule.model_validate(data))
        except ValidationError as e:
            loc, msg = first_error(e, "(rule)")
            raise PlacementError(f"pin {data}: field '{loc}': {msg}; fields are device, layers, experts, "
                                 "load_below_percentile, load_above_percentile") from None
    return out


def parse_pin(text: str) -> dict:
    """PinRule fields from the command-line form `device=xeon,layers=0-2,experts=0,3,8-11,below=50`."""
    fields: dict[str, str] = {}
    key = None
    for token in (t.strip() for t in text.split(",")):
        if "=" in token:
            name, _, value = token.partition("=")
            name = name.strip()
            if name not in _CLI_KEYS:
                raise PlacementError(f"pin '{text}': unknown key '{name}'; use {', '.join(_CLI_KEYS)} "
                                     "(e.g. device=xeon,below=50)")
            key = _CLI_KEYS[name]
            fields[key] = value.strip()
        elif token and key in ("layers", "experts"):  # more items of a list: layers=0,3,5-7
            fields[key] += "," + token
        elif token:
            raise PlacementError(f"pin '{text}': '{token}' is not key=value; write e.g. device=h100,layers=0-2")
    if "device" not in fields or not fields["device"]:
        raise PlacementError(f"pin '{text}' names no device; start it with device=GROUP (e.g. device=xeon,below=50)")
    for k in ("load_below_percentile", "load_above_percentile"):
        if k in fields:
            try:
                fields[k] = float(fields[k])
            except ValueError:
                raise PlacementError(f"pin '{text}': {k.split('_')[1]}={fields[k]} is not a number; "
                                     "give a percentile 0-100") from None
    return fields


def pin_mask(rules: list[PinRule], devices: list[tuple[str, str]], load: np.ndarray) -> np.ndarray | None:
    """[L, E, D] bool: where each expert may go under `rules`; None when nothing is pinned.

    `devices` is [(device id, group id)] in device-index order; `load` [L, E] decides the percentile rules.
    """
    L, E = load.shape
    D = len(devices)
    allowed = np.ones((L, E, D), dtype=bool)
    claimed = np.zeros((L, E), dtype=bool)  # pairs an earlier rule already matched
    for rule in rules:
        targets = np.array([rule.device in (dev_id, group) for dev_id, group in devices])
        if not targets.any():
            groups = sorted({g for _, g in devices})
            raise PlacementError(f"pin names device '{rule.device}', which the profile lacks; "
                                 f"use a device group ({', '.join(groups)}) or a device id such as '{devices[0][0]}'")
        match = np.ones((L, E), dtype=bool)
        if rule.layers is not None:
            match &= _index_mask(rule.layers, L, "MoE layer", rule)[:, None]
        if rule.experts is not None:
            match &= _index_mask(rule.experts, E, "expert", rule)[None, :]
        if rule.load_below_percentile is not None:
            match &= load < np.percentile(load, rule.load_below_percentile, axis=1, keepdims=True)
        if rule.load_above_percentile is not None:
            match &= load > np.percentile(load, rule.load_above_percentile, axis=1, keepdims=True)
        match &= ~claimed
        allowed[match] = targets
        claimed |= match
    return None if allowed.all() else allowed


def describe(rule: PinRule) -> str:
    """A rule in the command-line form."""
    parts = [f"device={rule.device}"]
    for key, field in list(_CLI_KEYS.items())[1:]:
        v = getattr(rule, field)
        if v is not None:
            parts.append(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return ",".join(parts)


def _index_mask(spec, n: int, what: str, rule: PinRule) -> np.ndarray:
    # [n] bool of the indices a rule's `layers` / `experts` field names.
    items = spec if isinstance(spec, list) else []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, sep, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise PlacementError(f"pin for '{rule.device}': '{part}' is not an index or a range like 0-2") from None
            if b < a:
                raise PlacementError(f"pin for '{rule.device}': range '{part}' runs backwards; write it low-high")
            items.extend(range(a, b + 1))
    mask = np.zeros(n, dtype=bool)
    for i in items:
        if not 0 <= i < n:
            raise PlacementError(f"pin for '{rule.device}' names {what} {i}, but the model has {n} "
                                 f"({what}s 0..{n - 1}); fix the rule")
        mask[i] = True
    return mask
