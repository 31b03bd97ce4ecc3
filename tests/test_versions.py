"""Signed model versions on the models topic, against the real embedded broker."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter

import orjson
import pytest

from tensorstream.checkpoint.versions import (
    ENV_KEY, ModelAnnouncement, ModelIntegrityError, ModelRegistry, ModelVersionError,
    ModelWatcher, SigningKeyError, canonical_bytes, models_topic, resolve_key, sign_fields, verify_fields,
)
from tensorstream.cli.models import HISTORY_COLUMNS, format_announcement, format_history, format_rejected
from tensorstream.kafka import KafkaSink

KEY = b"test-key-0123456789abcdef"
OTHER_KEY = b"another-key-0123456789abc"


@pytest.fixture
def pipeline() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def state_file(tmp_path):
    """``make(name, content) -> (url, sha256)``: a state file on the local filesystem."""

    def make(name: str, content: bytes | None = None) -> tuple[str, str]:
        data = content if content is not None else name.encode() * 100
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        return str(path), hashlib.sha256(data).hexdigest()

    return make


@pytest.fixture
def registry(kafka_config, pipeline):
    with ModelRegistry(kafka_config, pipeline, KEY) as reg:
        yield reg


def _poll_until(watcher: ModelWatcher, timeout: float = 10.0, version: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ann = watcher.poll()
        if ann is not None and (version is None or ann.version == version):
            return ann
        time.sleep(0.02)
    return None


# -- signing, no broker needed ----------------------------------------------------
def test_signature_covers_every_field_and_ignores_key_order():
    ann = ModelAnnouncement.build(KEY, pipeline="p", version="v1", url="/x", sha256="a" * 64,
                                  metrics={"acc": 0.9, "loss": 0.25}, backend="torch", spec_hash="abc")
    fields = orjson.loads(ann.to_bytes())
    assert fields["signature"].startswith("hmac-sha256:")
    assert verify_fields(fields, KEY)
    assert verify_fields(dict(reversed(list(fields.items()))), KEY)
    assert canonical_bytes(fields) == canonical_bytes(dict(reversed(list(fields.items()))))
    assert not verify_fields(fields, OTHER_KEY)
    for name, value in [("version", "v2"), ("url", "/evil"), ("metrics", {"acc": 0.91, "loss": 0.25}),
                        ("action", "rollback"), ("created_at", "2020-01-01T00:00:00Z")]:
        assert not verify_fields({**fields, name: value}, KEY), name
    assert not verify_fields({**fields, "extra": 1}, KEY)
    assert not verify_fields({k: v for k, v in fields.items() if k != "signature"}, KEY)
    assert sign_fields(fields, KEY) == fields["signature"]


def test_key_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY + "_FILE", raising=False)
    with pytest.raises(SigningKeyError, match=ENV_KEY):
        resolve_key()
    assert resolve_key(allow_unsigned=True) is None
    with pytest.raises(SigningKeyError, match="at least 16"):
        resolve_key("short")
    keyfile = tmp_path / "key"
    keyfile.write_text("from-a-file-0123456789\n")
    monkeypatch.setenv(ENV_KEY + "_FILE", str(keyfile))
    assert resolve_key() == b"from-a-file-0123456789"
    monkeypatch.setenv(ENV_KEY, "from-the-env-0123456789")
    assert resolve_key() == b"from-the-env-0123456789"
    assert resolve_key(KEY) == KEY  # an explicit key wins


def test_non_finite_metrics_and_bad_hash_are_refused_before_publishing():
    with pytest.raises(ValueError, match="finite"):
        ModelAnnouncement.build(KEY, pipeline="p", version="v1", url="/x", sha256="a" * 64,
                                metrics={"acc": float("nan")})
    with pytest.raises(ValueError, match="sha256"):
        ModelAnnouncement.build(KEY, pipeline="p", version="v1", url="/x", sha256="abc")
    with pytest.raises(ValueError, match="legal topic"):
        models_topic("has space")


# -- against the broker ---------------------------------------------------------------
def test_no_key_is_a_clear_error(kafka_config, pipeline, monkeypatch, state_file):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY + "_FILE", raising=False)
    with pytest.raises(SigningKeyError, match="unsigned announcements are neither published nor accepted"):
        ModelRegistry(kafka_config, pipeline)
    with pytest.raises(SigningKeyError, match=ENV_KEY):
        ModelWatcher(kafka_config, pipeline)
    # The dev flag: unsigned announcements go out and are read by unsigned readers only.
    url, _ = state_file("dev")
    with ModelRegistry(kafka_config, pipeline, allow_unsigned=True) as dev:
        ann = dev.publish("dev1", url)
        assert ann.signature == ""
        assert dev.current() == ann
    with ModelWatcher(kafka_config, pipeline, allow_unsigned=True) as w:
        assert w.catch_up() == ann
    with ModelWatcher(kafka_config, pipeline, KEY) as w:
        assert w.catch_up() is None
        assert w.rejected == Counter(bad_signature=1)


def test_publish_history_current_roundtrip(registry, pipeline, state_file):
    assert registry.topic == f"{pipeline}.models"
    assert registry.history() == [] and registry.current() is None
    url, digest = state_file("v1")
    ann = registry.publish("v1", url, metrics={"acc": 0.875, "n": 1000}, backend="torch", spec_hash="s1")
    assert ann.sha256 == digest  # hashed from the file when not given
    assert ann.pipeline == pipeline and ann.action == "promote" and ann.signature
    assert registry.history() == [ann]
    assert registry.current() == ann
    assert registry.rejected == Counter()

    rows = format_history(registry.history())
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert rows[0]["version"] == "v1" and rows[0]["current"] == "*" and rows[0]["metrics"] == "acc=0.875 n=1000"
    show = dict(format_announcement(registry.find("v1"), is_current=True))
    assert show["sha256"] == digest and show["url"] == url and show["signed"] == "yes" and show["current"] == "yes"
    with pytest.raises(ModelVersionError, match="no valid announcement"):
        registry.find("v9")


def test_promote_promote_rollback(registry, state_file):
    url1, sha1 = state_file("v1")
    url2, sha2 = state_file("v2")
    registry.promote("v1", url1, sha1)
    registry.promote("v2", url2, sha2, metrics={"acc": 0.9})
    assert registry.current().version == "v2"

    back = registry.rollback()
    assert (back.version, back.action, back.url, back.sha256) == ("v1", "rollback", url1, sha1)
    cur = registry.current()
    assert cur == back and cur.version == "v1"
    assert [a.version for a in registry.lineage()] == ["v1"]
    with pytest.raises(ModelVersionError, match="nothing to roll back to"):
        registry.rollback()

    # Promote a known version again by name: copied from its announcement, freshly signed.
    again = registry.promote("v2")
    assert (again.version, again.action, again.sha256, again.metrics) == ("v2", "promote", sha2, {"acc": 0.9})
    assert registry.promote("v2") == again  # already current: nothing published
    assert [(a.version, a.action) for a in registry.history()] == [
        ("v1", "promote"), ("v2", "promote"), ("v1", "rollback"), ("v2", "promote")]
    assert registry.rollback().version == "v1"
    with pytest.raises(ModelVersionError):
        registry.promote("v3")  # never announced, no url


def test_watcher_started_late_sees_current_then_follows_live(kafka_config, registry, pipeline, state_file):
    registry.publish("v1", *state_file("v1"))
    registry.publish("v2", *state_file("v2"))
    with ModelWatcher(kafka_config, pipeline, KEY) as late:
        first = _poll_until(late)  # a new worker learns the current version on its first polls
        assert first is not None and first.version == "v2"
        assert late.poll() is None  # nothing new: cheap, non-blocking
        t0 = time.perf_counter()
        for _ in range(200):
            assert late.poll() is None
        assert (time.perf_counter() - t0) / 200 < 0.005

        published = registry.publish("v3", *state_file("v3"))
        t0 = time.monotonic()
        seen = _poll_until(late, timeout=5.0)
        assert seen == published
        assert time.monotonic() - t0 < 3.0
        assert late.current == published

        registry.rollback()
        back = _poll_until(late, timeout=5.0)
        assert back is not None and (back.version, back.action) == ("v2", "rollback")

        t0 = time.monotonic()
        assert late.catch_up().version == "v2"  # already at the end: returns at once
        assert time.monotonic() - t0 < 1.0

    with ModelWatcher(kafka_config, pipeline, KEY) as starter:
        assert starter.catch_up().version == "v2"
        assert starter.poll() is None  # what catch_up read is not returned again
        assert starter.rejected == Counter()


def test_watcher_on_an_empty_topic(kafka_config, registry, pipeline, state_file):
    with ModelWatcher(kafka_config, pipeline, KEY) as w:
        assert w.catch_up() is None and w.current is None
        first = registry.publish("v1", *state_file("v1"))
        assert _poll_until(w, timeout=5.0) == first


def test_tampered_announcements_are_rejected_and_counted(kafka_config, registry, pipeline, state_file):
    good1 = registry.publish("v1", *state_file("v1"), metrics={"acc": 0.8})
    fields = orjson.loads(good1.to_bytes())
    url_evil, sha_evil = state_file("evil")
    forged = {**fields, "version": "v666", "url": url_evil, "sha256": sha_evil,
              "created_at": "2030-01-01T00:00:00Z"}
    raw = {
        "flipped field": orjson.dumps({**fields, "url": url_evil}),
        "wrong key": orjson.dumps({**forged, "signature": sign_fields(forged, OTHER_KEY)}),
        "no signature": orjson.dumps({k: v for k, v in forged.items() if k != "signature"}),
        "empty signature": orjson.dumps({**forged, "signature": ""}),
        "not json": b"\x00not json{",
        "wrong type": orjson.dumps([1, 2, 3]),
    }
    other_pipeline = {**forged, "pipeline": "someone-else"}
    raw["wrong pipeline"] = orjson.dumps({**other_pipeline, "signature": sign_fields(other_pipeline, KEY)})
    bad_schema = {**forged, "sha256": "not-a-hash"}
    raw["signed but malformed"] = orjson.dumps({**bad_schema, "signature": sign_fields(bad_schema, KEY)})
    raw["replay of v1"] = good1.to_bytes()

    with ModelWatcher(kafka_config, pipeline, KEY) as w:
        assert w.catch_up() == good1
        with KafkaSink(kafka_config) as sink:
            for value in raw.values():
                sink.produce(registry.topic, value, key=pipeline.encode())
            sink.flush()
        good2 = registry.publish("v2", *state_file("v2"))
        with KafkaSink(kafka_config) as sink:  # garbage after the newest valid one changes nothing
            sink.produce(registry.topic, raw["wrong key"], key=pipeline.encode())
            sink.flush()
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(w.rejected.values()) < len(raw) + 1:
            if (ann := w.poll()) is not None:
                seen.append(ann)
            time.sleep(0.02)
        expected = Counter(bad_signature=5, malformed=3, wrong_pipeline=1, replayed=1)
        assert w.rejected == expected
        assert seen == [good2] and w.current == good2
        assert w.fetch_verified(good2) == b"v2" * 100

    assert registry.history() == [good1, good2]
    assert registry.rejected == expected
    assert registry.current() == good2
    assert format_rejected(registry.rejected) == [
        ("malformed", 3), ("bad_signature", 5), ("wrong_pipeline", 1), ("replayed", 1)]


def test_fetch_verified_checks_the_state_file_hash(kafka_config, registry, pipeline, state_file, tmp_path):
    content = bytes(range(256)) * 50
    url, digest = state_file("weights", content)
    ann = registry.publish("v1", url, digest)
    with ModelWatcher(kafka_config, pipeline, KEY) as w:
        got = w.catch_up()
        assert w.fetch_verified(got) == content
        (tmp_path / "weights.safetensors").write_bytes(content[:-1] + b"\x00")  # changed after the announcement
        with pytest.raises(ModelIntegrityError, match="sha256"):
            w.fetch_verified(ann)
        assert w.rejected == Counter(hash_mismatch=1)
