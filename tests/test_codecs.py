"""Codecs: tensor frames and JSON records, round trips and every malformed case."""

from __future__ import annotations

import doctest
import math
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from tensorstream.codecs import (
    DecodeError,
    EncodeError,
    decode_frame,
    decode_frames,
    decode_json,
    decode_json_batch,
    encode_frame,
    encode_json,
    get_codec,
)

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]  # fmt: skip


def sample(dtype: str, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 7 - 2).astype(dtype).reshape(shape)


def raw_frame(fields, *, named=False, magic=b"TSF1", version=1, flags=None, nfields=None, header_len=None, tail=b""):
    """Build a frame header by hand, so tests can say things the encoder never would.

    ``fields``: (name bytes, dtype code, dims, offset, nbytes); offset and nbytes
    None mean what the encoder would write. The header is padded to 8 bytes and
    followed by ``tail``.
    """
    flags = int(named) if flags is None else flags
    nfields = len(fields) if nfields is None else nfields
    end = 12 + sum(3 + len(name) + 8 * len(dims) + 16 for name, _, dims, _, _ in fields)
    padded = end + (-end % 8)
    header_len = padded if header_len is None else header_len
    out = struct.pack("<4sBBHI", magic, version, flags, nfields, header_len)
    pos = header_len
    for name, code, dims, offset, nbytes in fields:
        itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 4, 12: 8}.get(code, 1)
        nbytes = math.prod(dims) * itemsize if nbytes is None else nbytes
        offset = pos + (-pos % 8) if offset is None else offset
        pos = offset + nbytes
        out += struct.pack("<BBB", len(name), code, len(dims)) + name
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<QQ", offset, nbytes)
    return out + b"\0" * (padded - end) + tail


# A valid unnamed float32[4] frame is 40 header bytes, then 16 data bytes.
HEADER = 40


def test_raw_frame_matches_the_encoder():
    x = np.arange(4, dtype=np.float32)
    assert raw_frame([(b"", 11, (4,), HEADER, 16)], tail=x.tobytes()) == encode_frame(x)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(dtype):
    x = sample(dtype)
    y = decode_frame(encode_frame(x))
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_float_specials_survive():
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    y = decode_frame(encode_frame(x))
    assert y.tobytes() == x.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (5, 0, 2), (1,), (2, 1, 3), (1,) * 32])
def test_round_trip_shapes(shape):
    x = sample("float64", shape)
    y = decode_frame(encode_frame(x))
    assert y.shape == shape
    np.testing.assert_array_equal(y, x)


def test_numpy_scalar_and_python_values_encode_as_arrays():
    assert decode_frame(encode_frame(np.float32(2.5))).shape == ()
    np.testing.assert_array_equal(decode_frame(encode_frame([1, 2, 3])), [1, 2, 3])


def test_named_fields_round_trip_in_order():
    fields = {"image": sample("uint8", (2, 2, 3)), "label": np.array(3), "": np.zeros(0, "f4"),
              "wéight": np.float16(0.5), "mask": np.array([True, False])}  # fmt: skip
    out = decode_frame(encode_frame(fields))
    assert list(out) == list(fields)
    for name, x in fields.items():
        assert out[name].dtype == np.asarray(x).dtype
        np.testing.assert_array_equal(out[name], x)


def test_empty_mapping_round_trips():
    assert decode_frame(encode_frame({})) == {}


def test_big_endian_input_is_little_endian_on_the_wire():
    x = np.arange(5, dtype=">i4")
    frame = encode_frame(x)
    assert frame == encode_frame(x.astype("<i4"))
    y = decode_frame(frame)
    assert y.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(y, x)


def test_non_contiguous_input():
    x = sample("int16", (4, 6))
    for view in (x.T, x[::2, 1::3], x[:, ::-1]):
        np.testing.assert_array_equal(decode_frame(encode_frame(view)), view)


def test_data_offsets_are_aligned():
    frame = encode_frame({"a": np.ones(3, "u1"), "b": np.ones(3, "f8"), "c": np.ones((), "i2")})
    for arr in decode_frame(frame).values():
        assert (arr.__array_interface__["data"][0] - np.frombuffer(frame, "u1").ctypes.data) % 8 == 0
        assert arr.flags.aligned


# ------------------------------------------------------------------ zero copy


def test_decode_is_zero_copy_and_read_only_for_bytes():
    frame = encode_frame({"a": sample("float32"), "b": sample("int64", (5,))})
    whole = np.frombuffer(frame, np.uint8)
    for arr in decode_frame(frame).values():
        assert np.shares_memory(arr, whole)
        assert not arr.flags.writeable


def test_decode_of_bytearray_is_a_writable_view():
    buf = bytearray(encode_frame(np.zeros(4, np.float32)))
    arr = decode_frame(buf)
    arr[0] = 1.0
    assert decode_frame(bytes(buf))[0] == 1.0


def test_decode_memoryview_slice_of_a_larger_buffer():
    frame = encode_frame(sample("uint16"))
    big = b"junk" + frame + b"junk"
    view = memoryview(big)[4 : 4 + len(frame)]
    arr = decode_frame(view)
    np.testing.assert_array_equal(arr, sample("uint16"))
    assert np.shares_memory(arr, np.frombuffer(big, np.uint8))


# ------------------------------------------------------------------ batch decode


def test_decode_frames_stacks_a_batch():
    xs = [sample("float32") + i for i in range(5)]
    batch = decode_frames([encode_frame(x) for x in xs])
    assert batch.shape == (5, 3, 4) and batch.flags.writeable and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, np.stack(xs))


def test_decode_frames_named_and_empty_fields():
    frames = [encode_frame({"x": np.full(3, i, "i4"), "y": np.float64(i), "z": np.zeros((2, 0))}) for i in range(4)]
    batch = decode_frames(frames)
    np.testing.assert_array_equal(batch["x"], np.repeat(np.arange(4), 3).reshape(4, 3))
    np.testing.assert_array_equal(batch["y"], np.arange(4.0))
    assert batch["z"].shape == (4, 2, 0)


def test_decode_frames_accepts_memoryviews_and_one_frame():
    frame = encode_frame(np.arange(3))
    np.testing.assert_array_equal(decode_frames([memoryview(frame)]), [[0, 1, 2]])


def test_decode_frames_same_layout_with_other_offsets():
    # A writer may pad more (64-byte alignment): same layout, different header bytes.
    x, y = np.arange(4, dtype="f4"), np.arange(4, 8, dtype="f4")
    padded = raw_frame([(b"", 11, (4,), 64, 16)]) + bytes(24) + y.tobytes()
    assert len(padded) == 80
    np.testing.assert_array_equal(decode_frame(padded), y)
    np.testing.assert_array_equal(decode_frames([encode_frame(x), padded]), [x, y])


def test_decode_frames_layout_mismatch_names_the_index():
    frames = [encode_frame(np.zeros(3)) for _ in range(3)] + [encode_frame(np.zeros(4))]
    with pytest.raises(DecodeError, match=r"frame 3: layout differs from frame 0.*float64\[4\].*float64\[3\]"):
        decode_frames(frames)
    with pytest.raises(DecodeError, match=r"frame 1: layout differs.*float32\[3\].*float64\[3\]"):
        decode_frames([encode_frame(np.zeros(3)), encode_frame(np.zeros(3, "f4"))])
    with pytest.raises(DecodeError, match="frame 1: layout differs.*named fields vs unnamed array"):
        decode_frames([encode_frame(np.zeros(3)), encode_frame({"a": np.zeros(3)})])
    with pytest.raises(DecodeError, match="frame 1: layout differs"):
        decode_frames([encode_frame({"a": np.zeros(3)}), encode_frame({"b": np.zeros(3)})])


def test_decode_frames_malformed_frame_names_the_index():
    good = encode_frame(np.zeros(3))
    with pytest.raises(DecodeError, match="frame 2: tensor frame: truncated data"):
        decode_frames([good, good, good[:-1]])
    with pytest.raises(DecodeError, match="frame 0: tensor frame: bad magic"):
        decode_frames([b"XXXX" + good[4:], good])
    with pytest.raises(DecodeError, match="empty batch"):
        decode_frames([])


def test_decode_frames_validates_before_allocating():
    big = encode_frame(np.zeros(1 << 20, np.uint8))  # 1 MiB
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="frame 1"):
            decode_frames([big] + [b"TSF1"] * 1000)  # would be a 1 GiB output
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


# ------------------------------------------------------------------ malformed frames

VALID = encode_frame(np.arange(4, dtype=np.float32))
DATA = VALID[HEADER:]

MALFORMED = {
    "empty": (b"", "truncated header"),
    "short prefix": (b"TSF1\x01", "truncated header"),
    "truncated field header": (VALID[:12], r"truncated header \(12 bytes, header length 40 declared\)"),
    "truncated padding": (VALID[:37], "truncated header"),
    "truncated data": (VALID[:-1], r"truncated data: field '' needs bytes \[40, 56\) but the frame has 55"),
    "bad magic": (b"XXXX" + VALID[4:], r"bad magic b'XXXX' \(expected b'TSF1'\)"),
    "unknown version": (raw_frame([(b"", 11, (4,), None, None)], version=2, tail=DATA), "unsupported format version 2"),
    "unknown flags": (raw_frame([(b"", 11, (4,), None, None)], flags=0x80, tail=DATA), "unknown flags 0x80"),
    "header length too small": (raw_frame([(b"", 11, (4,), 40, 16)], header_len=16, tail=DATA), "field 0 runs past the declared header length 16"),
    "header length too large": (
        raw_frame([(b"", 11, (4,), 48, 16)], header_len=48, tail=bytes(8) + DATA),
        "header length 48 declared, but the field descriptors end at 39",
    ),
    "dtype code 0": (raw_frame([(b"", 0, (4,), 40, 16)], tail=DATA), "unknown dtype code 0"),
    "dtype code 13": (raw_frame([(b"", 13, (8,), 40, 16)], tail=DATA), "unknown dtype code 13"),
    "dtype code 255": (raw_frame([(b"", 255, (4,), 40, 16)], tail=DATA), "unknown dtype code 255"),
    "size mismatch": (raw_frame([(b"", 11, (5,), 40, 16)], tail=DATA), "16 data bytes declared, but shape .5,. of float32 needs 20"),
    "negative dim": (raw_frame([(b"", 11, (2**64 - 1,), 40, 16)], tail=DATA), "exceeds max_bytes"),
    "overflowing dims": (raw_frame([(b"", 11, (2**32, 2**32, 0), None, 0)], tail=DATA), "exceeds max_bytes"),
    "huge empty dim": (raw_frame([(b"", 1, (0, 2**63), None, 0)]), "exceeds max_bytes"),
    "declared beyond buffer": (raw_frame([(b"", 11, (1000,), 40, 4000)], tail=DATA), r"truncated data.*needs bytes \[40, 4040\)"),
    "declared 2 GiB": (raw_frame([(b"", 6, (2**31,), 40, 2**31)], tail=DATA), "exceeds max_bytes=1073741824"),
    "sum over max_bytes": (
        raw_frame([(b"a", 6, (2**29 + 8,), None, None), (b"b", 6, (2**29,), None, None)], named=True),
        r"declared data \(1073741832 bytes so far\) exceeds max_bytes",
    ),
    "65 fields": (raw_frame([], named=True, nfields=65), "65 fields declared, at most 64"),
    "33 dims": (raw_frame([(b"", 11, (1,) * 33, None, None)], tail=bytes(4)), "33 dims declared, at most 32"),
    "name not utf-8": (raw_frame([(b"\xff", 11, (4,), None, None)], named=True, tail=DATA), "name is not valid UTF-8"),
    "unnamed with 2 fields": (raw_frame([(b"", 11, (0,), None, None)] * 2), "exactly 1 field, 2 declared"),
    "unnamed with 0 fields": (raw_frame([]), "exactly 1 field, 0 declared"),
    "unnamed with a name": (raw_frame([(b"x", 11, (4,), None, None)], tail=DATA), "unnamed frame has a field named 'x'"),
    "duplicate names": (raw_frame([(b"a", 11, (0,), None, None)] * 2, named=True), "duplicate field name 'a'"),
    "misaligned offset": (raw_frame([(b"", 11, (4,), 44, 16)], tail=DATA + bytes(4)), "offset 44 is not a multiple of 8"),
    "offset into header": (raw_frame([(b"", 11, (4,), 32, 16)], tail=DATA), "offset 32 overlaps the header"),
    "overlapping fields": (
        raw_frame([(b"a", 11, (4,), 72, 16), (b"b", 11, (4,), 80, 16)], named=True, tail=bytes(24)),
        "field 'b': data offset 80 overlaps",
    ),
    "trailing bytes": (VALID + b"\0" * 8, "8 trailing bytes after the data"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_frame_raises_decode_error(case):
    buf, message = MALFORMED[case]
    with pytest.raises(DecodeError, match=message) as info:
        decode_frame(buf)
    assert str(info.value).startswith("tensor frame: ")


def test_max_bytes_is_configurable():
    frame = encode_frame(np.zeros(100, np.uint8))
    assert decode_frame(frame, max_bytes=100).shape == (100,)  # now cached...
    with pytest.raises(DecodeError, match="exceeds max_bytes=99"):
        decode_frame(frame, max_bytes=99)  # ...and the cache still applies the limit
    empty = raw_frame([(b"", 6, (0, 2**40), None, None)])
    assert decode_frame(empty, max_bytes=2**41).shape == (0, 2**40)
    with pytest.raises(DecodeError, match="exceeds max_bytes"):
        decode_frame(empty)


def test_cached_layout_still_checks_the_length():
    decode_frame(VALID)
    for bad in (VALID[:-8], VALID + bytes(8)):
        with pytest.raises(DecodeError):
            decode_frame(bad)


def test_layout_cache_is_bounded():
    from tensorstream.codecs import frame

    for n in range(600):
        decode_frame(encode_frame(np.zeros(n, np.uint8)))
    assert len(frame._CACHE) <= frame._CACHE_MAX_ENTRIES


def test_large_header_round_trip():
    fields = {f"{i:03d}" + "x" * 200: np.full((1,) * 8, i) for i in range(64)}  # ~16 KB header
    out = decode_frame(encode_frame(fields))
    assert list(out) == list(fields) and all(out[k][(0,) * 8] == i for i, k in enumerate(fields))
    np.testing.assert_array_equal(decode_frames([encode_frame(fields)] * 2)["063" + "x" * 200].ravel(), [63, 63])


def test_absurd_declaration_allocates_nothing():
    lie = raw_frame([(b"", 12, (2**26,), 40, 2**29)], tail=DATA)  # declares 512 MiB
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            decode_frame(lie)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ------------------------------------------------------------------ encode errors


@pytest.mark.parametrize("value", [np.zeros(2, complex), np.array(["a"]), np.array([object()]), np.zeros(2, "M8[s]")])
def test_unsupported_dtype_raises_encode_error(value):
    with pytest.raises(EncodeError, match="unsupported dtype"):
        encode_frame(value)


def test_encode_limits():
    with pytest.raises(EncodeError, match="65 fields, at most 64"):
        encode_frame({str(i): np.zeros(1) for i in range(65)})
    assert len(decode_frame(encode_frame({str(i): np.zeros(1) for i in range(64)}))) == 64
    with pytest.raises(EncodeError, match="33 dims, at most 32"):
        encode_frame(np.zeros((1,) * 33))
    with pytest.raises(EncodeError, match="256 bytes, at most 255"):
        encode_frame({"n" * 256: np.zeros(1)})
    assert list(decode_frame(encode_frame({"é" * 127: np.zeros(1)}))) == ["é" * 127]
    with pytest.raises(EncodeError, match="names must be str"):
        encode_frame({1: np.zeros(1)})


# ------------------------------------------------------------------ JSON


def test_json_round_trip_with_numpy_values():
    record = {"f": np.array([1.5, 2.5], "f4"), "i": np.int64(7), "b": np.bool_(True), "h": np.float16(0.5),
              "m": np.arange(6).reshape(2, 3), "s": "ü", "n": None}  # fmt: skip
    assert decode_json(encode_json(record)) == {"f": [1.5, 2.5], "i": 7, "b": True, "h": 0.5,
                                                "m": [[0, 1, 2], [3, 4, 5]], "s": "ü", "n": None}  # fmt: skip


def test_json_encodes_awkward_arrays():
    x = np.arange(10)
    assert decode_json(encode_json({"a": x[::3]})) == {"a": [0, 3, 6, 9]}
    assert decode_json(encode_json({"a": x.astype(">f8")[:2]})) == {"a": [0.0, 1.0]}


def test_json_unencodable_raises_encode_error():
    with pytest.raises(EncodeError, match="json record: cannot encode"):
        encode_json({"a": object()})
    with pytest.raises(EncodeError):
        encode_json({1: 2})  # orjson wants str keys


def test_decode_json_accepts_bytes_like_and_str():
    for data in (b'{"a":1}', bytearray(b'{"a":1}'), memoryview(b'{"a":1}'), '{"a":1}'):
        assert decode_json(data) == {"a": 1}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "invalid JSON: "),
        (b'{"a":', "invalid JSON: "),
        (b'{"a": NaN}', "invalid JSON: "),
        (b"\xff\xfe", "invalid JSON: "),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"x"', "expected a JSON object, got str"),
        (b"3", "expected a JSON object, got int"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
)
def test_decode_json_malformed(data, message):
    with pytest.raises(DecodeError, match=message) as info:
        decode_json(data)
    assert str(info.value).startswith("json record: ")


def test_decode_json_includes_orjson_message():
    with pytest.raises(DecodeError, match=r"line 1 column \d+ \(char \d+\)"):
        decode_json(b'{"a": }')


def test_decode_json_batch():
    assert decode_json_batch([]) == []
    assert decode_json_batch([b'{"a":1}', b'{"b":[2]}']) == [{"a": 1}, {"b": [2]}]
    with pytest.raises(DecodeError, match="json record 2: invalid JSON"):
        decode_json_batch([b"{}", b"{}", b"{", b"]"])
    with pytest.raises(DecodeError, match="json record 1: expected a JSON object, got list"):
        decode_json_batch([b"{}", b"[]"])


# ------------------------------------------------------------------ registry


def test_registry():
    frame, json = get_codec("frame"), get_codec("json")
    assert (frame.name, json.name) == ("frame", "json")
    x = sample("int32")
    np.testing.assert_array_equal(frame.decode(frame.encode(x)), x)
    np.testing.assert_array_equal(frame.decode_batch([frame.encode(x)] * 2), [x, x])
    assert json.decode(json.encode({"a": 1})) == {"a": 1}
    assert json.decode_batch([b'{"a":1}']) == [{"a": 1}]
    with pytest.raises(ValueError, match="unknown codec 'xml'; known codecs: 'avro', 'avro-registry', 'frame', 'json'"):
        get_codec("xml")


@pytest.mark.parametrize("module", ["__init__", "errors", "frame", "jsonc"])
def test_docstring_examples_run(module):
    import importlib

    name = "tensorstream.codecs" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_no_framework_imports():
    # A fresh interpreter: other test files may have imported the frameworks.
    code = "import sys, tensorstream.codecs; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
