"""The references on hand-computed cases (the 2:4 one lives in tests/ops/test_sparse24_linear.py)."""

import pytest
import torch

from pyprune.reference import bsr_linear_ref, conv2d_weight, csr_conv2d_ref, csr_linear_ref, pruned_conv2d_ref


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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape,kernel,stride,padding,groups",
    [
        ((3, 4, 16, 16), 1, 2, 0, 1),
        ((2, 6, 15, 9), 1, 3, 0, 1),
        ((2, 6, 8, 8), 1, 1, 0, 1),
        ((1, 5, 7, 7), 1, (2, 1), 0, 1),
        ((2, 6, 9, 9), 3, 2, 1, 1),
        ((2, 6, 9, 9), 1, 2, 1, 1),
        ((2, 6, 9, 9), 1, 2, 0, 3),
        ((2, 6, 8, 8), 1, 2, 0, 6),
        ((2, 6, 9, 9), 3, 2, 1, 2),
    ],
)
def test_conv2d_weight_matches_aten(channels_last, shape, kernel, stride, padding, groups):
    # strided unpadded 1x1 convs on x that is not NCHW-contiguous take one product per group over the pixels
    # the conv reads; the rest ATen's
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    stride, padding = torch.nn.modules.utils._pair(stride), torch.nn.modules.utils._pair(padding)
    w_shape = (4 * groups, shape[1] // groups, kernel, kernel)
    oh, ow = ((s + 2 * p - kernel) // st + 1 for s, p, st in zip(shape[2:], padding, stride))
    grad = torch.randn(shape[0], w_shape[0], oh, ow, dtype=torch.float64).contiguous(memory_format=fmt)
    expected = torch.nn.grad.conv2d_weight(x, w_shape, grad, stride, padding, (1, 1), groups)
    got = conv2d_weight(x, w_shape, grad, stride, padding, (1, 1), groups)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_strided_1x1_weight_gradient_on_channels_last_does_not_crash():
    # ATen 2.13's CPU weight gradient of this conv (channels_last fp32 x, 1x1, stride 2) corrupted the heap
    # within 300 calls at 2 threads; pruned_conv2d's backward goes through reference.conv2d_weight instead.
    # In a subprocess: a corrupted heap would take the test run down with it.
    import subprocess
    import sys

    code = (
        "import torch, importlib\n"
        "pc = importlib.import_module('pyprune.ops.pruned_conv2d').pruned_conv2d\n"
        "torch.set_num_threads(2); torch.manual_seed(0)\n"
        "for _ in range(300):\n"
        "    x = torch.randn(3, 4, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()\n"
        "    w = torch.randn(3, 4, 1, 1, requires_grad=True)\n"
        "    y = pc(x, w, stride=2)\n"
        "    torch.autograd.grad(y, [x, w], torch.randn_like(y))\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])
