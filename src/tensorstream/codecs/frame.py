"""Tensor frames: numpy arrays on the wire, decoded without copying.

A frame is a small header followed by the raw little-endian bytes of one or
more arrays; ``docs/tensor-frame-format.md`` has the byte layout. Decoding
returns *views* of the input buffer (``np.frombuffer``), so it costs the same
whatever the array size. Views of ``bytes`` are read-only; views of a
``bytearray`` are writable and share its memory.

>>> import numpy as np
>>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> frame = encode_frame(x)
>>> decode_frame(frame)
array([[0., 1., 2.],
       [3., 4., 5.]], dtype=float32)
>>> fields = decode_frame(encode_frame({"ids": np.array([7, 8]), "ok": np.array(True)}))
>>> fields["ids"], fields["ok"]
(array([7, 8]), array(True))
>>> decode_frames([encode_frame(np.array([1, 2])), encode_frame(np.array([3, 4]))])
array([[1, 2],
       [3, 4]])

No library does this exact thing (.npy holds one array behind a text header,
safetensors has a JSON header sized for files, Arrow IPC needs a schema message
per stream), so the header is packed by hand with ``struct``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .errors import DecodeError, EncodeError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DIMS",
    "MAX_FIELDS",
    "MAX_NAME_BYTES",
    "decode_frame",
    "decode_frames",
    "encode_frame",
]

MAGIC = b"TSF1"
FORMAT_VERSION = 1
ALIGN = 8  # every data offset is a multiple of 8: numpy-aligned for any supported dtype
MAX_FIELDS = 64
MAX_DIMS = 32
MAX_NAME_BYTES = 255  # the length is one byte on the wire
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of declared array data per frame

_FLAG_NAMED = 0x01  # fields decode to a dict; without it, one unnamed array

# Wire codes are part of the format: never renumber, only append.
# (13 is reserved for bfloat16, left out while numpy has no native bfloat16.)
_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in {
        1: "|b1",
        2: "|i1",
        3: "<i2",
        4: "<i4",
        5: "<i8",
        6: "|u1",
        7: "<u2",
        8: "<u4",
        9: "<u8",
        10: "<f2",
        11: "<f4",
        12: "<f8",
    }.items()
}
_CODES: dict[np.dtype, int] = {dtype: code for code, dtype in _DTYPES.items()}

_PREFIX = struct.Struct("<4sBBHI")  # magic, version, flags, field count, header length
_FIELD = struct.Struct("<BBB")  # name length, dtype code, ndim; then name, dims
_SPAN = struct.Struct("<QQ")  # data offset from frame start, data length in bytes
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]


class _Layout(NamedTuple):
    named: bool
    # per field: (name, dtype, shape, data offset, data bytes, element count)
    fields: tuple[tuple[str, np.dtype, tuple[int, ...], int, int, int], ...]
    header_len: int  # bytes before the first data offset, padding included
    size: int  # the exact length of a valid frame
    needs: int  # the smallest max_bytes that accepts this layout


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --------------------------------------------------------------------------- encode


def encode_frame(x: np.ndarray | Mapping[str, np.ndarray]) -> bytes:
    """Encode one array, or a mapping of names to arrays, as a tensor frame.

    Big-endian and non-contiguous inputs are converted; the wire is always
    C-order little-endian. Raises :class:`EncodeError` for unsupported dtypes,
    more than 64 fields, more than 32 dims or names over 255 UTF-8 bytes.

    >>> len(encode_frame(np.zeros(4, dtype=np.float32)))  # 40 header + 16 data
    56
    """
    named = isinstance(x, Mapping)
    items = list(x.items()) if named else [("", x)]
    if len(items) > MAX_FIELDS:
        raise EncodeError(f"tensor frame: {len(items)} fields, at most {MAX_FIELDS} allowed")

    fields = []  # (name bytes, dtype code, contiguous little-endian array)
    end = _PREFIX.size
    for name, value in items:
        if not isinstance(name, str):
            raise EncodeError(f"tensor frame: field names must be str, got {type(name).__name__}")
        raw_name = name.encode("utf-8")
        if len(raw_name) > MAX_NAME_BYTES:
            raise EncodeError(f"tensor frame: field name {name[:40]!r}... is {len(raw_name)} bytes, at most {MAX_NAME_BYTES}")
        arr = np.asarray(value)
        code = _CODES.get(arr.dtype.newbyteorder("<"))
        if code is None:
            raise EncodeError(f"tensor frame: field {name!r}: unsupported dtype {arr.dtype}")
        if arr.ndim > MAX_DIMS:
            raise EncodeError(f"tensor frame: field {name!r}: {arr.ndim} dims, at most {MAX_DIMS}")
        arr = np.asarray(arr, dtype=_DTYPES[code], order="C")  # no copy when already right
        fields.append((raw_name, code, arr))
        end += _FIELD.size + len(raw_name) + 8 * arr.ndim + _SPAN.size

    header_len = _align(end)
    header = [_PREFIX.pack(MAGIC, FORMAT_VERSION, _FLAG_NAMED if named else 0, len(fields), header_len)]
    body: list[Any] = []
    pos = header_len
    for raw_name, code, arr in fields:
        offset = _align(pos)
        header += [
            _FIELD.pack(len(raw_name), code, arr.ndim),
            raw_name,
            _DIMS[arr.ndim].pack(*arr.shape),
            _SPAN.pack(offset, arr.nbytes),
        ]
        body += [b"\0" * (offset - pos), arr]  # bytes.join reads the array buffer: one copy
        pos = offset + arr.nbytes
    header.append(b"\0" * (header_len - end))
    return b"".join(header + body)


# --------------------------------------------------------------------------- decode


def _parse(buf: Any, max_bytes: int) -> _Layout:
    """Read and validate the header; reads only ``buf[:header_len]`` and
    ``len(buf)``, touches no data and allocates nothing sized by the header."""
    size = len(buf)
    if size < _PREFIX.size:
        raise DecodeError(f"tensor frame: truncated header ({size} bytes, need at least {_PREFIX.size})")
    magic, version, flags, nfields, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise DecodeError(f"tensor frame: bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DecodeError(f"tensor frame: unsupported format version {version} (this reader knows {FORMAT_VERSION})")
    if flags & ~_FLAG_NAMED:
        raise DecodeError(f"tensor frame: unknown flags 0x{flags:02x}")
    named = bool(flags & _FLAG_NAMED)
    if nfields > MAX_FIELDS:
        raise DecodeError(f"tensor frame: {nfields} fields declared, at most {MAX_FIELDS} allowed")
    if not named and nfields != 1:
        raise DecodeError(f"tensor frame: an unnamed frame holds exactly 1 field, {nfields} declared")
    if header_len > size:
        raise DecodeError(f"tensor frame: truncated header ({size} bytes, header length {header_len} declared)")

    pos = _PREFIX.size
    data_end = header_len  # data starts after the header; fields follow in order
    needs = 0
    fields = []
    names: set[str] = set()
    for i in range(nfields):
        if pos + _FIELD.size > header_len:
            raise DecodeError(f"tensor frame: field {i} runs past the declared header length {header_len}")
        name_len, code, ndim = _FIELD.unpack_from(buf, pos)
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise DecodeError(f"tensor frame: field {i}: unknown dtype code {code}")
        if ndim > MAX_DIMS:
            raise DecodeError(f"tensor frame: field {i}: {ndim} dims declared, at most {MAX_DIMS}")
        pos += _FIELD.size
        end = pos + name_len + 8 * ndim + _SPAN.size
        if end > header_len:
            raise DecodeError(f"tensor frame: field {i} runs past the declared header length {header_len}")
        try:
            name = str(buf[pos : pos + name_len], "utf-8") if name_len else ""
        except UnicodeDecodeError:
            raise DecodeError(f"tensor frame: field {i}: name is not valid UTF-8") from None
        if not named and name:
            raise DecodeError(f"tensor frame: an unnamed frame has a field named {name!r}")
        if name in names:
            raise DecodeError(f"tensor frame: duplicate field name {name!r}")
        names.add(name)
        pos += name_len
        shape = _DIMS[ndim].unpack_from(buf, pos)
        offset, nbytes = _SPAN.unpack_from(buf, pos + 8 * ndim)
        pos = end

        # Python ints never overflow, so these products are exact. Check sizes
        # against max_bytes before anything else uses them.
        count = math.prod(shape)
        expected = count * dtype.itemsize
        if count == 0 and ndim > 1:
            # numpy refuses even an empty (0, 2**63) shape: bound the other dims too.
            expected_if_filled = math.prod(d or 1 for d in shape) * dtype.itemsize
            needs = max(needs, expected_if_filled)
        needs = max(needs, expected)
        if needs > max_bytes:
            raise DecodeError(f"tensor frame: field {name!r}: shape {shape} exceeds max_bytes={max_bytes}")
        if nbytes != expected:
            raise DecodeError(
                f"tensor frame: field {name!r}: {nbytes} data bytes declared, "
                f"but shape {shape} of {dtype.name} needs {expected}"
            )
        if offset % ALIGN:
            raise DecodeError(f"tensor frame: field {name!r}: data offset {offset} is not a multiple of {ALIGN}")
        if offset < data_end:
            raise DecodeError(f"tensor frame: field {name!r}: data offset {offset} overlaps the header or a previous field")
        data_end = offset + nbytes
        if data_end - header_len > max_bytes:
            raise DecodeError(f"tensor frame: declared data ({data_end - header_len} bytes so far) exceeds max_bytes={max_bytes}")
        fields.append((name, dtype, shape, offset, nbytes, count))

    if _align(pos) != header_len:
        raise DecodeError(f"tensor frame: header length {header_len} declared, but the field descriptors end at {pos}")
    if data_end > size:  # fields are in order, so the last one ends furthest
        name, _, _, offset, _, _ = fields[-1]
        raise DecodeError(
            f"tensor frame: truncated data: field {name!r} needs bytes [{offset}, {data_end}) but the frame has {size}"
        )
    if data_end != size:
        raise DecodeError(f"tensor frame: {size - data_end} trailing bytes after the data")
    return _Layout(named, tuple(fields), header_len, size, max(needs, data_end - header_len))


# Validated layouts by exact header bytes. A stream's frames nearly always share
# one layout, and the header plus the frame length decide every check _parse
# makes, so a hit skips the parse. Small headers only, few entries: bounded memory
# whatever the input.
_CACHE: dict[bytes, _Layout] = {}
_CACHE_MAX_HEADER = 1024
_CACHE_MAX_ENTRIES = 256
_HEADER_LEN = struct.Struct("<I")


def _layout(buf: Any, max_bytes: int) -> _Layout:
    """The validated layout of ``buf``, from the cache when possible."""
    size = len(buf)
    if size >= _PREFIX.size:
        (header_len,) = _HEADER_LEN.unpack_from(buf, 8)
        if header_len <= size and header_len <= _CACHE_MAX_HEADER:
            header = bytes(buf[:header_len])
            layout = _CACHE.get(header)
            if layout is not None and layout.size == size and layout.needs <= max_bytes:
                return layout
            layout = _parse(buf, max_bytes)
            if len(_CACHE) >= _CACHE_MAX_ENTRIES:
                _CACHE.clear()
            _CACHE[header] = layout
            return layout
    return _parse(buf, max_bytes)


def _as_bytes(buf: Any) -> Any:
    # bytes/bytearray index and measure in bytes; other buffers (a memoryview of
    # floats, an ndarray...) are recast so len() and slices count bytes too.
    if isinstance(buf, (bytes, bytearray)):
        return buf
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def decode_frame(
    buf: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray | dict[str, np.ndarray]:
    """Decode a tensor frame into views of ``buf`` (no copy).

    Returns an ndarray for a frame of one unnamed array, a dict for named
    fields. The arrays reference ``buf``, which keeps it alive; writes to a
    mutable ``buf`` show through. Raises :class:`DecodeError` for any
    malformed frame, or one declaring more than ``max_bytes`` of data.

    >>> a = decode_frame(encode_frame(np.arange(3, dtype=np.int16)))
    >>> a, a.flags.writeable
    (array([0, 1, 2], dtype=int16), False)
    >>> decode_frame(b"XXXX" + bytes(8))
    Traceback (most recent call last):
    ...
    tensorstream.codecs.errors.DecodeError: tensor frame: bad magic b'XXXX' (expected b'TSF1')
    """
    buf = _as_bytes(buf)
    layout = _layout(buf, max_bytes)
    if not layout.named:
        _, dtype, shape, offset, _, count = layout.fields[0]
        return np.frombuffer(buf, dtype, count, offset).reshape(shape)
    return {
        name: np.frombuffer(buf, dtype, count, offset).reshape(shape)
        for name, dtype, shape, offset, _, count in layout.fields
    }


def decode_frames(
    bufs: Sequence[bytes | bytearray | memoryview], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray | dict[str, np.ndarray]:
    """Decode frames of one layout into stacked arrays, batch dimension first.

    Each output array is allocated once and each frame's data copied into it
    once. Raises :class:`DecodeError` naming the first frame that is malformed
    or whose layout (names, dtypes, shapes) differs from frame 0;
    ``max_bytes`` applies to each frame.

    >>> batch = decode_frames([encode_frame({"x": np.full(2, i)}) for i in range(3)])
    >>> batch["x"]
    array([[0, 0],
           [1, 1],
           [2, 2]])
    """
    if not bufs:
        raise DecodeError("tensor frames: empty batch, no layout to decode")
    bufs = [_as_bytes(b) for b in bufs]
    try:
        layout = _layout(bufs[0], max_bytes)
    except DecodeError as e:
        raise DecodeError(f"frame 0: {e}") from None
    size, header_len = layout.size, layout.header_len
    header = bytes(bufs[0][:header_len])

    # Validate every frame before allocating the output, so a batch of short or
    # corrupt frames never makes us allocate len(bufs) times frame 0's size.
    # Byte-identical header + same length is the same layout, with no parse.
    offsets: list[Sequence[int]] = []
    same = [f[3] for f in layout.fields]
    for i, b in enumerate(bufs):
        if len(b) == size and b[:header_len] == header:
            offsets.append(same)
            continue
        try:
            other = _layout(b, max_bytes)
        except DecodeError as e:
            raise DecodeError(f"frame {i}: {e}") from None
        _check_same_layout(i, layout, other)
        offsets.append([f[3] for f in other.fields])  # same layout, other padding

    views = [memoryview(b) for b in bufs]  # slicing a memoryview copies nothing
    out = {}
    for k, (name, dtype, shape, _, nbytes, _) in enumerate(layout.fields):
        arr = out[name] = np.empty((len(bufs), *shape), dtype=dtype)
        dst = memoryview(arr.reshape(-1).view(np.uint8))
        pos = 0
        for src, offs in zip(views, offsets):
            start = offs[k]
            dst[pos : pos + nbytes] = src[start : start + nbytes]  # the one copy
            pos += nbytes
    return out if layout.named else out[""]


def _check_same_layout(i: int, expected: _Layout, got: _Layout) -> None:
    if got.named != expected.named:
        kinds = ("unnamed array", "named fields")
        raise DecodeError(f"frame {i}: layout differs from frame 0: {kinds[got.named]} vs {kinds[expected.named]}")
    want = [f[:3] for f in expected.fields]  # name, dtype, shape
    have = [f[:3] for f in got.fields]
    if have != want:

        def show(fields: list) -> str:
            return ", ".join(f"{n!r}: {d.name}{list(s)}" for n, d, s in fields)

        raise DecodeError(f"frame {i}: layout differs from frame 0: {{{show(have)}}} vs {{{show(want)}}}")
