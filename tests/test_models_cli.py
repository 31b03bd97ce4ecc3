"""`tensorstream models ...` against the real broker: promote a checkpoint, watch it swap in, roll back."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from procutil import write_spec
from tensorstream.cli import app
from tensorstream.examples import example_spec
from tensorstream.pipeline import Pipeline
from tensorstream.data.produce import produce_records

runner = CliRunner()


def _cli(*args: str) -> str:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_promote_list_show_rollback(broker, kafka_config, topic_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_MODELS_HMAC_KEY", "s" * 32)
    topic = topic_factory(1, prefix="models")
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={
        "name": f"models-{topic[-6:]}", "mode": "train", "sink": None, "state_dir": str(tmp_path / "state"),
        "source": base.source.model_copy(update={"topic": topic}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 400})})
    produce_records(kafka_config, "river:Phishing", topic)
    Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    path = write_spec(spec, tmp_path / "spec.yaml")
    b = broker.bootstrap_servers

    listing = _cli("models", "checkpoints", str(path))
    from tensorstream.checkpoint import CheckpointStore

    ids = [i.id for i in CheckpointStore(spec.checkpoint_url).list()]
    assert len(ids) >= 3 and all(i in listing for i in ids)

    _cli("models", "promote", str(path), ids[0], "-b", b)
    _cli("models", "promote", str(path), ids[-1], "-b", b)
    out = _cli("models", "list", str(path), "-b", b)
    assert ids[0] in out and ids[-1] in out
    assert ids[-1] in _cli("models", "show", str(path), ids[-1], "-b", b)
    assert ids[0] in _cli("models", "rollback", str(path), "-b", b)

    # An inference worker watching the models topic starts with the current version (the rolled-back one).
    infer = spec.model_copy(update={
        "name": spec.name, "mode": "infer", "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "source": spec.source.model_copy(update={"group_id": "infer-" + topic}),
        "versions": spec.versions.model_copy(update={"watch": True})})
    r = Pipeline(infer, kafka_config).run(until_end=True, timeout=120)
    assert r.predictions == 1250 and r.model_version == ids[0]


def test_unsigned_is_refused_without_a_key(broker, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORSTREAM_MODELS_HMAC_KEY", raising=False)
    spec = example_spec("phishing.yaml")
    path = write_spec(spec, tmp_path / "spec.yaml")
    res = runner.invoke(app, ["models", "list", str(path), "-b", broker.bootstrap_servers])
    assert res.exit_code == 1 and "TENSORSTREAM_MODELS_HMAC_KEY" in res.output


@pytest.mark.parametrize("bad", ["nope"])
def test_promote_unknown_version_fails_clearly(bad, broker, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_MODELS_HMAC_KEY", "s" * 32)
    spec = example_spec("phishing.yaml").model_copy(update={"name": "models-unknown", "state_dir": str(tmp_path)})
    path = write_spec(spec, tmp_path / "spec.yaml")
    res = runner.invoke(app, ["models", "promote", str(path), bad, "-b", broker.bootstrap_servers])
    assert res.exit_code == 1 and bad in res.output


def test_a_worker_falls_back_to_the_newest_version_whose_weights_verify(broker, kafka_config, topic_factory,
                                                                        tmp_path, monkeypatch):
    """The newest signed version's file is gone: a new worker serves the one before it (it used to die with
    "no model yet"), and `models list` marks the gone one unavailable and the served one current."""
    from tensorstream.checkpoint.versions import ModelRegistry

    monkeypatch.setenv("TENSORSTREAM_MODELS_HMAC_KEY", "s" * 32)
    topic = topic_factory(1, prefix="fallback")
    base = example_spec("phishing.yaml")
    name = f"fallback-{topic[-6:]}"
    train = base.model_copy(update={"name": name, "mode": "train", "sink": None, "state_dir": str(tmp_path / "s"),
                                    "source": base.source.model_copy(update={"topic": topic})})
    produce_records(kafka_config, "river:Phishing", topic, limit=400)
    pipe = Pipeline(train, kafka_config)
    pipe.run(until_end=True, timeout=120)
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    pipe.save_state(str(v1))
    pipe.save_state(str(v2))
    with ModelRegistry(kafka_config, name) as reg:
        reg.publish("v1", str(v1))
        reg.publish("v2", str(v2))
    v2.unlink()  # the store lost it (or it was never uploaded)

    infer = base.model_copy(update={
        "name": name, "mode": "infer", "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "source": base.source.model_copy(update={"topic": topic, "group_id": "infer-" + topic}),
        "versions": base.versions.model_copy(update={"watch": True})})
    r = Pipeline(infer, kafka_config).run(until_end=True, timeout=120)
    assert r.model_version == "v1" and r.predictions == 400

    path = write_spec(infer, tmp_path / "infer.yaml")
    listing = [line for line in _cli("models", "list", str(path), "-b", broker.bootstrap_servers).splitlines()
               if "│" in line]
    row = {v: line for line in listing for v in ("v1", "v2") if f" {v} " in line}
    assert "unavailable" in row["v2"] and "*" not in row["v2"]
    assert "*" in row["v1"] and "unavailable" not in row["v1"]
