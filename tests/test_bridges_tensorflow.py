"""tf.data / Keras over Kafka, against the real embedded broker (no mock of the client)."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from tensorstream.data.datasets import open_source
from tensorstream.features import FeaturePipeline, LabelEncoder
from tensorstream.kafka import KafkaConfig, KafkaSink
from tensorstream.data.produce import produce_records
from tensorstream.spec import FeatureSpec, LabelSpec

# Bounded datasets end by running out: Keras warns about it; here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")


def _import_tensorflow():
    # TensorFlow is imported when these tests run, not when pytest collects the
    # module. And torch's compiler stack (torch._dynamo -> triton) must be
    # imported *before* TensorFlow: in this environment importing triton after
    # TensorFlow segfaults, and any later torch.optim.* constructor imports it.
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass
    import tensorflow as tf
    import keras
    return tf, keras


@pytest.fixture(scope="module")
def tfk():
    return _import_tensorflow()


def produce_ids(cfg: KafkaConfig, topic: str, ids: range, partitions: int = 1) -> None:
    with KafkaSink(cfg) as sink:
        for i in ids:
            sink.produce(topic, orjson.dumps({"id": i, "x": float(i % 5), "y": i % 2}), partition=i % partitions)
        sink.flush()


def ids_and_labels(records):
    recs = [orjson.loads(r.value) for r in records]
    return (np.array([[r["id"], r["x"]] for r in recs], dtype=np.float32),
            np.array([r["y"] for r in recs], dtype=np.int64))


def committed(cfg: KafkaConfig, group: str, topic: str, partitions: int = 1) -> dict[int, int]:
    c = Consumer({**cfg.consumer_settings(), "group.id": group})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {r.partition: r.offset for r in res if r.offset >= 0}
    finally:
        c.close()


def mlp(n_features: int, seed: int = 0):
    _, keras = _import_tensorflow()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def test_fit_on_kafka_matches_fit_in_memory(tfk, kafka_config, topic_factory, group_id):
    tf, _ = tfk
    from tensorstream.tensorflow import CommitOffsetsCallback, kafka_dataset

    topic = topic_factory(1)  # one partition, no shuffle: the same batch order as in memory
    produce_records(kafka_config, "river:Phishing", topic)
    records = list(open_source("river:Phishing"))
    features = FeatureSpec(numeric=["*"])
    label = LabelSpec(field="y", classes=[False, True])
    # Statistics fitted once and frozen: both runs see identical feature values.
    fp = FeaturePipeline(features, label_field="y")
    fp.transform_batch(records, update=True)
    X, _, _ = fp.transform_batch(records, update=False)
    y, _, _ = LabelEncoder(label).encode_batch(records)
    state = fp.state_dict()
    epochs, bs = 4, 32

    ds = kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=bs, features=features,
                       label=label, feature_state=state, start="earliest")
    assert ds.element_spec == (tf.TensorSpec((None, X.shape[1]), tf.float32), tf.TensorSpec((None,), tf.int64))
    on_kafka = mlp(X.shape[1])
    hist = on_kafka.fit(ds, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=[CommitOffsetsCallback(ds, commit_freq="epoch")])
    in_memory = mlp(X.shape[1])
    in_memory.fit(X, y, batch_size=bs, epochs=epochs, shuffle=False, verbose=0)

    acc_kafka = on_kafka.evaluate(X, y, verbose=0)[1]
    acc_memory = in_memory.evaluate(X, y, verbose=0)[1]
    print(f"accuracy: on kafka {acc_kafka:.4f}, in memory {acc_memory:.4f}")
    assert acc_memory > 0.85
    assert abs(acc_kafka - acc_memory) <= 0.01, (acc_kafka, acc_memory)
    assert len(hist.history["loss"]) == epochs
    assert committed(kafka_config, group_id, topic) == {0: len(records)}


def test_commit_callback_commits_completed_steps_only(tfk, kafka_config, topic_factory, group_id):
    _, keras = tfk
    from tensorstream.tensorflow import CommitOffsetsCallback, kafka_dataset

    topic = topic_factory(3)
    n, k, bs = 300, 5, 10
    produce_ids(kafka_config, topic, range(n), 3)

    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == k:
                self.model.stop_training = True  # "killed" after step k

    ds = kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=bs, decode=ids_and_labels,
                       prefetch=8)
    model = mlp(2)
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[CommitOffsetsCallback(ds), StopAfter()])
    assert sum(committed(kafka_config, group_id, topic, 3).values()) == k * bs
    # the pipeline had read ahead of training: committing "what was read" would have skipped records
    assert ds.kafka.ledger.runs == 1 and ds.kafka.ledger.pending > 0

    # A new dataset in the same group continues at the first record not yet trained.
    trained = {int(i) for x, _ in kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=bs,
                                               decode=ids_and_labels, start="earliest").take(k)
               for i in x[:, 0].numpy()}
    rest = [int(i) for x, _ in kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=bs,
                                            decode=ids_and_labels) for i in x[:, 0].numpy()]
    assert len(trained) == k * bs and not trained & set(rest)
    assert sorted(trained | set(rest)) == list(range(n))


def test_unbounded_yields_new_records_and_idle_timeout_ends(tfk, kafka_config, topic_factory, group_id):
    from tensorstream.tensorflow import kafka_dataset

    topic = topic_factory(2)
    produce_ids(kafka_config, topic, range(10), 2)
    ds = kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=8, until=None, idle_timeout=1.5,
                       max_wait=0.2, decode=ids_and_labels)
    started = threading.Event()

    def later() -> None:
        started.wait(10)
        time.sleep(0.3)
        produce_ids(kafka_config, topic, range(10, 40), 2)

    t = threading.Thread(target=later)
    t.start()
    seen: list[int] = []
    steps = 0
    for x, _ in ds:
        started.set()
        seen.extend(int(i) for i in x[:, 0].numpy())
        steps += 1
        ds.kafka.steps_done(1)  # a custom loop reports its steps itself
    ds.kafka.commit()
    t.join()
    assert sorted(seen) == list(range(40))
    assert sum(committed(kafka_config, group_id, topic, 2).values()) == 40


def test_online_fit_with_checkpoints_on_an_unbounded_stream(tfk, kafka_config, topic_factory, group_id, tmp_path):
    """The docs' online recipe, small: fit on an unbounded stream, checkpoint + commit per 'epoch'."""
    _, keras = tfk
    from tensorstream.tensorflow import CommitOffsetsCallback, kafka_dataset

    topic = topic_factory(1)
    produce_ids(kafka_config, topic, range(200))
    ds = kafka_dataset(topic, config=kafka_config, group_id=group_id, batch_size=20, until=None,
                       idle_timeout=1.0, decode=ids_and_labels)
    model = mlp(2)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "online.weights.h5"), save_weights_only=True)
    model.fit(ds, steps_per_epoch=5, epochs=100, verbose=0, shuffle=False,  # ends when the stream idles
              callbacks=[ckpt, CommitOffsetsCallback(ds, commit_freq="epoch")])
    assert (tmp_path / "online.weights.h5").exists()
    assert committed(kafka_config, group_id, topic) == {0: 200}
