"""PyTorch training-loop bridge: ``from tensorstream.torch import KafkaIterableDataset``.

See ``docs/bridges.md``; the implementation is in ``tensorstream.bridges.torch``.
"""

from tensorstream.bridges.common import BadRecordError, OffsetCommitter, raw_messages
from tensorstream.bridges.torch import KafkaBatch, KafkaIterableDataset, KafkaRecord

__all__ = ["BadRecordError", "KafkaBatch", "KafkaIterableDataset", "KafkaRecord", "OffsetCommitter", "raw_messages"]
