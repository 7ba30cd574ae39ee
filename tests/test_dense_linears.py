"""The dense part's linear layers on the dense device (hetrun.runtime.dense): which run there, at what precision,
with what error, and what happens when the device or the input is wrong."""

import copy
import logging
import re

import numpy as np
import pytest
import torch
from hetrun.backends import host_cpu
from hetrun.backends.ort_threads import plain_session_options

import hetrun
from hetrun.errors import HetrunError, PrecisionError
from hetrun.runtime.dense import RuntimeLinear
from hetrun.runtime.dispatch import HetrunMoEBlock
from hetrun.runtime.graphs import build_linear_graph
from hetrun.tiny_models import tiny_model

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
ORT = [{"id": "ort", "type": "host-cpu", "backend": "onnxruntime"}]


def _profile(dense_precision: str, devices=ORT, **extra) -> dict:
    return {"name": f"dense-{dense_precision}", "devices": devices, "dense_precision": dense_precision, **extra}


def _linears(model) -> tuple[list[str], list[str]]:
    torch_linears = [p for p, m in model.named_modules() if type(m) is torch.nn.Linear]
    runtime_linears = [p for p, m in model.named_modules() if isinstance(m, RuntimeLinear)]
    return torch_linears, runtime_linears


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_every_dense_linear_runs_on_the_dense_device_at_int8(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
    before, _ = _linears(model)
    deployed = hetrun.deploy(copy.deepcopy(model), _profile("int8-w8a8"), precision="int8-w8a8")
    after, replaced = _linears(deployed)
    assert after == [] and replaced  # no torch nn.Linear (and so no FP32/BF16 dense weight) is left
    moe = [p for p, m in deployed.named_modules() if isinstance(m, HetrunMoEBlock)]
    assert sorted(replaced) == sorted(p for p in before if not any(p.startswith(f"{b}.") for b in moe))
    report = deployed.hetrun.dense
    assert report.device == "ort:0" and report.precision == "int8-w8a8" and sorted(report.layers) == sorted(replaced)
    with torch.no_grad():
        out = deployed(IDS).logits
    err = float((out - ref).norm() / ref.norm())
    print(f"{family}: logits error with INT8 experts and INT8 dense linears {err:.4f}")
    assert err < 0.1  # W8A8 everywhere on random tiny weights (measured 0.03-0.06)


def test_fp32_dense_linears_reproduce_the_model():
    model = tiny_model("mixtral")
    with torch.no_grad():
        ref = model(IDS).logits
    deployed = hetrun.deploy(copy.deepcopy(model), _profile("fp32"), precision="fp32")
    assert _linears(deployed)[0] == []
    with torch.no_grad():
        out = deployed(IDS).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


OV = [{"id": "ov", "type": "host-cpu", "backend": "openvino"}]


@pytest.mark.parametrize("precision, dense_precision, devices", [
    ("int8-w8a8", "model", ORT), ("bf16", "auto", ORT),
    ("fp32", "auto", OV)])  # OpenVINO would hold FP32 weights twice (its repacked copy beside the graph's)
def test_the_dense_part_stays_in_torch_unless_auto_moves_it(precision, dense_precision, devices):
    deployed = hetrun.deploy(tiny_model("mixtral"), _profile(dense_precision, devices), precision=precision)
    torch_linears, replaced = _linears(deployed)
    assert replaced == [] and torch_linears and deployed.hetrun.dense is None


@pytest.mark.parametrize("precision, devices, want", [("int8-w8a8", ORT, "int8-w8a8"), ("int8", OV, "int8-w8a8"),
                                                      ("fp32", ORT, "fp32")])
def test_auto_follows_an_integer_dense_device_and_fp32_on_onnxruntime(precision, devices, want):
    deployed = hetrun.deploy(tiny_model("mixtral"), _profile("auto", devices), precision=precision)
    assert deployed.hetrun.dense.precision == want and _linears(deployed)[0] == []


def test_auto_fp32_reproduces_a_bf16_model_in_fp32_with_its_attention_on_the_runtime(monkeypatch):
    # a BF16 model (as checkpoints ship) deployed with FP32 experts on a CPU that emulates BF16: linears and
    # attention on onnxruntime in FP32, the rest upcast -- the logits and greedy tokens of the model cast to FP32
    monkeypatch.setattr(host_cpu, "native_float", lambda dtype: dtype in (torch.float32, torch.float64))
    model = tiny_model("mixtral").to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    deployed = hetrun.deploy(copy.deepcopy(model), _profile("auto"), precision="fp32")
    report = deployed.hetrun.dense
    assert report.precision == "fp32" and report.upcast_from == torch.bfloat16
    assert report.attention_layers == model.config.num_hidden_layers
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref, out = reference(IDS).logits, deployed(IDS).logits
        want, got = reference.generate(IDS, **gen), deployed.generate(IDS, **gen)
    assert out.dtype == torch.float32 and float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert torch.equal(got, want)


# error bound of one Gaussian matrix with Gaussian inputs; stored bits per weight
LINEAR_BOUNDS = {"int8-w8a8": (0.02, 8), "int4-w4a8": (0.125, 4)}


@pytest.mark.parametrize("precision", sorted(LINEAR_BOUNDS))
def test_an_integer_linear_is_within_its_formats_error_of_its_weight(precision):
    g = np.random.default_rng(0)
    w = g.standard_normal((300, 200)).astype(np.float32)  # K=200: a ragged last block of 128
    x = g.standard_normal((5, 200)).astype(np.float32)
    import onnxruntime as ort

    graph = build_linear_graph(w, precision)
    y = ort.InferenceSession(graph.SerializeToString(), plain_session_options(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ w.T
    bound, bits = LINEAR_BOUNDS[precision]
    assert y.shape == (5, 300)
    err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
    assert 0.1 * bound < err < bound  # weights and activations rounded per block: an error, within the format's
    weights = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    assert len(weights.raw_data) == 300 * 256 * bits // 8  # K padded to whole blocks, `bits` per weight


@pytest.mark.parametrize("precision", sorted(LINEAR_BOUNDS))
def test_a_bf16_weight_gives_the_graph_of_its_fp32_values(precision):
    # INT8 reads a BF16 weight to FP32 a row chunk at a time (no whole FP32 copy): the chunks must not change a bit
    w = torch.randn(70000, 200).to(torch.bfloat16)  # [N, K]: 18 chunks of 4 MB of FP32 scratch (K padded to 256)
    from_bf16, from_fp32 = build_linear_graph(w, precision), build_linear_graph(w.float().numpy(), precision)
    assert [t.raw_data for t in from_bf16.graph.initializer] == [t.raw_data for t in from_fp32.graph.initializer]


def test_int4_dense_linears_when_asked_and_int8_beside_int4_experts_by_default(caplog):
    model = tiny_model("mixtral")
    with torch.no_grad():
        ref = model(IDS).logits
    with caplog.at_level(logging.WARNING, logger="hetrun"):
        auto = hetrun.deploy(copy.deepcopy(model), _profile("auto"), precision="int4-w4a8")
    assert auto.hetrun.dense.precision == "int8-w8a8"
    said = [r.getMessage() for r in caplog.records if "linear layers run on" in r.getMessage()]
    assert len(said) == 1 and "in int8-w8a8, beside its int4-w4a8 experts" in said[0] and "or int4-w4a8" in said[0]
    deployed = hetrun.deploy(model, _profile("int4-w4a8"), precision="int4-w4a8")
    assert deployed.hetrun.dense.precision == "int4-w4a8" and _linears(deployed)[0] == []
    with torch.no_grad():
        err8, err4 = (float((m(IDS).logits - ref).norm() / ref.norm()) for m in (auto, deployed))
    print(f"logits error with INT4 experts: INT8 dense linears {err8:.4f}, INT4 ones {err4:.4f}")
    assert err8 < err4 < 0.6  # random tiny weights (hidden 64: one short group per row) amplify INT4's noise


def test_an_explicit_dense_precision_on_a_simulated_device_is_one_line():
    sim = [{"id": "gpu", "type": "h100-sxm", "backend": "simulated"}]
    with pytest.raises(PrecisionError, match="dense_precision: int8-w8a8 needs a CPU dense device") as e:
        hetrun.deploy(tiny_model("mixtral"), _profile("int8-w8a8", sim), precision="fp32")
    assert "\n" not in str(e.value)


def test_an_unknown_dense_precision_is_a_profile_error():
    with pytest.raises(HetrunError, match="dense_precision"):
        hetrun.deploy(tiny_model("mixtral"), _profile("int3"))


def test_a_wrong_result_names_the_dense_device_and_nan_input_blames_the_model():
    deployed = hetrun.deploy(tiny_model("mixtral"), _profile("int8-w8a8"), precision="int8-w8a8")
    head = deployed.lm_head
    real = head.call.session.forward
    head.call.session.forward = lambda x: real(x) * float("nan")
    with pytest.raises(HetrunError, match="dense device 'ort:0' returned a wrong result for lm_head"):
        with torch.no_grad():
            deployed(IDS)
    head.call.session.forward = real
    with pytest.raises(HetrunError, match="input of lm_head holds NaN"):
        head(torch.full((1, head.in_features), float("nan")))


def test_the_accuracy_report_says_where_the_dense_part_ran():
    from hetrun.cli.accuracy import accuracy_report

    report = accuracy_report("tiny-mixtral", _profile("auto"), precision="int8-w8a8", prompts=2, tokens=5,
                             weights="random")
    assert report["dense"] == {"device": "ort:0", "precision": "int8-w8a8", "layers": 9}
    assert report["deployment"]["top1"] > 0.5


def test_siblings_share_one_call_with_the_outputs_their_own_graphs_give():
    import onnxruntime as ort

    model = tiny_model("mixtral")
    attn = model.model.layers[0].self_attn
    weights = {n: getattr(attn, n).weight.detach().numpy().copy() for n in ("q_proj", "k_proj", "v_proj")}
    deployed = hetrun.deploy(model, _profile("int8-w8a8"), precision="int8-w8a8")
    q, k, v = (getattr(deployed.model.layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert q.call is k.call is v.call and deployed.lm_head.call is not q.call
    x = torch.randn(3, q.in_features)
    for layer, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):  # the same input: one call, three slices
        graph = build_linear_graph(weights[name], "int8-w8a8").SerializeToString()
        alone = ort.InferenceSession(graph, plain_session_options(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        np.testing.assert_array_equal(layer(x).numpy(), alone)
    assert q.call._input is None  # every member took its columns: nothing held
    other = torch.randn(3, q.in_features)  # another input for one member: computed for it, not taken from the cache
    assert not torch.equal(k(other), k(x))



def test_shared_calls_work_under_inference_mode_as_serve_runs_them():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        want = hetrun.deploy(copy.deepcopy(model), _profile("int8-w8a8"), precision="int8-w8a8")(IDS).logits
    deployed = hetrun.deploy(model, _profile("int8-w8a8"), precision="int8-w8a8")
    with torch.inference_mode():
        got = deployed(IDS).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_dense_linears_are_loaded_before_any_expert_and_never_from_inside_an_moe_block(family, monkeypatch, tmp_path):
    # An LM head's conversion holds its 16-bit weight, its INT8 codes and their serialized bytes at once: deploying
    # a checkpoint directory does it before compiling experts, beside the dense part alone. Shared experts and
    # routers (nn.Linear inside the MoE blocks) stay the expert runtime's.
    from hetrun.backends.onnxruntime import OnnxRuntimeBackend

    from hetrun.checkpoint.writer import save_checkpoint

    loads = []
    load = OnnxRuntimeBackend.load
    monkeypatch.setattr(OnnxRuntimeBackend, "load",
                        lambda self, graph, name, meta: loads.append(name) or load(self, graph, name, meta))
    model = tiny_model(family)
    save_checkpoint(model, tmp_path)
    with torch.no_grad():
        ref = model(IDS).logits
    deployed = hetrun.deploy(tmp_path, _profile("int8-w8a8"), precision="int8-w8a8")
    dense = deployed.hetrun.dense.layers
    first_expert = next(i for i, n in enumerate(loads) if re.match(r"L\d+\.", n))  # L<layer>.E<e> or .S<s>
    moe = tuple(f"{p}." for p, m in deployed.named_modules() if isinstance(m, HetrunMoEBlock))
    assert loads[:first_expert] and not any(p.startswith(moe) for n in loads[:first_expert] for p in n.split("+"))
    assert all(re.match(r"L\d+\.", n) for n in loads[first_expert:]) and any(".S" in n for n in loads[first_expert:])
    assert len(dense) == sum(n.count("+") + 1 for n in loads[:first_expert]) and "lm_head" in dense
    with torch.no_grad():
        got = deployed(IDS).logits
    assert float((got - ref).norm() / ref.norm()) < 0.1  # W8A8 on random tiny weights, as above


def test_a_callers_model_is_left_as_it_was_when_an_expert_fails_to_compile(monkeypatch):
    # deploy(model) compiles every expert before it touches the caller's model: a failure changes nothing
    from hetrun.backends.onnxruntime import OnnxRuntimeBackend

    def load(self, graph, name, meta):
        raise HetrunError(f"device refused {name}")

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load)
    model = tiny_model("qwen2_moe")
    before = {p: type(m) for p, m in model.named_modules()}
    with torch.no_grad():
        ref = model(IDS).logits
    with pytest.raises(HetrunError, match="device refused L"):
        hetrun.deploy(model, _profile("int8-w8a8"), precision="int8-w8a8")
    assert {p: type(m) for p, m in model.named_modules()} == before
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("source", ["directory", "model"])
def test_a_read_checkpoints_16_bit_dense_weights_go_before_the_runtime_reads_their_graph(source, monkeypatch,
                                                                                          tmp_path):
    # A model hetrun read itself drops each dense layer's 16-bit weights once its graph is built, before the runtime
    # loads it (an LM head's are twice its INT8 bytes); a caller's model keeps them until the layer is replaced.
    from hetrun.backends.onnxruntime import OnnxRuntimeBackend

    from hetrun import deployment
    from hetrun.checkpoint.writer import save_checkpoint

    model = tiny_model("mixtral")
    with torch.no_grad():
        ref = model(IDS).logits
    mine = copy.deepcopy(model)
    held = {"model": mine}
    read = deployment.checkpoint_model
    monkeypatch.setattr(deployment, "checkpoint_model", lambda *a, **k: held.setdefault("model", read(*a, **k)))
    seen = {}  # dense layer path -> its weight's elements when its graph was loaded
    load = OnnxRuntimeBackend.load

    def spy(self, graph, name, meta):
        if not re.match(r"L\d+\.", name):
            seen.update({p: held["model"].get_submodule(p).weight.numel() for p in name.split("+")})
        return load(self, graph, name, meta)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", spy)
    if source == "directory":
        save_checkpoint(model, tmp_path)
        held.clear()
    deployed = hetrun.deploy(tmp_path if source == "directory" else mine, _profile("int8-w8a8"), precision="int8-w8a8")
    assert "lm_head" in seen and set(seen) == set(deployed.hetrun.dense.layers)
    assert all(n == 0 for n in seen.values()) if source == "directory" else all(n > 0 for n in seen.values())
    with torch.no_grad():
        assert float((deployed(IDS).logits - ref).norm() / ref.norm()) < 0.1
