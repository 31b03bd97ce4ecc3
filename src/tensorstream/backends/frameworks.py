"""Importing the frameworks quietly: one place for every module that imports TensorFlow.

TensorFlow's C++ side (absl) writes its start-up lines straight to file
descriptor 2 while ``import tensorflow`` runs, before ``TF_CPP_MIN_LOG_LEVEL``
is read: the oneDNN notice (twice: two shared libraries load it) and the CPU
feature guard. They are not Python logging, so no handler can catch them, and
they break ``--log-format json`` (every stderr line a JSON object). Every
module that imports TensorFlow or Keras does it inside
:func:`quiet_framework_import`, which points descriptor 2 at a temporary file
for the duration of that first import only:

- if the import fails, what was captured is written out after all (a broken
  installation must not fail silently);
- with ``TENSORSTREAM_FRAMEWORK_LOGS=1`` (what ``tensorstream -v`` sets, so
  child processes inherit it) nothing is redirected and TensorFlow's own
  ``TF_CPP_MIN_LOG_LEVEL`` default is left alone;
- an import that already happened (``tensorflow`` in ``sys.modules``) costs
  nothing and redirects nothing.

>>> with quiet_framework_import():
...     import json  # any import: only the first TensorFlow import prints anything
>>> framework_logs({"TENSORSTREAM_FRAMEWORK_LOGS": "1"}), framework_logs({})
(True, False)
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

#: set to 1 to see the frameworks' start-up logs (``tensorstream -v`` sets it)
FRAMEWORK_LOGS_ENV = "TENSORSTREAM_FRAMEWORK_LOGS"

_lock = threading.Lock()
_depth = 0


def framework_logs(env: Mapping[str, str] | None = None) -> bool:
    """Whether the frameworks' own start-up logs are wanted."""
    value = (os.environ if env is None else env).get(FRAMEWORK_LOGS_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def quiet_framework_import() -> Iterator[None]:
    """Run the imports in the ``with`` block with file descriptor 2 captured (see the module doc).

    Also sets ``KERAS_BACKEND=tensorflow`` and ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's
    later C++ INFO/WARNING lines), each only when the user chose nothing.
    """
    global _depth
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if framework_logs():
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _lock:
        nested = _depth > 0 or "tensorflow" in sys.modules
        _depth += 1
    try:
        if nested:
            yield
            return
        with _fd2_captured():
            yield
    finally:
        with _lock:
            _depth -= 1


@contextmanager
def _fd2_captured() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 at all: nothing to protect
        yield
        return
    _flush_stderr()
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:  # the import failed: whatever it said may be the reason
                capture.seek(0)
                text = capture.read()
                if text:
                    os.write(2, text)


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
