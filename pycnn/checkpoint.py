"""Checkpoints in safetensors format (no pickle), written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pycnn.fileio import atomic_write_bytes


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model."""


def save_checkpoint(model, path, metadata: dict | None = None) -> Path:
    """Save the model's parameters (and string metadata, e.g. the model name) to ``path``."""
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(array) for name, array in model.state_dict().items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read ``(state_dict, metadata)`` from a safetensors checkpoint.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file "
                              f"({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
    return dict(state), dict(header.get("__metadata__", {}))


def load_model(path, device: str = "cpu"):
    """Rebuild the model recorded in a checkpoint's metadata and load its weights."""
    from pycnn import models

    state, meta = load_checkpoint(path)
    name = meta.get("model")
    if name is None:
        raise CheckpointError(f"checkpoint {path} does not record which model it holds (no 'model' metadata)")
    kwargs = json.loads(meta.get("model_kwargs", "{}"))
    model = models.get_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit model {name!r}: {exc.args[0]}") from exc
    return model.to(device), meta
