"""Data: MNIST (IDX files, integrity checks, download, cache), normalization, mini-batches,
localization canvases (``pycnn.data.localization``) and augmentation (``pycnn.data.augment``)."""
from . import augment, localization
from .augment import Augment
from .loader import DataLoader, WeightedSampler, balanced_class_weights, balanced_sample_weights, iterate_batches
from .localization import load_canvases, load_localization, make_canvases, save_canvases
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
    "balanced_class_weights",
    "localization",
    "augment",
    "make_canvases",
    "save_canvases",
    "load_canvases",
    "load_localization",
    "Augment",
]
