"""pycnn: a small, fast, readable CNN engine.

Hand-written CUDA kernels (through CuPy), a Numba and a native C++ CPU backend, and a NumPy
reference backend, under a small autograd + layer API that follows PyTorch's names.
"""
__version__ = "0.1.0"

from pycnn.backends import get_backend_name, set_backend  # noqa: E402
from pycnn.tensor import (Tensor, concatenate, from_dlpack, is_grad_enabled, manual_seed, no_grad,  # noqa: E402
                          ones, tensor, zeros)
from pycnn import functional, nn, optim  # noqa: E402
from pycnn import models  # noqa: E402

__all__ = ["Tensor", "tensor", "concatenate", "zeros", "ones", "no_grad", "is_grad_enabled", "from_dlpack",
           "manual_seed", "set_backend", "get_backend_name", "functional", "nn", "optim", "models", "__version__"]
