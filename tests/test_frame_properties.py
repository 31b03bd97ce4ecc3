"""Property tests for tensor frames: identity round trips, and hostile bytes only
ever raise DecodeError."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from tensorstream.codecs import DecodeError, decode_frame, decode_frames, encode_frame

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every supported dtype, in both byte orders where that means anything.
DTYPES = (
    npst.boolean_dtypes()
    | npst.integer_dtypes(endianness="?")
    | npst.unsigned_integer_dtypes(endianness="?")
    | npst.floating_dtypes(sizes=(16, 32, 64), endianness="?")
)
SHAPES = npst.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
ARRAYS = DTYPES.flatmap(lambda dtype: npst.arrays(dtype, SHAPES))
FIELDS = st.dictionaries(st.text(max_size=20), ARRAYS, max_size=5)


def assert_same(decoded: np.ndarray, original: np.ndarray) -> None:
    wire = original.astype(original.dtype.newbyteorder("<"))
    assert decoded.dtype == wire.dtype
    assert decoded.shape == original.shape
    assert decoded.tobytes() == wire.tobytes()  # bitwise: NaN payloads and -0.0 included


def decode_or_decode_error(buf: bytes) -> None:
    """Decoding hostile bytes may succeed or raise DecodeError; nothing else."""
    try:
        out = decode_frame(buf)
    except DecodeError as e:
        assert str(e).startswith("tensor frame: ")
        return
    for arr in out.values() if isinstance(out, dict) else [out]:
        assert isinstance(arr, np.ndarray) and arr.nbytes <= len(buf)


@SETTINGS
@given(ARRAYS)
def test_single_array_identity(x):
    assert_same(decode_frame(encode_frame(x)), x)


@SETTINGS
@given(FIELDS)
def test_named_fields_identity(fields):
    out = decode_frame(encode_frame(fields))
    assert list(out) == list(fields)
    for name, x in fields.items():
        assert_same(out[name], x)


@SETTINGS
@given(DTYPES, SHAPES, st.integers(1, 5), st.data())
def test_batch_identity(dtype, shape, n, data):
    xs = [data.draw(npst.arrays(dtype, shape)) for _ in range(n)]
    assert_same(decode_frames([encode_frame(x) for x in xs]), np.stack(xs))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(buf):
    decode_or_decode_error(buf)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_after_a_valid_prefix(rest):
    # Get past the magic and version so the fuzzing reaches the field parser.
    decode_or_decode_error(b"TSF1\x01" + rest)
    decode_or_decode_error(b"TSF1\x01\x01" + rest)


def mutations(frame: bytes) -> st.SearchStrategy[bytes]:
    n = len(frame)
    index = st.integers(0, n - 1)
    truncate = st.integers(0, n - 1).map(lambda i: frame[:i])
    flip = st.tuples(index, st.integers(1, 255)).map(
        lambda t: frame[: t[0]] + bytes([frame[t[0]] ^ t[1]]) + frame[t[0] + 1 :]
    )
    overwrite = st.tuples(index, st.binary(min_size=1, max_size=8)).map(
        lambda t: frame[: t[0]] + t[1] + frame[t[0] + len(t[1]) :]
    )
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=8)).map(
        lambda t: frame[: t[0]] + t[1] + frame[t[0] :]
    )
    delete = st.tuples(index, st.integers(1, 8)).map(lambda t: frame[: t[0]] + frame[t[0] + t[1] :])
    return st.one_of(truncate, flip, overwrite, insert, delete)


@SETTINGS
@given(st.one_of(ARRAYS, FIELDS).map(encode_frame).flatmap(lambda f: st.tuples(st.just(f), mutations(f))))
def test_mutated_frames(pair):
    frame, mutated = pair
    decode_or_decode_error(mutated)
    try:
        decode_frames([frame, mutated])
    except DecodeError as e:
        assert str(e).startswith("frame 1: ")
