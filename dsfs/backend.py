"""Which runtime trains: ``--backend auto|reference|cuda|mlx`` resolved to a model class and a device."""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass

import torch

from dsfs.errors import BackendError
from reference import Model

BACKENDS = ("auto", "reference", "cuda", "mlx")


@dataclass
class Backend:
    """What `resolve_backend` chose: ``name`` (``reference``, ``cuda`` or ``mlx``: the runtime that trains), the
    model class (``reference.Model``, ``runtime_cuda.Model`` or ``runtime_mlx.Model``), the torch ``device`` of a
    torch runtime (``cpu`` for ``mlx``), and ``note``: one line to print when ``auto`` fell back to the reference
    because the runtime it chose failed to import (else ``None``)."""

    name: str
    model_cls: type
    device: torch.device
    note: str | None = None


def _auto_name() -> str:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    return "cuda" if torch.cuda.is_available() else "reference"


def resolve_backend(name: str = "auto") -> Backend:
    """Pick the runtime for ``--backend``.

    ``reference``: the plain-PyTorch model on cpu (deterministic; the definition of correct). ``cuda``:
    ``runtime_cuda.Model`` on cuda. ``mlx``: ``runtime_mlx.Model`` (MLX's default device). ``auto``: ``mlx`` on
    Apple Silicon, ``cuda`` when ``torch.cuda.is_available()``, else ``reference``; when the runtime it picks fails
    to import, the reference model runs instead (on cuda for ``cuda``, on cpu for ``mlx``) and ``note`` names the
    ``ImportError``. Raises `BackendError` for an unknown name, for ``cuda`` without CUDA, and when an explicitly
    requested runtime fails to import (the message carries the ``ImportError``).
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")
    auto = name == "auto"
    if auto:
        name = _auto_name()
    if name == "reference":
        return Backend("reference", Model, torch.device("cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise BackendError("backend cuda requested but CUDA is not available (torch.cuda.is_available() is "
                           "False); use --backend auto or reference")
    device = torch.device("cuda" if name == "cuda" else "cpu")
    package = f"runtime_{name}"
    try:
        return Backend(name, importlib.import_module(package).Model, device)
    except ImportError as e:
        why = f"backend {name}: {package} failed to import: {e}"
        if not auto:
            raise BackendError(f"{why} (use --backend reference, or auto to fall back)") from e
        return Backend("reference", Model, device, f"{why}; training the reference model on {device.type}")
