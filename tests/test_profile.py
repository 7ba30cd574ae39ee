import pytest

import hetrun
from hetrun.errors import BackendUnavailable, PrecisionError, ProfileError
from hetrun.profile import builtin_profiles, device_catalog, load_profile


def test_catalog_has_sourced_devices_and_fp8_only_where_silicon_has_it():
    cat = device_catalog()
    for name in ("h100-sxm", "h800", "h20", "a100-80gb", "rtx-4090", "ascend-910b2", "ascend-910c", "gaudi2",
                 "gaudi3", "intel-max-1550", "xeon-8480"):
        assert cat[name].sources
    assert "fp8" in cat["h100-sxm"].precisions and cat["h100-sxm"].tflops["fp8"] == 1979
    for no_fp8 in ("a100-80gb", "ascend-910b2", "ascend-910b3", "ascend-910b4", "ascend-910c"):
        assert "fp8" not in cat[no_fp8].precisions


def test_builtin_profiles_expand_devices():
    assert {"mixed-demo", "cpu"} <= set(builtin_profiles())
    mixed = load_profile("mixed-demo")
    assert [d.type.name for d in mixed.devices] == ["h100-sxm", "ascend-910b2", "xeon-8480"]
    assert {d.backend for d in mixed.devices} == {"simulated"}
    cpu = load_profile("cpu")
    assert [d.backend for d in cpu.devices] == ["onnxruntime", "openvino"]


def test_per_node_expansion():
    p = load_profile({"name": "x", "devices": [{"id": "g", "type": "h800", "count": 16, "per_node": 8}],
                      "links": {"inter_node": {"bandwidth_gbs": 50}}})
    assert [d.node for d in p.devices] == [0] * 8 + [1] * 8
    assert p.link(p.devices[0], p.devices[9]).bandwidth_gbs == 50


@pytest.mark.parametrize("data,match", [
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm", "backend": "cuda-magic"}]}, "unknown backend 'cuda-magic'"),
    ({"name": "x", "devices": [{"id": "a", "type": "tpu-v9"}]}, "unknown device type 'tpu-v9'"),
    ({"name": "x", "devices": []}, "field 'devices'"),
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm", "count": 0}]}, "field 'devices.0.count'"),
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm", "colour": "red"}]}, "colour"),
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm"}, {"id": "a", "type": "h800"}]}, "used twice"),
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm"}], "dense_device": "b"}, "dense_device 'b'"),
    ({"name": "x", "devices": [{"id": "a", "type": "h100-sxm"}], "pins": [{"device": "zz", "layers": "0-2"}]},
     "pin names device 'zz'"),
    ("just a string", "expected a mapping"),
])
def test_malformed_profiles_give_one_line_errors(data, match):
    with pytest.raises(ProfileError, match=match) as e:
        load_profile(data) if isinstance(data, dict) else load_profile_text(data)
    assert "\n" not in str(e.value)


def load_profile_text(text, tmp_path=None):
    import tempfile
    from pathlib import Path
    f = Path(tempfile.mkdtemp()) / "p.yaml"
    f.write_text(text)
    return load_profile(f)


def test_unknown_profile_name_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'; use a YAML path or one of: "):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.yaml")


def test_explicit_fp8_on_ascend_is_an_error_naming_device_and_precisions():
    with pytest.raises(PrecisionError, match=r"device 'npu' \(ascend-910b2\) cannot run fp8; it supports fp16, bf16"):
        load_profile({"name": "x", "devices": [{"id": "npu", "type": "ascend-910b2", "precision": "fp8"}]})


def test_uninstalled_vendor_backend_is_a_clear_error(fresh):
    profile = {"name": "x", "devices": [{"id": "npu", "type": "ascend-910b2", "backend": "ascend"}]}
    with pytest.raises(BackendUnavailable, match="backend 'ascend' is not available here") as e:
        hetrun.deploy(fresh("mixtral"), profile, precision="fp32")
    assert "\n" not in str(e.value)
