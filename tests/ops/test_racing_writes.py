"""A write through `.data` racing a call must not leave a stale derived value behind (derived_cache.h).

Writes through `.data` move no version counter, so what a CPU kernel keeps between calls (pruned_conv2d's
transposed weight, csr_conv2d's offsets) is matched against a fingerprint of the sources' contents. The value
was built from the live sources after they were fingerprinted: another thread writing B over A and then A again
during one build left a value derived from a mix of A and B kept under A's fingerprint, and every later call
with A returned a wrong result (3-7% of the rounds below). It is now built from a copy taken in the pass that
fingerprints it. A racing call's own result is undefined, as for any op; the checks run after the writer ends.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pyprune import _extension
from pyprune.nn import PrunedConv2d, SparseConv2d

pytestmark = pytest.mark.skipif(
    not _extension.HAS_CPP, reason="the values kept between calls are the C++ kernels'"
)


def _rounds(module, x, source, other, rounds=200):
    """Rounds of: a thread calls `module` while this one writes `other`, then the source's own values back,
    into `source` through `.data`, 20 times; then one call, which must match the module's dense equivalent."""
    a, b = source.clone(), other.clone()
    with torch.no_grad():
        expected = module.to_dense()(x)
        wrong = 0
        for _ in range(rounds):
            stop = threading.Event()

            def call():
                while not stop.is_set():
                    try:
                        module(x)
                    except ValueError:  # a pattern read half-written: refused, as it should be
                        pass

            thread = threading.Thread(target=call)
            thread.start()
            for _ in range(20):
                source.data.copy_(b)
                source.data.copy_(a)
            stop.set()
            thread.join()
            wrong += not torch.allclose(module(x), expected, rtol=1e-4, atol=1e-4)
    assert wrong == 0, f"{wrong} of {rounds} rounds kept a value built from a half-written source"


def test_pruned_conv2d_transposed_weight():
    torch.manual_seed(0)
    m = PrunedConv2d.from_dense(torch.nn.Conv2d(256, 256, 3, padding=1, bias=False), keep_in=range(256),
                                keep_out=range(256))
    x = torch.randn(1, 256, 7, 7)  # a small map: the path that keeps a transposed weight
    _rounds(m, x, m.weight, torch.randn_like(m.weight))


def test_csr_conv2d_structure():
    torch.manual_seed(0)

    def half_of_each_row():  # every row holds 1152 of its 2304 weights, so two patterns share crow_indices
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
        keep = torch.zeros(256, 2304, dtype=torch.bool)
        keep.scatter_(1, torch.rand(256, 2304).argsort(dim=1)[:, :1152], True)
        with torch.no_grad():  # tap-major columns back to (out, in, kh, kw)
            conv.weight.mul_(keep.view(256, 9, 256).permute(0, 2, 1).reshape(256, 256, 3, 3))
        return SparseConv2d.from_dense(conv, layout="csr")

    m, other = half_of_each_row(), half_of_each_row()
    assert torch.equal(m.weight.crow_indices, other.weight.crow_indices)
    _rounds(m, torch.randn(1, 256, 7, 7), m.weight.col_indices, other.weight.col_indices)
