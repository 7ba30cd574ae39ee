"""The prefill queue's residual (a step is one batch) and permutation-based expert routing."""

from importlib import resources

import numpy as np
import pytest
import yaml

from hetrun.profile import load_profile
from hetrun.sim.engine import StepModel
from hetrun.sim.operators import permute_ops
from hetrun.sim.run import simulate


@pytest.mark.parametrize("n, c, steps", [(100, 4096, 0.5), (4096, 4096, 0.5), (8192, 4096, 1.0), (40960, 4096, 5.0)])
def test_step_residual_is_md1_for_short_prompts_and_fluid_for_long_ones(n, c, steps):
    # equal prompts within one chunk: an arrival waits out half a step (M/D/1); prompts of m whole chunks: the
    # fluid Pollaczek-Khinchine residual E[n^2] / (2 c E[n]) = m / 2
    assert StepModel._step_residual(np.full(7, float(n)), float(c)) == pytest.approx(steps)


def test_step_residual_never_below_half_a_step():
    new = np.random.default_rng(0).lognormal(7, 1, 500).round() + 1
    for c in (256.0, 2048.0, 16384.0):
        r = StepModel._step_residual(new, c)
        assert r >= 0.5 and r >= (new ** 2).sum() / new.sum() / (2 * c) - 0.5


def test_permute_ops_count_the_expansion_and_the_restore():
    src, dst = permute_ops(8, 7168, 10.0, np.array([80.0]))
    assert src.bytes == 2.0 * 7168 * 9 * 10  # read each token, write it once per routed expert
    assert float(dst.bytes[0]) == 4.0 * 7168 * 80  # read and write every expert output row


def _cann(routing: str):
    d = yaml.safe_load(resources.files("hetrun.profiles.published").joinpath("cann-a3-prefill.yaml").read_text())
    d["extra"]["sim"]["expert_routing"] = routing
    return simulate("deepseek-r1", load_profile(d), None, ("prefill",)).phases["prefill"]


def test_permutation_routing_slows_the_compute_stages_only():
    fused, permute = _cann("fused"), _cann("permute")
    assert permute.step_s > fused.step_s
    for stage in ("attention", "experts"):
        assert permute.step.stage_max[stage].sum() > fused.step.stage_max[stage].sum()
    for stage in ("dispatch", "combine"):
        np.testing.assert_allclose(permute.step.stage_max[stage], fused.step.stage_max[stage])
