"""The CLI's contract: exit 0 on success, 2 with one line on user error, never a traceback."""

import json
import subprocess
import sys

import pytest

from hetrun.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_profiles_json(capsys):
    rc, out, _ = run_cli(capsys, "profiles", "--json")
    assert rc == 0 and "mixed-demo" in json.loads(out)["profiles"]


@pytest.mark.parametrize("argv,match", [
    (["demo", "--profile", "no-such-profile"], "unknown profile 'no-such-profile'"),
    (["demo", "--precision", "fp8"], "device 'ascend:0' (ascend-910b2) has no fp8; its precisions are fp16, bf16"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, match):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hetrun: error:") and match in err
    assert "Traceback" not in err


def test_demo_runs_on_defaults_and_matches_reference(capsys):
    rc, out, _ = run_cli(capsys, "demo", "--json", "--tokens", "6")
    r = json.loads(out)
    assert rc == 0 and r["profile"] == "mixed-demo"
    assert {d["precision"] for d in r["devices"]} == {"fp8", "fp16", "bf16"}
    assert r["top1_agreement"] >= 0.9
    assert all(d["modeled_ms"] > 0 for d in r["devices"])


def test_console_script_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "hetrun", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout
