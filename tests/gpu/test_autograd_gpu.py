"""The autograd engine, layers, losses and optimizers on GPU tensors agree with the CPU."""
import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import Tensor
from pycnn.tensor import concatenate, move_array

pytestmark = pytest.mark.gpu


def both(array, grad=True):
    return Tensor(array, requires_grad=grad), Tensor(array, requires_grad=grad, device="cuda")


def test_scalar_arithmetic_indexing_concatenate_on_gpu():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 4)).astype(np.float32)
    outs = []
    for x in both(a):
        y = (2.0 - x * 0.5 + 1.0) / 3.0 - 1.0 / (x.abs() + 1.0)
        idx = move_array(np.array([1, 1, 3]), x.device)
        z = concatenate([y[:, 0:2], y[idx][:, 2:4]], axis=0)
        (z * z).sum().backward()
        outs.append((z.numpy(), x.grad.numpy()))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)


def test_localization_step_matches_cpu():
    from pycnn.models import LocalizationNet
    from pycnn.localize import LocalizeConfig, localization_loss

    rng = np.random.default_rng(1)
    images = rng.random((6, 1, 32, 32)).astype(np.float32)
    present = np.array([1, 0, 1, 1, 0, 1], np.float32)
    labels = np.array([3, 0, 7, 1, 0, 9])
    corner = rng.random((6, 2)).astype(np.float32) * 0.5
    boxes = np.concatenate([corner, corner + 0.3], axis=1).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        pycnn.manual_seed(0)
        model = LocalizationNet(canvas_size=32, width=8).to(device)
        batch = {"present_host": present, "present": move_array(present, device),
                 "labels": move_array(labels, device), "boxes": move_array(boxes, device)}
        total, _ = localization_loss(model(Tensor(move_array(images, device))), batch, LocalizeConfig())
        total.backward()
        opt = pycnn.optim.Adam(model.parameters(), lr=1e-2)
        opt.step()
        results.append((total.item(), [p.numpy().copy() for p in model.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4)
    for cpu_p, gpu_p in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(gpu_p, cpu_p, rtol=1e-3, atol=1e-5)


def test_dlpack_and_devices():
    import cupy

    c = cupy.arange(6, dtype=cupy.float32)
    t = pycnn.from_dlpack(c)
    assert t.device == "cuda" and t.data.data.ptr == c.data.ptr  # no copy
    back = cupy.from_dlpack(t)
    assert back.data.ptr == c.data.ptr
    cpu = Tensor(np.ones(6, np.float32))
    with pytest.raises(ValueError, match="different devices: cpu and cuda"):
        cpu + t
    with pytest.raises(ValueError, match="input is on cuda but weight is on cpu"):
        F.conv2d(Tensor(np.ones((1, 1, 4, 4), np.float32), device="cuda"), Tensor(np.ones((1, 1, 3, 3), np.float32)))
    model = pycnn.models.FastMNIST().to("cuda")
    assert model.device == "cuda" and model.cpu().device == "cpu"


@pytest.mark.parametrize("model_name", ["mnistcnn", "fastmnist", "lenet5"])
def test_gpu_parameter_gradients_become_grad_without_a_copy(leaf_grad_copies, model_name):
    """The CUDA backend's conv / linear / fused gradients are new contiguous arrays of the
    parameter's dtype, so Tensor.backward hands them to .grad as they are (a view of a larger
    workspace would be copied once per parameter per step: an extra kernel in every step)."""
    from pycnn import models

    copies = leaf_grad_copies
    pycnn.manual_seed(0)
    model = models.get_model(model_name).to("cuda")
    x = Tensor(np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32), device="cuda")
    y = move_array(np.random.default_rng(1).integers(0, 10, 64).astype(np.int32), "cuda")
    F.cross_entropy(model(x), y).backward()
    assert copies == [], f"{model_name}: gradients copied on their way to .grad: {copies}"
    for p in model.parameters():
        assert p.grad.data.flags.c_contiguous and p.grad.data.dtype == p.data.dtype
