"""Calibrate this machine: measure the CPU backends, fit the roofline, write a host profile, predict real layers.

  run               `calibrate()`, the one entry point: measure, fit, validate and write the host profile
  measure           timings: expert calls inside calibration MoE layers, the dispatcher's own time, copy bandwidth,
                    cache and memory size; the sweeps that keep each point's fastest measurement
  dispatcher_terms  what the dispatcher's own time depends on (features of a layer call, the fitted terms)
  fit               the CPU roofline fit per (backend, precision), the dispatcher fit, the host profile dict
  predict           seconds of a real MoE layer from a calibrated profile

Callers import from the module that holds what they need; this package re-exports nothing.
"""
