import os
import socket

import pytest

# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def clip_tokenizer():
    from storygptv.testing import build_bpe_tokenizer

    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def evaluate_modules_cache(tmp_path_factory):
    """One ``evaluate`` modules cache for the whole run: evaluate imports every loaded script as part of one
    package, ``evaluate_modules``, from the first cache folder it put on ``sys.path``, so a module copied into
    a second folder later in the same process is never found."""
    return tmp_path_factory.mktemp("evaluate_modules_cache")


@pytest.fixture
def offline(monkeypatch, tmp_path, evaluate_modules_cache):
    """No network at all, evaluate's modules in the run's cache and its metric cache in ``tmp_path`` (for
    ``load_metric``)."""
    import evaluate

    def refuse(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", evaluate_modules_cache)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics")


def pytest_configure(config):
    import torch

    # The test models are tiny: their ops are overhead-bound, and a second OpenMP thread only adds
    # spin-waiting (6x slower when another process is busy on the other core).
    torch.set_num_threads(1)
