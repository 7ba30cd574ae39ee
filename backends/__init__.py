"""Execution backends, one module each; see registry.py for how they are found and probed."""
