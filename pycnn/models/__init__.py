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


class LocalizationNet(nn.Module):
    """Digit localization: is there a digit, which one, and where (the brief's second model).

    Backbone conv32-pool-conv64-pool-conv128-pool (3x3, padding 1) and fc128, then three heads:
    a presence logit, class logits and a box. The box head predicts (cx, cy, w, h) through a
    sigmoid and returns corners (x0, y0, x1, y1) normalized to the canvas, so x0 <= x1 always.
    The backbone's first two convolutions have MnistCNN's shapes and names (features.0,
    features.3), so a trained MNIST classifier can initialize them (transfer learning).
    """

    def __init__(self, canvas_size: int = 64, num_classes: int = 10, width: int = 32):
        super().__init__()
        if canvas_size % 8 or canvas_size < 8:
            raise ValueError(f"LocalizationNet: canvas_size must be a positive multiple of 8, got {canvas_size}")
        self.canvas_size = canvas_size
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = canvas_size // 8
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(w3 * side * side, 128), nn.ReLU())
        self.presence = nn.Linear(128, 1)
        self.classes = nn.Linear(128, num_classes)
        self.box = nn.Linear(128, 4)

    def forward(self, x):
        """Returns (presence_logit (N,), class_logits (N, C), boxes (N, 4) as x0, y0, x1, y1)."""
        from pycnn import functional as F

        h = self.neck(self.features(x))
        presence = self.presence(h).reshape(-1)
        cxcywh = F.sigmoid(self.box(h))
        center, size = cxcywh[:, 0:2], cxcywh[:, 2:4] * 0.5
        from pycnn.tensor import concatenate

        boxes = concatenate([center - size, center + size], axis=1)
        return presence, self.classes(h), boxes

    def backbone_parameters(self):
        return [p for _, p in self.features.named_parameters()]

    def head_parameters(self):
        backbone = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]


class Seed001Net(nn.Module):
    """The brief's binary image classifier: 224x224x3 input, conv32/64/128 3x3 each followed by
    2x2 max-pool, flatten, fc128, one output (a logit; ``predict_proba`` applies the sigmoid)."""

    def __init__(self, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size
        for _ in range(3):
            side = (side - 2) // 2
        if side < 1:
            raise ValueError(f"Seed001Net: image_size {image_size} is too small for three conv+pool stages")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, x):
        return self.classifier(self.features(x)).reshape(-1)

    def predict_proba(self, x):
        from pycnn import functional as F

        return F.sigmoid(self.forward(x))


MODELS.update({"localizationnet": LocalizationNet, "seed001net": Seed001Net})
__all__ += ["LocalizationNet", "Seed001Net"]
