import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture
def one_thread():
    """Runs the test with one intra-op thread (many tiny forwards: threads only add contention on a 2-core
    machine); restores the count afterwards. Directories opt in with an autouse fixture of their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
