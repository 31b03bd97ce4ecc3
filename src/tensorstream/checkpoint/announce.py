"""Model version announcements: what a trainer or an operator publishes on ``<pipeline>.models``.

An announcement names a state file (an fsspec URL) and its sha256, with metrics and
the action (publish, promote, rollback); it is signed with HMAC-SHA256 over its
canonical JSON. ``fetch_verified`` returns a file's bytes only when their sha256
matches. Reading and writing the topic: ``checkpoint/versions.py``.

>>> key = resolve_key(b"0123456789abcdef0123")
>>> fields = {"a": 1}
>>> verify_fields(fields | {"signature": sign_fields(fields, key)}, key)
True
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, FiniteFloat, SecretStr


log = logging.getLogger(__name__)

ENV_KEY = "TENSORSTREAM_MODELS_HMAC_KEY"
SIGNATURE_PREFIX = "hmac-sha256:"
#: HMAC keys shorter than this are refused: a guessable key signs anything.
MIN_KEY_BYTES = 16
#: Reasons an announcement (or a downloaded file) is rejected, as counted in ``rejected``.
REJECT_REASONS = ("malformed", "bad_signature", "wrong_pipeline", "replayed", "hash_mismatch")

_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
_SHA256_HEX = r"^[0-9a-f]{64}$"

Key = str | bytes | SecretStr | None


class ModelVersionError(RuntimeError):
    """A models-topic operation that cannot be done (unknown version, nothing to roll back to...)."""


class SigningKeyError(ModelVersionError):
    """No usable HMAC key: announcements can be neither published nor accepted."""


class ModelIntegrityError(ModelVersionError):
    """A downloaded state file does not have the sha256 its announcement signed."""


# -- keys and signatures ------------------------------------------------------
def resolve_key(key: Key = None, *, allow_unsigned: bool = False) -> bytes | None:
    """The HMAC key: ``key`` if given, else ``$TENSORSTREAM_MODELS_HMAC_KEY``, else the
    contents of the file named by ``$TENSORSTREAM_MODELS_HMAC_KEY_FILE``.

    No key -> ``SigningKeyError``, unless ``allow_unsigned`` (local experiments
    only), which returns None: nothing is signed and nothing is verified.
    """
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    source = "the key argument"
    if key is None or key == "" or key == b"":
        key, source = os.environ.get(ENV_KEY) or None, f"${ENV_KEY}"
    if key is None and os.environ.get(ENV_KEY + "_FILE"):
        path = os.environ[ENV_KEY + "_FILE"]
        source = f"${ENV_KEY}_FILE ({path})"
        try:
            with open(path, "rb") as f:
                key = f.read().strip() or None  # a trailing newline is not part of the key
        except OSError as e:
            raise SigningKeyError(f"cannot read the models HMAC key from {source}: {e}") from None
    if key is None:
        if allow_unsigned:
            return None
        raise SigningKeyError(
            f"no HMAC key for model announcements: set ${ENV_KEY} (or ${ENV_KEY}_FILE, or pass key=) "
            "on every trainer and inference worker of the pipeline; unsigned announcements are "
            "neither published nor accepted (allow_unsigned=True is for local experiments only)"
        )
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise SigningKeyError(f"the models HMAC key from {source} is {len(raw)} bytes; use at least "
                              f"{MIN_KEY_BYTES} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return raw


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """The signed form: compact JSON, keys sorted at every level, UTF-8, ``signature`` left out."""
    return orjson.dumps({k: v for k, v in fields.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)


def sign_fields(fields: Mapping[str, Any], key: bytes) -> str:
    return SIGNATURE_PREFIX + hmac.new(key, canonical_bytes(fields), hashlib.sha256).hexdigest()


def verify_fields(fields: Mapping[str, Any], key: bytes) -> bool:
    """True if ``fields["signature"]`` is the HMAC of the other fields (constant-time compare)."""
    sig = fields.get("signature")
    if not isinstance(sig, str) or not sig:
        return False
    return hmac.compare_digest(sign_fields(fields, key).encode(), sig.encode())


def models_topic(pipeline: str) -> str:
    topic = f"{pipeline}.models"
    if not pipeline or not _TOPIC_CHARS.match(pipeline) or len(topic) > 249:
        raise ValueError(f"pipeline name {pipeline!r} does not make a legal topic name "
                         "(letters, digits, '.', '_', '-'; at most 242 characters)")
    return topic


# -- the announcement ----------------------------------------------------------
class ModelAnnouncement(BaseModel):
    """One signed record on the models topic. Frozen: change means a new announcement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = Field(min_length=1)
    #: e.g. "v7" or a checkpoint id like "000042-3fa1c2"
    version: str = Field(min_length=1, max_length=256)
    #: fsspec URL of the state file (safetensors)
    url: str = Field(min_length=1)
    #: hex sha256 of the state file's bytes
    sha256: str = Field(pattern=_SHA256_HEX)
    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)
    created_at: AwareDatetime
    backend: str = ""
    spec_hash: str = ""
    action: Literal["promote", "rollback"] = "promote"
    #: "hmac-sha256:<hex>" over every other field; "" only when unsigned (dev mode)
    signature: str = ""

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def build(cls, key: bytes | None, **fields: Any) -> ModelAnnouncement:
        """Validate ``fields`` and sign them (unsigned if ``key`` is None)."""
        fields.setdefault("created_at", datetime.now(timezone.utc))
        fields["sha256"] = str(fields.get("sha256", "")).lower()
        unsigned = cls(**{**fields, "signature": ""})
        if key is None:
            return unsigned
        return unsigned.model_copy(update={"signature": sign_fields(unsigned.model_dump(mode="json"), key)})


def file_sha256(url: str) -> str:
    """Hex sha256 of the file at an fsspec URL (streamed)."""
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_verified(announcement: ModelAnnouncement) -> bytes:
    """The bytes of the announced state file, after checking their sha256.

    Load the model from *these* bytes (e.g. ``safetensors.numpy.load``), not by
    reading the URL again: the file could change between check and load.
    """
    h = hashlib.sha256()
    chunks: list[bytes] = []
    with fsspec.open(announcement.url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            chunks.append(chunk)
    actual = h.hexdigest()
    if not hmac.compare_digest(actual, announcement.sha256):
        raise ModelIntegrityError(
            f"state file {announcement.url} of {announcement.pipeline} version {announcement.version!r} "
            f"has sha256 {actual}, but its announcement says {announcement.sha256}; not loading it"
        )
    return b"".join(chunks)
