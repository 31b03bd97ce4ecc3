"""TensorFlow/Keras training-loop bridge: ``from tensorstream.tensorflow import kafka_dataset``.

See ``docs/bridges.md``; the implementation is in ``tensorstream.bridges.tensorflow``.
"""

from tensorstream.bridges.common import BadRecordError, OffsetCommitter, raw_messages
from tensorstream.bridges.tensorflow import CommitOffsetsCallback, KafkaStream, kafka_dataset

__all__ = [
    "BadRecordError", "CommitOffsetsCallback", "KafkaStream", "OffsetCommitter", "kafka_dataset", "raw_messages",
]
