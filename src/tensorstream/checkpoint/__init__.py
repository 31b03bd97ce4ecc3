"""Model state as data: safetensors files at fsspec URLs (never pickle).

``save_state``/``load_state``: one state file. ``CheckpointStore``: durable,
versioned checkpoints (state + manifest of source offsets and hashes).
"""

from tensorstream.checkpoint.manifest import CheckpointError
from tensorstream.checkpoint.state_file import StateFileError, load_state, save_state
from tensorstream.checkpoint.store import CheckpointInfo, CheckpointStore

__all__ = ["CheckpointError", "CheckpointInfo", "CheckpointStore", "StateFileError", "load_state", "save_state"]
