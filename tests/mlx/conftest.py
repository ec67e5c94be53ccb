"""The runtime_mlx tests need the ``mlx`` package; without it (e.g. Windows) they are not collected, and the
session header says why. Every MLX test runs with poisoned Metal outputs, and a test parametrized by ``path``
on the path it names."""

import importlib.util

import pytest

if importlib.util.find_spec("mlx") is None:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if importlib.util.find_spec("mlx") is None:
        return "tests/mlx: skipped, the mlx package is not installed"
    return None


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Metal outputs start as NaN (or 127 for integer outputs) on Apple Silicon, in every MLX test."""
    from runtime_mlx.kernels import launch

    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture(autouse=True)
def _path(request, monkeypatch):
    """A test parametrized by ``path`` (`tests.mlx.utils.PATHS`): "mlx" forces the pure-MLX path
    (DSFS_MLX_KERNELS=mlx); "metal" runs the Metal kernels."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path == "mlx":
        monkeypatch.setenv("DSFS_MLX_KERNELS", "mlx")
    yield path
