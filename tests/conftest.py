import os

import pytest

# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def clip_tokenizer():
    from storygptv.testing import build_bpe_tokenizer

    return build_bpe_tokenizer()


def pytest_configure(config):
    import torch

    # The test models are tiny: their ops are overhead-bound, and a second OpenMP thread only adds
    # spin-waiting (6x slower when another process is busy on the other core).
    torch.set_num_threads(1)
