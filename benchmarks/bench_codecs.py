"""Codec throughput: tensor-frame decode and JSON decode, each against a baseline.

Run: ``python benchmarks/bench_codecs.py`` (from the repository root, with the
package installed or ``PYTHONPATH=src``).

Tensor frames are measured against a bare ``np.frombuffer(...).reshape(...)`` of
the same buffer: the floor for a zero-copy decode, with no header to validate.
Zero-copy decoding touches no data, so its GB/s is bytes *made available* per
second, not bytes moved. JSON records are measured against the stdlib
``json.loads``. Every figure is the median of several timed repeats.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from tensorstream.codecs import decode_frame, decode_frames, decode_json, decode_json_batch, encode_frame

REPEATS = 15


def calls_for(fn: Callable[[], object], min_time: float = 0.02) -> int:
    """How many calls make one timed run last at least ``min_time`` seconds,
    so the clock's resolution does not matter."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= min_time:
            return calls
        calls *= 2


def compare(ours: Callable[[], object], base: Callable[[], object]) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and ``base``. Their runs alternate, so
    a busy machine slows both alike and the ratio stays fair."""
    plan = [(ours, calls_for(ours), []), (base, calls_for(base), [])]
    for _ in range(REPEATS):
        for fn, calls, runs in plan:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter() - start) / calls)
    return statistics.median(plan[0][2]), statistics.median(plan[1][2])


def frame_rows() -> list[tuple[str, str, float, float]]:
    rows = []
    for shape in [(256,), (224, 224, 3)]:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        frame = encode_frame(x)
        offset = len(frame) - x.nbytes  # the header length, for the baseline
        ours, base = compare(
            lambda: decode_frame(frame),
            lambda: np.frombuffer(frame, np.float32, x.size, offset).reshape(shape),
        )
        rows.append((f"decode_frame float32{list(shape)}", "np.frombuffer", len(frame) / ours, len(frame) / base))

    # Batch: 1024 small frames into one stacked (1024, 256) array (one copy each).
    x = np.random.default_rng(0).random((1024, 256), dtype=np.float32)
    frames = [encode_frame(row) for row in x]
    total = sum(map(len, frames))
    offset = len(frames[0]) - x[0].nbytes
    assert np.array_equal(decode_frames(frames), x)
    ours, views = compare(
        lambda: decode_frames(frames),
        lambda: [np.frombuffer(f, np.float32, 256, offset) for f in frames],
    )
    rows.append(("decode_frames 1024 x float32[256]", "np.frombuffer each (views)", total / ours, total / views))
    ours, stack = compare(
        lambda: decode_frames(frames),
        lambda: np.stack([np.frombuffer(f, np.float32, 256, offset) for f in frames]),
    )
    rows.append(("decode_frames 1024 x float32[256]", "np.stack(np.frombuffer each)", total / ours, total / stack))
    return rows


RECORD = {
    "user_id": 918273645,
    "event": "purchase",
    "ts": 1767225600.123,
    "amount": 42.17,
    "currency": "EUR",
    "country": "DE",
    "device": {"os": "ios", "version": "18.2"},
    "items": [3, 17, 256],
    "features": [0.12, -1.5, 3.25, 0.0, 7.75, -0.5, 1.0, 2.5],
    "label": True,
}


def json_rows() -> list[tuple[str, str, float, float]]:
    data = json.dumps(RECORD).encode()
    batch = [data] * 1024
    assert decode_json(data) == json.loads(data)
    ours, base = compare(lambda: decode_json(data), lambda: json.loads(data))
    ours_batch, base_batch = compare(lambda: decode_json_batch(batch), lambda: [json.loads(d) for d in batch])
    n = len(batch)
    return [
        (f"decode_json, 10-field record ({len(data)} B)", "json.loads", 1 / ours, 1 / base),
        (f"decode_json_batch, {n} records", "[json.loads(d) for d in ...]", n / ours_batch, n / base_batch),
    ]


def main() -> None:
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}; median of {REPEATS} repeats\n")
    header = f"{'case':<42} {'baseline':<30} {'ours':>12} {'baseline':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for case, baseline, ours, base in frame_rows():
        print(f"{case:<42} {baseline:<30} {ours / 1e9:>7.2f} GB/s {base / 1e9:>7.2f} GB/s {ours / base:>6.2f}x")
    for case, baseline, ours, base in json_rows():
        print(f"{case:<42} {baseline:<30} {ours / 1e6:>5.2f} Mrec/s {base / 1e6:>5.2f} Mrec/s {ours / base:>6.2f}x")
    print("\nratio = ours / baseline throughput (>1: faster than the baseline).")


if __name__ == "__main__":
    main()
