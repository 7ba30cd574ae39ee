"""Calibrate this machine: measure the CPU backends, fit the roofline, write a host profile, predict real layers."""
