"""The framework-free half of the training-loop bridges.

Both bridges (``tensorstream.torch.KafkaIterableDataset`` and
``tensorstream.tensorflow.kafka_dataset``) are thin shells over this module:

- **partition planning**: the partitions of the topics, split round-robin
  between readers (DataLoader workers); each reader ``assign()``s its share, so
  there is no consumer-group join and no rebalancing between readers;
- **reading**, bounded (``until="end"``: stop at the end offsets captured when
  the reader starts) or unbounded (block for new records; ``idle_timeout`` ends
  the stream cleanly when nothing arrives for that long);
- **decoding**, records -> numpy arrays, through the same codecs and feature
  specs as the pipeline, or a user ``decode`` callable;
- **offset tracking**: every batch carries the offset ranges it covers, and
  :class:`OffsetCommitter` commits exactly the ranges of completed training
  steps (never what was merely read ahead by a prefetching loader).

The offsets of a batch are an ``int64`` array with one row per partition it
covers: ``(topic index, partition, first offset, next offset)``. Ranges of one
partition are contiguous from reader start to reader end (a batch's range
starts where the previous batch's ended, bad records included), so committing
the ``next offset`` of completed batches, in step order, leaves no gap and no
overlap. As an array it survives ``torch``'s collate and pin-memory machinery.

>>> ranges = np.array([[0, 1, 40, 72], [0, 3, 10, 12]])
>>> offsets_to_commit(ranges, ["events"])
{('events', 1): 72, ('events', 3): 12}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from confluent_kafka import Message

from tensorstream.bridges.decoding import (
    DecodedBatch,
    RecordDecoder,
    load_feature_state,
    map_structure,
    raw_messages,
    signature_of,
    stream_signature,
    structure_len,
)
from tensorstream.bridges.offsets import BatchLedger, OffsetCommitter, _Coverage, offsets_to_commit
from tensorstream.bridges.options import (
    OFFSET_COLUMNS,
    ArraySig,
    BadRecordError,
    Decoded,
    StreamOptions,
    end_offsets,
    list_partitions,
    split_partitions,
    start_offsets,
)
from tensorstream.bridges.reading import PartitionReader, probe
from tensorstream.delivery import DeadLetters, DeliveryEngine
from tensorstream.kafka import TP, KafkaSink, Record

__all__ = [  # the bridges' framework-free API, from one place
    "OFFSET_COLUMNS", "ArraySig", "BadRecordError", "BatchLedger", "Decoded", "DecodedBatch", "OffsetCommitter",
    "PartitionReader", "RecordDecoder", "StreamOptions", "end_offsets", "iterate_stream", "list_partitions",
    "load_feature_state", "map_structure", "offsets_to_commit", "probe", "raw_messages", "signature_of",
    "split_partitions", "start_offsets", "stream_signature", "structure_len",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the stream


def iterate_stream(opts: StreamOptions, decoder: RecordDecoder, reader_index: int = 0, reader_count: int = 1,
                   assignment: Sequence[TP] | None = None) -> Iterator[tuple[Decoded, np.ndarray]]:
    """``(decoded arrays, offsets)`` for reader ``reader_index`` of ``reader_count``.

    Batches (``opts.batch_size``) or single records (``batch_size=None``; arrays
    without the batch axis and a one-row offsets array). Bad records are
    dead-lettered (flushed before the batch covering them is handed out),
    skipped, or raise :class:`BadRecordError`, per ``opts``.
    """
    if reader_count > 1 and opts.stateful_encoding:
        raise ValueError(
            "with several readers (DataLoader workers), a growing class set or one-hot vocabulary would be "
            "numbered differently in each worker; fix label.classes, use categorical_encoding='hash', "
            "or pass feature_state= (frozen) from a fitted pipeline")
    if assignment is None:
        assignment = split_partitions(opts.partitions(), reader_index, reader_count)
    if not assignment:
        log.warning("reader %d of %d has no partition to read (more readers than partitions)",
                    reader_index, reader_count)
        return
    sink = KafkaSink(opts.config) if opts.dead_letter_topic else None
    dlq = DeadLetters(sink, opts.dead_letter_topic) if sink is not None and opts.dead_letter_topic else None
    # This reader's side of the delivery contract: its dead letters are delivered before the batch
    # covering them is handed out (the training loop commits that batch's offsets once it has learned it).
    engine = DeliveryEngine(sink=sink)
    reader = PartitionReader(opts, assignment).open()
    try:
        cover = _Coverage(opts.topics, reader.starts)
        for chunk in reader.chunks(opts.batch_size):
            out = decoder(chunk)
            if out.bad:
                _handle_bad(opts, dlq, chunk, out.bad)
                engine.flush()  # raises DeliveryFailed (sticky) if a dead letter was not delivered
            if opts.batch_size is not None:
                cover.add(chunk)
                if len(out.good):
                    yield out.data, cover.take()
                continue
            # single records: each good record covers the bad ones before it on its partition
            gi = 0
            good = out.good
            for i, m in enumerate(chunk):
                cover.add_one(m)
                if gi < len(good) and good[gi] == i:
                    yield map_structure(lambda a, gi=gi: a[gi], out.data), cover.take()
                    gi += 1
    finally:
        reader.close()
        if sink is not None:
            sink.close(purge=engine.failure is not None)


def _handle_bad(opts: StreamOptions, dlq: DeadLetters | None, chunk: Sequence[Message],
                bad: Sequence[tuple[int, str, str]]) -> None:
    if dlq is not None:
        for i, error_type, message in bad:
            dlq.send(Record.from_message(chunk[i]), error_type, message)
        return
    i, error_type, message = bad[0]
    m = chunk[i]
    where = f"{m.topic()}[{m.partition()}]@{m.offset()}"
    if opts.on_bad == "raise":
        raise BadRecordError(f"{len(bad)} bad record(s) in a batch; first: {where}: {error_type}: {message} "
                             "(pass on_bad='skip' or dead_letter_topic= to go on)")
    log.warning("skipped %d bad record(s); first: %s: %s: %s", len(bad), where, error_type, message)
