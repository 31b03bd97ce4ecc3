"""Records -> arrays: streaming feature transforms and label encoding.

Everything here is plain numpy (no framework import) and every piece of state
is checkpointable as named numeric arrays (``state_dict``/``load_state_dict``).
"""

from tensorstream.features.labels import LabelEncoder
from tensorstream.features.records import ERROR_TYPES, BadRecord
from tensorstream.features.scaler import RunningStandardizer
from tensorstream.features.state import from_json_array, json_array
from tensorstream.features.transform import FeaturePipeline, ParsedBatch, stable_bucket

__all__ = [
    "ERROR_TYPES",
    "BadRecord",
    "FeaturePipeline",
    "LabelEncoder",
    "ParsedBatch",
    "RunningStandardizer",
    "from_json_array",
    "json_array",
    "stable_bucket",
]
