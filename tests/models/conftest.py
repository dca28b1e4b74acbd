import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny forwards only: intra-op threads add contention on the 2-core machine. Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
