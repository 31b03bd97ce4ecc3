"""TensorFlow bridge: a Kafka topic as a ``tf.data.Dataset`` for ``model.fit``.

>>> ds = kafka_dataset("phishing", config="127.0.0.1:9092", group_id="trainer",   # doctest: +SKIP
...                    features=FeatureSpec(numeric=["*"]),
...                    label=LabelSpec(field="y", classes=[False, True]), batch_size=64)
>>> model.fit(ds, callbacks=[CommitOffsetsCallback(ds)])                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from tensorstream.backends.frameworks import quiet_framework_import

with quiet_framework_import():
    import keras
    import tensorflow as tf

from tensorstream.bridges.common import (
    ArraySig,
    BatchLedger,
    Decoded,
    OffsetCommitter,
    RecordDecoder,
    StreamOptions,
    iterate_stream,
    stream_signature,
)
from tensorstream.kafka import TP, KafkaConfig, Record
from tensorstream.spec import FeatureSpec, LabelSpec

log = logging.getLogger(__name__)


class KafkaStream:
    """The Kafka side of a :func:`kafka_dataset`: options, decoder, step ledger, committer.

    Reachable as ``dataset.kafka``. Custom training loops report completed
    steps with :meth:`steps_done` and commit with :meth:`commit`; ``model.fit``
    users add :class:`CommitOffsetsCallback` instead.
    """

    def __init__(self, options: StreamOptions):
        self.options = options
        self.decoder = RecordDecoder(options)
        self.ledger = BatchLedger()
        self._committer: OffsetCommitter | None = None

    def generate(self) -> Iterator[Decoded]:
        """One pass over the stream (tf.data calls this once per iterator)."""
        run = self.ledger.start_run()
        try:
            for data, offsets in iterate_stream(self.options, self.decoder):
                self.ledger.push(run, offsets)
                yield data
        finally:
            self.ledger.finish(run)

    @property
    def committer(self) -> OffsetCommitter:
        if self._committer is None:
            o = self.options
            self._committer = OffsetCommitter(o.config, o.group_id, o.topics)
        return self._committer

    def steps_done(self, steps: int = 1) -> int:
        """``steps`` more training steps completed, each on the next batch of the current pass.

        Returns the number of batches credited (fewer than ``steps`` only at the
        end of a pass, see :meth:`BatchLedger.complete`).
        """
        if self.options.batch_size is None:
            raise ValueError("step-based commits need batches: create the dataset with batch_size=N "
                             "(a step on a dataset of single records does not say how many records it used)")
        done = self.ledger.complete(steps)
        for offsets in done:
            self.committer.mark(offsets)
        return len(done)

    def commit(self) -> dict[TP, int]:
        """Commit the offsets of every completed step (synchronously)."""
        return self.committer.commit()

    def feature_state(self) -> dict[str, np.ndarray]:
        """A snapshot of what the decoder has learned (``features/...``, ``labels/...``).

        Pass it as ``feature_state=`` to another dataset (e.g. an evaluation
        window) to encode its records exactly as the trainer does now, or save
        it with the weights (``tensorstream.checkpoint.save_state``).
        """
        d = self.decoder
        state: dict[str, np.ndarray] = {}
        if d.features is not None:
            state.update({f"features/{k}": v for k, v in d.features.state_dict().items()})
        if d.labels is not None:
            state.update({f"labels/{k}": v for k, v in d.labels.state_dict().items()})
        return state

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None


def _tensor_spec(sig: Any, batched: bool) -> Any:
    if isinstance(sig, ArraySig):
        shape = ((None,) if batched else ()) + tuple(sig.shape)
        dtype = tf.string if sig.dtype.kind in "OSU" else tf.as_dtype(sig.dtype)  # bytes -> tf.string
        return tf.TensorSpec(shape=shape, dtype=dtype)
    if isinstance(sig, dict):
        return {k: _tensor_spec(v, batched) for k, v in sig.items()}
    return tuple(_tensor_spec(v, batched) for v in sig)


def kafka_dataset(
    topics: str | Sequence[str],
    *,
    config: KafkaConfig | str,
    group_id: str,
    batch_size: int | None = 64,
    until: Literal["end"] | None | Mapping[TP, int] = "end",
    idle_timeout: float | None = None,
    max_wait: float | None = None,
    start: Literal["committed", "earliest"] | int | Mapping[TP, int] = "committed",
    codec: str = "json",
    features: FeatureSpec | None = None,
    label: LabelSpec | None = None,
    decode: Callable[[list[Record]], Decoded] | None = None,
    feature_state: str | Mapping[str, np.ndarray] | None = None,
    dead_letter_topic: str | None = None,
    on_bad: Literal["raise", "skip"] = "raise",
    consumer_settings: dict[str, Any] | None = None,
    output_signature: Any = None,
    prefetch: int | None = 4,
    probe_timeout: float = 10.0,
) -> tf.data.Dataset:
    """Records of ``topics`` as a ``tf.data.Dataset`` of ``(x, y)`` batches (or ``x``).

    The parameters are those of :class:`tensorstream.torch.KafkaIterableDataset`
    (bounded ``until="end"`` / unbounded with ``idle_timeout``, consumer group,
    codec and feature specs or ``decode=``), plus:

    output_signature
        The ``tf.TensorSpec`` structure of one element. Without it, it is known
        from ``feature_state`` or read from the first records where the stream
        will start (within ``probe_timeout`` seconds).
    prefetch
        Batches decoded ahead of the training step (None: no prefetch).

    Each iterator over the dataset is one pass: it starts at the group's
    committed offsets (``start="committed"``), so after committing, a new epoch
    continues where the last one stopped instead of repeating it. Decoding runs
    in one Python generator (``from_generator``); the partitions are read by one
    consumer that ``assign()``s them (no group join).

    The returned dataset has a ``kafka`` attribute (:class:`KafkaStream`) for
    :class:`CommitOffsetsCallback` and custom loops. Steps map 1:1 to the
    dataset's batches: ``.prefetch()``, ``.map()``, ``.take()`` on it are fine;
    do not ``.unbatch()``/``.rebatch()``/``.filter()`` when committing by steps.
    """
    options = StreamOptions(
        topics=[topics] if isinstance(topics, str) else list(topics), config=config,  # type: ignore[arg-type]
        group_id=group_id, batch_size=batch_size, until=until, idle_timeout=idle_timeout, max_wait=max_wait,
        start=start, codec=codec, features=features, label=label, decode=decode, feature_state=feature_state,
        dead_letter_topic=dead_letter_topic, on_bad=on_bad, consumer_settings=dict(consumer_settings or {}),
    )
    stream = KafkaStream(options)
    if output_signature is None:
        output_signature = _tensor_spec(stream_signature(options, stream.decoder, probe_timeout),
                                        batched=batch_size is not None)
    ds = tf.data.Dataset.from_generator(stream.generate, output_signature=output_signature)
    if prefetch:
        ds = ds.prefetch(prefetch)
    ds.kafka = stream
    return ds


def _stream_of(dataset: Any) -> KafkaStream:
    if isinstance(dataset, KafkaStream):
        return dataset
    stream = getattr(dataset, "kafka", None)
    if not isinstance(stream, KafkaStream):
        raise TypeError("pass the dataset returned by kafka_dataset() (or its .kafka); a dataset derived from "
                        "it by .map()/.take() has lost the attribute")
    return stream


class CommitOffsetsCallback(keras.callbacks.Callback):
    """Commits the offsets of the batches whose optimizer steps completed.

    The dataset prefetches ahead of training; this callback commits only the
    batches that training steps have used, never what was merely read.

    ``commit_freq``: an int N commits every N steps (and at each epoch end and
    at the end of training); steps are counted from Keras' batch index, and
    the callback is safe for Keras' asynchronous callback dispatch, so
    committing overlaps the next step. ``"epoch"`` commits at epoch ends only
    (steps counted with ``optimizer.iterations``); put it *after* a
    ``ModelCheckpoint`` in the callbacks list, so offsets are committed only
    once the weights that learned those records are saved.

    ``stop_on_empty_epoch`` (default True): stop training after an epoch in
    which the stream handed out no batch (a bounded stream already read to its
    end, or an unbounded one that stayed idle for ``idle_timeout``). Keras
    itself only warns and starts the next epoch, i.e. another pass that waits
    again.
    """

    #: on_train_batch_end only reads its ``batch`` argument and takes a lock,
    #: so Keras may run it in its callback thread while the next step runs.
    async_safe = True

    def __init__(self, dataset: Any, commit_freq: int | Literal["epoch"] = 1, stop_on_empty_epoch: bool = True):
        super().__init__()
        if commit_freq != "epoch" and (not isinstance(commit_freq, int) or commit_freq < 1):
            raise ValueError("commit_freq must be a positive int or 'epoch'")
        self.stream = _stream_of(dataset)
        self.commit_freq = commit_freq
        self.stop_on_empty_epoch = stop_on_empty_epoch
        self._lock = threading.Lock()
        self._epoch_steps = 0  # steps of this epoch credited so far
        self._epoch_batches = 0  # batches credited this epoch (fewer than steps at the end of a pass)
        self._since_commit = 0
        self._iterations_at_epoch = 0
        self.commits = 0
        if commit_freq == "epoch":
            # No per-batch hook at all: Keras keeps its fastest dispatch.
            self.on_train_batch_end = super().on_train_batch_end  # type: ignore[method-assign]

    def _iterations(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _credit_to(self, epoch_steps: int) -> None:
        """Credit the current epoch up to ``epoch_steps`` completed steps (idempotent, monotonic)."""
        with self._lock:
            new = epoch_steps - self._epoch_steps
            if new <= 0:
                return
            self._epoch_steps = epoch_steps
            done = self.stream.steps_done(new)
            self._epoch_batches += done
            self._since_commit += done

    def _commit(self) -> None:
        with self._lock:
            self._since_commit = 0
        if self.stream.commit():
            self.commits += 1

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_steps = self._epoch_batches = 0
        if self.commit_freq == "epoch":
            self._iterations_at_epoch = self._iterations()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # ``batch`` is the index, in this epoch, of the last step this call covers.
        self._credit_to(batch + 1)
        if self._since_commit >= self.commit_freq:  # type: ignore[operator]
            self._commit()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.commit_freq == "epoch":
            # The last fetch of an exhausted pass bumps optimizer.iterations without a step:
            # the ledger clamps that (the pass is finished), see BatchLedger.complete.
            self._credit_to(self._iterations() - self._iterations_at_epoch)
        self._commit()
        if self.stop_on_empty_epoch and self._epoch_batches == 0:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.commit_freq != "epoch":
            self._commit()
