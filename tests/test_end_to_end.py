"""The foundation's promise: FastMNIST, one epoch on full MNIST, NumPy backend, >= 98.5% test accuracy."""
import pytest

from pycnn.train import run_mnist


@pytest.mark.slow
def test_fastmnist_one_epoch_numpy_reaches_98_5(mnist_path, tmp_path):
    result = run_mnist("fastmnist", backend="numpy", data_dir=str(mnist_path), out_dir=str(tmp_path), progress=False)
    print(f"FastMNIST numpy: test acc {result['test_acc']:.4f}, training {result['train_s_total']:.1f} s")
    assert result["test_acc"] >= 0.985
