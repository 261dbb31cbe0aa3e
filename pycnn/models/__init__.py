"""Model zoo: LeNet5, MnistCNN (the brief's Keras network), FastMNIST (a 1-epoch record recipe)."""
from __future__ import annotations

from pycnn import nn


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 1->6 5x5 pad 2, conv 6->16 5x5, fc 400-120-84-10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MnistCNN(nn.Module):
    """The Keras MNIST example: conv32-pool-conv64-pool-conv64, fc64, fc10 (3x3 kernels)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class FastMNIST(nn.Module):
    """conv 1->24 5x5, pool, relu, conv 24->32 3x3, pool, relu, fc 800->256, relu, fc 256->10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 24, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(24, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(800, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"lenet5": LeNet5, "mnistcnn": MnistCNN, "fastmnist": FastMNIST}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by its CLI name (case-insensitive)."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)


__all__ = ["LeNet5", "MnistCNN", "FastMNIST", "MODELS", "get_model"]
