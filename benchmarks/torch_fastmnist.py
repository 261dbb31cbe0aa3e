"""PyTorch CPU reference for the FastMNIST recipe (ANCHORS.md), timed like `pycnn train mnist`.

Same model, recipe and data pipeline (normalized arrays in memory, batches of 256 gathered in the
seed's random order, pycnn.train.epoch_order, inside the timed loop as pycnn's training loop does,
Adam lr 1e-2 betas (0.7, 0.9), one-cycle without momentum cycling); prints the training time of
one epoch, the test accuracy and the whole-process time, so the figures can sit next to pycnn's.
Run: python benchmarks/torch_fastmnist.py [--threads N]
"""
import argparse
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402

from pycnn import data  # noqa: E402
from pycnn.train import epoch_order  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = data.load_mnist("train", progress=False)
    xte, yte = data.load_mnist("test", progress=False)
    xtr, xte = torch.from_numpy(data.normalize(xtr)), torch.from_numpy(data.normalize(xte))
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    model = tnn.Sequential(tnn.Conv2d(1, 24, 5), tnn.MaxPool2d(2), tnn.ReLU(), tnn.Conv2d(24, 32, 3), tnn.MaxPool2d(2),
                           tnn.ReLU(), tnn.Flatten(), tnn.Linear(800, 256), tnn.ReLU(), tnn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.7, 0.9))
    steps = -(-len(xtr) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, cycle_momentum=False)
    order = torch.from_numpy(epoch_order(args.seed, 1, len(xtr)))
    start = time.perf_counter()
    for i in range(steps):
        idx = order[i * 256:(i + 1) * 256]
        xb, yb = xtr[idx], ytr[idx]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = sum((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, 10000, 1000)) / 1e4
    print(f"pytorch {torch.__version__} CPU threads={torch.get_num_threads()}: FastMNIST 1 epoch training {train_s:.2f} s, "
          f"test acc {acc:.4f}, whole process {time.perf_counter() - T0:.2f} s")


if __name__ == "__main__":
    main()
