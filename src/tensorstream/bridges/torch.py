"""PyTorch bridge: a Kafka topic as an ``IterableDataset`` for ``DataLoader``.

>>> ds = KafkaIterableDataset("phishing", config="127.0.0.1:9092", group_id="trainer",   # doctest: +SKIP
...                           features=FeatureSpec(numeric=["*"]),
...                           label=LabelSpec(field="y", classes=[False, True]), batch_size=64)
>>> loader = DataLoader(ds, batch_size=None, num_workers=2)                               # doctest: +SKIP
>>> for x, y, offsets in loader:                                                          # doctest: +SKIP
...     loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
...     ds.commit(offsets)        # this step is done: its records are never trained again
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tensorstream.bridges.common import (
    Decoded,
    OffsetCommitter,
    RecordDecoder,
    StreamOptions,
    iterate_stream,
    map_structure,
)
from tensorstream.kafka import TP, KafkaConfig, Record
from tensorstream.spec import FeatureSpec, LabelSpec

log = logging.getLogger(__name__)


def _freeze_inherited_objects() -> None:
    # A forked DataLoader worker inherits the parent's Python objects, including
    # Kafka clients that are garbage in the parent but not yet collected (a
    # cycle keeps them). If the worker's cyclic GC frees one, librdkafka tears
    # down a client whose threads do not exist in this process: segfault.
    # Freezing everything inherited keeps the child's GC away from it (objects
    # the worker creates itself are collected as usual).
    gc.freeze()


os.register_at_fork(after_in_child=_freeze_inherited_objects)


def _tensor(a: np.ndarray) -> torch.Tensor | np.ndarray:
    if a.dtype.kind in "OSU":
        return a  # bytes/strings (e.g. raw_messages): torch has no tensor for them
    if not a.flags.writeable:  # zero-copy frame views of bytes are read-only; torch wants writable
        a = a.copy()
    return torch.from_numpy(a)


def _tensors(data: Any) -> Any:
    return None if data is None else map_structure(_tensor, data)


class KafkaBatch:
    """One batch: ``x, y, offsets = batch`` (or ``batch.x``, ``batch.y``, ``batch.offsets``).

    ``x``/``y`` are tensors (or dicts of tensors); ``y`` is None without a
    label. ``offsets`` is an ``int64 [k, 4]`` tensor of ``(topic index,
    partition, first offset, next offset)`` rows: pass it to
    :meth:`KafkaIterableDataset.commit` once the step that used it is done.

    A DataLoader worker sends the numpy arrays (pickled, a plain copy) and the
    tensors are made in the training process, zero-copy. torch would otherwise
    move every tensor through its own shared-memory file, which costs more than
    decoding a small batch (about 0.5 ms per tensor). ``pin_memory=True`` works.
    """

    __slots__ = ("_x", "_y", "_offsets", "_ready")

    def __init__(self, x: Any, y: Any, offsets: Any, ready: bool = False):
        self._x, self._y, self._offsets, self._ready = x, y, offsets, ready

    def _materialize(self) -> None:
        if not self._ready:
            self._x, self._y = _tensors(self._x), _tensors(self._y)
            self._offsets = torch.from_numpy(np.asarray(self._offsets, dtype=np.int64))
            self._ready = True

    @property
    def x(self) -> Any:
        self._materialize()
        return self._x

    @property
    def y(self) -> Any:
        self._materialize()
        return self._y

    @property
    def offsets(self) -> torch.Tensor:
        self._materialize()
        return self._offsets

    def __iter__(self) -> Iterator[Any]:
        self._materialize()
        return iter((self._x, self._y, self._offsets))

    def __getitem__(self, i: int) -> Any:
        return tuple(self)[i]

    def pin_memory(self, device: Any = None) -> KafkaBatch:
        self._materialize()
        x = _map_tensors(lambda t: t.pin_memory(), self._x)
        y = _map_tensors(lambda t: t.pin_memory(), self._y)
        return KafkaBatch(x, y, self._offsets, ready=True)

    def to(self, *args: Any, **kwargs: Any) -> KafkaBatch:
        """The batch with ``x`` and ``y`` moved (``batch.to("cuda", non_blocking=True)``); offsets stay."""
        self._materialize()
        move = lambda t: t.to(*args, **kwargs)  # noqa: E731
        return KafkaBatch(_map_tensors(move, self._x), _map_tensors(move, self._y), self._offsets, ready=True)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._x, self._y, self._offsets, self._ready)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._x, self._y, self._offsets, self._ready = state

    def __repr__(self) -> str:
        n = len(self._offsets)
        return f"KafkaBatch(x={_shape(self._x)}, y={_shape(self._y)}, offsets={n} partition range(s))"


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict):
        return {k: _map_tensors(fn, v) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_map_tensors(fn, v) for v in data)
    return fn(data)


def _shape(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict):
        return {k: _shape(v) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return tuple(_shape(v) for v in data)
    return tuple(data.shape)


class KafkaRecord(NamedTuple):
    """One record (``batch_size=None``): tensors without the batch axis, and a one-row offsets tensor.

    A named tuple of tensors, so the DataLoader's own batching (``batch_size=N``)
    stacks records into ``x [N, ...]``, ``y [N]`` and ``offsets [N, 1, 4]``.
    """

    x: Any
    y: Any
    offsets: torch.Tensor


class KafkaIterableDataset(IterableDataset):
    """Records of one or more topics as tensors, for ``DataLoader(num_workers=N)``.

    Parameters
    ----------
    topics
        A topic name or a list of them.
    config
        A :class:`~tensorstream.kafka.KafkaConfig` or a bootstrap-servers string.
    group_id
        The consumer group whose committed offsets say where to start, and where
        :meth:`commit` records progress. Readers never *join* the group: each
        DataLoader worker ``assign()``s a disjoint, fixed share of the partitions
        (round-robin by worker id), so there is no rebalancing and no join delay.
    batch_size
        Records per yielded batch (use ``DataLoader(batch_size=None)``), or None
        to yield single records (then let the DataLoader batch them).
    until
        ``"end"`` (bounded): stop at the end offsets captured when each worker
        starts. ``None`` (unbounded): wait for new records. A mapping
        ``{(topic, partition): offset}``: stop before these offsets.
    idle_timeout
        Seconds without a new record after which an unbounded stream ends
        cleanly (None: never). In a bounded stream it raises ``TimeoutError``.
    max_wait
        Unbounded streams: hand out a partial batch when its oldest record has
        waited this many seconds (None: only full batches, plus the last one).
    start
        ``"committed"`` (the group's offsets, else the start of the log),
        ``"earliest"`` (from the start whatever was committed, e.g. more epochs),
        ``-N``: the last N records of each partition (e.g. to evaluate on
        the newest window), or a mapping ``{(topic, partition): offset}``:
        read only these partitions, from these offsets.
    codec, features, label
        Decode records with the pipeline's codec (``"json"`` or ``"frame"``) and
        feature/label specs: ``x`` float32 ``[n, d]``, ``y`` int64 class indices
        (float32 for regression). Tensor frames without specs decode directly
        (fields ``x``/``y`` become ``x, y``).
    decode
        Instead of specs: a callable ``list[Record] -> arrays`` (an array, an
        ``(x, y)`` tuple or a dict), run in the worker. Must be picklable for
        spawn-started workers (a module-level function).
    feature_state
        A learner state file (``tensorstream run --save-state``) or a
        ``FeaturePipeline.state_dict()``: scaler statistics, vocabularies and
        classes are loaded and frozen. Without it each worker learns its own
        running statistics from the records it reads (with several workers, a
        growing class set or one-hot vocabulary is refused: each worker would
        number them differently).
    dead_letter_topic, on_bad
        Bad records go to ``dead_letter_topic`` (with the reason in headers),
        else raise (``on_bad="raise"``, default) or are skipped with a warning.
    consumer_settings
        Extra librdkafka consumer settings (e.g. ``{"fetch.max.bytes": ...}``).
    """

    def __init__(
        self,
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
    ):
        super().__init__()
        self.options = StreamOptions(
            topics=[topics] if isinstance(topics, str) else list(topics), config=config,  # type: ignore[arg-type]
            group_id=group_id, batch_size=batch_size, until=until, idle_timeout=idle_timeout,
            max_wait=max_wait, start=start, codec=codec, features=features, label=label, decode=decode,
            feature_state=feature_state, dead_letter_topic=dead_letter_topic, on_bad=on_bad,
            consumer_settings=dict(consumer_settings or {}),
        )
        self._decoder: RecordDecoder | None = None
        self._committer: OffsetCommitter | None = None

    @property
    def topics(self) -> list[str]:
        return self.options.topics

    # -- reading (runs in each DataLoader worker, or in the main process with num_workers=0)

    def __iter__(self) -> Iterator[KafkaBatch | KafkaRecord]:
        info = get_worker_info()
        index, count = (0, 1) if info is None else (info.id, info.num_workers)
        if self._decoder is None:
            # One decoder per process: running statistics carry over between epochs of a worker
            # only with persistent_workers=True (otherwise each epoch forks a fresh copy).
            self._decoder = RecordDecoder(self.options)
        single = self.options.batch_size is None
        in_worker = info is not None
        for data, offsets in iterate_stream(self.options, self._decoder, index, count):
            x, y = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
            if single:
                yield KafkaRecord(_tensors(x), _tensors(y), torch.from_numpy(offsets))
            else:
                # In a worker: numpy arrays cross to the main process, tensors are made there.
                yield KafkaBatch(x, y, offsets, ready=False) if in_worker else \
                    KafkaBatch(_tensors(x), _tensors(y), torch.from_numpy(offsets), ready=True)

    # -- offsets (main process) -------------------------------------------

    @property
    def committer(self) -> OffsetCommitter:
        """The :class:`OffsetCommitter` of this dataset's group (created on first use)."""
        if self._committer is None:
            o = self.options
            self._committer = OffsetCommitter(o.config, o.group_id, o.topics)
        return self._committer

    def commit(self, offsets: Any) -> dict[TP, int]:
        """Commit the offsets of a batch whose optimizer step has completed (and all before it).

        Call it after ``optimizer.step()``, with the ``offsets`` of the batch that
        step used; batches prefetched by the DataLoader but not yet trained on
        stay uncommitted, so a restarted run continues at the first record not
        yet trained. Returns what was committed. For fewer round trips, call
        ``dataset.committer.mark(offsets)`` per step and ``dataset.committer.commit()``
        every N steps (a crash then retrains at most N steps).
        """
        return self.committer.commit(offsets)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the options, never the main process's Kafka handles or decoder state in flight.
        state = self.__dict__.copy()
        state["_committer"] = None
        return state
