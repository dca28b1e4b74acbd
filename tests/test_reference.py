"""The references on hand-computed cases (the 2:4 one lives in tests/ops/test_sparse24_linear.py)."""

import torch

from pyprune.reference import bsr_linear_ref, csr_conv2d_ref, csr_linear_ref, pruned_conv2d_ref


def test_csr_linear_ref_hand_computed():
    # W = [[1, 0, 2], [0, 0, 0]], x = [1, 2, 3], b = [10, 20] -> [1 + 6 + 10, 20]
    y = csr_linear_ref(
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.tensor([0, 2, 2], dtype=torch.int32),
        torch.tensor([0, 2], dtype=torch.int32),
        torch.tensor([1.0, 2.0]),
        2,
        torch.tensor([10.0, 20.0]),
    )
    assert y.tolist() == [[17.0, 20.0]]


def test_bsr_linear_ref_hand_computed_ragged():
    # 3 x 3 weight in 2 x 2 blocks: block (0, 1) holds W[0:2, 2:3] = [[5], [6]]; block (1, 0) holds W[2, 0:2]
    values = torch.tensor([[[5.0, 0.0], [6.0, 0.0]], [[1.0, 2.0], [0.0, 0.0]]])
    y = bsr_linear_ref(
        torch.tensor([[1.0, 1.0, 2.0]]),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        torch.tensor([1, 0], dtype=torch.int32),
        values,
        3,
    )
    assert y.tolist() == [[10.0, 12.0, 3.0]]


def test_duplicate_columns_add_up_as_in_the_kernels():
    # W row 0 = [1 + 2, 0] given as two entries of column 0; x = [[1, 5]] (m = 1: gather path, 40: tiles)
    from pyprune.ops import bsr_linear, csr_linear

    crow, col = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
    for m in (1, 40):
        x = torch.tensor([[1.0, 5.0]]).expand(m, 2)
        y = csr_linear_ref(x, crow, col, torch.tensor([1.0, 2.0]), 1)
        assert y.tolist() == [[3.0]] * m
        assert csr_linear(x, crow, col, torch.tensor([1.0, 2.0]), 1).tolist() == [[3.0]] * m
        blocks = torch.tensor([[[1.0]], [[2.0]]])  # 1 x 1 blocks
        assert bsr_linear_ref(x, crow, col, blocks, 1).tolist() == [[3.0]] * m
        assert bsr_linear(x, crow, col, blocks, 1).tolist() == [[3.0]] * m


def test_conv_references_without_channels():
    # the GPU router's reference backend and the CPU fallback: F.conv2d rejects a weight without rows and
    # gives no output channels for one without inputs; the op's answer is the bias (or zeros) in out_channels
    x, b = torch.randn(2, 4, 5, 5), torch.randn(3)
    empty = torch.zeros(0, dtype=torch.long)
    y = pruned_conv2d_ref(x, torch.randn(3, 0, 3, 3), b, empty, None, 3, [1, 1], [1, 1], [1, 1], 1, True)
    assert torch.equal(y, b.relu().view(1, 3, 1, 1).expand(2, 3, 5, 5))
    y = pruned_conv2d_ref(x, torch.randn(0, 4, 3, 3), None, None, empty, 5, [1, 1], [1, 1], [1, 1], 1, False)
    assert torch.equal(y, torch.zeros(2, 5, 5, 5))
    crow, col = torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    y = csr_conv2d_ref(x, crow, col, torch.zeros(0), 0, [3, 3], None, [2, 2], [1, 1], [1, 1])
    assert y.shape == (2, 0, 3, 3)
