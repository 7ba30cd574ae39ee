"""The whole model as one onnxruntime graph: every decoder layer (norms, the q/k/v and o projections,
GroupQueryAttention on an in-place KV cache, the router, the routed experts) and the LM head, run by one call per
forward pass. The profile's `model_graph` asks for it (off, auto, on); it applies where every expert and the dense
part sit on one onnxruntime CPU device and the model is a Llama-style MoE decoder (why_not says what stops it).

Why: at one token a decode step reads each weight once, and what is left of the time is the Python around the
many small calls of the dispatcher path -- on the 2-layer Mixtral-shaped benchmark model (2-core AVX2 host), a
decode token with INT4 experts took 5.2 ms there, of which about 2.3 ms was inside the runtimes' kernels and the rest
the dispatcher, transformers' modules and the torch ops between the calls. In one graph the runtime walks its nodes
itself. The experts of a layer each take the rows routed to them (NonZero, Gather), their outputs weighed and
scattered back (ScatterND add); an expert no row chose gets no rows and reads none of its weights, so a decode
token reads its K experts' weights as the dispatcher's calls do.

The graph holds the deployed weights once: no dispatcher sessions and no dense linear sessions are built beside it,
and the model's own dense weights are released (its embedding table and norms stay in torch: the embedding lookup
runs there). It serves what generation asks of a model: one sequence, no padding, positions that continue its KV
cache (a transformers DynamicCache whose layers are InPlaceKVLayers). Other calls -- a batch, a padded mask, packed
positions -- stop with a one-line error naming model_graph: off, which serves them through the dispatcher.

Routing is the model's own (top-k of the router's softmax, renormalised where the model renormalises), computed in
FP32; the combine sums experts in expert order rather than k order, so outputs match the dispatcher's within FP32
rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from hetrun.backends.graph_files import StreamedGraph
from hetrun.backends.ort_binding import HostBindings
from hetrun.errors import HetrunError
from hetrun.runtime.attention import STATIC_ROPE, InPlaceKVLayer, SharedGqa, _rotates_half, _slides
from hetrun.runtime.dense import DenseLinears, dense_precision
from hetrun.runtime.dispatch import ExpertRuntime, all_finite
from hetrun.runtime.graph_generate import GreedyGenerate
from hetrun.runtime.graphs import IR_VERSION, LINEAR_FORMATS, OPSET, build_expert_graph, build_linear_graph
from hetrun.runtime.memory import release_freed_heap
from hetrun.runtime.weights import MoELayerWeights
from hetrun.spec import MoESpec, RouterSpec

log = logging.getLogger("hetrun")
MODEL_GRAPH = ("off", "auto", "on")  # the profile's `model_graph` values
ATTENTION = ("MixtralAttention", "LlamaAttention", "MistralAttention")  # q/k/v/o projections, no per-head norms
NORMS = ("MixtralRMSNorm", "LlamaRMSNorm", "MistralRMSNorm")  # weight * x / rms(x), computed in FP32
EXTERNAL_FROM = 1024  # initializers moved out of the proto from this many bytes (as hetrun.backends.graph_files)
SWITCH_OFF = "deploy with model_graph: off in the profile to serve it through the dispatcher"
# the output's cache field: `cache` from transformers 5.20, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class DecoderShape:
    """What the graph's nodes need to know of the model beyond its weights."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    eps: float  # RMSNorm epsilon
    scale: float  # attention scale
    vocab: int


# ---- whether a deployment can run as one graph -------------------------------------------------------------------

def why_not(model: torch.nn.Module, spec: MoESpec, runtime: ExpertRuntime, weights: list[MoELayerWeights]) -> str:
    """Why the deployment cannot run as one graph ("" when it can)."""
    profile, plan = runtime.profile, runtime.plan
    if profile.model.distributed is not None or profile.model.rebalance is not None or profile.model.cache is not None:
        return "the profile has a distributed:, rebalance: or cache: section, which the dispatcher serves"
    if len(plan.device_ids) != 1 or profile.dense_device.id != plan.device_ids[0]:
        return "its experts and dense part are not all on one device"
    device = runtime.devices[0]
    if device.backend != "onnxruntime" or device.type.kind != "cpu":
        return f"its device '{device.id}' is {device.type.kind} on {device.backend}, not a CPU on onnxruntime"
    dense = dense_precision(runtime)
    if dense not in LINEAR_FORMATS:
        return f"its dense part stays in the model (dense_precision resolves to {dense})"
    router = spec.router
    if router.kind != "softmax_topk" or router.n_group > 1 or router.routed_scaling_factor != 1.0:
        return f"its router ({router.kind}) is not a plain softmax top-k"
    if any(w.shared or w.gate_bias is not None or w.correction_bias is not None for w in weights):
        return "it has shared experts or a router bias"
    inner = getattr(model, "model", None)
    decoders = list(getattr(inner, "layers", []))
    if len(weights) != len(decoders) or [w.layer for w in weights] != list(range(len(decoders))):
        return "not every decoder layer is a MoE layer"
    config = model.config.get_text_config(decoder=True)
    for layer in decoders:
        attn = getattr(layer, "self_attn", None)
        if type(attn).__name__ not in ATTENTION:
            return f"its attention is {type(attn).__name__}, not one of {', '.join(ATTENTION)}"
        if any(type(getattr(layer, n, None)).__name__ not in NORMS for n in ("input_layernorm",
                                                                              "post_attention_layernorm")):
            return "its decoder layers' norms are not RMSNorms of a known kind"
        if any(type(getattr(attn, p, None)) is not torch.nn.Linear for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "its attention projections are not nn.Linear layers"
        if _slides(attn, config) or hasattr(attn, "sinks"):
            return "it has a sliding window or attention sinks"
    if type(getattr(inner, "norm", None)).__name__ not in NORMS or type(getattr(model, "lm_head", None)) \
            is not torch.nn.Linear or not isinstance(getattr(inner, "embed_tokens", None), torch.nn.Embedding):
        return "its embedding, final norm or LM head is not of a known kind"
    head_dim = decoders[0].self_attn.head_dim
    if head_dim % 16 or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return f"its heads ({head_dim}, partial rotary {getattr(config, 'partial_rotary_factor', 1.0)}) are not " \
               "what GroupQueryAttention takes"
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) not in STATIC_ROPE or not _rotates_half(rotary):
        return "its rotary embedding is not a static rotate-half table"
    return ""


# ---- the graph ------------------------------------------------------------------------------------------------

class _Graph:
    """Nodes and initializers of the whole graph. Initializers of EXTERNAL_FROM bytes and more go into a
    StreamedGraph's data file as they are made (so the weights are never all in memory at once), or, where no
    temporary folder can be written, are held as arrays beside the proto (loaded from bytes then)."""

    def __init__(self, folder: "str | os.PathLike | None" = None):
        self.model = onnx.ModelProto()
        self.arrays: dict[str, np.ndarray] = {}
        try:
            self.sink: StreamedGraph | None = StreamedGraph(self.model, folder)
        except OSError:
            if folder is not None:
                raise
            self.sink = None
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}#{self._n}"

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op_type) for _ in range(outputs)]
        self.model.graph.node.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain,
                                                      **attrs))
        return outs

    def const(self, array: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        array = np.ascontiguousarray(array)
        if array.nbytes >= EXTERNAL_FROM:
            t = self.model.graph.initializer.add()
            t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            self._hold(t, array)
        else:
            self.model.graph.initializer.add().CopyFrom(numpy_helper.from_array(array, name))
        return name

    def _hold(self, t: onnx.TensorProto, array: np.ndarray) -> None:
        # the bytes of initializer t (in the graph already): into the data file, or held beside the proto
        if self.sink is not None:
            self.sink.add(t, array)
        else:
            self.arrays[t.name] = array

    def loadable(self) -> "StreamedGraph | _Graph":
        """What a backend's load_graph takes: the StreamedGraph, or this graph with its arrays."""
        return self.sink if self.sink is not None else self

    def inline(self, sub: onnx.ModelProto, arrays: dict[str, np.ndarray], x: str, stem: str) -> str:
        """Take in a one-input one-output graph (an expert's, a linear layer's) applied to `x`; its output's name."""
        g = sub.graph
        prefix = self.name(stem) + "/"
        outer = {g.input[0].name: x}
        rename = lambda n: "" if n == "" else outer.get(n, prefix + n)  # noqa: E731
        for t in g.initializer:
            array = arrays.pop(t.name, None)  # an in-process graph's bytes, held beside its proto
            if array is None and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_FROM:
                array = np.frombuffer(t.raw_data, np.uint8)
                t.ClearField("raw_data")
            t.name = rename(t.name)
            self.model.graph.initializer.append(t)
            if array is not None:
                self._hold(self.model.graph.initializer[-1], array)
        for k, n in enumerate(g.node):
            n.input[:] = [rename(i) for i in n.input]
            n.output[:] = [rename(o) for o in n.output]
            n.name = f"{prefix}{k}:{n.name or n.op_type}"
            self.model.graph.node.append(n)
        for opset in sub.opset_import:
            if opset.domain and opset.domain not in {o.domain for o in self.model.opset_import}:
                self.model.opset_import.append(helper.make_opsetid(opset.domain, opset.version))
        return rename(g.output[0].name)

    def rms_norm(self, x: str, weight: torch.Tensor, eps: float) -> str:
        w = self.const(weight.detach().float().numpy(), "norm")
        return self.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=float(eps), stash_type=1)[0]


def _linear(g: _Graph, weight: torch.Tensor, precision: str, x: str, stem: str) -> str:
    return g.inline(build_linear_graph(weight.detach(), precision), {}, x, stem)


def _moe_layer(g: _Graph, h: str, layer: MoELayerWeights, router: RouterSpec, precision: str) -> tuple[str, str]:
    # the MoE block's output [S, D] and its expert ids [S, K] for normed hidden states h [S, D]
    ids, w, logits = _router(g, h, layer.gate, router)  # [S, K], [S, K], [S, E]
    return _experts(g, h, ids, w, logits, layer, precision), ids


def _router(g: _Graph, h: str, gate: torch.Tensor, router: RouterSpec) -> tuple[str, str, str]:
    # expert ids [S, K] int64, their weights [S, K] and the logits [S, E] for normed hidden states h [S, D], as the
    # model routes (a plain softmax top-k: why_not)
    logits = g.op("MatMul", [h, g.const(gate.detach().float().numpy().T.copy(), "gate")])[0]  # [S, E]
    k = g.const(np.array([router.top_k], np.int64))
    if router.norm_topk_prob:  # the top-k of the softmax, renormalised: the softmax of the top-k logits
        top, ids = g.op("TopK", [logits, k], outputs=2, axis=-1)
        return ids, g.op("Softmax", [top], axis=-1)[0], logits
    probs = g.op("Softmax", [logits], axis=-1)[0]  # [S, E]
    top, ids = g.op("TopK", [probs, k], outputs=2, axis=-1)
    return ids, top, logits


def _experts(g: _Graph, h: str, ids: str, weights: str, logits: str, layer: MoELayerWeights, precision: str) -> str:
    # the routed experts' weighted sum [S, D] for h [S, D]: each expert on the rows that chose it (NonZero, then
    # GatherND); an expert no row chose runs on no rows and reads none of its weights. (Each in an If instead,
    # skipped where unchosen, was no faster: 2.81 against 2.78 ms a decode step of the benchmark model, the best of
    # six rounds each, interleaved in one process.)
    zero = g.const(np.zeros(1, np.float32))
    chosen = g.op("ScatterElements", [g.op("Mul", [logits, zero])[0], ids, weights], axis=1)[0]  # [S, E]
    acc = g.op("Mul", [h, zero])[0]  # [S, D] zeros
    one = g.const(np.array([1], np.int64))
    for e, expert in enumerate(layer.experts):
        col = g.op("Gather", [chosen, g.const(np.array([e], np.int64))], axis=1)[0]  # [S, 1]
        rows = g.op("Transpose", [g.op("NonZero", [g.op("Squeeze", [col, one])[0]])[0]])[0]  # [n, 1]
        graph = build_expert_graph(expert, precision, target="onnxruntime", in_process=True)
        y = g.inline(graph.model, graph.arrays, g.op("GatherND", [h, rows])[0], f"L{layer.layer}E{e}")  # [n, D]
        del graph
        acc = g.op("ScatterND", [acc, rows, g.op("Mul", [y, g.op("GatherND", [col, rows])[0]])[0]],
                   reduction="add")[0]  # [S, D]
    return acc


def build_model_graph(model: torch.nn.Module, weights: list[MoELayerWeights], shape: DecoderShape,
                      router: RouterSpec, precision: str, dense: str, folder: "str | os.PathLike | None" = None
                      ) -> _Graph:
    """The graph of `model` (see the module docstring): experts at `precision`, the dense linear layers at
    `dense` (a LINEAR_FORMATS precision). Inputs: hidden [S, D] (embedded tokens), rows [R] (positions whose
    logits are wanted), seqlens_k [1], total_sequence_length [1], cos_cache and sin_cache [P, Dh/2], past_key_i and
    past_value_i [1, Hkv, C, Dh] per layer; outputs: logits [R, V], present_key_i and present_value_i (the same
    buffers as the past), expert_ids [L, S, K]. The model's dense linear weights are released as their graphs are
    built where the model is hetrun's own (read from a checkpoint directory). Its weights are written into `folder`
    (an export's) as they are built, else into a temporary folder the loading backend reads."""
    g = _Graph(folder)
    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    cache = [1, shape.kv_heads, "C", shape.head_dim]
    graph = g.model.graph
    graph.name = "hetrun-model"
    graph.input.extend([helper.make_tensor_value_info("hidden", f, ["S", shape.hidden]),
                        helper.make_tensor_value_info("rows", i64, ["R"]),
                        helper.make_tensor_value_info("seqlens_k", i32, [1]),
                        helper.make_tensor_value_info("total_sequence_length", i32, [1]),
                        helper.make_tensor_value_info("cos_cache", f, ["P", shape.head_dim // 2]),
                        helper.make_tensor_value_info("sin_cache", f, ["P", shape.head_dim // 2])])
    g.model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    own = getattr(model, "hetrun_checkpoint", None) is not None
    x, ids_per_layer = "hidden", []
    zero = g.const(np.array([0], np.int64))
    for i, (decoder, layer) in enumerate(zip(model.model.layers, weights)):
        attn = decoder.self_attn
        h = g.rms_norm(x, decoder.input_layernorm.weight, shape.eps)  # [S, D]
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv = _linear(g, torch.cat([p.weight.detach() for p in projections]), dense, h, f"L{i}qkv")  # [S, W]
        if any(p.bias is not None for p in projections):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in projections])
            qkv = g.op("Add", [qkv, g.const(bias.detach().float().numpy())])[0]
        past_k, past_v = f"past_key_{i}", f"past_value_{i}"
        graph.input.extend([helper.make_tensor_value_info(past_k, f, cache),
                            helper.make_tensor_value_info(past_v, f, cache)])
        out = g.name("attn")
        g.model.graph.node.append(helper.make_node(
            "GroupQueryAttention", [g.op("Unsqueeze", [qkv, zero])[0], "", "", past_k, past_v, "seqlens_k",
                                    "total_sequence_length", "cos_cache", "sin_cache"],
            [out, f"present_key_{i}", f"present_value_{i}"], name=g.name("gqa"), domain="com.microsoft",
            num_heads=shape.heads, kv_num_heads=shape.kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(shape.scale)))  # [1, S, Hq*Dh]
        o = _linear(g, attn.o_proj.weight, dense, g.op("Squeeze", [out, zero])[0], f"L{i}o")  # [S, D]
        if attn.o_proj.bias is not None:
            o = g.op("Add", [o, g.const(attn.o_proj.bias.detach().float().numpy())])[0]
        x = g.op("Add", [x, o])[0]
        h = g.rms_norm(x, decoder.post_attention_layernorm.weight, shape.eps)
        y, ids = _moe_layer(g, h, layer, router, precision)  # [S, D], [S, K]
        ids_per_layer.append(g.op("Unsqueeze", [ids, zero])[0])  # [1, S, K]
        x = g.op("Add", [x, y])[0]
        if own:
            for p in (*projections, attn.o_proj):
                p.weight = torch.nn.Parameter(p.weight.new_empty(0), requires_grad=False)
        release_freed_heap()
    last = g.op("Gather", [x, "rows"], axis=0)[0]  # [R, D]
    head = model.lm_head
    logits = _linear(g, head.weight, dense, g.rms_norm(last, model.model.norm.weight, shape.eps), "lm_head")
    if own and head.weight is not model.model.embed_tokens.weight:
        head.weight = torch.nn.Parameter(head.weight.new_empty(0), requires_grad=False)
    g.model.graph.node.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    g.model.graph.node.append(helper.make_node("Concat", ids_per_layer, ["expert_ids"], name="expert_ids", axis=0))
    graph.output.extend([helper.make_tensor_value_info("logits", f, ["R", shape.vocab])]
                        + [helper.make_tensor_value_info(f"present_{kv}_{i}", f, cache)
                           for i in range(shape.layers) for kv in ("key", "value")]
                        + [helper.make_tensor_value_info("expert_ids", i64, [shape.layers, "S", shape.top_k])])
    g.model.ir_version, g.model.producer_name = IR_VERSION, "hetrun"
    return g


def layer_graph(layer: MoELayerWeights, router: RouterSpec, precision: str, hidden: int) -> _Graph:
    """One MoE block as the model graph computes it: hidden [S, D] (normed) -> y [S, D], its experts at
    `precision` (for benchmarks and tests of the block alone; load with a backend's load_graph(g.loadable()))."""
    g = _Graph()
    graph = g.model.graph
    graph.name = "hetrun-moe-layer"
    graph.input.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["S", hidden]))
    g.model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    y, _ = _moe_layer(g, "hidden", layer, router, precision)
    graph.node.append(helper.make_node("Identity", [y], ["y"], name="y"))
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", hidden]))
    g.model.ir_version, g.model.producer_name = IR_VERSION, "hetrun"
    return g


# ---- running it ---------------------------------------------------------------------------------------------

class ModelGraph:
    """Stands as the model's forward: embeds the tokens in torch, runs the graph, returns transformers' output."""

    def __init__(self, model: torch.nn.Module, session, shape: DecoderShape, runtime: ExpertRuntime):
        self.model, self.session, self.shape, self.runtime = model, session, shape, runtime
        self.device_id = runtime.devices[0].id
        self.rope = SharedGqa(session, shape.heads, shape.kv_heads, shape.head_dim, model.model.rotary_emb,
                              runtime.stats, self.device_id)
        self.bindings = HostBindings(session)  # the cache buffers, tables and counters stay bound between steps
        self._lengths = torch.zeros(1, dtype=torch.int32)  # [1] last position, filled in place
        self._total = torch.zeros(1, dtype=torch.int32)  # [1] tokens after this call
        self._ids = torch.zeros(0, dtype=torch.int64)
        self.calls = 0

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 use_cache=None, logits_to_keep=0, past_key_values=None, cache_position=None, **kwargs):
        if kwargs.get("labels") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise HetrunError(f"a model deployed as one graph returns logits alone; {SWITCH_OFF}")
        embeds = self.model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, D]
        b, s = embeds.shape[:2]
        cache = cache if cache is not None else past_key_values  # (its name before transformers 5.20)
        cache = cache if cache is not None else DynamicCache()
        if b != 1 or not isinstance(cache, DynamicCache):
            raise HetrunError(f"a model deployed as one graph takes one sequence with a DynamicCache, not batch {b} "
                              f"with {type(cache).__name__}; {SWITCH_OFF}")
        layers = self.cache_layers(cache)
        n = layers[0].length()
        if attention_mask is not None and (attention_mask.shape[-1] != n + s or not bool(attention_mask.all())):
            raise HetrunError(f"a model deployed as one graph takes no padding; {SWITCH_OFF}")
        for given in (position_ids, cache_position):
            if given is not None and not torch.equal(given.reshape(-1)[-s:], torch.arange(n, n + s)):
                raise HetrunError(f"a model deployed as one graph takes positions that continue its KV cache; "
                                  f"{SWITCH_OFF}")
        keep = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else \
            torch.arange(s - logits_to_keep if logits_to_keep else 0, s)  # [R]
        logits = self.run(embeds[0].float().contiguous(), keep.to(torch.int64).contiguous(), layers, n)  # [R, V]
        kept = cache if use_cache is not False else None
        return MoeCausalLMOutputWithPast(logits=logits[None], **{_CACHE_FIELD: kept})

    def cache_layers(self, cache) -> list[InPlaceKVLayer]:
        """The cache's first L layers as InPlaceKVLayers (empty ones replaced, missing ones added)."""
        while len(cache.layers) < self.shape.layers:
            cache.layers.append(InPlaceKVLayer())
        for i in range(self.shape.layers):
            layer = cache.layers[i]
            if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
                cache.layers[i] = InPlaceKVLayer()
            elif not isinstance(layer, InPlaceKVLayer):
                raise HetrunError(f"a model deployed as one graph keeps its own KV cache; this one's layer {i} is a "
                                  f"{type(layer).__name__}: pass a new DynamicCache, or {SWITCH_OFF}")
        return cache.layers[:self.shape.layers]

    def run(self, hidden: torch.Tensor, rows: torch.Tensor, layers: list[InPlaceKVLayer], cached: int) -> torch.Tensor:
        """Logits [R, V] of hidden [S, D] (embedded tokens after `cached` ones) at positions `rows` [R]; each layer's
        keys and values appended to its cache layer."""
        sh, s = self.shape, hidden.shape[0]
        cos, sin = self.rope.tables(cached + s)  # [P, Dh/2] each
        self._lengths.fill_(cached + s - 1)
        self._total.fill_(cached + s)
        logits = torch.empty((rows.shape[0], sh.vocab))  # [R, V]
        if self._ids.shape[1:2] != (s,):
            self._ids = torch.empty((sh.layers, s, sh.top_k), dtype=torch.int64)  # [L, S, K]
        inputs = [("hidden", hidden), ("rows", rows), ("seqlens_k", self._lengths),
                  ("total_sequence_length", self._total), ("cos_cache", cos), ("sin_cache", sin)]
        outputs = [("logits", logits), ("expert_ids", self._ids)]
        like = self.rope.kv_like(1)
        for i, layer in enumerate(layers):
            kbuf, vbuf = layer.reserve(like, s)  # [1, Hkv, C, Dh] each
            inputs += [(f"past_key_{i}", kbuf), (f"past_value_{i}", vbuf)]
            outputs += [(f"present_key_{i}", kbuf), (f"present_value_{i}", vbuf)]
        for name, t in inputs:
            self.bindings.input(name, t)
        for name, t in outputs:
            self.bindings.output(name, t)
        stats = self.runtime.stats
        t0 = time.perf_counter()
        self.bindings.run()
        stats.graph_s += time.perf_counter() - t0
        if not all_finite(logits):
            what = "its input holds NaN or inf" if not all_finite(hidden) else \
                f"device '{self.device_id}' returned NaN or inf"
            raise HetrunError(f"the model graph's logits are not finite: {what}; check the device and the inputs")
        for layer in layers:
            layer.advance(s)
        ids = self._ids.reshape(sh.layers, -1)  # [L, S*K]
        if s == 1:
            for li, row in enumerate(ids.tolist()):
                for e in row:
                    stats.tokens_per_expert[li, e] += 1
        else:
            stats.tokens_per_expert += np.stack([np.bincount(r, minlength=sh.experts) for r in ids.numpy()])
        stats.tokens_per_device[0] += s * sh.top_k * sh.layers
        stats.calls += 1
        self.calls += 1
        return logits


def decoder_shape(model: torch.nn.Module, spec: MoESpec) -> DecoderShape:
    """The DecoderShape of a model why_not accepts."""
    config = model.config.get_text_config(decoder=True)
    attn = model.model.layers[0].self_attn
    return DecoderShape(len(model.model.layers), config.hidden_size, config.num_attention_heads,
                        config.num_key_value_heads, attn.head_dim, spec.num_experts, spec.router.top_k,
                        float(model.model.norm.variance_epsilon),
                        float(attn.scaling), config.vocab_size)


def run_model_graph(model: torch.nn.Module, spec: MoESpec, runtime: ExpertRuntime,
                    weights: list[MoELayerWeights], paths: list[str]) -> ModelGraph:
    """Build the model's graph on its one device, load it and let it stand as the model's forward (why_not must
    have said ""). The replaced MoE blocks, attention projections and LM head hold no weights afterwards."""
    shape = decoder_shape(model, spec)
    device = runtime.devices[0]
    backend = runtime.backends[0]
    dense = dense_precision(runtime)
    with runtime.memory.measure(0):
        graph = build_model_graph(model, weights, shape, spec.router, runtime.plan.precision[device.id], dense)
        session = backend.load_graph(graph.loadable())
        del graph
    runner = ModelGraph(model, session, shape, runtime)
    runner.rope.tables(1)
    model.forward = runner
    model.generate = GreedyGenerate(model, runner, model.generate)
    for path in paths:  # the MoE blocks' torch code never runs now: their expert tensors go with them
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, torch.nn.Identity())
    # a caller's model kept its dense weights until the graph loaded (a failure leaves it as it was); now the
    # graph holds them (a model read from a directory released each as its graph was built)
    tied = model.model.embed_tokens.weight
    for linear in [getattr(d.self_attn, f"{p}_proj") for d in model.model.layers for p in "qkvo"] + [model.lm_head]:
        if linear.weight is not tied and linear.weight.numel():
            linear.weight = torch.nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
    linears = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(shape.layers) for p in "qkvo"] + ["lm_head"]
    runtime.dense = DenseLinears(device.id, dense, linears, attention_layers=shape.layers)
    runtime.graph = runner
    log.info("the model runs as one onnxruntime graph on '%s': experts in %s, dense linear layers in %s",
             device.id, runtime.plan.precision[device.id], dense)
    return runner
