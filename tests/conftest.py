import pytest
import torch

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
