"""Data for the accuracy study: scikit-learn's bundled handwritten digits (no download) and the loader checks.

A "loader" here is anything iterable over ``(x, y)`` batches that can be iterated more than once (a
``torch.utils.data.DataLoader``, a list of pairs, or :class:`Batches`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Batches:
    """Re-iterable ``(x, y)`` mini-batches over in-memory tensors; with ``shuffle`` each pass uses a new
    permutation drawn from ``seed`` and the pass number, so a run is reproducible. x: (N, ...), y: (N,)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False, seed: int = 0
    ) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s permutation (``train`` calls this at every epoch, so two
        fine-tunes of the same length see the same batches whatever ran before)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return (self.x.shape[0] + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self._epoch)
            order = torch.randperm(n, generator=gen)
            self._epoch += 1
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def take(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches of one unshuffled pass (calibration / importance data)."""
        out = []
        for i in range(0, min(self.x.shape[0], n_batches * self.batch_size), self.batch_size):
            out.append((self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]))
        return out


@dataclass
class Task:
    """A classification task: loaders plus what their batches must look like."""

    name: str
    train: Iterable
    val: Iterable
    input_shape: tuple[int, ...]  # one sample, without the batch dim
    num_classes: int


def digits(
    size: int = 32,
    val_fraction: float = 0.2,
    batch_size: int = 64,
    seed: int = 0,
) -> Task:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, bundled with the package).

    Images are scaled to [0, 1], resized to ``size`` x ``size`` (bilinear, deterministic: LeNet-5 expects
    32x32), and standardised with the training split's mean and std. The split is stratified per class and
    fixed by ``seed``. Returns a :class:`Task` whose x batches are (B, 1, size, size) float32 and y (B,) int64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits task needs scikit-learn (pip install scikit-learn)") from exc
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8), got {size!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    val_idx, train_idx = [], []
    for c in range(10):  # stratified: every class in the same proportion in both splits
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * float(val_fraction))
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Task(
        name=f"digits{size}",
        train=Batches(x[tr], y[tr], batch_size, shuffle=True, seed=seed),
        val=Batches(x[va], y[va], 256),
        input_shape=(1, size, size),
        num_classes=10,
    )


def check_loader(
    data: object, arg: str, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
) -> int:
    """Iterate once over ``data`` and raise a ValueError / TypeError naming ``arg`` if it is empty, does not
    yield (x, y) tensor pairs, or has x of the wrong sample shape or y outside [0, num_classes). Returns the
    number of samples."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"{arg} must be an iterable of (x, y) batches (e.g. a DataLoader), got {type(data).__name__}"
        )
    if iter(data) is data:
        raise TypeError(
            f"{arg} is an iterator, which is exhausted after one pass; pass a re-iterable (a DataLoader, a list "
            "of (x, y) pairs or pyprune.accuracy.Batches)"
        )
    n = 0
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{arg}: batch {i} must be an (x, y) pair, got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{arg}: batch {i} must hold tensors, got {type(x).__name__}, {type(y).__name__}")
        if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"{arg}: batch {i} must be x (B, ...) with labels y (B,), B > 0; got x {tuple(x.shape)}, "
                f"y {tuple(y.shape)}"
            )
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"{arg}: batch {i} has samples of shape {tuple(x.shape[1:])}, expected {tuple(input_shape)} "
                f"(x: (B, {', '.join(map(str, input_shape))}))"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{arg}: batch {i} labels must be integer class indices, got dtype {y.dtype}")
        if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"{arg}: batch {i} has labels in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]"
            )
        n += x.shape[0]
    if n == 0:
        raise ValueError(f"{arg} is empty: it must yield at least one (x, y) batch")
    return n
