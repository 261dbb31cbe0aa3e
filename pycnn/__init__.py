"""pycnn: a small, fast, readable CNN engine.

Hand-written CUDA kernels (through CuPy), a Numba and a native C++ CPU backend, and a NumPy
reference backend, under a small autograd + layer API that follows PyTorch's names.
"""
__version__ = "0.1.0"

from pycnn.backends import get_backend_name, set_backend  # noqa: E402
from pycnn.tensor import (Tensor, from_dlpack, manual_seed, no_grad, ones, tensor,  # noqa: E402
                          zeros)
from pycnn import functional, nn, optim  # noqa: E402
from pycnn import models  # noqa: E402

__all__ = ["Tensor", "tensor", "zeros", "ones", "no_grad", "from_dlpack", "manual_seed", "set_backend",
           "get_backend_name", "functional", "nn", "optim", "models", "__version__"]
