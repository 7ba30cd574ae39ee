"""Fuzzing the command line with malformed profiles, bundle manifests and load tables (hypothesis).

Every generated input is malformed by construction. Each must end with exit code 2 and exactly one stderr line
starting with "hetrun: error:", never a traceback and never exit 0 or 1. Most cases call hetrun.cli.main in-process
(fast); a few go through a real `python -m hetrun` subprocess.
"""

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hetrun.backends.registry import backend_names
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hetrun.bundle import MANIFEST, export
from hetrun.cli import main
from hetrun.formats import PRECISIONS
from hetrun.profile import device_catalog

REPO = Path(__file__).resolve().parents[1]
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---- helpers -------------------------------------------------------------------------------------------


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process and check the user-error contract; returns the message."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, rc, err[-500:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hetrun: error:"), err[-1000:]
    assert "Traceback" not in err
    return lines[0]


def user_error_subprocess(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "hetrun", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-1000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hetrun: error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def bundle(work):
    root = work / "bundle"
    export("tiny", "mixed-demo", root, progress=False)
    return root


@pytest.fixture(scope="module")
def manifest(bundle):
    return json.loads((bundle / MANIFEST).read_text())


# ---- malformed profiles ------------------------------------------------------------------------------------

VALID_PROFILE = {
    "name": "fuzz", "description": "two groups",
    "devices": [{"id": "a", "type": "host-cpu", "count": 2, "backend": "simulated"},
                {"id": "b", "type": "h100-sxm", "count": 1, "backend": "simulated"}],
    "dense_device": "a", "fallback_device": "a",
    "links": {"intra_node": {"bandwidth_gbs": 10.0}},
}
IDS = {"a", "b", "a:0", "a:1", "b:0"}
NAMES = st.text(min_size=1, max_size=12)
NOT_INT = st.one_of(st.floats(allow_nan=True).filter(lambda f: f != f or f != int(f) if abs(f) < 1e15 else True),
                    st.text(min_size=1, max_size=8).filter(lambda t: not _intlike(t)),
                    st.lists(st.integers(), max_size=2), st.none())
JUNK = st.recursive(st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
                    max_leaves=6)


def _intlike(t: str) -> bool:
    try:
        float(t.strip().replace("_", ""))
        return True
    except ValueError:
        return False


@st.composite
def bad_profiles(draw):
    """(description, YAML text) of a profile that cannot be valid."""
    p = copy.deepcopy(VALID_PROFILE)
    group = draw(st.integers(0, 1))
    dev = p["devices"][group]
    how = draw(st.sampled_from([
        "yaml-text", "not-mapping", "drop-name", "drop-devices", "devices-empty", "devices-not-list", "unknown-key",
        "type", "count", "count-big", "backend", "precision", "id-chars", "id-duplicate", "node", "per-node",
        "reserved", "price", "dense-device", "fallback-device", "link-bandwidth", "link-efficiency", "pin-device",
        "group-unknown-key", "grid", "custom-type", "name-type"]))
    if how == "yaml-text":  # random text: not YAML, or YAML that is not a profile mapping
        text = draw(st.one_of(st.text(max_size=60), st.sampled_from([
            "{", "devices: [", "- a\n- b", ":", "\t\x00", "name: x\ndevices: 3", "&a [*a]",
            "!!python/object/apply:os.system ['touch /tmp/hetrun-pwned']"])))
        return how, text
    if how == "not-mapping":
        return how, yaml.safe_dump(draw(st.one_of(st.lists(JUNK, max_size=3), st.integers(), st.text(max_size=10),
                                                  st.none(), st.floats(allow_nan=False))))
    if how == "drop-name":
        del p["name"]
    elif how == "drop-devices":
        del p["devices"]
    elif how == "devices-empty":
        p["devices"] = []
    elif how == "devices-not-list":
        p["devices"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), min_size=1, max_size=3)))
    elif how == "unknown-key":
        p[draw(NAMES.filter(lambda k: k not in _profile_fields()))] = draw(JUNK)
    elif how == "type":
        dev["type"] = draw(st.one_of(NAMES.filter(lambda t: t not in device_catalog()), st.integers(), st.none()))
    elif how == "count":
        dev["count"] = draw(st.one_of(st.integers(max_value=0), NOT_INT))
    elif how == "count-big":
        dev["count"] = draw(st.integers(min_value=100_001, max_value=10**30))
    elif how == "backend":
        dev["backend"] = draw(st.one_of(NAMES.filter(lambda b: b not in [*backend_names(), "auto"]), st.integers()))
    elif how == "precision":
        dev["precision"] = draw(NAMES.filter(lambda x: x not in PRECISIONS))
    elif how == "id-chars":
        bad = draw(st.sampled_from(" /:*?\"<>|\\\n\t!@#$%^&()[]{}'"))
        dev["id"] = draw(st.text("abc", max_size=3)) + bad + draw(st.text("xyz", max_size=3))
    elif how == "id-duplicate":
        p["devices"][1]["id"] = p["devices"][0]["id"]
    elif how == "node":
        dev["node"] = draw(st.integers(max_value=-1))
    elif how == "per-node":
        dev["per_node"] = draw(st.integers(max_value=0))
    elif how == "reserved":
        dev["reserved_gb"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
    elif how == "price":
        dev["price_per_hour"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
    elif how == "dense-device":
        p["dense_device"] = draw(NAMES.filter(lambda x: x not in IDS))
    elif how == "fallback-device":
        p["fallback_device"] = draw(NAMES.filter(lambda x: x not in IDS))
    elif how == "link-bandwidth":
        p["links"]["intra_node"]["bandwidth_gbs"] = draw(st.floats(max_value=0, allow_nan=False, allow_infinity=False))
    elif how == "link-efficiency":
        p["links"]["intra_node"]["efficiency"] = draw(st.floats(min_value=1.0001, max_value=1e9, allow_nan=False))
    elif how == "pin-device":
        p["pins"] = [{"device": draw(NAMES.filter(lambda x: x not in IDS)), "layers": "0-1"}]
    elif how == "group-unknown-key":
        dev[draw(NAMES.filter(lambda k: k not in _group_fields()))] = draw(JUNK)
    elif how == "grid":
        p["grid_kg_co2_per_kwh"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
    elif how == "custom-type":  # a custom device type missing its required figures
        p["device_types"] = {"mine": {"name": "mine", "vendor": "other", "kind": "gpu"}}
        dev["type"] = "mine"
    elif how == "name-type":
        p["name"] = draw(st.one_of(st.lists(st.integers(), max_size=2),
                                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    return how, yaml.safe_dump(p, allow_unicode=True)


def _profile_fields() -> set[str]:
    from hetrun.profile import ProfileModel

    return set(ProfileModel.model_fields)


def _group_fields() -> set[str]:
    from hetrun.profile import DeviceGroup

    return set(DeviceGroup.model_fields)


def test_valid_profile_template_is_valid():
    """The mutations start from a profile that loads: each mutation is what breaks it."""
    from hetrun.profile import load_profile

    assert len(load_profile(copy.deepcopy(VALID_PROFILE)).devices) == 3


@settings(max_examples=220, **FUZZ)
@given(case=bad_profiles(), command=st.sampled_from(["export", "export", "run"]))
def test_malformed_profiles(case, command, work, bundle, capsys):
    how, text = case
    event(how)
    path = work / "profile.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    if command == "export":
        user_error(capsys, ["export", "tiny", "--profile", str(path), "-o", str(work / "never"), "--no-progress"])
        assert not (work / "never").exists()
    else:
        user_error(capsys, ["run", str(bundle), "--prompt-ids", "1,2", "--profile", str(path)])


# ---- malformed manifests ----------------------------------------------------------------------------------

REQUIRED = ["format", "format_version", "hetrun_version", "created_utc", "model", "spec", "plan", "precision",
            "targets", "profile", "config", "dense", "experts", "files"]
ESCAPES = st.one_of(
    st.builds(lambda s: "../" + s, st.text("abc/", max_size=6)),
    st.builds(lambda s: "/" + s, st.text("abcetc/", max_size=8)),
    st.builds(lambda a, b: f"{a}/../../{b}", st.text("ab", min_size=1, max_size=3), st.text("ab", max_size=3)),
    st.sampled_from(["", ".", "./x", "a//b", "a/", "C:\\x", "x\\..\\y", "a/./b", "x\x00y", "\n", ".."]),
    st.builds(lambda s: "a/" * 5 + s + "/..", st.text("ab", max_size=3)))


@st.composite
def bad_manifests(draw, valid):
    """(how, manifest text) of a manifest that cannot pass."""
    m = copy.deepcopy(valid)
    how = draw(st.sampled_from([
        "text", "nesting", "nan", "not-object", "drop", "junk-field", "format", "version", "sha", "size", "extra-path",
        "expert-path", "expert-precision", "expert-moe-layer", "expert-kind", "expert-index", "expert-layer",
        "expert-target", "expert-meta", "plan-phy2log", "plan-device-of", "plan-share", "plan-device-ids",
        "plan-drop", "plan-format", "plan-shared", "precision", "spec", "dtype", "targets", "fallback",
        "drop-expert", "files-self", "duplicate-listing"]))
    files = sorted(m["files"])
    experts = m["experts"]
    e = experts[draw(st.integers(0, len(experts) - 1))]
    plan = m["plan"]
    if how == "text":
        return how, draw(st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))))
    if how == "nesting":
        depth = draw(st.integers(1000, 200_000))
        return how, "[" * depth + "]" * depth
    if how == "nan":
        return how, json.dumps(m).replace('"share": [[1.0', '"share": [[NaN', 1)
    if how == "not-object":
        return how, json.dumps(draw(st.one_of(st.lists(JUNK, max_size=3), st.integers(), st.text(max_size=5), st.none())))
    if how == "drop":
        del m[draw(st.sampled_from(REQUIRED))]
    elif how == "junk-field":
        key = draw(st.sampled_from(REQUIRED))
        junk = draw(JUNK.filter(lambda v: not isinstance(v, str) and v != m[key] and v != 1))
        m[key] = junk
    elif how == "format":
        m["format"] = draw(JUNK.filter(lambda v: v != "hetrun-bundle"))
    elif how == "version":
        m["format_version"] = draw(JUNK.filter(lambda v: v != 1))
    elif how == "sha":
        f = draw(st.sampled_from(files))
        m["files"][f]["sha256"] = draw(st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64),
                                                 st.text(max_size=70), st.integers()).filter(
            lambda v: v != valid["files"][f]["sha256"]))
    elif how == "size":
        f = draw(st.sampled_from(files))
        m["files"][f]["size"] = draw(st.one_of(st.integers(), st.text(max_size=3).filter(lambda t: not _intlike(t)))
                                     .filter(lambda v: v != valid["files"][f]["size"]))
    elif how == "extra-path":
        m["files"][draw(ESCAPES)] = {"sha256": "0" * 64, "size": 1}
    elif how == "expert-path":
        old, new = e["path"], draw(ESCAPES)
        m["files"][new] = m["files"].pop(old)
        for x in experts:
            if x["path"] == old:
                x["path"] = new
    elif how == "expert-precision":
        e["precision"] = draw(st.one_of(st.sampled_from(PRECISIONS), NAMES).filter(lambda p: p != e["precision"]))
    elif how == "expert-moe-layer":
        e["moe_layer"] = draw(st.integers().filter(lambda v: v != e["moe_layer"]))
    elif how == "expert-kind":
        e["kind"] = draw(st.one_of(st.just("shared" if e["kind"] == "routed" else "routed"), NAMES))
    elif how == "expert-index":
        e["index"] = draw(st.integers().filter(lambda v: v != e["index"]))
    elif how == "expert-layer":
        e["layer"] = draw(st.integers().filter(lambda v: v != e["layer"]))
    elif how == "expert-target":
        e["target"] = draw(st.one_of(NAMES, st.integers(), st.just("")).filter(lambda v: v not in m["targets"].values()))
    elif how == "expert-meta":
        e["meta"][draw(st.sampled_from(["hidden", "intermediate"]))] = draw(
            st.one_of(st.integers(max_value=0), st.text(max_size=3), st.none(), st.floats()))
    elif how == "plan-phy2log":
        row = plan["phy2log"][draw(st.integers(0, len(plan["phy2log"]) - 1))]
        row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=12),
                                                                 st.text(max_size=2), st.none()))
    elif how == "plan-device-of":
        row = plan["device_of"][0]
        row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=3)))
    elif how == "plan-share":
        row = plan["share"][0]
        row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(st.floats(min_value=1.5, allow_nan=False),
                                                                 st.floats(max_value=-0.5, allow_nan=False)))
    elif how == "plan-device-ids":
        i = draw(st.integers(0, len(plan["device_ids"]) - 1))
        plan["device_ids"][i] = draw(NAMES.filter(lambda x: x not in valid["plan"]["device_ids"]))
    elif how == "plan-drop":
        del plan[draw(st.sampled_from(["spec", "device_ids", "precision", "phy2log", "device_of", "share",
                                       "shared_device_of", "format"]))]
    elif how == "plan-format":
        plan["format"] = draw(JUNK.filter(lambda v: v != 1))
    elif how == "plan-shared":
        plan["shared_device_of"][0][0] = draw(st.one_of(st.integers(min_value=3), st.integers(max_value=-1)))
    elif how == "precision":
        d = draw(st.sampled_from(sorted(m["precision"])))
        m["precision"][d] = draw(st.sampled_from(PRECISIONS).filter(lambda p: p != valid["precision"][d]))
    elif how == "spec":
        key = draw(st.sampled_from(["num_layers", "hidden_size", "moe_intermediate_size", "num_experts",
                                    "vocab_size", "num_shared_experts", "first_dense_layers"]))
        m["spec"][key] = m["spec"][key] + draw(st.integers(1, 5))
    elif how == "dtype":
        m["model"]["dtype"] = draw(NAMES.filter(lambda x: x not in ("float32", "bfloat16", "float16")))
    elif how == "targets":
        m["targets"] = draw(st.dictionaries(NAMES, NAMES, max_size=3).filter(lambda t: set(t) != set(m["targets"])))
    elif how == "fallback":
        m["fallback_device"] = draw(st.one_of(NAMES.filter(lambda x: x not in m["targets"]), st.integers()))
    elif how == "drop-expert":
        experts.remove(e)  # the plan still needs it
        if all(x["path"] != e["path"] for x in experts):
            del m["files"][e["path"]]
            return how, json.dumps(m) + "\n" if draw(st.booleans()) else json.dumps(m)
    elif how == "files-self":
        m["files"][MANIFEST] = {"sha256": "0" * 64, "size": 0}
    elif how == "duplicate-listing":
        m["config"] = draw(st.sampled_from([m["profile"], m["dense"][0], e["path"]]))
    return how, json.dumps(m)


def test_valid_manifest_template_passes(bundle, capsys):
    assert main(["inspect", str(bundle)]) == 0


@settings(max_examples=240, **FUZZ)
@given(data=st.data())
def test_malformed_manifests(data, bundle, manifest, capsys):
    how, text = data.draw(bad_manifests(manifest))
    event(how)
    command = data.draw(st.sampled_from(["inspect", "inspect", "inspect --json", "run"]))
    (bundle / MANIFEST).write_bytes(text.encode("utf-8", errors="replace"))
    try:
        if command == "run":
            user_error(capsys, ["run", str(bundle), "--prompt-ids", "1"])
        else:
            user_error(capsys, command.split() + [str(bundle)])
    finally:
        (bundle / MANIFEST).write_text(json.dumps(manifest))


# ---- malformed load tables ------------------------------------------------------------------------------------

L, E = 2, 12  # the tiny preset: 2 MoE layers of 12 experts


@st.composite
def bad_load_tables(draw):
    """(suffix, file bytes, how) of a load table that cannot be right for the tiny preset."""
    how = draw(st.sampled_from(["shape", "ndim", "negative", "nan", "zeros", "json-text", "json-junk", "ragged",
                                "strings", "csv-junk", "npy-garbage", "npy-object", "bools", "json-nan"]))
    good = np.ones((L, E))
    if how == "shape":
        shape = draw(st.tuples(st.integers(0, 5), st.integers(0, 20)).filter(lambda s: s != (L, E)))
        arr = np.ones(shape)
    elif how == "ndim":
        arr = np.ones(draw(st.sampled_from([(E,), (L, E, 1), (1, L, E), ()])))
    elif how == "negative":
        arr = good.copy()
        arr[draw(st.integers(0, L - 1)), draw(st.integers(0, E - 1))] = draw(st.floats(max_value=-1e-6,
                                                                                         allow_nan=False))
    elif how == "nan":
        arr = good.copy()
        arr[0, draw(st.integers(0, E - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif how == "zeros":
        arr = np.zeros((L, E))
    elif how == "json-text":
        return ".json", draw(st.text(max_size=40)).encode("utf-8", errors="replace") + b"{", how
    elif how == "json-junk":
        junk = draw(st.one_of(st.dictionaries(st.text(max_size=4), JUNK, max_size=3), st.text(max_size=5), st.none()))
        return ".json", json.dumps(junk).encode(), how
    elif how == "ragged":
        return ".json", json.dumps([[1] * E, [1] * (E - draw(st.integers(1, E)))]).encode(), how
    elif how == "strings":
        return ".json", json.dumps([[draw(st.text(max_size=3))] * E] * L).encode(), how
    elif how == "json-nan":
        return ".json", ("[" + ",".join(["[" + ",".join(["NaN"] * E) + "]"] * L) + "]").encode(), how
    elif how == "csv-junk":
        return ".csv", draw(st.binary(max_size=64)), how
    elif how == "npy-garbage":
        return ".npy", draw(st.binary(max_size=64)), how
    elif how == "npy-object":
        buf = io.BytesIO()
        np.save(buf, np.array([[{"a": 1}] * E] * L, dtype=object), allow_pickle=True)
        return ".npy", buf.getvalue(), how
    else:  # a boolean array is no table of token counts (as .npy; JSON true/false read as 1/0 in hetrun.placement)
        arr = np.ones((L, E), dtype=bool)
    if how == "bools" or draw(st.booleans()):
        buf = io.BytesIO()
        np.save(buf, arr)
        return ".npy", buf.getvalue(), how
    return ".json", json.dumps(arr.tolist()).encode(), how  # NaN and Infinity as JSON writes them


@settings(max_examples=100, **FUZZ)
@given(case=bad_load_tables())
def test_malformed_load_tables(case, work, capsys):
    suffix, data, how = case
    event(how)
    path = work / f"load{suffix}"
    path.write_bytes(data)
    user_error(capsys, ["export", "tiny", "--profile", "cpu", "--load", str(path), "-o", str(work / "never"),
                        "--no-progress"])
    assert not (work / "never").exists()


# ---- a few through a real process --------------------------------------------------------------------------


def test_malformed_inputs_through_the_console_script(work, bundle, manifest):
    bad_profile = work / "sub.yaml"
    bad_profile.write_text("name: x\ndevices:\n  - {id: a, type: no-such-device}\n")
    assert "no-such-device" in user_error_subprocess(["export", "tiny", "--profile", str(bad_profile), "-o",
                                                      str(work / "never")])
    broken = work / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text('{"format": "hetrun-bundle", "format_version": 1, "files": {"../x": 1}}')
    assert MANIFEST in user_error_subprocess(["inspect", str(broken)])
    table = work / "sub-load.json"
    table.write_text("[[1, 2], [3]]")
    user_error_subprocess(["export", "tiny", "--profile", "cpu", "--load", str(table), "-o", str(work / "never")])


def test_yaml_python_tags_are_never_constructed(work, bundle, capsys):
    marker = work / "pwned"
    path = work / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndevices: []\n")
    user_error(capsys, ["export", "tiny", "--profile", str(path), "-o", str(work / "never")])
    user_error(capsys, ["run", str(bundle), "--prompt-ids", "1", "--profile", str(path)])
    assert not marker.exists()
