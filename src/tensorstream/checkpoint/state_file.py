"""Learner state <-> one safetensors file at any fsspec URL (weights are data).

safetensors holds only named arrays plus string metadata: loading it never
executes code, unlike pickle-based formats. The file is written to a temporary
name, fsynced (local paths) and renamed, so a reader never sees half a file.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
>>> save_state(path, {"backend/w": np.ones((2, 3), np.float32)}, {"backend": "torch"})
>>> state, meta = load_state(path)
>>> state["backend/w"].shape, meta["backend"]
((2, 3), 'torch')
"""

from __future__ import annotations

import json
import os
import struct
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


class StateFileError(ValueError):
    """A state file that is missing, unreadable or not a safetensors file."""


def save_state(url: str, state: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    # np.ascontiguousarray would turn 0-d arrays into 1-d: copy only what is not C-contiguous.
    arrays = {k: np.asarray(v) for k, v in state.items()}
    data = st_save({k: a if a.flags.c_contiguous else a.copy(order="C") for k, a in arrays.items()},
                   metadata=metadata or {})
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if isinstance(fs, LocalFileSystem):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores: a single PUT is atomic already
        with fs.open(path, "wb") as f:
            f.write(data)


def load_state(url: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateFileError(f"state file not found: {url}") from None
    try:
        state = st_load(data)
        # safetensors' Python API reads metadata only from paths; the header is
        # an 8-byte length then JSON, so read it from the bytes we already have.
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
    except Exception as e:  # safetensors raises several error types for bad input
        raise StateFileError(f"{url} is not a valid safetensors state file: {e}") from None
    return state, meta
