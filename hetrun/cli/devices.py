"""`hetrun devices` and `hetrun profiles`: what this machine has, and the built-in profiles."""

from __future__ import annotations

import argparse

from hetrun.cli import Command, print_json


def _devices(args: argparse.Namespace) -> int:
    from hetrun.backends.registry import backend_class, backend_names, probe_backend

    rows = []
    for name in backend_names():
        avail = probe_backend(name)
        cls = backend_class(name)
        rows.append({"backend": name, "available": avail.ok, "devices": list(avail.devices),
                     "precisions": sorted(cls.caps.precisions) if cls else [],
                     "reason": avail.reason, "details": avail.details,
                     "install": cls.caps.install_hint if cls and not avail.ok else ""})
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="hetrun backends on this machine")
    for col in ("backend", "status", "devices found", "precisions", "why not / what to install"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["backend"], "[green]ok[/]" if r["available"] else "[red]unavailable[/]", ", ".join(r["devices"]),
                  ", ".join(r["precisions"]), " ".join(x for x in (r["reason"], r["install"]) if x))
    Console().print(t)
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from hetrun.profile import builtin_profiles, device_catalog

    profiles = builtin_profiles()
    catalog = device_catalog()
    if args.json:
        print_json({"profiles": profiles, "device_types": {k: v.model_dump() for k, v in catalog.items()}})
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="built-in deployment profiles (use a name or a YAML path with --profile)")
    t.add_column("name")
    t.add_column("description")
    for k, v in profiles.items():
        t.add_row(k, v)
    c = Table(title="device catalog")
    for col in ("type", "precisions", "BF16 TFLOPS", "FP8 TFLOPS", "memory GB", "GB/s", "$/h"):
        c.add_column(col)
    for d in catalog.values():
        c.add_row(d.name, ", ".join(d.precisions), f"{d.tflops.get('bf16', 0):g}", f"{d.tflops.get('fp8', 0):g}",
                  f"{d.memory_gb:g}", f"{d.memory_bw_gbs:g}", f"{d.price_per_hour:g}")
    Console().print(t)
    Console().print(c)
    return 0


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


COMMANDS = {
    "devices": Command("list backends, the real devices they find, and why any is unavailable", _json_flag, _devices,
                       "  hetrun devices\n  hetrun devices --json"),
    "profiles": Command("list built-in deployment profiles and the device catalog", _json_flag, _profiles,
                        "  hetrun profiles\n  hetrun profiles --json"),
}
