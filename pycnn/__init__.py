"""pycnn: a small, fast, readable CNN engine."""
__version__ = "0.1.0"

from pycnn.backends import get_backend_name, set_backend  # noqa: E402,F401
