"""Durable, versioned checkpoints at any fsspec URL (local path, ``memory://``, ``s3://``...).

A checkpoint is a directory ``<root>/<id>/`` holding ``state.safetensors`` (the
learner state: named arrays, never pickle) and ``manifest.json`` (the source
offsets the state reflects, ``n_learned``, backend, spec hash, metrics, parent,
and a sha256 + size of every other file). Ids are ``<8-digit sequence>-<6 hex>``,
so the newest checkpoint is the largest id.

A save is all-or-nothing. Locally it is written into ``<root>/.tmp-<id>/``,
every file and the directory fsynced, then renamed into place and the root
fsynced. On object stores (no atomic rename of a prefix) the data goes first and
the manifest last: a checkpoint without a valid manifest does not exist. Reads
check every hash, so a torn, truncated or tampered checkpoint is never loaded;
:meth:`CheckpointStore.latest` skips it (with a warning) for the one before.

Commit source offsets only after :meth:`~CheckpointStore.save` returns, and on
restart replay from ``info.offsets`` of :meth:`~CheckpointStore.latest`.

>>> import numpy as np, tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), keep_last=2)
>>> for n in (100, 200, 300):
...     info = store.save({"backend/w": np.full(3, n, np.float32)}, offsets={("clicks", 0): n},
...                       n_learned=n, backend="torch", spec_hash="ab12", metrics={"accuracy": 0.9})
>>> state, info = store.latest()
>>> info.id[:8], info.offsets, info.n_learned, state["backend/w"].tolist()
('00000003', {('clicks', 0): 300}, 300, [300.0, 300.0, 300.0])
>>> [i.n_learned for i in store.list()]   # keep_last=2: the first one was pruned
[200, 300]
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tensorstream.checkpoint.manifest import (
    ID_RE,
    MANIFEST,
    PROMOTED,
    STATE,
    CheckpointError,
    build_manifest,
    decode_metrics,
    decode_offsets,
    file_digest,
    parse_manifest,
)

log = logging.getLogger(__name__)

_TMP = ".tmp-"  # a local save in progress (or one that crashed)
_DEL = ".del-"  # a local delete in progress (renamed away first, so it is never half-visible)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint reflects (read from its manifest)."""

    id: str
    created_at: datetime
    #: next offset to read per (topic, partition): replay starts here on resume
    offsets: dict[tuple[str, int], int]
    #: records learned by the lineage up to this checkpoint
    n_learned: int
    backend: str
    spec_hash: str
    metrics: dict[str, float]
    parent: str | None
    extra: dict[str, Any]
    #: the checkpoint directory (fsspec URL)
    url: str
    #: file name -> {"sha256": hex, "size": bytes}, as recorded in the manifest
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the version it was promoted as (``promoted.json``), or None
    promoted: str | None = None

    @property
    def state_url(self) -> str:
        """The state file (also readable with :func:`tensorstream.checkpoint.load_state`)."""
        return f"{self.url}/{STATE}"

    @property
    def size(self) -> int:
        return sum(d["size"] for d in self.files.values())


class CheckpointStore:
    """Versioned checkpoints under one root URL, one writer (one lineage) per root.

    ``keep_last``: after each save, keep the newest N good checkpoints plus every
    promoted one and delete the rest (None: never delete good ones).
    ``stale_after_s``: unfinished saves and damaged checkpoints older than this are
    deleted by :meth:`prune` (younger ones may be a save still in flight).
    """

    def __init__(self, url: str | os.PathLike[str], keep_last: int | None = 5, *, stale_after_s: float = 900.0) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1 (or None to keep every checkpoint)")
        url = os.fspath(url)
        self.url = url
        self.keep_last = keep_last
        self.stale_after_s = stale_after_s
        self.fs, path = fsspec.core.url_to_fs(url)
        self.root = path.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, keep_last={self.keep_last})"

    # -- writing ------------------------------------------------------------
    def save(
        self,
        state: Mapping[str, np.ndarray],
        *,
        offsets: Mapping[tuple[str, int], int],
        n_learned: int,
        backend: str,
        spec_hash: str,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        parent: str | None = None,
    ) -> CheckpointInfo:
        """Write a new checkpoint; when this returns it is durable (fsynced).

        ``offsets`` maps (topic, partition) to the next offset to read, i.e. the
        records the state has learned end just before it. Bad arguments raise
        ValueError/TypeError before anything is written.
        """
        arrays = _as_arrays(state)
        with self._lock:
            cid = self._next_id(self._names())
            created = datetime.now(timezone.utc)
            try:
                blob = st_save(arrays, metadata={
                    "tensorstream.checkpoint": cid, "backend": str(backend),
                    "spec_hash": str(spec_hash), "n_learned": str(n_learned),
                })
            except Exception as e:  # safetensors raises its own error type
                raise ValueError(f"state cannot be stored as safetensors: {e}") from None
            manifest = build_manifest(
                cid, created.isoformat(), offsets=offsets, n_learned=n_learned, backend=backend,
                spec_hash=spec_hash, metrics=metrics, parent=parent, extra=extra,
                files={STATE: file_digest(blob)})
            files = [(STATE, blob), (MANIFEST, manifest)]  # the manifest last
            if self._local:
                self._write_local(cid, files)
            else:
                self._write_remote(cid, files)
            info = self._info(cid, parse_manifest(manifest, cid), None)
        if self.keep_last is not None:
            try:
                self.prune()
            except Exception:  # the checkpoint is durable; retention can catch up next time
                log.exception("pruning %s after saving %s failed", self.url, cid)
        return info

    def _write_local(self, cid: str, files: list[tuple[str, bytes]]) -> None:
        _makedirs_durable(self.root)
        tmp = os.path.join(self.root, _TMP + cid)
        os.mkdir(tmp)
        try:
            for name, data in files:
                with open(os.path.join(tmp, name), "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, os.path.join(self.root, cid))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)  # the rename itself survives a power cut

    def _write_remote(self, cid: str, files: list[tuple[str, bytes]]) -> None:
        d = self._path(cid)
        self.fs.makedirs(d, exist_ok=True)
        for name, data in files:  # one PUT each; the manifest PUT makes it exist
            self.fs.pipe_file(posixpath.join(d, name), data)

    def mark_promoted(self, checkpoint_id: str, version: str) -> CheckpointInfo:
        """Record that a checkpoint was released as ``version``; retention keeps it.

        The flag lives in its own ``promoted.json`` (not in the hashed manifest).
        The checkpoint is verified first: a damaged one is never promoted.
        """
        if not isinstance(version, str) or not version:
            raise ValueError("version must be a non-empty string")
        with self._lock:
            _, info = self.load(checkpoint_id)
            data = json.dumps({"version": version, "promoted_at": datetime.now(timezone.utc).isoformat()}).encode()
            if self._local:
                d = self._path(checkpoint_id)
                tmp = os.path.join(d, f".{PROMOTED}.tmp-{secrets.token_hex(4)}")
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(d, PROMOTED))
                _fsync_dir(d)
            else:
                self.fs.pipe_file(self._path(checkpoint_id, PROMOTED), data)
        return replace(info, promoted=version)

    # -- reading ------------------------------------------------------------
    def load(self, checkpoint_id: str) -> tuple[dict[str, np.ndarray], CheckpointInfo]:
        """State and info of one checkpoint; CheckpointError if missing, torn or tampered."""
        m, promoted, blobs = self._check(checkpoint_id, full=True)
        try:
            state = st_load(blobs[STATE])  # parses named arrays; never executes anything
        except Exception as e:
            raise self._err(checkpoint_id, f"{STATE} is not a valid safetensors file ({e})") from None
        return state, self._info(checkpoint_id, m, promoted)

    def verify(self, checkpoint_id: str) -> None:
        """Raise CheckpointError unless the checkpoint loads: every file present,
        sizes and sha256 as in the manifest, the state a valid safetensors file."""
        self.load(checkpoint_id)

    def latest(self) -> tuple[dict[str, np.ndarray], CheckpointInfo] | None:
        """The newest checkpoint that loads, or None. Damaged ones are skipped with a warning."""
        names = self._names()
        for n in names:
            if n.startswith(_TMP):
                log.warning("ignoring %s in %s: an unfinished save (crashed or still running)", n, self.url)
        for cid in reversed(self._ids(names)):
            try:
                return self.load(cid)
            except CheckpointError as e:
                log.warning("skipping %s; falling back to the previous checkpoint", e)
        return None

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Good checkpoints, oldest first; damaged ones are logged and left out.

        By default "good" means: a valid manifest and every file present with its
        recorded size (cheap: one listing per checkpoint). ``verify=True`` also
        checks every sha256 (reads every file), as :meth:`load` does.
        """
        out = []
        for cid in self._ids(self._names()):
            try:
                out.append(self._good(cid, verify))
            except CheckpointError as e:
                log.warning("skipping %s", e)
        return out

    def promoted(self) -> list[CheckpointInfo]:
        """Good checkpoints that were promoted (``info.promoted`` is the version), oldest first."""
        return [i for i in self.list() if i.promoted is not None]

    # -- retention ----------------------------------------------------------
    def prune(self) -> list[str]:
        """Apply retention; returns the names removed, oldest first.

        Keeps the newest ``keep_last`` good checkpoints and every promoted one.
        Removes unfinished saves (``.tmp-*``) and damaged checkpoints once older
        than ``stale_after_s`` (a promoted damaged one is kept for inspection).
        """
        with self._lock:
            names = self._names()
            now = time.time()
            good: list[CheckpointInfo] = []
            bad: list[tuple[str, CheckpointError]] = []
            for cid in self._ids(names):
                try:
                    good.append(self._good(cid, False))
                except CheckpointError as e:
                    bad.append((cid, e))
            keep = {i.id for i in good if i.promoted is not None}
            keep |= {i.id for i in (good if self.keep_last is None else good[-self.keep_last:])}
            doomed = [i.id for i in good if i.id not in keep]
            for cid, e in bad:
                if self._is_stale(cid, now) and not self._exists(cid, PROMOTED):
                    log.warning("prune: removing damaged %s", e)
                    doomed.append(cid)
            doomed += [n for n in names if n.startswith(_TMP) and self._is_stale(n, now)]
            doomed += [n for n in names if n.startswith(_DEL)]  # an interrupted delete
            removed = []
            for name in doomed:
                self._remove(name)
                if not name.startswith(_DEL):
                    removed.append(name)
            return removed

    def _remove(self, name: str) -> None:
        path = self._path(name)
        if self._local:
            if ID_RE.match(name):  # vanish atomically, then delete at leisure
                gone = self._path(_DEL + name)
                os.rename(path, gone)
                path = gone
            shutil.rmtree(path, ignore_errors=True)
        else:
            if ID_RE.match(name):  # without its manifest it no longer exists
                try:
                    self.fs.rm_file(posixpath.join(path, MANIFEST))
                except FileNotFoundError:
                    pass
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

    def _is_stale(self, name: str, now: float) -> bool:
        # The newest modification time of the directory or anything in it: an
        # unknown time (some object stores) never counts as stale.
        path = self._path(name)
        times: list[float] = []
        try:
            if self._local:
                times.append(os.stat(path).st_mtime)
                times += [e.stat().st_mtime for e in os.scandir(path)]
            else:
                for f in self.fs.find(path):
                    try:
                        times.append(self.fs.modified(f).timestamp())
                    except (NotImplementedError, OSError, AttributeError):
                        pass
        except OSError:
            return False
        return bool(times) and now - max(times) >= self.stale_after_s

    # -- internals ----------------------------------------------------------
    def _path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def _err(self, cid: str, reason: Any) -> CheckpointError:
        return CheckpointError(f"checkpoint {cid} in {self.url}: {reason}")

    def _names(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            entries = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [posixpath.basename(str(e).rstrip("/")) for e in entries]

    @staticmethod
    def _ids(names: list[str]) -> list[str]:
        ids = [n for n in names if ID_RE.match(n)]
        return sorted(ids, key=lambda n: (int(n[:-7]), n[-6:]))  # numeric: stays right past 10**8

    @staticmethod
    def _next_id(names: list[str]) -> str:
        seqs = [0]
        for n in names:
            m = ID_RE.match(n[len(_TMP):] if n.startswith(_TMP) else n)
            if m:
                seqs.append(int(m.group(1)))
        return f"{max(seqs) + 1:08d}-{secrets.token_hex(3)}"

    def _exists(self, cid: str, name: str) -> bool:
        try:
            return self.fs.exists(self._path(cid, name))
        except OSError:
            return False

    def _listing(self, cid: str) -> dict[str, int]:
        try:
            self.fs.invalidate_cache(self._path(cid))  # another process may have written since
            entries = self.fs.ls(self._path(cid), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            raise self._err(cid, "no such checkpoint") from None
        return {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries if e.get("type") == "file"}

    def _read(self, cid: str, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(cid, name))
        except (FileNotFoundError, IsADirectoryError):
            raise CheckpointError(f"{name} is missing") from None

    def _check(self, cid: str, full: bool) -> tuple[dict[str, Any], str | None, dict[str, bytes]]:
        if not isinstance(cid, str) or not ID_RE.match(cid):
            raise CheckpointError(f"{cid!r} is not a checkpoint id (like '00000042-3fa1c2')")
        listing = self._listing(cid)
        try:
            if MANIFEST not in listing:
                raise CheckpointError(f"no {MANIFEST} (an unfinished or torn save)")
            m = parse_manifest(self._read(cid, MANIFEST), cid)
            blobs: dict[str, bytes] = {}
            for name, d in m["files"].items():
                if name not in listing:
                    raise CheckpointError(f"{name} is missing")
                data = self._read(cid, name) if full else None
                size = len(data) if data is not None else listing[name]
                if size != d["size"]:
                    raise CheckpointError(f"{name} is {size} bytes, the manifest says {d['size']} (torn or truncated)")
                if data is not None:
                    if file_digest(data)["sha256"] != d["sha256"]:
                        raise CheckpointError(f"{name} does not match its sha256 in the manifest (corrupted or tampered)")
                    blobs[name] = data
        except CheckpointError as e:
            raise self._err(cid, e) from None
        return m, (self._promoted_version(cid) if PROMOTED in listing else None), blobs

    def _good(self, cid: str, full: bool) -> CheckpointInfo:
        m, promoted, _ = self._check(cid, full)
        return self._info(cid, m, promoted)

    def _promoted_version(self, cid: str) -> str:
        try:
            v = json.loads(self._read(cid, PROMOTED))["version"]
            if isinstance(v, str):
                return v
        except (CheckpointError, ValueError, KeyError, TypeError):
            pass
        log.warning("checkpoint %s in %s: unreadable %s; still treated as promoted", cid, self.url, PROMOTED)
        return "?"

    def _info(self, cid: str, m: dict[str, Any], promoted: str | None) -> CheckpointInfo:
        try:
            created = datetime.fromisoformat(m["created_at"])
        except ValueError:
            raise self._err(cid, f"manifest created_at {m['created_at']!r} is not an ISO time") from None
        return CheckpointInfo(
            id=cid, created_at=created, offsets=decode_offsets(m["offsets"]), n_learned=m["n_learned"],
            backend=m["backend"], spec_hash=m["spec_hash"], metrics=decode_metrics(m["metrics"]),
            parent=m["parent"], extra=m["extra"], url=self.fs.unstrip_protocol(self._path(cid)),
            files=m["files"], promoted=promoted)


def _as_arrays(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of name -> numpy array, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"state keys must be strings, got {k!r}")
        if not isinstance(v, np.ndarray):
            raise TypeError(f"state[{k!r}] must be a numpy array, got {type(v).__name__}")
        # not np.ascontiguousarray unconditionally: it turns 0-d arrays into 1-d
        out[k] = v if v.flags.c_contiguous else np.ascontiguousarray(v)
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """mkdir -p, fsyncing the parent of each directory created (new entries survive a power cut)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        _fsync_dir(os.path.dirname(d))
