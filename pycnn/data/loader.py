"""Mini-batches over in-memory arrays: a seeded batch iterator, a DataLoader and a weighted sampler.

The arrays may be NumPy or CuPy (anything indexable along its first axis with an integer array);
the shuffle order is always drawn on the host with ``np.random.default_rng`` so that a seed gives
the same batches on every device. ``y`` may be one array or a tuple / list / dict of arrays (for
example the presence, class and box targets of the localization task); every one of them is
indexed with the same sample indices.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterator

import numpy as np

__all__ = ["iterate_batches", "DataLoader", "WeightedSampler", "balanced_sample_weights", "balanced_class_weights"]


def _check_batch_size(batch_size, where: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _nonnegative_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_seed(seed, where: str) -> int:
    # (None, -1 or 2.5 were taken here and failed only at the first iter() with NumPy's "object of
    # type 'NoneType' has no len()" or "expected non-negative integer", naming no argument)
    return _nonnegative_int(seed, "seed", where)


def _targets(y) -> list:
    if isinstance(y, dict):
        return list(y.values())
    if isinstance(y, (tuple, list)):
        return list(y)
    return [y]


def _check_lengths(x, y, where: str) -> int:
    if not hasattr(x, "shape") or len(x.shape) == 0:
        raise ValueError(f"{where}: x must be an array with a leading sample axis, got {type(x).__name__}")
    n = x.shape[0]
    for i, t in enumerate(_targets(y)):
        if not hasattr(t, "shape") or len(t.shape) == 0:
            raise ValueError(f"{where}: y must be an array (or a tuple/dict of arrays) with a "
                             f"leading sample axis, got {type(t).__name__}")
        if t.shape[0] != n:
            name = "y" if not isinstance(y, (dict, tuple, list)) else f"y[{list(y)[i] if isinstance(y, dict) else i}]"
            raise ValueError(f"{where}: len(x) and len({name}) must match, got {n} and {t.shape[0]}")
    if n == 0:
        raise ValueError(f"{where}: the data set is empty (x has shape {tuple(x.shape)})")
    return n


def _to_device_index(arr, idx: np.ndarray):
    """``idx`` as an index for ``arr``: a CuPy array when ``arr`` lives on the GPU."""
    if hasattr(arr, "__cuda_array_interface__"):
        import cupy  # only reached when a CuPy array was passed in

        return cupy.asarray(idx)
    return idx


def _take(arr, idx):
    if isinstance(idx, slice):
        return arr[idx]
    return arr[_to_device_index(arr, idx)]


def _take_targets(y, idx):
    if isinstance(y, dict):
        return {k: _take(v, idx) for k, v in y.items()}
    if isinstance(y, (tuple, list)):
        return type(y)(_take(v, idx) for v in y)
    return _take(y, idx)


def _batches_from_order(x, y, order, n: int, batch_size: int, drop_last: bool):
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        idx = slice(start, end) if order is None else order[start:end]
        yield _take(x, idx), _take_targets(y, idx)


def iterate_batches(x, y, batch_size: int, shuffle: bool = True, seed=0,
                    drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
    """Yield ``(xb, yb)`` mini-batches that cover every sample once.

    Args:
        x: array whose first axis indexes samples (any trailing shape; NumPy or CuPy).
        y: an array with the same first-axis length, or a tuple/list/dict of such arrays.
        batch_size: samples per batch (>= 1); the last batch may be smaller.
        shuffle: visit the samples in a random order drawn with ``np.random.default_rng(seed)``;
            otherwise in order (then the batches are views, not copies).
        seed: anything ``np.random.default_rng`` accepts (an int, a sequence of ints, a
            Generator); the same seed gives the same batches.
        drop_last: skip the final batch when it holds fewer than ``batch_size`` samples.

    Returns:
        An iterator of ``(xb, yb)``; ``yb`` has the structure of ``y``.

    Raises:
        ValueError: batch_size < 1, lengths of x and y differ, or the data set is empty.
    """
    batch_size = _check_batch_size(batch_size, "iterate_batches")
    n = _check_lengths(x, y, "iterate_batches")
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    return _batches_from_order(x, y, order, n, batch_size, drop_last)


class WeightedSampler:
    """Draw sample indices with replacement, with probability proportional to ``weights``.

    Used as ``DataLoader(..., sampler=WeightedSampler(w, num_samples))`` to rebalance classes
    (see :func:`balanced_sample_weights`). Each epoch draws fresh indices from
    ``np.random.default_rng([seed, epoch])``, so runs with one seed are reproducible.

    Args:
        weights: (N,) non-negative finite weights, one per sample, not all zero.
        num_samples: indices per epoch (default: N).
        seed: an integer seed (>= 0).

    Raises:
        ValueError: weights not 1-D, negative, non-finite or all zero; num_samples < 1; a seed
            that is not an integer >= 0.
    """

    def __init__(self, weights, num_samples: int | None = None, seed: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"WeightedSampler: weights must be a non-empty 1-D array, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
            raise ValueError(f"WeightedSampler: weights must be finite and >= 0, got {w[bad]} at index {bad}")
        total = w.sum()
        if total <= 0:
            raise ValueError("WeightedSampler: weights must not all be zero")
        if num_samples is None:
            num_samples = w.size
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"WeightedSampler: num_samples must be an integer >= 1, got {num_samples!r}")
        self.probabilities = w / total
        self.num_samples = int(num_samples)
        self.seed = _check_seed(seed, "WeightedSampler")
        self.epoch = 0

    def indices(self, epoch: int) -> np.ndarray:
        """The (num_samples,) int64 indices drawn for ``epoch`` (the same every call)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        return rng.choice(self.probabilities.size, size=self.num_samples, replace=True,
                          p=self.probabilities).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next ``iter(sampler)`` draws for (an integer >= 0)."""
        # (int(2.7) was 2: a fractional epoch silently replayed another epoch's draw)
        self.epoch = _nonnegative_int(epoch, "epoch", "WeightedSampler.set_epoch")

    def __iter__(self) -> Iterator[int]:
        idx = self.indices(self.epoch)
        self.epoch += 1
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"WeightedSampler(n={self.probabilities.size}, num_samples={self.num_samples}, seed={self.seed})"


def _class_counts(labels, num_classes, where: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{where}: labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise ValueError(f"{where}: labels must be < num_classes={num_classes}, got {labels.max()}")
    return labels, np.bincount(labels, minlength=num_classes)


def balanced_sample_weights(labels, num_classes: int | None = None) -> np.ndarray:
    """Per-sample weights ``1 / count(label)`` so that every class is drawn equally often.

    Args:
        labels: (N,) non-negative integer class labels.
        num_classes: number of classes (default: ``labels.max() + 1``).

    Returns:
        (N,) float64 weights for :class:`WeightedSampler`.

    Raises:
        ValueError: labels empty, not 1-D, negative, or >= num_classes.
    """
    labels, counts = _class_counts(labels, num_classes, "balanced_sample_weights")
    return 1.0 / counts[labels]


def balanced_class_weights(labels, num_classes: int | None = None) -> np.ndarray:
    """Per-class loss weights ``N / (num_classes * count(class))`` (scikit-learn's "balanced").

    For ``cross_entropy(..., weight=...)``: a class seen half as often weighs twice as much; on
    balanced data every weight is 1. A class that never occurs gets weight 0 (it contributes no
    term to the loss anyway).

    Args:
        labels: (N,) non-negative integer class labels of the training set.
        num_classes: number of classes (default: ``labels.max() + 1``).

    Returns:
        (num_classes,) float32 weights.

    Raises:
        ValueError: labels empty, not 1-D, negative, or >= num_classes.
    """
    labels, counts = _class_counts(labels, num_classes, "balanced_class_weights")
    weights = np.zeros(counts.size, dtype=np.float64)
    seen = counts > 0
    weights[seen] = labels.size / (counts.size * counts[seen])
    return weights.astype(np.float32)


class DataLoader:
    """Re-iterable mini-batches over in-memory arrays; a new order every epoch.

    Epoch ``e`` (counted by the number of ``iter()`` calls, or set with :meth:`set_epoch`)
    shuffles with ``np.random.default_rng([seed, e])``, so a run is reproducible from its seed
    while each epoch sees a different order. With a ``sampler`` the batches follow the
    sampler's indices instead (for example a :class:`WeightedSampler`).

    Args:
        x, y: as for :func:`iterate_batches`.
        batch_size: samples per batch (>= 1).
        shuffle: shuffle each epoch. Default: True without a sampler; it must not be True
            together with a sampler (the sampler decides the order).
        seed: integer seed of the shuffle (>= 0).
        drop_last: skip a final short batch.
        sampler: an object with ``__iter__`` yielding sample indices and ``__len__``; when it
            has ``indices(epoch)`` that is used instead (reproducible per epoch).

    Raises:
        ValueError: as for :func:`iterate_batches`; a seed that is not an integer >= 0;
            shuffle=True with a sampler; a sampler index outside [0, len(x)).
    """

    def __init__(self, x, y, batch_size: int, shuffle: bool | None = None, seed: int = 0,
                 drop_last: bool = False, sampler=None):
        self.batch_size = _check_batch_size(batch_size, "DataLoader")
        self.n = _check_lengths(x, y, "DataLoader")
        if sampler is not None and shuffle:
            raise ValueError("DataLoader: shuffle=True and a sampler are mutually exclusive "
                             "(the sampler decides the order); leave shuffle unset")
        self.x, self.y = x, y
        self.shuffle = (sampler is None) if shuffle is None else bool(shuffle)
        # (checked where it is used: an unshuffled or sampled loader never reads it, and seed=None
        # was fine there)
        self.seed = _check_seed(seed, "DataLoader") if self.shuffle and sampler is None else seed
        self.drop_last = bool(drop_last)
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next ``iter()`` produces (an integer >= 0)."""
        self.epoch = _nonnegative_int(epoch, "epoch", "DataLoader.set_epoch")

    def _order(self, epoch: int):
        if self.sampler is not None:
            if hasattr(self.sampler, "indices"):
                order = np.asarray(self.sampler.indices(epoch), dtype=np.int64)
            else:
                order = np.fromiter(iter(self.sampler), dtype=np.int64)
            if order.size and (order.min() < 0 or order.max() >= self.n):
                raise ValueError(f"DataLoader: sampler produced index {int(order.min()) if order.min() < 0 else int(order.max())}, "
                                 f"outside [0, {self.n})")
            return order
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return None

    def _num_items(self) -> int:
        return len(self.sampler) if self.sampler is not None else self.n

    def __iter__(self):
        order = self._order(self.epoch)
        self.epoch += 1
        n = self.n if order is None else order.size
        return _batches_from_order(self.x, self.y, order, n, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        n = self._num_items()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __repr__(self) -> str:
        return (f"DataLoader(n={self.n}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, sampler={self.sampler!r})")
