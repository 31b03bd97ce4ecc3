"""CheckpointStore: roundtrips, torn/tampered/forged checkpoints, retention, crashes.

No Kafka needed: checkpoints are files. Local stores live in tmp_path; the
object-store path (no rename, manifest written last) runs on fsspec's memory://.
"""

from __future__ import annotations

import doctest
import importlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstream.checkpoint import CheckpointError, CheckpointStore, load_state
from tensorstream.checkpoint.manifest import MANIFEST, STATE, build_manifest, file_digest

LOGGER = "tensorstream.checkpoint.store"


def sample_state(seed: int = 0, n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "backend/w": rng.standard_normal((n, 3), dtype=np.float32),
        "backend/b": rng.standard_normal(3, dtype=np.float32),
        "features/counts": rng.integers(0, 1 << 40, size=5, dtype=np.int64),
        "features/vocab": rng.integers(0, 255, size=7, dtype=np.uint8),
        "learner/n": np.array(seed, np.int64),  # 0-d
        "metrics/empty": np.zeros((0, 4), np.float32),  # empty
    }


def save(store: CheckpointStore, state=None, i: int = 0, **kw):
    return store.save(sample_state(i) if state is None else state, offsets={("t", 0): 10 * i, ("t", 1): i},
                      n_learned=11 * i, backend="torch", spec_hash="abc", extra={"i": i}, **kw)


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


def fs_path(info, name: str = ""):
    fs, path = fsspec.core.url_to_fs(info.url)
    return fs, f"{path}/{name}" if name else path


@pytest.fixture(params=["local", "memory"])
def make_store(request, tmp_path):
    roots = []

    def make(**kw) -> CheckpointStore:
        if request.param == "local":
            url = str(tmp_path / f"ckpt-{len(roots)}")
        else:
            url = f"memory://ckpt-{uuid.uuid4().hex}"
        roots.append(url)
        return CheckpointStore(url, **kw)

    yield make
    if request.param == "memory":
        fs = fsspec.filesystem("memory")
        for url in roots:
            if fs.exists(url):
                fs.rm(url, recursive=True)


# -- roundtrips ---------------------------------------------------------------
def test_roundtrip_exact(make_store):
    store = make_store()
    state = sample_state(3)
    state["backend/bool"] = np.array([True, False])
    state["backend/transposed"] = np.arange(12, dtype=np.float64).reshape(3, 4).T  # not C-contiguous
    offsets = {("clicks", 0): 5, ("clicks", 2): 0, ("views", np.int64(1)): np.int64(1 << 40)}
    metrics = {"accuracy": 0.8125, "logloss": float("inf"), "auc": float("nan")}
    saved = store.save(state, offsets=offsets, n_learned=42, backend="tensorflow", spec_hash="f00d",
                       metrics=metrics, extra={"note": "hi", "nested": {"a": [1, 2]}})
    loaded_state, info = store.load(saved.id)
    assert_same_state(loaded_state, state)
    assert info.offsets == {("clicks", 0): 5, ("clicks", 2): 0, ("views", 1): 1 << 40}
    assert all(type(k[1]) is int and type(v) is int for k, v in info.offsets.items())
    assert (info.n_learned, info.backend, info.spec_hash, info.parent) == (42, "tensorflow", "f00d", None)
    assert info.metrics["accuracy"] == 0.8125 and info.metrics["logloss"] == float("inf")
    assert np.isnan(info.metrics["auc"])
    assert info.extra == {"note": "hi", "nested": {"a": [1, 2]}}
    assert info.created_at.tzinfo is not None and abs(time.time() - info.created_at.timestamp()) < 60
    assert (info.id, info.url, info.files, info.offsets) == (saved.id, saved.url, saved.files, saved.offsets)
    assert info.files[STATE]["size"] == info.size > 0
    # The manifest is plain, strict JSON with the documented layout.
    fs, path = fs_path(info, MANIFEST)
    m = json.loads(fs.cat_file(path))
    assert m["offsets"] == {"clicks": {"0": 5, "2": 0}, "views": {"1": 1 << 40}}
    assert m["metrics"]["auc"] == "NaN" and set(m["files"]) == {STATE}
    # The state file alone is a normal state file (usable as model.weights).
    st2, meta = load_state(info.state_url)
    assert_same_state(st2, state)
    assert meta["backend"] == "tensorflow" and meta["tensorstream.checkpoint"] == info.id


def test_ids_monotonic_and_lineage(make_store):
    store = make_store(keep_last=None)
    infos = []
    for i in range(12):
        infos.append(save(store, i=i, parent=infos[-1].id if infos else None))
    ids = [i.id for i in infos]
    assert ids == sorted(ids) and len(set(ids)) == 12
    assert [int(i[:8]) for i in ids] == list(range(1, 13))
    assert [i.id for i in store.list()] == ids
    assert [i.parent for i in store.list()] == [None] + ids[:-1]
    state, latest = store.latest()
    assert latest.id == ids[-1] and latest.offsets == {("t", 0): 110, ("t", 1): 11}
    assert_same_state(state, sample_state(11))
    assert store.latest() is not None and CheckpointStore(store.url).latest()[1].id == ids[-1]


def test_empty_store(make_store):
    store = make_store()
    assert store.latest() is None and store.list() == [] and store.prune() == []
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        store.load("00000001-abcdef")
    with pytest.raises(CheckpointError, match="not a checkpoint id"):
        store.load("../etc")


@pytest.mark.parametrize("kw, err", [
    ({"offsets": {("t", 0): -1}}, "must be >= 0"),
    ({"offsets": {("t", 0): 1.5}}, "must be an integer"),
    ({"offsets": {"t": 3}}, r"\(topic, partition\) pairs"),
    ({"n_learned": -3}, "n_learned"),
    ({"extra": {"x": float("nan")}}, "JSON-serialisable"),
    ({"parent": "latest"}, "parent"),
    ({"metrics": {"a": "high"}}, "must be a number"),
])
def test_bad_arguments_write_nothing(make_store, kw, err):
    store = make_store()
    args = dict(offsets={("t", 0): 1}, n_learned=1, backend="torch", spec_hash="h") | kw
    with pytest.raises(ValueError, match=err):
        store.save(sample_state(), **args)
    with pytest.raises(TypeError, match="numpy array"):
        store.save({"w": [1.0]}, offsets={}, n_learned=0, backend="torch", spec_hash="h")
    assert store._names() == []


# -- torn checkpoints -----------------------------------------------------------
@pytest.mark.parametrize("damage, reason", [
    ("no_manifest", "no manifest.json"),
    ("truncate_state", "torn or truncated"),
    ("no_state", "state.safetensors is missing"),
])
def test_torn_checkpoint_falls_back(make_store, caplog, damage, reason):
    store = make_store()
    good = save(store, i=1)
    torn = save(store, i=2)
    fs, d = fs_path(torn)
    if damage == "no_manifest":
        fs.rm_file(f"{d}/{MANIFEST}")
    elif damage == "truncate_state":
        fs.pipe_file(f"{d}/{STATE}", fs.cat_file(f"{d}/{STATE}")[:100])
    else:
        fs.rm_file(f"{d}/{STATE}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state, info = store.latest()
    assert info.id == good.id
    assert_same_state(state, sample_state(1))
    assert any(torn.id in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    assert [i.id for i in store.list()] == [good.id]
    with pytest.raises(CheckpointError, match=reason):
        store.load(torn.id)


def test_leftover_temp_dir_ignored(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep_last=None)
    good = save(store, i=1)
    # A save killed before its rename: a complete-looking temp dir with the next id.
    tmp = tmp_path / ".tmp-00000002-aaaaaa"
    tmp.mkdir()
    (tmp / STATE).write_bytes((tmp_path / good.id / STATE).read_bytes())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest()[1].id == good.id
    assert ".tmp-00000002-aaaaaa" in caplog.text and "unfinished save" in caplog.text
    assert [i.id for i in store.list()] == [good.id]
    assert save(store, i=3).id.startswith("00000003-")  # the temp dir's sequence number is not reused


# -- tampering and forgery --------------------------------------------------------
def test_flipped_byte_fails_verify(make_store, caplog):
    store = make_store()
    good, bad = save(store, i=1), save(store, i=2)
    fs, path = fs_path(bad, STATE)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    store.verify(good.id)
    with pytest.raises(CheckpointError, match=f"{bad.id}.*sha256"):
        store.verify(bad.id)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest()[1].id == good.id
    assert bad.id in caplog.text and "sha256" in caplog.text
    assert [i.id for i in store.list(verify=True)] == [good.id]
    assert [i.id for i in store.list()] == [good.id, bad.id]  # the cheap check sees sizes only


@pytest.mark.parametrize("edit, reason", [
    (lambda b: b[: len(b) // 2], "not valid JSON"),
    (lambda b: b"\x00\xff garbage", "not valid JSON"),
    (lambda b: b.replace(b'"0": 20', b'"0": 21'), "manifest_sha256"),  # still valid JSON: an offset moved
    (lambda b: b.replace(b'"n_learned": 22', b'"n_learned": NaN'), "not valid JSON"),
])
def test_tampered_manifest_skipped(make_store, caplog, edit, reason):
    store = make_store()
    good, bad = save(store, i=1), save(store, i=2)
    fs, path = fs_path(bad, MANIFEST)
    original = fs.cat_file(path)
    assert edit(original) != original
    fs.pipe_file(path, edit(original))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest()[1].id == good.id
        assert [i.id for i in store.list()] == [good.id]
    assert bad.id in caplog.text and reason in caplog.text
    with pytest.raises(CheckpointError, match=reason):
        store.load(bad.id)


class _Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _forge(store: CheckpointStore, cid: str, payload: bytes, files=None) -> None:
    """A checkpoint whose manifest is fully consistent (hashes recomputed) around payload."""
    manifest = build_manifest(cid, "2026-01-01T00:00:00+00:00", offsets={("t", 0): 1}, n_learned=1,
                              backend="torch", spec_hash="abc", metrics=None, parent=None, extra=None,
                              files=files or {STATE: file_digest(payload)})
    store.fs.makedirs(store._path(cid), exist_ok=True)
    store.fs.pipe_file(store._path(cid, STATE), payload)
    store.fs.pipe_file(store._path(cid, MANIFEST), manifest)


@pytest.mark.parametrize("kind", ["pickle", "garbage", "torch-zip-like"])
def test_forged_non_safetensors_state_never_executes(make_store, tmp_path, caplog, kind):
    store = make_store()
    good = save(store, i=1)
    marker = tmp_path / f"pwned-{kind}"
    payload = {
        "pickle": pickle.dumps({"backend/w": _Evil(str(marker))}),
        "garbage": os.urandom(4096),
        "torch-zip-like": b"PK\x03\x04" + pickle.dumps(_Evil(str(marker)), protocol=2),
    }[kind]
    assert not marker.exists()
    cid = "00000002-e1e1e1"
    _forge(store, cid, payload)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        store.load(cid)
    with pytest.raises(CheckpointError):
        store.verify(cid)
    with pytest.raises(CheckpointError):
        store.mark_promoted(cid, "v-evil")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest()[1].id == good.id
    assert cid in caplog.text
    assert not marker.exists()


def test_forged_manifest_cannot_escape_the_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    save(store, i=1)
    (tmp_path / "secret").write_bytes(b"s3cret")
    for name in ("../secret", "/etc/passwd", "..", ".hidden"):
        _forge(store, "00000007-abcdef", b"x", files={STATE: file_digest(b"x"), name: file_digest(b"s3cret")})
        with pytest.raises(CheckpointError, match="invalid file name"):
            store.load("00000007-abcdef")


# -- retention ------------------------------------------------------------------
def test_retention_keeps_last_n_and_promoted(make_store):
    store = make_store(keep_last=3)
    a, b = save(store, i=1), save(store, i=2)
    promoted = store.mark_promoted(a.id, "model-v1")
    assert promoted.promoted == "model-v1"
    later = [save(store, i=i) for i in range(3, 8)]
    assert [i.id for i in store.list()] == [a.id] + [i.id for i in later[-3:]]
    assert [(i.id, i.promoted) for i in store.promoted()] == [(a.id, "model-v1")]
    state, info = store.load(a.id)  # promotion did not break the manifest hashes
    assert info.promoted == "model-v1"
    assert_same_state(state, sample_state(1))
    assert b.id not in store._names()
    # An explicit prune is idempotent.
    assert store.prune() == []


def test_prune_removes_only_stale_temp_and_damaged(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=3, stale_after_s=600)
    infos = [save(store, i=i) for i in range(1, 4)]
    (tmp_path / infos[-1].id / MANIFEST).write_bytes(b"{")  # damaged newest
    tmp = tmp_path / ".tmp-00000004-bbbbbb"
    tmp.mkdir()
    (tmp / STATE).write_bytes(b"partial")
    assert store.prune() == []  # everything is young: maybe a save in flight
    assert [i.id for i in store.list()] == [i.id for i in infos[:2]]
    old = time.time() - 3600
    for p in (tmp / STATE, tmp, tmp_path / infos[-1].id / MANIFEST, tmp_path / infos[-1].id / STATE,
              tmp_path / infos[-1].id):
        os.utime(p, (old, old))
    assert sorted(store.prune()) == sorted([infos[-1].id, ".tmp-00000004-bbbbbb"])
    assert sorted(os.listdir(tmp_path)) == [i.id for i in infos[:2]]


def test_memory_prune_of_unfinished_save():
    store = CheckpointStore(f"memory://ckpt-{uuid.uuid4().hex}", keep_last=2, stale_after_s=0)
    try:
        good = save(store, i=1)
        store.fs.pipe_file(store._path("00000002-cccccc", STATE), b"half a checkpoint")  # no manifest
        assert store.latest()[1].id == good.id
        assert store.prune() == ["00000002-cccccc"]
        assert store._names() == [good.id]
    finally:
        store.fs.rm(store.root, recursive=True)


# -- property: truncation or corruption never yields wrong data -------------------------
_BASE = sample_state(7, n=16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from([STATE, MANIFEST]), how=st.sampled_from(["truncate", "flip"]))
def test_damage_never_returns_wrong_data(data, which, how):
    store = CheckpointStore(f"memory://hyp-{uuid.uuid4().hex}", keep_last=None)
    try:
        info = save(store, _BASE, i=7)
        fs, path = fs_path(info, which)
        blob = fs.cat_file(path)
        if how == "truncate":
            damaged = blob[: data.draw(st.integers(0, len(blob)), label="length")]
        else:
            pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
            damaged = blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255), label="xor")]) + blob[pos + 1:]
        fs.pipe_file(path, damaged)
        try:
            state, got = store.load(info.id)
        except CheckpointError:
            assert damaged != blob  # an intact checkpoint always loads
            assert store.latest() is None
        else:
            assert_same_state(state, _BASE)
            assert (got.offsets, got.n_learned, got.extra, got.files) == (info.offsets, info.n_learned,
                                                                           info.extra, info.files)
    finally:
        store.fs.rm(store.root, recursive=True)


# -- crash safety: SIGKILL a writer at random moments ---------------------------------
_N_CRASH = 2_000_000  # 8 MB of float32: a save takes tens of ms, so kills land mid-write
_WRITER = f"""
import sys
import numpy as np
from tensorstream.checkpoint import CheckpointStore

def state(i):
    w = np.random.default_rng(i).standard_normal({_N_CRASH}, dtype=np.float32)
    return {{"backend/w": w, "learner/i": np.array(i, np.int64)}}

store = CheckpointStore(sys.argv[1], keep_last=2, stale_after_s=0)
i = int(sys.argv[2])
print("ready", flush=True)
while True:
    store.save(state(i), offsets={{("t", 0): i}}, n_learned=i, backend="torch", spec_hash="h", extra={{"i": i}})
    print("saved", i, flush=True)
    i += 1
"""


def _crash_state(i: int) -> dict[str, np.ndarray]:
    w = np.random.default_rng(i).standard_normal(_N_CRASH, dtype=np.float32)
    return {"backend/w": w, "learner/i": np.array(i, np.int64)}


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path):
    root = str(tmp_path / "store")
    store = CheckpointStore(root, keep_last=2, stale_after_s=0)
    store.save(_crash_state(0), offsets={("t", 0): 0}, n_learned=0, backend="torch", spec_hash="h",
               extra={"i": 0})
    rng = np.random.default_rng(1234)
    acked, next_i = 0, 1
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, root, str(next_i)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        acked = max([acked, *saved])
        state, info = store.latest()
        i = info.extra["i"]
        # durable: nothing acknowledged is lost; complete: exactly one of the saved states
        assert i >= acked and info.offsets == {("t", 0): i} and info.n_learned == i
        assert_same_state(state, _crash_state(i))
        next_i = i + 1
    assert acked >= 1  # the kills did not all land before the first save
    for info in store.list():
        store.verify(info.id)


# -- housekeeping ------------------------------------------------------------------
@pytest.mark.parametrize("module", ["store", "manifest"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"tensorstream.checkpoint.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_no_framework_imports():
    code = "import sys, tensorstream.checkpoint; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
