"""Training-loop bridges: Kafka topics as a torch ``IterableDataset`` or a ``tf.data.Dataset``.

Importing this package imports neither framework; the framework halves live in
``tensorstream.torch`` (``KafkaIterableDataset``) and ``tensorstream.tensorflow``
(``kafka_dataset``, ``CommitOffsetsCallback``). See ``docs/bridges.md``.
"""

from tensorstream.bridges.common import (
    BadRecordError,
    BatchLedger,
    OffsetCommitter,
    RecordDecoder,
    StreamOptions,
    iterate_stream,
    offsets_to_commit,
    raw_messages,
    split_partitions,
)

__all__ = [
    "BadRecordError",
    "BatchLedger",
    "OffsetCommitter",
    "RecordDecoder",
    "StreamOptions",
    "iterate_stream",
    "offsets_to_commit",
    "raw_messages",
    "split_partitions",
]
