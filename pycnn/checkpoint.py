"""Checkpoints in safetensors format (no pickle), written atomically."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pycnn.fileio import atomic_write_bytes


CHECKSUM_KEY = "pycnn_sha256"  # metadata: SHA-256 of the tensor bytes (hex)
# metadata: SHA-256 (hex) of the JSON header as written, without this entry (tensor names, dtypes,
# shapes, offsets and the other metadata, which the tensor checksum does not cover)
HEADER_CHECKSUM_KEY = "pycnn_header_sha256"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model."""


# numpy dtype -> safetensors dtype name (the ones a model's state can hold)
_SAFETENSORS_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                       np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` (name -> array) and string ``metadata``, with the
    header's keys and the tensors in sorted order, so that equal weights give equal bytes.

    (safetensors' own writer keeps the metadata in a hash map: two runs that trained the same
    weights wrote the file's header in different orders, and the checkpoints' checksums differed.)
    The format: an 8-byte little-endian header length, the JSON header padded with spaces to a
    multiple of 8 bytes, then each tensor's little-endian bytes, back to back. The metadata also
    holds ``pycnn_sha256``, the SHA-256 of those bytes, and ``pycnn_header_sha256``, the SHA-256
    of the JSON header written without that entry (names, dtypes, shapes, offsets, metadata);
    :func:`load_checkpoint` checks both.

    Raises:
        TypeError: a dtype safetensors cannot hold here; metadata that is not strings to strings.
        ValueError: a tensor named ``__metadata__``.
    """
    metadata = dict(metadata or {})
    for key, value in metadata.items():  # (else written, and refused by every reader of the file)
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_checkpoint: safetensors metadata must map strings to strings, got "
                            f"{key!r}: {value!r} ({type(value).__name__})")
    if "__metadata__" in tensors:
        raise ValueError("save_checkpoint: a tensor may not be named '__metadata__' (the safetensors header "
                         "keeps the metadata under that name)")
    header: dict = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        kind = _SAFETENSORS_DTYPES.get(array.dtype.newbyteorder("="))
        if kind is None:
            raise TypeError(f"save_checkpoint: tensor {name!r} has dtype {array.dtype}, which safetensors "
                            f"cannot hold here (expected one of {sorted(str(d) for d in _SAFETENSORS_DTYPES)})")
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    # A checksum of the tensor bytes, so that damage there is found on loading (the format checks
    # only the header: a run resumed from a state with scrambled moments trained on and ended at
    # chance accuracy without a word).
    body = b"".join(blobs)
    metadata[CHECKSUM_KEY] = hashlib.sha256(body).hexdigest()
    metadata.pop(HEADER_CHECKSUM_KEY, None)
    header = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}, **header}
    # ... and one of the header, so that damage to a shape, a dtype or the metadata (a training
    # state's epoch, history or configuration) is found too: the tensor checksum passed them.
    metadata[HEADER_CHECKSUM_KEY] = _header_digest(header)
    header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _header_digest(header: dict) -> str:
    """SHA-256 of the header's JSON as :func:`safetensors_bytes` writes it (keys in their order)."""
    return hashlib.sha256(json.dumps(header, separators=(",", ":")).encode()).hexdigest()


def checkpoint_bytes(model, metadata: dict | None = None) -> bytes:
    """What :func:`save_checkpoint` writes: the model's parameters and ``metadata`` (strings as
    they are, other values as JSON) in safetensors format."""
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    return safetensors_bytes(model.state_dict(), meta)


def save_checkpoint(model, path, metadata: dict | None = None) -> Path:
    """Save the model's parameters (and string metadata, e.g. the model name) to ``path``; the
    same weights and metadata always give the same bytes."""
    atomic_write_bytes(path, checkpoint_bytes(model, metadata))
    return Path(path)


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read ``(state_dict, metadata)`` from a safetensors checkpoint.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file, or its tensor
            bytes or its header do not match the checksums written with it.
    """
    from safetensors.numpy import load

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file"
                              + (f" (it holds {', '.join(found)})" if found else ""))
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
    meta = dict(header.get("__metadata__", {}))
    expected_header = meta.pop(HEADER_CHECKSUM_KEY, None)  # (files written before it was added have none)
    if expected_header is not None:
        header["__metadata__"].pop(HEADER_CHECKSUM_KEY)
        if _header_digest(header) != expected_header:
            raise CheckpointError(f"checkpoint {path} is corrupt: its header (tensor names, dtypes, shapes or "
                                  "metadata) does not match the checksum written with it (the file was damaged "
                                  "or changed after it was saved)")
    expected = meta.pop(CHECKSUM_KEY, None)  # (files written before it was added have none)
    if expected is not None and hashlib.sha256(data[8 + header_len:]).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensor data does not match the checksum "
                              "written with it (the file was damaged or changed after it was saved)")
    return dict(state), meta


def _check_floating(path, state: dict) -> None:
    """A model's parameters are floating point: an integer or boolean tensor for one was cast to
    float32 and loaded without a word."""
    for key, array in state.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} has dtype {array.dtype}, but a model's "
                                  "parameters are floating point (float16, float32 or float64)")


def load_model(path, device: str = "cpu"):
    """Rebuild the model recorded in a checkpoint's metadata and load its weights.

    Raises:
        CheckpointError: as :func:`load_checkpoint`; a training state given for a model; no, an
            unknown or an unusable model record (naming the file, what it records and which pycnn
            version wrote it); weights that do not fit the model.
    """
    from pycnn import models

    state, meta = load_checkpoint(path)
    written = f"written by pycnn {meta['pycnn_version']}" if "pycnn_version" in meta else \
        "written without a pycnn_version (by another pycnn version, or not by pycnn train)"
    name = meta.get("model")
    if name is None:
        if "optimizer" in meta:  # (the other file a run writes: "no 'model' metadata" did not say so)
            raise CheckpointError(f"checkpoint {path} is a training state (what --resume reads: weights and "
                                  f"optimizer moments), not a model checkpoint; give the model.safetensors that "
                                  f"the same run wrote beside it")
        raise CheckpointError(f"checkpoint {path} does not record which model it holds (no 'model' metadata; "
                              f"expected one of {', '.join(sorted(models.MODELS))}, as "
                              "save_checkpoint(model, path, {'model': name}) writes it)")
    if name.lower() not in models.MODELS:
        raise CheckpointError(f"checkpoint {path} holds a {name!r} model, which this pycnn does not know "
                              f"(expected one of {', '.join(sorted(models.MODELS))}; {written})")
    try:
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: its model_kwargs metadata is not JSON ({exc}): "
                              f"{meta['model_kwargs']!r}") from exc
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"checkpoint {path}: its model_kwargs metadata must be a JSON object of "
                              f"{name}'s arguments, got {meta['model_kwargs']!r}")
    try:
        model = models.get_model(name, **kwargs)
    except (TypeError, ValueError) as exc:  # (an argument this version's model does not take, or refuses)
        raise CheckpointError(f"checkpoint {path}: cannot build model {name!r} with its recorded arguments "
                              f"{kwargs} ({written}): {exc}") from exc
    _check_floating(path, state)
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as exc:
        note = "" if "model_kwargs" in meta else \
            f"; it records no model_kwargs, so {name!r} was built with its default arguments"
        raise CheckpointError(f"checkpoint {path} does not fit model {name!r} ({written}{note}): "
                              f"{exc.args[0]}") from exc
    return model.to(device), meta


# ----------------------------------------------------------------------------- resuming a run

TRAINING_STATE_FILE = "training_state.safetensors"


def save_training_state(path, model, optimizer, metadata: dict) -> Path:
    """Save what a training run needs to continue where it stopped: the model's parameters
    (``model/<name>``), the optimizer's buffers (``optimizer/<parameter index>/<name>``), and as
    JSON metadata the optimizer's step counts and hyper-parameters plus ``metadata`` (the run's
    configuration, the epoch finished, the history, the scheduler's state...). Written atomically:
    an interrupted write leaves the previous state intact."""
    tensors = {f"model/{name}": array for name, array in model.state_dict().items()}
    saved = optimizer.state_dict()
    numbers: dict = {}
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                numbers.setdefault(str(index), {})[name] = value
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    meta["optimizer"] = json.dumps({"type": type(optimizer).__name__, "param_groups": saved["param_groups"],
                                    "numbers": numbers})
    atomic_write_bytes(path, safetensors_bytes(tensors, meta))
    return Path(path)


def read_training_state(path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a :func:`save_training_state` file, the metadata decoded.

    Raises:
        CheckpointError: missing, corrupt, or not a training state.
    """
    tensors, meta = load_checkpoint(path)
    if "optimizer" not in meta:
        raise CheckpointError(f"{path} is not a training state (no optimizer state in it; "
                              f"a model checkpoint such as model.safetensors cannot resume a run)")
    try:
        decoded = {key: json.loads(value) for key, value in meta.items()}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not a training state (its metadata is not JSON: {exc})") from exc
    return tensors, decoded


def load_training_state(path, model, optimizer, tensors_and_meta=None) -> dict:
    """Restore :func:`save_training_state`'s file into ``model`` and ``optimizer`` (built as in the
    saved run and already on their device) and return the rest of its metadata.

    Raises:
        CheckpointError: the file is missing or corrupt, or does not fit the model or optimizer.
    """
    tensors, meta = tensors_and_meta or read_training_state(path)
    saved = meta.pop("optimizer")
    if saved.get("type") != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds the state of a {saved.get('type')} optimizer, this run uses "
                              f"{type(optimizer).__name__}")
    state: dict = {}
    for key, array in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = array
    for index, values in saved["numbers"].items():
        state.setdefault(int(index), {}).update(values)
    model_state = {key[len("model/"):]: array for key, array in tensors.items() if key.startswith("model/")}
    _check_floating(path, {f"model/{key}": array for key, array in model_state.items()})
    try:
        model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit this run's model or optimizer: {exc.args[0]}") from exc
    return meta
