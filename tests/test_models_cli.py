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
