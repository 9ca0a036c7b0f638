"""Suite-wide settings: one intra-op thread per test process.

`make test` runs two pytest-xdist workers on a 2-core machine; torch's default of one thread
per core would oversubscribe it (measured: a 4-iteration training took 82 s instead of 3 s on
a loaded machine). Override with D2SSOD_TEST_THREADS.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("D2SSOD_TEST_THREADS", "1")))
