"""Plots: training curves (and, for the localization model, prediction grids and feature maps)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The figure encoded as ``fmt`` (png, pdf, svg...), in memory."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(fig, path) -> None:
    """Save through a temp file so a failed write never destroys an existing picture."""
    from pycnn.fileio import atomic_write_bytes

    atomic_write_bytes(path, figure_bytes(fig, Path(path).suffix.lstrip(".") or "png"))


def _save_and_close(plt, fig, path) -> None:
    """:func:`save_figure`, then close the figure even when the write failed (pyplot kept every
    figure of a failed write open, and warns beyond 20 open figures)."""
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _epoch_axis(ax, epochs: list) -> None:
    """Ticks at whole epochs (one epoch alone was labelled 0.96 ... 1.04)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_png(history: list, title: str = "training") -> bytes:
    """Loss and accuracy per epoch (train and test) from ``run_mnist``'s history, as PNG bytes."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
        ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
        _epoch_axis(ax_loss, epochs)
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend()
        ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
        ax_acc.plot(epochs, [h["test_acc"] for h in history], "s-", label="test")
        _epoch_axis(ax_acc, epochs)
        ax_acc.set_ylabel("accuracy")
        ax_acc.legend()
        fig.suptitle(title)
        return figure_bytes(fig)
    finally:
        plt.close(fig)


def plot_curves(history: list, path, title: str = "training") -> None:
    """:func:`curves_png` written to ``path``."""
    from pycnn.fileio import atomic_write_bytes

    atomic_write_bytes(path, curves_png(history, title))


def localization_curves_png(history: list) -> bytes:
    """The localization model's training loss per epoch, as PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    try:
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], "o-")
        _epoch_axis(ax, epochs)
        ax.set_ylabel("training loss (presence + class + box)")
        ax.set_title("LocalizationNet training")
        return figure_bytes(fig)
    finally:
        plt.close(fig)


def plot_localization_curves(history: list, path) -> None:
    """:func:`localization_curves_png` written to ``path``."""
    from pycnn.fileio import atomic_write_bytes

    atomic_write_bytes(path, localization_curves_png(history))


def plot_localization_grid(data: dict, pred: dict, path, columns: int = 4) -> None:
    """Canvases with the true box (green) and the predicted box (red), with labels and presence."""
    import numpy as np

    plt = _pyplot()
    n = len(pred["labels"])
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    size = data["images"].shape[-1], data["images"].shape[-2]
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(data["images"][i, 0], cmap="gray", vmin=0, vmax=1)
        present, prob = data["present"][i] > 0.5, float(pred["presence_prob"][i])

        def draw(box, color):
            x0, y0, x1, y1 = np.asarray(box) * np.array([size[0], size[1], size[0], size[1]])
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=1.5))

        if present:
            draw(data["boxes"][i], "lime")
        if prob > 0.5:
            draw(pred["boxes"][i], "red")
        truth = str(int(data["labels"][i])) if present else "none"
        guess = str(int(pred["labels"][i])) if prob > 0.5 else "none"
        ok = truth == guess
        ax.set_title(f"true {truth} / pred {guess} ({prob:.2f})", fontsize=8, color="black" if ok else "red")
    fig.suptitle("green: true box, red: predicted box", fontsize=10)
    _save_and_close(plt, fig, path)


def plot_feature_maps(model, image, path, title: str = "feature maps", max_maps: int = 16) -> None:
    """The outputs of every Conv2d layer (after its activation where one follows) for one input."""
    import numpy as np

    from pycnn import nn
    from pycnn.tensor import Tensor, no_grad

    plt = _pyplot()
    maps = []
    layers = list(model.features) if hasattr(model, "features") else []
    if not layers:
        raise ValueError(f"{type(model).__name__} has no 'features' Sequential to visualize")
    x = Tensor(np.ascontiguousarray(image, dtype=np.float32))
    with no_grad():
        for i, layer in enumerate(layers):
            x = layer(x)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and not isinstance(nxt, nn.ReLU):
                maps.append((f"conv {len(maps) + 1} ({layer.out_channels} maps)", x.numpy()[0]))
            elif isinstance(layer, nn.ReLU) and isinstance(layers[i - 1], nn.Conv2d):
                maps.append((f"conv {len(maps) + 1} + relu ({x.shape[1]} maps)", x.numpy()[0]))
    rows = len(maps) + 1
    fig, axes = plt.subplots(rows, max_maps, figsize=(max_maps * 0.9, rows * 1.05), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(image)[0, 0], cmap="gray")
    axes[0, 0].set_title("input", fontsize=7)
    for r, (name, fmap) in enumerate(maps, start=1):
        for c in range(min(max_maps, fmap.shape[0])):
            axes[r, c].imshow(fmap[c], cmap="viridis")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=10)
    _save_and_close(plt, fig, path)
