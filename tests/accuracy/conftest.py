import pytest
import torch

from pyprune.accuracy import Batches, build_model, digits, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def task():
    return digits()


@pytest.fixture(scope="session")
def small_task(task):
    """512 training and 128 validation digits (32x32): enough for a LeNet to learn in a few epochs."""
    tr, va = task.train, task.val
    return (
        Batches(tr.x[:512], tr.y[:512], 64, shuffle=True, seed=1),
        Batches(va.x[:128], va.y[:128], 128),
    )


@pytest.fixture(scope="session")
def trained_lenet(small_task):
    """LeNet-5 trained 4 epochs on the small split (session-wide: tests take copies)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model("lenet5")
    train(m, small_task[0], 4, lr=3e-3)
    torch.set_num_threads(before)
    return m.eval()
