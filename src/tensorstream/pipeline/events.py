"""Drift and champion/challenger events -> ``<pipeline>.events`` (JSON, keyed by pipeline name).

See docs/drift.md. Each event is stamped with the record that revealed it
(topic/partition/offset), the records processed so far and the model version.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tensorstream.kafka import KafkaSink, Record

log = logging.getLogger(__name__)


class EventWriter:
    def __init__(self, topic: str, pipeline: str, backend: str, obs: Any = None) -> None:
        self.topic = topic
        self.pipeline = pipeline
        self.backend = backend
        self.obs = obs
        #: the events this run wrote
        self.written: list[dict[str, Any]] = []
        #: a challenger won: the loop checkpoints (and announces) it next
        self.promotion_pending = False

    def write(self, sink: KafkaSink, events: list[dict[str, Any]], recs: list[Record], batch: list[Record],
              records_before: int, version: str) -> None:
        if not events:
            return
        pos = {id(r): i for i, r in enumerate(batch)}
        for ev in events:
            body = {k: v for k, v in ev.items() if k != "index"}
            rec = recs[ev["index"]] if 0 <= ev.get("index", -1) < len(recs) else None
            body.update(pipeline=self.pipeline, backend=self.backend,
                        records=records_before + (pos.get(id(rec), len(batch) - 1) + 1 if rec else len(batch)),
                        model_version=version)
            if rec is not None:
                body["source"] = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
            self.written.append(body)
            sink.produce(self.topic, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                         key=self.pipeline.encode(), headers=[("event.type", str(body["type"]).encode())])
            self._announce(body)

    def _announce(self, body: dict[str, Any]) -> None:
        src = body.get("source", {})
        if body["type"] == "drift":
            log.warning("drift detected (%s) at %s[%s]@%s: %s %.4f -> %.4f", body["detector"], src.get("topic"),
                        src.get("partition"), src.get("offset"), body["metric"], body["before"], body["after"])
            hook = getattr(self.obs, "drift_detected", None)
            if hook is not None:
                hook(body["detector"], records=body["records"],
                     detail=f"{body['metric']} {body['before']:.3f} -> {body['after']:.3f}")
        elif body["type"] == "promotion":
            self.promotion_pending = True
            hook = getattr(self.obs, "model_version_changed", None)
            if hook is not None:
                hook(body["model_version"], reason="challenger", records=body["records"])
