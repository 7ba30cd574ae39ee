"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations


class HetrunError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits 2."""

    def __init__(self, message: str):
        # Keep it to one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


class ProfileError(HetrunError):
    """A malformed or inconsistent hardware profile."""


class SpecError(HetrunError):
    """An unsupported or malformed model description."""


class BackendUnavailable(HetrunError):
    """A backend that was asked for explicitly cannot run here."""


class PrecisionError(HetrunError):
    """A precision that a device does not support."""


class PlacementError(HetrunError):
    """A placement that cannot be made: bad load table, experts that don't fit, bad pins."""


class BundleError(HetrunError):
    """A deployment bundle that is missing, incomplete or tampered with."""


class WorkloadError(HetrunError):
    """A malformed simulation workload."""


class CheckpointError(HetrunError):
    """A model checkpoint directory that is missing, incomplete, corrupt or in a format hetrun cannot read."""
