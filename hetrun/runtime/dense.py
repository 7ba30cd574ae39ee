"""The model's dense part on the dense device: its linear layers (attention projections, dense MLPs, the LM head)
computed by the dense device's runtime, at a precision that device computes from compressed weights.

At one token a decode step reads every weight of the step once, the dense ones included: on the Mixtral-shaped
benchmark model the LM head alone is 65 MB in BF16, more than the two experts a token visits. Left in transformers'
eager torch on a CPU without native BF16, BF16 linears run at FP32 speed on twice the bytes they need.

The profile's `dense_precision` says what runs them:
  auto       int8-w8a8 where the dense device is a CPU driven by onnxruntime or OpenVINO whose plan precision is
             an integer format (the default on CPUs without native BF16: hetrun.backends.host_cpu); fp32 where it
             is a CPU driven by onnxruntime whose plan precision is fp32; else "model".
             INT8 weights in blocks of 128 along K, INT8 activations per block on the fly (MatMulNBits accuracy
             level 4), the same numerics as the int8-w8a8 experts beside them. Beside INT4 experts too, for
             accuracy: on the 2-layer benchmark model (2-core AVX2 host) an INT4 LM head took 1.03 ms a decode
             token against INT8's 1.68 ms (two runs each), for about twice the error; ask for int4-w4a8 for that.
             FP32 on onnxruntime because attention then follows its projections onto the runtime (hetrun.runtime.
             attention) and the rest computes in FP32 beside a compact embedding table: the benchmark model's BF16
             checkpoint deployed with FP32 experts on onnxruntime decoded 65-74 tokens/s this way against 33-47
             with its dense part cast to FP32 in torch (five and six runs, one process each), at 1.33-1.36 against
             1.37-1.40 GB peak. Not on OpenVINO: its CPU plugin keeps a repacked copy of FP32 weights beside the
             graph's, so the LM head would be held twice (2.03 GB peak there, for no more speed).
  int4-w4a8  asked for: INT4 weights in groups of 128 with zero points (round-to-nearest), INT8 activations,
             every linear layer the LM head included (as llama.cpp's Q4_0 files hold them): half INT8's bytes.
  model      the model's own nn.Linear layers, untouched (and every precision that is not an integer format, and
             every profile with a distributed: section: under torchrun the ranks that hold the dense part run it).
  int8-w8a8, int4-w4a8, fp32   explicitly; a dense device that cannot run them is a one-line error.
Embeddings, norms and rotary tables stay in torch (in FP32 where the CPU emulates the model's 16-bit dtype:
hetrun.runtime.dense_dtype), attention too unless it can follow its projections onto onnxruntime
(hetrun.runtime.attention); MoE blocks are the dispatcher's. A replaced
layer's weight is released with its nn.Linear (a weight tied to the embeddings stays with them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from hetrun.backends.base import ExpertSession
from hetrun.errors import HetrunError, PrecisionError
from hetrun.formats import base_precision
from hetrun.runtime.dense_dtype import compute_in_fp32
from hetrun.runtime.dispatch import DispatchStats, ExpertRuntime, all_finite
from hetrun.runtime.graphs import build_linear_graph
from hetrun.runtime.memory import release_freed_heap

log = logging.getLogger("hetrun")
RUNTIMES = ("onnxruntime", "openvino")  # backends that run linear graphs on a CPU dense device
# Sibling layers that read one input in the transformers models hetrun deploys (Llama-style attention, DeepSeek's
# MLA, dense SwiGLU MLPs): one runtime call computes them together.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("q_proj", "kv_a_proj_with_mqa"),
            ("gate_proj", "up_proj"))


@dataclass
class DenseLinears:
    """What runs the dense part's linear layers: the device, the precision and the layers replaced."""

    device: str
    precision: str
    layers: list[str] = field(default_factory=list)  # module paths now computed on the device
    upcast_from: torch.dtype | None = None  # the model's emulated 16-bit dtype, when the rest now computes in FP32
    attention_layers: int = 0  # layers whose attention runs on the device too (hetrun.runtime.attention)


class SharedInputCall:
    """One runtime call for linear layers that read the same input (an attention's q, k and v projections): their
    weights stacked along N in one graph, the output [M, sum of N] kept until each of them has taken its columns.

    Stacking rows changes nothing a row computes (INT8 blocks run along K, per row), so each layer's output is what
    its own graph would give. A member called with another input than the one cached computes the whole stack for
    it (correct, only slower). The input is known by identity and, outside inference_mode, its version counter (an
    inference tensor changed in place between two members' calls would not be noticed: attention code does not)."""

    def __init__(self, session: ExpertSession, widths: list[int], device: str, paths: list[str],
                 stats: DispatchStats):
        self.session, self.device_id, self.paths, self.stats = session, device, paths, stats
        self.bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]  # column ranges of the members
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._untaken: set[int] = set()

    def columns(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member `member`'s output [M, N] float32 for x [..., K]."""
        version = -1 if x.is_inference() else x._version  # inference_mode tensors keep no version counter
        if self._input is not x or self._version != version or member not in self._untaken:
            self._input, self._version, self._output = x, version, self.run_all(x)
            self._untaken = set(range(len(self.paths)))
        self._untaken.discard(member)
        y = self._output[:, self.bounds[member]:self.bounds[member + 1]]  # [M, N]
        if not self._untaken:  # every member has its columns: hold neither the input nor the output any longer
            self._input = self._output = None
        return y

    def run_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output at once, [M, sum of N] float32 for x [..., K] (nothing kept for the members)."""
        rows = x.reshape(-1, x.shape[-1]).float()  # [M, K]
        t0 = time.perf_counter()
        y = self.session.forward(rows)  # [M, sum N] float32
        self.stats.dense_s += time.perf_counter() - t0
        if tuple(y.shape) != (rows.shape[0], self.bounds[-1]) or not all_finite(y):
            what = " and ".join(self.paths)
            if not all_finite(rows):
                raise HetrunError(f"the input of {what} holds NaN or inf: the model's dense part or its inputs "
                                  "produced it, not a device")
            raise HetrunError(f"dense device '{self.device_id}' returned a wrong result for {what} (shape "
                              f"{list(y.shape)}, or NaN/inf): check the device, or set dense_precision: model")
        return y


class RuntimeLinear(torch.nn.Module):
    """Stands where an nn.Linear stood: x [..., K] -> [..., N] in x's dtype, its columns of a SharedInputCall."""

    def __init__(self, call: SharedInputCall, member: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.call, self.member = call, member
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.call.columns(x, self.member).to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # [..., N]
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, on {self.call.device_id}"


def dense_precision(runtime: ExpertRuntime) -> str:
    """The precision the dense part's linear layers run at ("model": left as they are), per the profile's
    `dense_precision`; an explicit precision the dense device cannot run is a one-line PrecisionError."""
    profile, plan = runtime.profile, runtime.plan
    asked = profile.model.dense_precision
    dense = profile.dense_device
    capable = (dense.id in plan.device_ids and profile.model.distributed is None and dense.backend in RUNTIMES
               and dense.type.kind == "cpu")  # under torchrun every rank that holds the dense part runs it itself
    if asked == "model":
        return "model"
    if asked == "auto":
        experts = base_precision(plan.precision.get(dense.id, "fp32"))
        if capable and experts in ("int8", "int4"):
            return "int8-w8a8"
        return "fp32" if capable and experts == "fp32" and dense.backend == "onnxruntime" else "model"
    if not capable:
        raise PrecisionError(f"dense_precision: {asked} needs a CPU dense device run by {' or '.join(RUNTIMES)} in "
                             f"one process (no distributed: section); '{dense.id}' is {dense.type.kind} on "
                             f"{dense.backend}: set dense_precision: model or auto")
    return asked


def run_dense_linears(model: torch.nn.Module, runtime: ExpertRuntime,
                      moe_blocks: "tuple[str, ...] | list[str]" = ()) -> DenseLinears | None:
    """Replace the model's nn.Linear layers, those inside the MoE blocks at paths `moe_blocks` excepted (or the
    blocks already swapped), by RuntimeLinear layers on the dense device at `dense_precision(runtime)`, siblings of
    SIBLINGS in one call; None when they stay as they are. Once the MoE blocks are swapped, compute_rest_in_fp32."""
    precision = dense_precision(runtime)
    inside = tuple(f"{p}." for p in moe_blocks)
    targets = {path: m for path, m in model.named_modules()
               if type(m) is torch.nn.Linear and path not in moe_blocks and not path.startswith(inside)}
    if precision == "model" or any(m.weight.is_meta for m in targets.values()):  # meta: another rank runs it
        return None
    dense = runtime.profile.dense_device
    backend = runtime.backends[runtime.plan.device_ids.index(dense.id)]
    report = DenseLinears(dense.id, precision)
    # a model hetrun read from a checkpoint directory is its own: a failure discards it, so each layer's weights can
    # go once its graph is built; a caller's model keeps them until its layer is replaced
    own = getattr(model, "hetrun_checkpoint", None) is not None
    for paths in _groups(targets):
        linears = [targets[p] for p in paths]
        weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
        data = build_linear_graph(weight, precision)  # weight [sum N, K] in the model's dtype; both RUNTIMES take it
        del weight
        if own:  # the 16-bit weights go before the runtime reads the graph: an LM head's are twice its INT8 bytes
            for m in linears:
                m.weight = torch.nn.Parameter(m.weight.new_empty(0), requires_grad=False)
        release_freed_heap()  # the graph's transients (the LM head's: 100 MB and more) before the runtime's copy
        call = SharedInputCall(backend.load(data, "+".join(paths), {}), [m.out_features for m in linears], dense.id,
                               paths, runtime.stats)
        del data
        for member, (path, linear) in enumerate(zip(paths, linears)):
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, RuntimeLinear(call, member, linear.in_features, linear.out_features, linear.bias))
            report.layers.append(path)
    if runtime.profile.model.dense_precision == "auto" and report.layers:
        experts = runtime.plan.precision.get(dense.id, precision)
        log.warning("the dense part's %d linear layers run on '%s' in %s, %s (dense_precision: auto); set "
                    "dense_precision: model in the profile to keep them as the model has them%s",
                    len(report.layers), dense.id, precision,
                    "as its experts do" if experts == precision else f"beside its {experts} experts",
                    ", or int4-w4a8 for INT4 ones (faster at one token, about twice the error)"
                    if base_precision(experts) == "int4" else "")
    return report


def compute_rest_in_fp32(model: torch.nn.Module, runtime: ExpertRuntime) -> None:
    """After run_dense_linears and the MoE blocks' swap: the torch ops left around the moved linear layers compute
    in FP32 where the CPU only emulates the model's 16-bit dtype (hetrun.runtime.dense_dtype)."""
    report = runtime.dense
    if report is not None and report.layers:
        report.upcast_from = compute_in_fp32(model, runtime.profile.dense_device.type.kind)


def _groups(targets: dict[str, torch.nn.Linear]) -> list[list[str]]:
    # module paths in runs of one call: SIBLINGS of one parent with one input width together, every other alone
    grouped: list[list[str]] = []
    taken: set[str] = set()
    for path in targets:
        parent, _, name = path.rpartition(".")
        for names in SIBLINGS:
            paths = [f"{parent}.{n}" if parent else n for n in names]
            if name == names[0] and all(p in targets and p not in taken for p in paths) \
                    and len({targets[p].in_features for p in paths}) == 1:
                grouped.append(paths)
                taken.update(paths)
                break
    return grouped + [[p] for p in targets if p not in taken]
