"""Data: MNIST (IDX files, integrity checks, download, cache), normalization and mini-batches."""
from .loader import DataLoader, WeightedSampler, balanced_sample_weights, iterate_batches
from .mnist import (
    MNIST_MEAN,
    MNIST_STD,
    MnistIntegrityError,
    MnistNotFoundError,
    load_mnist,
    normalize,
)

__all__ = [
    "load_mnist",
    "normalize",
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistNotFoundError",
    "MnistIntegrityError",
    "iterate_batches",
    "DataLoader",
    "WeightedSampler",
    "balanced_sample_weights",
]
