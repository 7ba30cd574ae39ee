"""The path a model takes once deployed (hetrun.deployment): weights -> expert graphs -> backends -> dispatch.

  weights.py   expert and MoE-layer weights in hetrun's layout, from a transformers model or random
  graphs.py    one ONNX graph per expert and precision
  routing.py   routers that pick top-k experts exactly as transformers does
  dispatch.py  route, permute per slot, run each device's experts, combine, count; the nn.Module in the model
"""
