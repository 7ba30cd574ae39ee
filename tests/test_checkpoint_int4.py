"""The INT4 rows, restated: one matrix's and one SwiGLU expert's error on Gaussian weights within their targets, and
GPTQ (a GPTQ checkpoint deployed from its directory) against round-to-nearest on the briefly trained tiny model."""

import pytest

from hetrun.cli.accuracy import INT4_TARGETS, int4_report


@pytest.fixture(scope="module")
def report():
    return int4_report("tiny")  # 32768 held-out positions: GPTQ and round-to-nearest differ by tens of top-1 flips


@pytest.mark.parametrize("precision", list(INT4_TARGETS))
def test_int4_rows_meet_their_targets(report, precision):
    row = next(r for r in report["rows"] if r["precision"] == precision)
    print(f"{precision}: matrix {row['matrix_rel_err']:.4f} (<= {row['matrix_target']}), "
          f"expert {row['expert_rel_err']:.4f} (<= {row['expert_target']})")
    assert 0.5 * row["matrix_target"] < row["matrix_rel_err"] <= row["matrix_target"]
    assert 0.5 * row["expert_target"] < row["expert_rel_err"] <= row["expert_target"]


@pytest.mark.parametrize("precision", list(INT4_TARGETS))
def test_gptq_beats_round_to_nearest_on_the_trained_model(report, precision):
    row = next(r for r in report["rows"] if r["precision"] == precision)
    rtn, gptq = row["rtn"], row["gptq"]
    print(f"{precision}: layer error RTN {rtn['layer_rel_err']} GPTQ {gptq['layer_rel_err']}; top-1 RTN "
          f"{rtn['top1']['agree']} GPTQ {gptq['top1']['agree']} of {gptq['top1']['positions']}; logits error RTN "
          f"{rtn['top1']['logits_rel_err']:.4f} GPTQ {gptq['top1']['logits_rel_err']:.4f}")
    assert all(g < r for g, r in zip(gptq["layer_rel_err"], rtn["layer_rel_err"]))  # every MoE layer, held out
    assert gptq["top1"]["logits_rel_err"] < rtn["top1"]["logits_rel_err"]
    # teacher-forced top-1 agreement with FP32: GPTQ agrees on more positions. Four runs (the trained model varies a
    # little from run to run) gave +117 to +153 of 32768 at g128 and +29 to +108 at g32, where groups of 32 leave
    # GPTQ less to fix; with 1024 calibration tokens instead of 8192, g32 once came out at -7
    assert gptq["top1"]["agree"] > rtn["top1"]["agree"]
    assert gptq["top1"]["top1"] > 0.95
