"""Prediction records: one per input record, built a batch at a time with the least work per record.

The value (JSON) of a prediction::

    {"label": true, "proba": [0.12, 0.88], "model_version": "fraud@1024",
     "source": {"topic": "tx", "partition": 3, "offset": 81723}}

(``{"value": 21.7, ...}`` for regression), keyed like its input record and
timestamped with the input's timestamp. The provenance (model version, source
position) is always in the value, which is what downstream de-duplication
needs. Headers repeat part of it for consumers that route without parsing;
each costs per record (measured with ``benchmarks/bench_inference.py
--headers``: producing with five headers took twice as long as with none), so
``sink.headers`` chooses: ``version`` (default: ``model.version`` only),
``all`` (``model.version``, ``source.topic``, ``source.partition``,
``source.offset``, ``event.timestamp.ms``), or ``none``.

Why by hand: one ``orjson.dumps`` of a dict per prediction costs ~2.5 µs (the
dict is built, then serialised); filling a bytes template with the parts that
change (label, probabilities, offset) costs ~0.5 µs and gives the same JSON.

>>> import numpy as np
>>> class Rec: topic, partition, offset, key, timestamp_ms = "tx", 3, 7, b"k", 0
>>> w = PredictionWriter("tx.pred", headers="version")
>>> [(value, key, headers, ts)] = w.build([Rec()], np.array([0]), np.array([[0.25, 0.75]], np.float32),
...                                       np.array([1]), [False, True], "m@1")
>>> value
b'{"label":true,"proba":[0.25,0.75],"model_version":"m@1","source":{"topic":"tx","partition":3,"offset":7}}'
>>> headers
[('model.version', b'm@1')]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import orjson

HeaderSet = Literal["version", "all", "none"]

Out = tuple[bytes, "bytes | None", "list[tuple[str, bytes]] | None", int]


class PredictionWriter:
    """Builds a batch's prediction records (``(value, key, headers, timestamp_ms)``) for ``KafkaSink.produce_many``.

    ``codec``: an encoder of prediction dicts (Avro sinks); None = the JSON template.
    """

    def __init__(self, topic: str, headers: HeaderSet = "version", codec: Any = None) -> None:
        self.topic = topic
        self.headers = headers
        self.codec = codec
        self._labels: tuple[tuple[Any, ...], list[bytes]] | None = None  # classes -> their JSON
        self._sources: dict[tuple[str, int], bytes] = {}

    def _label_json(self, classes: Sequence[Any]) -> list[bytes]:
        key = tuple(classes)
        if self._labels is None or self._labels[0] != key:
            self._labels = (key, [orjson.dumps(c) for c in classes])
        return self._labels[1]

    def _source_prefix(self, topic: str, partition: int) -> bytes:
        tp = (topic, partition)
        prefix = self._sources.get(tp)
        if prefix is None:
            prefix = self._sources[tp] = (b',"source":{"topic":' + orjson.dumps(topic)
                                          + b',"partition":%d,"offset":' % partition)
        return prefix

    def build(self, recs: Sequence[Any], rows: np.ndarray, proba: np.ndarray | None, predicted: np.ndarray,
              classes: Sequence[Any], version: str) -> list[Out]:
        """The records for the predicted ``rows`` of ``recs`` (``proba`` None: regression values)."""
        if self.codec is not None:
            return self._build_encoded(recs, rows, proba, predicted, classes, version)
        ver = b',"model_version":' + orjson.dumps(version)
        version_header = [("model.version", version.encode())]
        dumps = orjson.dumps
        out: list[Out] = []
        append = out.append
        chosen = [recs[i] for i in rows.tolist()]
        if proba is None:
            values = [b'{"value":' + dumps(v) for v in predicted.astype(np.float64).tolist()]
        else:
            labels = self._label_json(classes) + [b"null"]  # index -1 (no class known yet): null
            values = [b'{"label":%b,"proba":%b' % (labels[i], dumps(row))
                      for i, row in zip(predicted.tolist(), proba.astype(np.float64).tolist(), strict=True)]
        for rec, head in zip(chosen, values, strict=True):
            value = head + ver + self._source_prefix(rec.topic, rec.partition) + b"%d}}" % rec.offset
            append((value, rec.key, self._headers(rec, version_header), rec.timestamp_ms or 0))
        return out

    def _headers(self, rec: Any, version_header: list[tuple[str, bytes]]) -> list[tuple[str, bytes]] | None:
        if self.headers == "version":
            return version_header
        if self.headers == "none":
            return None
        h = [*version_header, ("source.topic", rec.topic.encode()), ("source.partition", b"%d" % rec.partition),
             ("source.offset", b"%d" % rec.offset)]
        if rec.timestamp_ms:
            h.append(("event.timestamp.ms", b"%d" % rec.timestamp_ms))
        return h

    def _build_encoded(self, recs: Sequence[Any], rows: np.ndarray, proba: np.ndarray | None,
                       predicted: np.ndarray, classes: Sequence[Any], version: str) -> list[Out]:
        version_header = [("model.version", version.encode())]
        out: list[Out] = []
        n = len(classes)
        probas = proba.astype(np.float64).tolist() if proba is not None else None
        for j, (i, p) in enumerate(zip(rows.tolist(), predicted.tolist(), strict=True)):
            rec = recs[i]
            pred: dict[str, Any] = ({"value": float(p)} if probas is None
                                    else {"label": classes[p] if 0 <= p < n else None, "proba": probas[j]})
            value = self.codec.encode({**pred, "model_version": version,
                                       "source": {"topic": rec.topic, "partition": rec.partition,
                                                  "offset": rec.offset}})
            out.append((value, rec.key, self._headers(rec, version_header), rec.timestamp_ms or 0))
        return out
