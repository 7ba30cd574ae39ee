"""The torch CPU backend (hetrun.backends.torch_cpu): BF16 and FP16 experts held narrow, computed as the graph says,
at every row count; run for real on this CPU."""

import numpy as np
import pytest
import torch
from hetrun.backends import host_cpu
from hetrun.backends.graph_matrices import read_expert_matrices

from hetrun.bench.precision import cpu_backend, gaussian_expert
from hetrun.runtime.graphs import build_expert_graph
from tests.test_precision_graphs import BOUNDS, FLOORS, rel

W = gaussian_expert(256, 512, seed=0)


def _session(runtime: str, precision: str):
    be = cpu_backend(runtime, precision, 2)
    g = build_expert_graph(W, precision, target=be.graph_target())
    return be.load(g.serialize(), "test", g.meta)


@pytest.mark.parametrize("rows", [1, 5, 64])  # narrow weights at 1 and 5 rows, widened for the call at 64
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_computes_the_graphs_numbers(precision, rows):
    x = np.random.default_rng(rows).standard_normal((rows, 256)).astype(np.float32)
    ref = W.reference(x)
    y_torch, y_ort = _session("torch", precision).run(x), _session("onnxruntime", precision).run(x)
    assert y_torch.shape == (rows, 256) and np.isfinite(y_torch).all()
    err = rel(y_torch, ref)
    assert FLOORS[precision] <= err < BOUNDS[precision]
    assert rel(y_torch, y_ort) < 3e-4  # the same roundings; only FP32 summation order differs


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32)])
def test_weights_stay_in_the_formats_dtype_and_are_the_graphs(precision, dtype):
    s = _session("torch", precision)
    assert s.gate_up.dtype == s.down.dtype == dtype
    assert s.gate_up.shape == (1024, 256) and s.down.shape == (256, 512)  # [N, K]: 2 bytes per BF16/FP16 weight
    # read straight from the stored initializers: bit for bit what evaluating the graph gives
    m = read_expert_matrices(build_expert_graph(W, precision, target="torch").serialize())
    assert torch.equal(s.gate_up.float(), torch.from_numpy(m.gate_up).t())
    assert torch.equal(s.down.float(), torch.from_numpy(m.down).t())


def test_the_narrow_product_runs_at_every_row_count_where_the_cpu_has_the_dtype(monkeypatch):
    emulated = _session("torch", "bf16")
    monkeypatch.setattr(host_cpu, "native_float", lambda dtype: True)
    native = _session("torch", "bf16")
    assert emulated.narrow_rows is not None and native.narrow_rows is None
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    assert rel(native.run(x), emulated.run(x)) < 3e-4  # the same format whichever way it is multiplied


def test_deploy_on_torch_places_and_reports_like_any_backend():
    import hetrun
    from hetrun.tiny_models import tiny_model

    profile = {"name": "torch-cpu", "devices": [{"id": "t", "type": "host-cpu", "backend": "torch"}]}
    model = hetrun.deploy(tiny_model("mixtral"), profile)
    assert model.hetrun.plan.precision == {"t:0": "bf16"}  # its preferred format
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 1, 4, 1, 5]])).logits).all()


def test_deploy_hands_in_process_backends_the_graph_itself(monkeypatch):
    """torch and onnxruntime read an expert graph in this process (caps.loads_in_process): deploy builds it
    in_process and hands over the ExpertGraph, its weights held beside the proto, never copied into it nor
    serialized (protobuf's copies were most of a BF16 deploy's time; onnxruntime reads the arrays from a folder,
    hetrun.backends.graph_files). Both compute what the same weights give."""
    import onnx

    import hetrun
    from hetrun.runtime.graphs import ExpertGraph
    from hetrun.tiny_models import tiny_model

    serialized = []
    real_serialize = ExpertGraph.serialize
    monkeypatch.setattr(ExpertGraph, "serialize", lambda g: serialized.append(1) or real_serialize(g))
    loaded = []  # (graph type, weights beside its proto, weights inside it) as each load() began

    def seen(g):
        inside = [t.name for t in g.model.graph.initializer if t.raw_data] if isinstance(g, ExpertGraph) else None
        return type(g), len(getattr(g, "arrays", {})), inside

    for backend in ("torch", "onnxruntime"):
        cls = type(cpu_backend(backend, "fp32", 1))
        real = cls.load
        monkeypatch.setattr(cls, "load", lambda self, g, *a, _real=real: loaded.append(seen(g)) or _real(self, g, *a))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    outs = {}
    for backend in ("torch", "onnxruntime"):
        serialized.clear(), loaded.clear()
        profile = {"name": backend, "devices": [{"id": "d", "type": "host-cpu", "backend": backend,
                                                  "precision": "fp32"}]}
        model = hetrun.deploy(tiny_model("mixtral"), profile)
        assert not serialized and all(kind in (ExpertGraph, onnx.ModelProto) for kind, _, _ in loaded)
        experts = [(beside, inside) for kind, beside, inside in loaded if kind is ExpertGraph]
        assert len(experts) == 2 * 8  # tiny_model("mixtral"): 2 layers of 8 experts (the dense linears: protos)
        for beside, inside in experts:
            assert beside == 2 and not any(n.startswith("w_") for n in inside)  # gate_up and down, beside the proto
        with torch.no_grad():
            outs[backend] = model(ids).logits
    torch.testing.assert_close(outs["torch"], outs["onnxruntime"], rtol=1e-4, atol=1e-4)


def test_an_in_process_graph_fills_its_proto_when_serialized():
    """An in_process graph's arrays go into its proto on serialize(): the bytes equal the graph built the usual way."""
    for precision in ("fp32", "bf16", "fp16"):
        for target in ("torch", "onnxruntime"):
            g = build_expert_graph(W, precision, target=target, in_process=True)
            assert g.arrays
            assert g.serialize() == build_expert_graph(W, precision, target=target).serialize()
            assert not g.arrays
