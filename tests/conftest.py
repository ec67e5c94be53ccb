import os

import torch

# Triton kernels run natively on a CUDA device and under Triton's CPU interpreter everywhere else (DESIGN.md,
# "Where each test runs"); the variable must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The tests run tiny ops: a second OpenMP thread only adds synchronization (measured 10x slower on the 2-core
# CI machine when the other core is busy), so the whole session runs on one intra-op thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test draws fresh, seeded random inputs (seed from the test's name, so reruns agree)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)
    yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared micro data directory (`tests.test_train.make_data_dir`) for every test that trains or
    evaluates; read-only."""
    from tests.test_train import make_data_dir

    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict:
    """The post-training tests' start (tests/test_stage.py, tests/test_grpo_run.py): a data dir and two micro
    checkpoints trained on it, ``plain`` and ``dropout`` (hidden_dropout 0.1)."""
    from tests.test_train import MICRO_MODEL, make_data_dir, micro_train

    root = tmp_path_factory.mktemp("stage")
    d = make_data_dir(root)
    torch.manual_seed(0)
    micro_train(d, root / "plain", max_steps=6, model_overrides={**MICRO_MODEL, "max_position_embeddings": 128})
    micro_train(d, root / "dropout", max_steps=2,
                model_overrides={**MICRO_MODEL, "max_position_embeddings": 128, "hidden_dropout": 0.1})
    return {"root": root, "data": d, "plain": root / "plain" / "final", "dropout": root / "dropout" / "final"}
