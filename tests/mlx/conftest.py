"""The runtime_mlx tests need the ``mlx`` package; without it (e.g. Windows) they are not collected, and the
session header says why."""

import importlib.util

if importlib.util.find_spec("mlx") is None:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if importlib.util.find_spec("mlx") is None:
        return "tests/mlx: skipped, the mlx package is not installed"
    return None
