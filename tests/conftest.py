import atexit
import os
import shutil
import tempfile

import pytest
import torch

# What cllm_rt makes once per machine (converted models, measured linear plans) goes to a cache of this run's
# own, never the user's: a linear plan measured in the middle of the suite (seen: float32 at 2 threads with its
# wide tiles at half their speed, on an Intel Xeon) routed every later process on the machine by it, a
# benchmark's token trees included.
os.environ["CLLM_RT_CACHE"] = tempfile.mkdtemp(prefix="cllm_rt-tests-")
atexit.register(shutil.rmtree, os.environ["CLLM_RT_CACHE"], ignore_errors=True)

# The models here are tiny: a second thread buys nothing, and with two OpenMP threads a busy neighbour
# process can slow a forward 10-30x (MACHINE-NOTES). tests/test_ops.py opts back into 2 threads so the
# kernels' parallel split is exercised.
torch.set_num_threads(1)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
