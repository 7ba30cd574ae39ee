"""Bundle integrity: every tampering case is refused with a one-line error naming the file, and nothing outside the
bundle is ever read or written."""

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx.external_data_helper import convert_model_to_external_data

from hetrun.bundle import MANIFEST, export, greedy, load, verify
from hetrun.cli import main
from hetrun.errors import BundleError


def graph_file(root: Path, kind: str = "routed") -> str:
    """The bundle path of the first graph of a kind (routed or shared) in MoE layer 0 (the plan decides precisions)."""
    return sorted(e["path"] for e in json.loads((root / MANIFEST).read_text())["experts"]
                  if e["kind"] == kind and e["moe_layer"] == 0)[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "b"
    export("tiny", "mixed-demo", root, progress=False)
    return root


@pytest.fixture
def bundle(pristine, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(pristine, root)
    return root


@pytest.fixture
def onnx_file(bundle):
    return graph_file(bundle)


def edit_manifest(root: Path, change) -> None:
    man = json.loads((root / MANIFEST).read_text())
    change(man)
    (root / MANIFEST).write_text(json.dumps(man))


def rehash(root: Path, rel: str) -> None:
    data = (root / rel).read_bytes()
    edit_manifest(root, lambda m: m["files"].__setitem__(rel, {"sha256": hashlib.sha256(data).hexdigest(),
                                                               "size": len(data)}))


def rename_entry(root: Path, old: str, new: str) -> None:
    def change(m):
        m["files"][new] = m["files"].pop(old)
        for e in m["experts"]:
            if e["path"] == old:
                e["path"] = new
    edit_manifest(root, change)


def refused(root: Path, needle: str, capsys, status: str | None = None, path: str | None = None) -> str:
    """Load, run and inspect all refuse the bundle with one line naming the file; returns the message."""
    with pytest.raises(BundleError) as e:
        load(root)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    capsys.readouterr()
    for argv in (["run", str(root), "--prompt-ids", "1,2"], ["inspect", str(root)], ["inspect", str(root), "--json"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hetrun: error:") and err.count("\n") == 1 and needle in err and "Traceback" not in err
    if status is not None:
        assert main(["inspect", str(root), "--json"]) == 2
        files = {f["path"]: f for f in json.loads(capsys.readouterr().out)["files"]}
        assert files[path]["status"] == status, files[path]
        assert sum(f["status"] != "ok" for f in files.values()) == 1  # only the tampered file fails
    return msg


@pytest.mark.parametrize("rel", ["routed", "shared", "dense.safetensors", "config.json", "profile.yaml",
                                 "generation_config.json"])
def test_one_changed_byte_in_any_file(bundle, rel, capsys):
    rel = graph_file(bundle, rel) if rel in ("routed", "shared") else rel
    data = bytearray((bundle / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / rel).write_bytes(bytes(data))
    refused(bundle, rel, capsys, status="changed", path=rel)


def test_truncated_file(bundle, onnx_file, capsys):
    (bundle / onnx_file).write_bytes((bundle / onnx_file).read_bytes()[:-10])
    assert "manifest says" in refused(bundle, onnx_file, capsys, status="changed", path=onnx_file)


def test_missing_file(bundle, onnx_file, capsys):
    (bundle / onnx_file).unlink()
    assert "missing" in refused(bundle, onnx_file, capsys, status="missing", path=onnx_file)


def test_extra_file_and_extra_directory(bundle, onnx_file, pristine, tmp_path, capsys):
    extra = str(Path(onnx_file).parent / "E99.fp32.onnx")
    (bundle / extra).write_bytes((bundle / onnx_file).read_bytes())
    msg = refused(bundle, extra, capsys, status="extra", path=extra)
    assert "not in the manifest" in msg
    other = tmp_path / "c"
    shutil.copytree(pristine, other)
    (other / "junk").mkdir()
    refused(other, "junk/", capsys, status="extra", path="junk/")


def test_graph_the_plan_needs_missing_from_manifest(bundle, onnx_file, capsys):
    def drop(m):
        m["experts"] = [e for e in m["experts"] if e["path"] != onnx_file]
        del m["files"][onnx_file]
    edit_manifest(bundle, drop)
    (bundle / onnx_file).unlink()
    precision = onnx_file.split(".")[-2]
    refused(bundle, f"the plan needs the {precision} graph of routed expert 0 of MoE layer 0", capsys)


@pytest.fixture
def spy_open(monkeypatch):
    """Every path opened for reading or writing while the fixture is active."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *a, **k)

    def os_spy(path, *a, **k):
        opened.append(os.path.realpath(os.fsdecode(path)))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    return opened


def _outside_copy(bundle: Path, onnx_file: str) -> Path:
    """A file outside the bundle with exactly the bytes the manifest expects: it must still never be read."""
    outside = bundle.parent / "outside.onnx"
    outside.write_bytes((bundle / onnx_file).read_bytes())
    return outside


@pytest.mark.parametrize("escape", ["../outside.onnx", "experts/../../outside.onnx", "ABSOLUTE"])
def test_manifest_path_escaping_the_bundle(bundle, onnx_file, escape, capsys, spy_open):
    outside = _outside_copy(bundle, onnx_file)
    new = str(outside) if escape == "ABSOLUTE" else escape
    rename_entry(bundle, onnx_file, new)
    (bundle / onnx_file).unlink()
    msg = refused(bundle, new, capsys)
    assert ("absolute" if escape == "ABSOLUTE" else "escapes the bundle") in msg
    assert str(outside.resolve()) not in spy_open


def test_manifest_path_to_system_file(bundle, capsys, spy_open):
    def change(m):
        m["files"]["/etc/passwd"] = {"sha256": "0" * 64, "size": 1}
        m["profile"] = "/etc/passwd"
    edit_manifest(bundle, change)
    assert "absolute" in refused(bundle, "/etc/passwd", capsys)
    assert "/etc/passwd" not in spy_open


def test_symlink_out_of_the_bundle(bundle, onnx_file, capsys, spy_open):
    outside = _outside_copy(bundle, onnx_file)
    (bundle / onnx_file).unlink()
    (bundle / onnx_file).symlink_to(outside)
    msg = refused(bundle, onnx_file, capsys, status="unsafe", path=onnx_file)
    assert "symlink that escapes the bundle" in msg
    assert str(outside.resolve()) not in spy_open


def test_symlinked_directory_out_of_the_bundle(bundle, capsys, spy_open):
    moved = bundle.parent / "experts-elsewhere"
    layer_dir = sorted((bundle / "experts").iterdir())[0]
    shutil.move(layer_dir, moved)
    layer_dir.symlink_to(moved, target_is_directory=True)
    assert "symlink that escapes the bundle" in refused(bundle, f"experts/{layer_dir.name}", capsys)
    assert not [p for p in spy_open if p.startswith(str(moved.resolve()))]


def test_unlisted_symlink_inside_or_out(bundle, capsys):
    (bundle / "link").symlink_to("/etc/passwd")
    assert "symlink" in refused(bundle, "link", capsys, status="unsafe", path="link")


def _external(bundle: Path, onnx_file: str, location: str, data_at: Path) -> None:
    """Move onnx_file's weights to external data at `data_at`, referenced as `location`, and re-checksum the graph."""
    model = onnx.load(bundle / onnx_file)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save_model(model, bundle / onnx_file)  # writes weights.bin beside it
    shutil.move((bundle / onnx_file).parent / "weights.bin", data_at)
    model = onnx.load(bundle / onnx_file, load_external_data=False)
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    (bundle / onnx_file).write_bytes(model.SerializeToString())
    rehash(bundle, onnx_file)


@pytest.mark.parametrize("location", ["../../../secret.bin", "ABSOLUTE"])
def test_onnx_external_data_outside_the_bundle(bundle, onnx_file, location, capsys, spy_open):
    secret = bundle.parent / "secret.bin"
    loc = str(secret) if location == "ABSOLUTE" else location
    _external(bundle, onnx_file, loc, secret)
    msg = refused(bundle, onnx_file, capsys, status="unsafe", path=onnx_file)
    assert "external data" in msg and loc in msg
    assert str(secret.resolve()) not in spy_open


def test_onnx_external_data_not_in_manifest(bundle, onnx_file, capsys):
    _external(bundle, onnx_file, "weights.bin", (bundle / onnx_file).parent / "weights.bin")
    refused(bundle, "weights.bin", capsys)


def test_onnx_external_data_inside_the_bundle_is_fine(bundle, onnx_file, pristine):
    _external(bundle, onnx_file, "weights.bin", (bundle / onnx_file).parent / "weights.bin")
    rehash(bundle, str(Path(onnx_file).parent / "weights.bin"))
    verify(bundle)
    assert greedy(load(bundle), [4, 5, 6], 5) == greedy(load(pristine), [4, 5, 6], 5)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_pickle_in_place_of_safetensors_is_never_unpickled(bundle, capsys):
    global MARKER
    MARKER = str(bundle.parent / "pwned")
    torch.save({"model.norm.weight": _Boom()}, bundle / "dense.safetensors")
    rehash(bundle, "dense.safetensors")
    refused(bundle, "dense.safetensors: is not a valid safetensors file", capsys)
    assert not Path(MARKER).exists()


def test_nothing_written_outside_or_inside(bundle):
    before = {p: p.stat().st_mtime_ns for p in bundle.parent.rglob("*")}
    load(bundle)
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert {p: p.stat().st_mtime_ns for p in bundle.parent.rglob("*")} == before


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["files"].__setitem__(MANIFEST, {"sha256": "0" * 64, "size": 0}), "cannot list itself"),
    (lambda m: m.__setitem__("format_version", 2), "format version 2"),
    (lambda m: m.__setitem__("format", "zip"), "not a hetrun bundle"),
    (lambda m: m["plan"]["phy2log"][0].__setitem__(0, 99), "bad plan"),
    (lambda m: m["precision"].__setitem__("h100:0", "fp32"), "'precision'"),
    (lambda m: m["spec"].__setitem__("hidden_size", 8), "spec"),
    (lambda m: m.pop("files"), "field 'files'"),
])
def test_edited_manifest(bundle, change, needle, capsys):
    edit_manifest(bundle, change)
    assert MANIFEST in refused(bundle, needle, capsys)


def test_inspect_lists_every_problem(bundle, onnx_file, capsys):
    (bundle / onnx_file).unlink()
    (bundle / "extra.txt").write_text("x")
    data = bytearray((bundle / "config.json").read_bytes())
    data[5] ^= 1
    (bundle / "config.json").write_bytes(bytes(data))
    assert main(["inspect", str(bundle), "--json"]) == 2
    captured = capsys.readouterr()
    status = {f["path"]: f["status"] for f in json.loads(captured.out)["files"]}
    assert status[onnx_file] == "missing" and status["extra.txt"] == "extra" and status["config.json"] == "changed"
    assert "failed 3 checks" in captured.err
