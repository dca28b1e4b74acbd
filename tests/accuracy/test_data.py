import pytest
import torch

from pyprune.accuracy import Batches, check_loader, digits


def test_digits_shapes_split_and_determinism(task):
    x, y = next(iter(task.val))
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    n_train, n_val = len(task.train.y), len(task.val.y)
    assert n_train + n_val == 1797 and abs(n_val - 0.2 * 1797) < 10
    assert set(task.val.y.tolist()) == set(range(10))  # stratified: every class in validation
    assert abs(float(task.train.x.mean())) < 1e-4 and abs(float(task.train.x.std()) - 1) < 1e-3
    again = digits()
    assert torch.equal(again.val.x, task.val.x) and torch.equal(again.train.y, task.train.y)
    other = digits(seed=1)
    assert not torch.equal(other.val.y, task.val.y)


def test_digits_native_size():
    t = digits(size=8)
    assert t.input_shape == (1, 8, 8) and next(iter(t.train))[0].shape[1:] == (1, 8, 8)


def test_batches_epoch_order_is_reproducible():
    b = Batches(torch.arange(10.0)[:, None], torch.arange(10), batch_size=4, shuffle=True, seed=3)
    b.set_epoch(2)
    first = torch.cat([y for _, y in b])
    b.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in b]), first)
    assert sorted(first.tolist()) == list(range(10)) and len(b) == 3
    assert not torch.equal(torch.cat([y for _, y in b]), first)  # the next epoch is another permutation


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "empty"),
        ([(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))], r"shape \(1, 16, 16\), expected"),
        ([(torch.zeros(2, 1, 32, 32), torch.tensor([0, 10]))], r"labels in \[0, 10\], expected \[0, 9\]"),
        ([(torch.zeros(2, 1, 32, 32), torch.tensor([-1, 3]))], r"labels in \[-1, 3\]"),
        ([(torch.zeros(2, 1, 32, 32), torch.zeros(2))], "integer class indices"),
        ([(torch.zeros(2, 1, 32, 32), torch.zeros(3, dtype=torch.long))], r"y \(B,\)"),
    ],
)
def test_check_loader_rejects(data, match):
    with pytest.raises(ValueError, match=match):
        check_loader(data, "train_data", (1, 32, 32), 10)


def test_check_loader_type_errors():
    with pytest.raises(TypeError, match="re-iterable"):
        check_loader(iter([(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))]), "val_data")
    with pytest.raises(TypeError, match=r"val_data: batch 0 must be an \(x, y\) pair"):
        check_loader([torch.zeros(2, 3)], "val_data")
    with pytest.raises(TypeError, match="iterable of"):
        check_loader(torch.zeros(3), "val_data")
    assert check_loader([(torch.zeros(3, 1, 32, 32), torch.tensor([0, 1, 9]))], "x", (1, 32, 32), 10) == 3
