"""Stateful features through the real pipeline (embedded broker): the Kafka record keys and
timestamps reach the feature stage, a topic keyed by the key field passes the partitioning
check, one that is not is refused when the spec says so."""

from __future__ import annotations

import pytest

from tensorstream.data.produce import produce_records
from tensorstream.examples import example_spec
from tensorstream.features.keyed import KeyPartitioningError
from tensorstream.pipeline import Pipeline


def _spec(topic, tmp_path, name, **features):
    base = example_spec("keyed.yaml")
    f = base.features.model_copy(update=features)
    return base.model_copy(update={
        "name": name, "mode": "train", "sink": None, "state_dir": str(tmp_path / name), "features": f,
        "source": base.source.model_copy(update={"topic": topic}),
    })


def test_a_topic_keyed_by_the_key_field_runs_without_mismatch(kafka_config, topic_factory, tmp_path):
    topic = topic_factory(3, prefix="keyed")
    produce_records(kafka_config, "river:keyed.transactions?seed=2", topic, limit=3000, key_field="card",
                    partitions=3)
    result = Pipeline(_spec(topic, tmp_path, "by-field"), kafka_config).run(until_end=True, timeout=120)
    m = result.metrics
    assert result.records == 3000 and m["key_mismatch"] == 0 and m["state_keys"] > 50
    assert m["accuracy"] > 0.8


def test_record_keys_and_timestamps_reach_the_features(kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="keyed")
    produce_records(kafka_config, "river:keyed.transactions?seed=4", topic, limit=500, key_field="card")
    spec = _spec(topic, tmp_path, "by-record", key="@key", time="@timestamp")
    pipe = Pipeline(spec, kafka_config)
    result = pipe.run(until_end=True, timeout=120)
    assert result.records == 500 and result.bad == 0
    keyed = pipe.learner.features.keyed
    assert b"c0" in keyed.store.index and keyed.store.n_keys == result.metrics["state_keys"]
    assert keyed.watermark > 1_600_000_000_000  # the broker's timestamps (now), not the records' ts field


def test_a_topic_not_keyed_by_the_field_is_refused_when_asked(kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="keyed")
    produce_records(kafka_config, "river:keyed.transactions?seed=6", topic, limit=100)  # no record keys
    base = example_spec("keyed.yaml")
    state = base.features.state.model_copy(update={"partitioning": "refuse"})
    with pytest.raises(KeyPartitioningError, match="--key-field card"):
        Pipeline(_spec(topic, tmp_path, "refused", state=state), kafka_config).run(until_end=True, timeout=60)
