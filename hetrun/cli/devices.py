"""`hetrun devices` and `hetrun profiles`: what this machine has, and the built-in profiles."""

from __future__ import annotations

import argparse

from hetrun.backends import host_cpu
from hetrun.backends.registry import backend_class, backend_names, probe_backend, resolve_backend
from hetrun.cli import Command
from hetrun.files import print_json, table_console
from hetrun.profile import builtin_profiles, device_catalog, load_profile


def _devices(args: argparse.Namespace) -> int:
    rows = []
    for name in backend_names():
        avail = probe_backend(name)
        cls = backend_class(name)
        rows.append({"backend": name, "available": avail.ok, "devices": list(avail.devices),
                     "precisions": sorted(cls.caps.precisions) if cls else [],
                     "reason": avail.reason, "details": avail.details,
                     "install": cls.caps.install_hint if cls and not avail.ok else ""})
    found = real_devices()
    auto = _auto_resolution(args.profile) if args.profile else []
    host = host_cpu.describe()
    if args.json:
        print_json({"backends": rows, "devices": found, "auto": auto, "host_cpu": host})
        return 0
    from rich.markup import escape  # display: loaded when a table is printed
    from rich.table import Table  # display: loaded when a table is printed

    console = table_console(160)
    t = Table(title="hetrun backends on this machine")
    for col in ("backend", "status", "devices found", "precisions", "why not / what to install"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["backend"], "[green]ok[/]" if r["available"] else "[red]unavailable[/]", escape(", ".join(r["devices"])),
                  ", ".join(r["precisions"]), escape(" ".join(x for x in (r["reason"], r["install"]) if x)))
    console.print(t)
    console.print(f"host CPU: {escape(host_cpu.summary(host))}"
                  + ("" if host["native_bf16"] else " (BF16 is emulated: onnxruntime and OpenVINO default to INT8 here; "
                                                   "the torch backend holds BF16 narrow)"))
    d = Table(title="real devices (NVIDIA via torch.cuda or the CUDA driver, Ascend via torch_npu, Intel via OpenVINO)")
    for col in ("vendor", "device", "name", "capabilities"):
        d.add_column(col)
    for r in found:
        d.add_row(r["vendor"], escape(r["device"]), escape(r["name"]),
                  escape("; ".join(f"{k}: {_fmt(v)}" for k, v in r["capabilities"].items())))
    if not found:
        d.add_row("-", "-", "none found", "only simulated devices can run here")
    console.print(d)
    if auto:
        a = Table(title=f"backend per device group of profile '{args.profile}'")
        for col in ("group", "type", "profile says", "runs on"):
            a.add_column(col)
        for r in auto:
            a.add_row(r["group"], r["type"], r["backend"], r["resolved"])
        console.print(a)
    return 0


def real_devices() -> list[dict]:
    """Every real accelerator and CPU the vendor backends find, with what each can do."""
    out = []
    nv = probe_backend("nvidia").details
    for dev in nv.get("devices", []):
        cc = tuple(dev["capability"])
        out.append({"vendor": "nvidia", "device": f"cuda:{dev['index']}", "name": dev["name"], "capabilities": {
            "compute capability": f"{cc[0]}.{cc[1]}", "memory GB": round(dev["memory_bytes"] / 1e9, 1),
            "fp8": "yes" if cc >= (8, 9) else "no (needs 8.9+)",
            "fp8 torch path": ", ".join(nv.get("fp8", {}).get(f"cuda:{dev['index']}", [])) or "none",
            "onnxruntime EPs": ", ".join(nv.get("onnxruntime_gpu_providers", [])) or "none"}})
    asc = probe_backend("ascend").details
    for dev in asc.get("devices", []):
        out.append({"vendor": "huawei", "device": f"npu:{dev['index']}", "name": dev["name"], "capabilities": {
            "memory GB": round(dev.get("memory_bytes", 0) / 1e9, 1), "torch_npu": asc.get("torch_npu", "?"),
            "int8 weight matmul": "yes" if asc.get("int8_matmul") else "no", "fp8": "no"}})
    for name, caps in probe_backend("openvino").details.get("devices", {}).items():
        out.append({"vendor": "intel" if "Intel" in str(caps.get("FULL_DEVICE_NAME", "Intel")) else "other",
                    "device": f"openvino {name}", "name": str(caps.get("FULL_DEVICE_NAME", name)),
                    "capabilities": {k: v for k, v in caps.items() if k != "FULL_DEVICE_NAME"}})
    return out


def _auto_resolution(profile: str) -> list[dict]:
    seen, out = set(), []
    for dev in load_profile(profile).devices:
        if dev.group not in seen:
            seen.add(dev.group)
            out.append({"group": dev.group, "type": dev.type.name, "backend": dev.backend,
                        "resolved": resolve_backend(dev)})
    return out


def _fmt(v) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _profiles(args: argparse.Namespace) -> int:
    profiles = builtin_profiles(published=True)
    catalog = device_catalog()
    if args.json:
        print_json({"profiles": profiles, "device_types": {k: v.model_dump() for k, v in catalog.items()}})
        return 0
    from rich.table import Table  # display: loaded when a table is printed

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
    console = table_console(120)
    console.print(t)
    console.print(c)
    return 0


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _devices_args(p: argparse.ArgumentParser) -> None:
    _json_flag(p)
    p.add_argument("--profile", help="also show which backend each device group of this profile runs on "
                                     "(resolves `backend: auto`)")


COMMANDS = {
    "devices": Command("list backends, the real devices they find, and why any is unavailable", _devices_args, _devices,
                       "  hetrun devices\n  hetrun devices --json\n  hetrun devices --profile mixed-demo"),
    "profiles": Command("list built-in deployment profiles and the device catalog", _json_flag, _profiles,
                        "  hetrun profiles\n  hetrun profiles --json"),
}
