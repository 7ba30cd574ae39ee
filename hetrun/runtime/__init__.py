"""The path a model takes once deployed (hetrun.deployment): weights -> expert graphs -> backends -> dispatch.

  weights.py   expert and MoE-layer weights in hetrun's layout (FP32, a checkpoint's FP8 / GPTQ codes, or read on
               demand), from a transformers model, a checkpoint (hetrun.checkpoint) or random
  graphs.py    one ONNX graph per expert and precision
  routing.py   routers that pick top-k experts exactly as transformers does
  memory.py    the resident memory each device's compiled experts take, against the plan's
  dispatch.py  route, permute per slot, run each device's experts, combine, count; the nn.Module in the model
  dense.py     the dense part's linear layers on the dense device's runtime (attention projections, LM head)
  dense_dtype.py    the rest of the dense part in FP32 where the CPU emulates the model's BF16 or FP16
  rebalancer.py     live rebalancing: smoothed load, background re-plan and compiles, the switch between steps
  expert_cache.py   hot-expert cache slots on fast devices: policy, background loads, the redirect of calls
"""
