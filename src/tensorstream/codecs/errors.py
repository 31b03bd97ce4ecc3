"""The two error types of the codecs package.

Both subclass ``ValueError`` so callers that only know "bad value" still catch
them. Every malformed input to a decoder raises :class:`DecodeError` and
nothing else, which lets the pipeline route the record to the dead-letter topic
with ``str(error)`` as the reason.
"""

from __future__ import annotations

__all__ = ["DecodeError", "EncodeError"]


class DecodeError(ValueError):
    """Bytes that cannot be decoded; the message says what is wrong.

    >>> str(DecodeError("tensor frame: bad magic b'XXXX' (expected b'TSF1')"))
    "tensor frame: bad magic b'XXXX' (expected b'TSF1')"
    """


class EncodeError(ValueError):
    """A value that this codec cannot encode (unsupported dtype, too many fields...)."""
