"""What each CPU runtime keeps resident per compiled expert, against the planner's figure for it.

The planner counts a device's memory as its backend holds each format (Backend.resident_expert_bytes: onnxruntime
expands BF16 and weight-only INT8 to FP32 on CPUs; OpenVINO's CPU plugin keeps a repacked copy beside the model's
constants). Deploy measures what compiling each expert added to the process's resident set (model.hetrun.memory);
the two must agree within 10% for every format a CPU device can run, or `hetrun plan` promises memory that deploy
then does not find. Experts are 34.6 MB in FP32 so that a session's fixed cost does not count.

Every case runs in one fresh process that keeps each deployed model alive: memory another test freed, or the
previous case's, would otherwise be reused and not show in the resident set.
"""

import json
import subprocess
import sys

import pytest

CASES = [("onnxruntime", p) for p in ("fp32", "bf16", "fp16", "fp8", "int8", "int8-w8a8", "int4")] + \
        [("torch", p) for p in ("fp32", "bf16", "fp16")] + \
        [("openvino", p) for p in ("fp32", "bf16", "fp16", "fp8", "int8", "int4")]

MEASURE = """
import json, sys
import hetrun
from hetrun.spec import MoESpec
from hetrun.tiny_models import random_model

spec = MoESpec.from_preset("mixtral-bench").replace(name="resident", num_experts=2, vocab_size=64)
def one_device(backend):
    return {"name": backend + "-only", "devices": [{"id": "cpu", "type": "host-cpu", "backend": backend}],
            "dense_device": "cpu"}
cases = json.loads(sys.argv[1])
for backend, precision in cases:  # each runtime's one-time costs (thread pools, plugins, a format's kernels) first
    hetrun.deploy(random_model(spec.replace(hidden_size=64, moe_intermediate_size=64)), one_device(backend),
                  precision=precision, threads=1)
keep, out = [], {}
for backend, precision in cases:
    model = hetrun.deploy(random_model(spec, seed=0), one_device(backend), precision=precision, threads=1)
    keep.append(model)  # never freed: the next case must not reuse its memory
    out[backend + " " + precision] = model.hetrun.memory.report(model.hetrun.plan)["cpu:0"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured():
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(CASES)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend,precision", CASES)
def test_deployed_memory_is_what_the_plan_counts(measured, backend, precision):
    report = measured[f"{backend} {precision}"]
    ratio = report["measured_bytes"] / report["predicted_bytes"]
    print(f"{backend} {precision}: measured {report['measured_bytes'] / 1e6:.1f} MB, planned "
          f"{report['predicted_bytes'] / 1e6:.1f} MB, ratio {ratio:.2f}")
    assert report["experts"] == 2
    assert 0.9 <= ratio <= 1.1
