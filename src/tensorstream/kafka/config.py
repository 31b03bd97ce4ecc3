"""Typed Kafka connection settings mapped onto librdkafka's names.

Fields cover what most deployments set; anything else passes through verbatim in
``extra`` (librdkafka names, e.g. ``{"socket.keepalive.enable": "true"}``).
Secrets are ``SecretStr``: masked in ``repr``, logs and ``masked()``.

>>> cfg = KafkaConfig(bootstrap_servers="b1:9092", sasl_username="u", sasl_password="p",
...                   security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512")
>>> cfg.to_librdkafka()["sasl.mechanism"]
'SCRAM-SHA-512'
>>> cfg.masked()["sasl.password"]
'**********'
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer

ENV_PREFIX = "TENSORSTREAM_"

# librdkafka names of settings whose values are secrets, masked wherever shown.
SECRET_KEYS = frozenset({
    "sasl.password", "ssl.key.password", "ssl.key.pem", "ssl.keystore.password",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config",
})


#: librdkafka property (prefixes) that only consumers know
_CONSUMER_ONLY = ("fetch.", "group.", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms",
                  "auto.offset.reset", "enable.auto.", "auto.commit.", "enable.partition.eof", "isolation.level",
                  "queued.m", "partition.assignment.strategy", "check.crcs")


class KafkaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field(min_length=1)
    client_id: str = "tensorstream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    #: group membership timeouts; None = librdkafka's defaults (45 s / 3 s)
    session_timeout_ms: int | None = Field(default=None, ge=1000)
    heartbeat_interval_ms: int | None = Field(default=None, ge=100)
    max_poll_interval_ms: int | None = Field(default=None, ge=1000)
    #: idempotent producer (no duplicates from retries). The embedded broker
    #: forgets producer ids when it restarts, which leaves an idempotent
    #: producer's in-flight records stuck: ``local()`` turns it off.
    idempotence: bool = True
    #: anything else, by librdkafka name (passed through verbatim)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_serializer("extra")
    def _mask_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        # model_dump()/model_dump_json() must not reveal pass-through secrets either.
        return {k: ("**********" if k in SECRET_KEYS else v) for k, v in extra.items()}

    def to_librdkafka(self) -> dict[str, Any]:
        """The settings as a confluent-kafka config dict (secrets revealed)."""
        out: dict[str, Any] = {}
        for name, value in self:
            if name in ("extra", "idempotence") or value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[name.replace("_", ".")] = value
        out.update(self.extra)
        return out

    def consumer_settings(self) -> dict[str, Any]:
        """Only the settings a consumer accepts (group timeouts included)."""
        return self.to_librdkafka()

    def client_settings(self) -> dict[str, Any]:
        """Settings valid for producers and admin clients: no consumer-only keys (``extra`` is shared
        by every client; a consumer property would only earn a librdkafka warning elsewhere)."""
        return {k: v for k, v in self.to_librdkafka().items() if not k.startswith(_CONSUMER_ONLY)}

    def masked(self) -> dict[str, Any]:
        """The settings with every secret replaced by asterisks (for display and logs)."""
        return {k: ("**********" if k in SECRET_KEYS else v) for k, v in self.to_librdkafka().items()}

    def __repr__(self) -> str:
        return f"KafkaConfig({self.masked()!r})"

    __str__ = __repr__

    @classmethod
    def local(cls, bootstrap_servers: str, **kw: Any) -> KafkaConfig:
        """Settings for a broker on this machine (the embedded one).

        Group joins on Tansu wait for the session timeout, so a short one makes
        a join take ~3 s instead of ~45 s.
        """
        kw.setdefault("session_timeout_ms", 6000)
        kw.setdefault("heartbeat_interval_ms", 500)
        kw.setdefault("idempotence", False)
        return cls(bootstrap_servers=bootstrap_servers, **kw)

    @classmethod
    def from_env(cls, bootstrap_servers: str | None = None, **kw: Any) -> KafkaConfig | None:
        """Build from ``TENSORSTREAM_*`` environment variables; None if no servers are set.

        ``TENSORSTREAM_BOOTSTRAP_SERVERS``, ``TENSORSTREAM_SASL_PASSWORD``, ... map to
        the fields of the same name. A ``*_FILE`` variant reads the value from a file
        (for secrets mounted by an orchestrator).
        """
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if name == "extra":
                continue
            env = ENV_PREFIX + name.upper()
            if env in os.environ:
                values[name] = os.environ[env]
            elif env + "_FILE" in os.environ:
                with open(os.environ[env + "_FILE"]) as f:
                    values[name] = f.read().strip()
        if bootstrap_servers:
            values["bootstrap_servers"] = bootstrap_servers
        values.update(kw)
        if not values.get("bootstrap_servers"):
            return None
        return cls(**values)


def weak_callback(method: Any) -> Any:
    """``method`` as a librdkafka client callback that does not keep its owner alive.

    A client holding ``self._on_error`` and held by ``self`` is a reference cycle:
    an owner that is dropped without ``close()`` (e.g. ``KafkaAdmin(cfg).ensure_topic(t)``)
    then keeps its client, threads and sockets until the cyclic GC runs, and the
    client goes on reconnecting (and logging) in the meantime.
    """
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        m = ref()
        if m is not None:
            m(*args)

    return call
