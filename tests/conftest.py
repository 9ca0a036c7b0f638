"""Suite-wide settings: one intra-op thread per test process.

`make test` runs two pytest-xdist workers on a 2-core machine; torch's default of one thread
per core would oversubscribe it (measured: a 4-iteration training took 82 s instead of 3 s on
a loaded machine). Override with D2SSOD_TEST_THREADS.
"""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("D2SSOD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``(cfg, path)`` of a d2ssod Soft Teacher checkpoint of 3 iterations (teacher, student and
    trainer state), trained once per test process for the tests of checkpoint-reading tools."""
    from training_helpers import train_tiny_checkpoint

    return train_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_checkpoint")))
