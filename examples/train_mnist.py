"""A first pycnn program: build a small CNN, train it for one epoch on MNIST, evaluate it.

Run from the repository root:  python examples/train_mnist.py
(MNIST is read from $PYCNN_DATA or ~/.cache/pycnn/mnist, or downloaded and verified.)
"""
import argparse
import time

import numpy as np

import pycnn
from pycnn import nn, optim
import pycnn.functional as F
from pycnn.data import iterate_batches, load_mnist, normalize

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch-size", type=int, default=128, help="images per training step (default 128)")
parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (default 0.002)")
args = parser.parse_args()

pycnn.manual_seed(0)
print("CPU backend:", pycnn.get_backend_name())

# 1. Data: uint8 images -> normalized float32 (N, 1, 28, 28)
train_x, train_y = load_mnist("train")
test_x, test_y = load_mnist("test")
train_x, test_x = normalize(train_x), normalize(test_x)

# 2. A model: the same layers you would write in PyTorch
model = nn.Sequential(
    nn.Conv2d(1, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
    nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
    nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
)
opt = optim.Adam(model.parameters(), lr=args.lr)

# 3. One epoch of training
start = time.perf_counter()
for step, (xb, yb) in enumerate(iterate_batches(train_x, train_y, batch_size=args.batch_size, shuffle=True, seed=0)):
    loss = F.cross_entropy(model(pycnn.tensor(xb)), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step:4d}  loss {loss.item():.4f}")
print(f"trained one epoch in {time.perf_counter() - start:.1f} s")

# 4. Evaluation without building a graph
model.eval()
with pycnn.no_grad():
    logits = np.concatenate([model(pycnn.tensor(test_x[i:i + 1000])).numpy() for i in range(0, len(test_x), 1000)])
print(f"test accuracy: {(logits.argmax(1) == test_y).mean():.4f}")
