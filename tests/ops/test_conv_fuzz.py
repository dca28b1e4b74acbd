"""Seeded random shapes for the conv kernels against the float64 reference: maps from 1x1 to 17x17, batches up
to 30, both memory formats, kept channels, strides, padding, bias and ReLU; and for pruned_conv2d, maps up to
29x29 with the rest of its arguments (scattered outputs, residuals, ReLU6, max pools, groups, dilation). The
fixed cases in test_pruned_conv2d.py / test_csr_conv2d.py pick out each kernel path; these catch what a path
assumes about shapes it was not written for (as an NCHW 1x1 map once took the channels_last pixel runs)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pyprune.nn.sparse_conv2d import tap_major
from pyprune.reference import pruned_conv2d_ref
from pyprune.sparse import CSR


def _shapes(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        k = rng.choice([1, 1, 1, 3, 5])
        p = rng.choice([0, 0, 1, 2]) if k > 1 else rng.choice([0, 0, 1])
        side = (1, 1, 2, 3, 7, 9, 14, 17)  # 1x1 maps twice as likely: several paths special-case them
        h = rng.choice(side)
        w = h if rng.random() < 0.5 else rng.choice(side)
        if h + 2 * p < k or w + 2 * p < k:
            continue
        out.append(
            dict(
                cin=rng.choice([1, 3, 8, 16, 33, 64]),
                cout=rng.choice([1, 5, 16, 24, 32, 40, 70]),
                k=k,
                s=rng.choice([1, 1, 2]),
                p=p,
                h=h,
                w=w,
                n=rng.choice([1, 2, 5, 14, 15, 30]),
                cl=rng.random() < 0.5,
                keep=rng.choice([1.0, 0.5, 0.25]),
                sparsity=rng.choice([0.0, 0.5, 0.9]),
                bias=rng.random() < 0.5,
                relu=rng.random() < 0.3,
            )
        )
    return out


SHAPES = _shapes(0, 200)


def _x(c, gen):
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if c["cl"] else x


@pytest.mark.parametrize("c", SHAPES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_pruned_conv2d_random_shapes(c):
    gen = torch.Generator().manual_seed(1)
    x = _x(c, gen)
    ci = max(1, int(c["cin"] * c["keep"]))
    in_index = torch.sort(torch.randperm(c["cin"], generator=gen)[:ci]).values if ci < c["cin"] else None
    w = torch.randn(c["cout"], ci, c["k"], c["k"], generator=gen)
    b = torch.randn(c["cout"], generator=gen) if c["bias"] else None
    s, p = [c["s"]] * 2, [c["p"]] * 2
    args = (x, w, b, in_index, None, c["cout"], s, p, [1, 1], 1, c["relu"])
    y = torch.ops.pyprune.pruned_conv2d(*args)
    double = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    want = pruned_conv2d_ref(*double)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def _epilogue_cases(seed: int, n: int):
    """What the shapes above leave at their defaults: a scattered output (out_index into a wider y), a
    residual (either memory format), ReLU6, a fused max pool, groups, dilation; maps up to 29x29."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        k = rng.choice([1, 1, 3, 3, 5])
        d = rng.choice([1, 1, 2]) if k > 1 else 1
        p = rng.choice([0, k // 2, d * (k // 2)])
        h = rng.choice([1, 5, 7, 14, 15, 28, 29])
        w = h if rng.random() < 0.7 else rng.choice([7, 13, 28])
        if h + 2 * p < d * (k - 1) + 1 or w + 2 * p < d * (k - 1) + 1:
            continue
        cin = rng.choice([3, 16, 33, 64, 130])
        ci = max(1, round(cin * rng.choice([1.0, 0.5, 0.25])))
        groups = rng.choice([g for g in (1, 1, 1, 2, 4, ci) if ci % g == 0]) if k > 1 else 1
        cout = groups * rng.choice([1, 3, 8, 16, 24]) if groups > 1 else rng.choice([1, 5, 16, 32, 48, 70])
        s = rng.choice([1, 1, 2])
        oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
        pool = oh >= 3 and ow >= 3 and rng.random() < 0.15
        out.append(
            dict(cin=cin, ci=ci, cout=cout, extra=rng.choice([0, 0, 1, 9]) if rng.random() < 0.4 else None,
                 k=k, s=s, p=p, d=d, groups=groups, h=h, w=w, n=rng.choice([1, 2, 3]), cl=rng.random() < 0.5,
                 bias=rng.random() < 0.5, relu=rng.random() < 0.6, cap=rng.random() < 0.3, pool=pool,
                 res=None if pool or rng.random() < 0.6 else rng.choice(["nchw", "cl"]))
        )  # fmt: skip
    return out


@pytest.mark.parametrize("c", _epilogue_cases(3, 120), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_pruned_conv2d_random_epilogues(c):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=gen)
    if c["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    in_index = torch.sort(torch.randperm(c["cin"], generator=gen)[: c["ci"]]).values
    width = c["cout"] + (c["extra"] or 0)
    out_index = None
    if c["extra"] is not None:
        out_index = torch.sort(torch.randperm(width, generator=gen)[: c["cout"]]).values
    w = torch.randn(c["cout"], c["ci"] // c["groups"], c["k"], c["k"], generator=gen)
    b = torch.randn(c["cout"], generator=gen) if c["bias"] else None
    geometry = ([c["s"]] * 2, [c["p"]] * 2, [c["d"]] * 2, c["groups"])
    oh = (c["h"] + 2 * c["p"] - c["d"] * (c["k"] - 1) - 1) // c["s"] + 1
    ow = (c["w"] + 2 * c["p"] - c["d"] * (c["k"] - 1) - 1) // c["s"] + 1
    res = None
    if c["res"] is not None:
        res = torch.randn(c["n"], width, oh, ow, generator=gen)
        if c["res"] == "cl":
            res = res.contiguous(memory_format=torch.channels_last)
    cap = 6.0 if c["relu"] and c["cap"] else None
    pool = [3, 3, 2, 2, 1, 1] if c["pool"] else []
    epilogue = (c["relu"], pool, cap)
    y = torch.ops.pyprune.pruned_conv2d(x, w, b, in_index, out_index, width, *geometry, *epilogue, res)
    f64 = [None if t is None else t.double() for t in (x, w, b, res)]
    want = pruned_conv2d_ref(f64[0], f64[1], f64[2], in_index, out_index, width, *geometry, *epilogue, f64[3])
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    if c["cl"] and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("c", SHAPES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_csr_conv2d_random_shapes(c):
    gen = torch.Generator().manual_seed(2)
    x = _x(c, gen)
    w = torch.randn(c["cout"], c["cin"], c["k"], c["k"], generator=gen)
    w = w * (torch.rand(w.shape, generator=gen) >= c["sparsity"])
    b = torch.randn(c["cout"], generator=gen) if c["bias"] else None
    csr = CSR.from_dense(tap_major(w))
    s, p = [c["s"]] * 2, [c["p"]] * 2
    y = torch.ops.pyprune.csr_conv2d(
        x, csr.crow_indices, csr.col_indices, csr.values, c["cout"], [c["k"]] * 2, b, s, p, [1, 1]
    )
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
