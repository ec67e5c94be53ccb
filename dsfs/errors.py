"""The errors a user can fix: bad input, not bugs.

Every verb raises a subclass of `UserError` for what the user can fix (a path, an option, a file); the CLI prints it
as one line, ``dsfs: error: <message>``, and exits 1. Any other exception is a bug and keeps its traceback. Each
message names what was expected.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that the user can fix; the message says what was expected (base of every error below)."""


class DataError(UserError):
    """Bad data input: a missing, empty or malformed file, a bad option of ``dsfs prepare``, too few tokens."""


class ConfigError(UserError):
    """An invalid training or model configuration value (an unknown preset, a field out of range)."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint; the message names the directory and what is wrong."""


class BackendError(UserError):
    """A backend that cannot run on this machine (``--backend cuda`` without CUDA, a runtime that fails to import)."""


class TrainError(UserError):
    """Training cannot go on (a non-finite loss); the message says at which step and what to try."""


class KernelError(UserError):
    """``dsfs check`` / ``dsfs bench``: an unknown op or shape, a candidate that does not import, has the wrong
    signature or (for bench) returns outputs of the wrong shape, a device or dtype the op or the machine lacks."""
