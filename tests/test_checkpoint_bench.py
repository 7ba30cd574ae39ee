"""`hetrun bench load`: its arguments, and its arms' own code on a tiny checkpoint (the bench itself writes a 4.9 GB
checkpoint: it is run by hand)."""

import pytest

from hetrun.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--arms", "directory,nope"], "unknown arm 'nope'"),
    (["--max-gb", "0"], "--max-gb must be a positive number"),
    (["--max-gb", "nan"], "--max-gb must be a positive number"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, needle, capsys):
    assert main(["bench", "load", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetrun: error:") and err.count("\n") == 1 and needle in err, err


def test_a_folder_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["bench", "load", "--shape", "small", "--dir", str(tmp_path / "absent"), "--arms", "directory"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err, err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "load", "--help"])
    assert e.value.code == 0 and "hetrun bench load --shape small" in capsys.readouterr().out


def test_torch_arms_hold_bf16_narrow_and_run_int4_on_onnxruntime(tmp_path):
    # the arms' own code, in this process, on a tiny checkpoint: the torch backend where it runs the format, else
    # onnxruntime (torch has no INT4), each arm's memory against the plan's
    import torch

    from hetrun.bench.load import _arm
    from hetrun.checkpoint.writer import save_checkpoint
    from hetrun.tiny_models import tiny_model

    ckpt = save_checkpoint(tiny_model("mixtral").to(torch.bfloat16), tmp_path / "ckpt")
    bf16 = _arm("directory", str(ckpt), str(tmp_path), "torch", 1)
    int4 = _arm("directory-int4", str(ckpt), str(tmp_path), "torch", 1)
    assert bf16["backend"] == "torch" and int4["backend"] == "onnxruntime"
    assert all(m["experts"] > 0 for m in bf16["memory"].values()) and bf16["bytes_read"] > 0
