"""The whole model as one onnxruntime graph (profile `model_graph`): what it computes against transformers and
against the dispatcher path at the same precisions, what it serves and refuses, and what it holds."""

import copy
import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch
from hetrun.backends.graph_files import DATA_FILE, MODEL_FILE, StreamedGraph
from transformers.cache_utils import DynamicCache

from hetrun.bench.generate import write_checkpoint
from hetrun.deployment import deploy
from hetrun.errors import HetrunError
from hetrun.placement.planner import plan
from hetrun.profile import load_profile
from hetrun.spec import MoESpec
from hetrun.tiny_models import FAMILY_SPECS, random_model

SPEC = MoESpec.from_preset("mixtral-bench").replace(name="mixtral-graph", num_layers=2, hidden_size=128,
                                                    moe_intermediate_size=256, vocab_size=512)
ORT = [{"id": "cpu", "type": "host-cpu", "backend": "onnxruntime"}]
TWO = [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"},
       {"id": "ov", "type": "host-cpu", "backend": "openvino"}]
GREEDY = dict(do_sample=False, pad_token_id=0)


def _deploy(model, precision: str, graph: str = "on", dense: str | None = None, devices=ORT):
    dense = dense or {"fp32": "fp32", "int4-w4a8": "int4-w4a8"}.get(precision, "int8-w8a8")
    profile = load_profile({"name": "graph-test", "devices": devices, "dense_precision": dense, "model_graph": graph})
    spec = MoESpec.from_hf_config(model.config) if not isinstance(model, str) else SPEC
    p = dataclasses.replace(plan(spec, profile), precision={d.id: precision for d in profile.devices})
    return deploy(model, profile, plan=p, threads=1)


@pytest.fixture(scope="module")
def reference():
    return random_model(SPEC, seed=3).float().eval()


def _prompt(length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, SPEC.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def test_fp32_graph_gives_transformers_logits_and_greedy_tokens(reference):
    model = _deploy(copy.deepcopy(reference), "fp32")
    assert model.hetrun.graph is not None and model.hetrun.layers == []  # no dispatcher sessions beside it
    assert model.lm_head.weight.numel() == 0 and model.model.layers[1].self_attn.o_proj.weight.numel() == 0
    x = _prompt()
    with torch.no_grad():
        want, got = reference(x).logits, model(x).logits  # [1, S, V]
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < 1e-4
        for kw in ({"max_new_tokens": 20, "eos_token_id": None}, {"max_length": 30}):
            assert torch.equal(model.generate(x, **GREEDY, **kw), reference.generate(x, **GREEDY, **kw))
    assert model.generate.calls == 2  # both ran in hetrun's own greedy loop
    routed = model.hetrun.stats.tokens_per_expert  # [L, E]
    assert routed.sum() == model.hetrun.stats.tokens_per_device.sum() > 0
    assert routed.shape == (SPEC.num_layers, SPEC.num_experts)


def test_greedy_loop_stops_at_end_of_sequence_and_leaves_other_requests_to_transformers(reference):
    model = _deploy(copy.deepcopy(reference), "fp32")
    x = _prompt(seed=1)
    with torch.no_grad():
        free = reference.generate(x, max_new_tokens=12, eos_token_id=None, **GREEDY)
        eos = int(free[0, x.shape[1] + 4])  # the fifth new token ends the sequence
        want = reference.generate(x, max_new_tokens=12, eos_token_id=eos, **GREEDY)
        got = model.generate(x, max_new_tokens=12, eos_token_id=eos, **GREEDY)
        assert torch.equal(got, want) and got.shape[1] <= x.shape[1] + 5
        assert model.generate.calls == 1
        # a logits processor (repetition penalty) and a full mask: transformers' loop on the graph's forward
        scores = {"output_scores": True, "return_dict_in_generate": True}
        for kw in ({"repetition_penalty": 1.3}, {"attention_mask": torch.ones_like(x)}, scores):
            a = model.generate(x, max_new_tokens=6, eos_token_id=None, **GREEDY, **kw)
            b = reference.generate(x, max_new_tokens=6, eos_token_id=None, **GREEDY, **kw)
            a, b = (a, b) if isinstance(a, torch.Tensor) else (a.sequences, b.sequences)
            assert torch.equal(a, b), kw
        assert model.generate.calls == 2  # the full mask alone was greedy's to take


@pytest.mark.parametrize("precision", ["int8-w8a8", "int4-w4a8", "fp32"])
def test_graph_computes_what_the_dispatcher_path_computes_at_the_same_precisions(reference, precision):
    graph = _deploy(copy.deepcopy(reference), precision, "on")
    dispatcher = _deploy(copy.deepcopy(reference), precision, "off")
    assert graph.hetrun.graph is not None and dispatcher.hetrun.graph is None
    x = _prompt(seed=2)
    with torch.no_grad():
        caches = DynamicCache(), DynamicCache()
        a, b = graph(x, cache=caches[0]).logits, dispatcher(x, cache=caches[1]).logits  # prefill [1, S, V]
        assert ((a - b).norm() / b.norm()).item() < 1e-4
        token = a[:, -1:].argmax(-1)
        for _ in range(4):  # decode steps on each one's own cache
            a, b = graph(token, cache=caches[0]).logits, dispatcher(token, cache=caches[1]).logits
            assert ((a - b).norm() / b.norm()).item() < 1e-4
            token = b.argmax(-1)
        ref = reference(x).logits
        errors = [((m(x).logits - ref).norm() / ref.norm()).item() for m in (graph, dispatcher)]
    assert abs(errors[0] - errors[1]) < 1e-4 and (precision != "fp32" or errors[0] < 1e-4)


def test_calls_it_cannot_serve_stop_with_one_line_naming_the_switch(reference):
    model = _deploy(copy.deepcopy(reference), "fp32")
    x = _prompt()
    with torch.no_grad():
        for call in (lambda: model(torch.cat([x, x])),  # a batch
                     lambda: model(x, attention_mask=torch.cat([torch.zeros(1, 2, dtype=torch.long),
                                                                torch.ones(1, x.shape[1] - 2, dtype=torch.long)], 1)),
                     lambda: model(x, position_ids=torch.arange(5, 5 + x.shape[1])[None])):
            with pytest.raises(HetrunError) as e:
                call()
            assert "\n" not in str(e.value) and "model_graph: off" in str(e.value)


def test_model_graph_on_where_it_cannot_run_is_a_one_line_error_and_auto_falls_back(reference):
    with pytest.raises(HetrunError) as e:
        _deploy(copy.deepcopy(reference), "fp32", "on", devices=TWO)
    assert "not all on one device" in str(e.value) and "model_graph: auto or off" in str(e.value)
    model = _deploy(copy.deepcopy(reference), "fp32", "auto", devices=TWO)
    assert model.hetrun.graph is None and model.hetrun.layers  # the dispatcher runs it
    x = _prompt()
    with torch.no_grad():
        want = reference(x).logits
        assert ((model(x).logits - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_auto_takes_what_it_can_compute_and_leaves_every_other_family_to_the_dispatcher(fresh, family):
    ref = fresh(family).float().eval()
    model = _deploy(fresh(family).float().eval(), "fp32", "auto", dense="fp32")
    x = torch.randint(3, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ref(x).logits, model(x).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4, f"{family}, graph: {model.hetrun.graph is not None}"
    if family == "mixtral":
        assert model.hetrun.graph is not None


def test_a_checkpoint_deploys_as_one_graph_with_its_dense_weights_released(tmp_path):
    write_checkpoint(tmp_path)  # the 2-layer Mixtral-shaped benchmark model, BF16
    model = _deploy(str(tmp_path), "int4-w4a8")
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).weight.numel() == 0 for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert model.lm_head.weight.numel() == 0
    assert isinstance(model.model.layers[0].mlp, torch.nn.Identity)  # the MoE block's torch code never runs
    assert model.hetrun.dense.precision == "int4-w4a8" and model.hetrun.memory.report(model.hetrun.plan)
    with torch.no_grad():
        out = model.generate(_prompt(16), max_new_tokens=4, eos_token_id=None, **GREEDY)
    assert out.shape == (1, 20)


def test_a_streamed_graph_writes_each_weight_as_it_is_added_and_removes_its_folder():
    model = onnx.ModelProto()
    g = StreamedGraph(model)
    t = model.graph.initializer.add()
    t.name, t.data_type = "w", onnx.TensorProto.FLOAT
    t.dims.extend([64, 32])
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    g.add(t, w)
    folder = os.path.dirname(g._data.name)
    assert os.path.getsize(os.path.join(folder, DATA_FILE)) == w.nbytes  # written now, not at the end
    assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data
    model.graph.output.add().CopyFrom(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [64, 32]))

    def read(path):
        assert os.path.basename(path) == MODEL_FILE
        return onnx.numpy_helper.to_array(onnx.load(path).graph.initializer[0], base_dir=folder)

    assert np.array_equal(g.read(read), w)
    assert not os.path.exists(folder)


@pytest.mark.parametrize("precision", ["fp32", "int4-w4a8"])
def test_the_moe_layer_graph_gives_the_dispatchers_layer_output(reference, precision):
    from hetrun.backends.registry import require_backend

    from hetrun.runtime.model_graph import layer_graph
    from hetrun.runtime.weights import model_layer_weights

    model = _deploy(copy.deepcopy(reference), precision, "off")
    weights = model_layer_weights(SPEC, copy.deepcopy(reference))[0][1]
    backend = require_backend("onnxruntime")(model.hetrun.devices[0], precision, 1)
    session = backend.load_graph(layer_graph(weights, SPEC.router, precision, SPEC.hidden_size).loadable())
    for tokens in (1, 9):
        x = torch.randn(tokens, SPEC.hidden_size, generator=torch.Generator().manual_seed(tokens))  # [T, D]
        want = model.hetrun.layers[0](x)  # [T, D]
        got = torch.from_numpy(session.run(None, {"hidden": x.numpy()})[0])
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_non_finite_logits_stop_with_the_device_named_and_an_input_fault_is_told_apart(reference, monkeypatch):
    import hetrun.runtime.model_graph as model_graph

    model = _deploy(copy.deepcopy(reference), "fp32")
    x = _prompt()
    monkeypatch.setattr(model_graph, "all_finite", lambda t: t.shape[-1] != SPEC.vocab_size)  # the logits "fail"
    with pytest.raises(HetrunError, match="device 'cpu:0' returned NaN or inf"):
        model(x)
    monkeypatch.setattr(model_graph, "all_finite", lambda t: False)  # the embedded input is not finite either
    with pytest.raises(HetrunError, match="its input holds NaN or inf"):
        model(x)


def test_the_builtin_cpu_graph_profile_runs_what_it_can_as_one_graph(fresh):
    from hetrun.tiny_models import tiny_model

    assert deploy(fresh("mixtral"), "cpu-graph", threads=1).hetrun.graph is not None
    assert deploy(tiny_model("deepseek_v3"), "cpu-graph", threads=1).hetrun.graph is None  # its router: dispatcher
