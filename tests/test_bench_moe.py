"""`hetrun bench moe`'s report: what it prints from a run's result (the timing itself is a benchmark, not a test)."""

from hetrun.backends import host_cpu

from hetrun.bench import moe


def _row(case: str, system: str, ratio: float, **extra) -> dict:
    return {"case": case, "system": system, "tokens": 1, "precisions": {"cpu": "int4-w4a8"}, "hetrun_ms": 0.9,
            "transformers_ms": 0.9 / ratio, "reference": "transformers bf16", "ratio": ratio,
            "rel_error_vs_fp32": 0.18, **extra}


def test_the_report_keeps_every_cell_whole_in_a_pipe_and_says_which_targets_are_met(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: rich would assume 80 columns and cut cells to "…"
    result = {"rows": [_row("int4", "onnxruntime", 0.34, weight_gbs=10.0, expert_alone_gbs=20.0),
                       _row("int4", "cpu profile", 0.77, weight_gbs=5.0, expert_alone_gbs=7.0),
                       _row("int8", "onnxruntime", 0.52, weight_gbs=15.0, expert_alone_gbs=21.0)],
              "read_bandwidth_gbs": 35.0, "cpu": host_cpu.describe(), "threads": 2}
    moe._print(result)
    out = capsys.readouterr().out
    assert "…" not in out and "experts alone" in out and "20.0 (57%)" in out
    lines = out.splitlines()
    assert any("int4 at 1 token: best 0.34" in line and "met" in line for line in lines)
    assert any("int8 at 1 token: best 0.52" in line and "missed" in line for line in lines)
    assert any("int4 weight traffic" in line and "29% of read bandwidth" in line and "alone: 57%" in line
               for line in lines)


def test_a_graph_row_has_no_expert_calls_alone_and_names_itself_in_the_traffic_line(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = {"rows": [_row("int8", "onnxruntime", 0.52, weight_gbs=15.0, expert_alone_gbs=21.0),
                       _row("int8", moe.GRAPH_SYSTEM, 0.36, weight_gbs=25.0)],
              "read_bandwidth_gbs": 35.0, "cpu": host_cpu.describe(), "threads": 2}
    moe._print(result)
    lines = capsys.readouterr().out.splitlines()
    assert any("int8 at 1 token: best 0.36" in line and "met" in line for line in lines)
    assert any("int8 weight traffic" in line and "71% of read bandwidth" in line and "(onnxruntime graph)" in line
               for line in lines)
