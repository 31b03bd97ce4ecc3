"""SASL / TLS settings: the mapping onto librdkafka's names, env and *_FILE, secrets never shown.

Unit tests only: the embedded broker's own SASL does not work in the shipped
build, so SASL is not exercised against a broker here (TLS is, in test_tls.py).
librdkafka itself checks the names and values: a client is *built* (never
connected) from each mapping, and it refuses unknown or inconsistent settings.
"""

from __future__ import annotations

import json
import logging

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from typer.testing import CliRunner

from tensorstream.cli import app
from tensorstream.kafka import KafkaConfig
from tensorstream.kafka.config import SECRET_KEYS

SECRET = "s3cr3t-Pa55w0rd-do-not-print"
OAUTH_SECRET = "oauth-client-secret-do-not-print"


def _built(settings: dict) -> None:
    """librdkafka accepts these settings (a producer is built, never used)."""
    p = Producer({**settings, "bootstrap.servers": "127.0.0.1:1"})
    del p


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("TENSORSTREAM_") and k not in ("TENSORSTREAM_HOME",):
            monkeypatch.delenv(k)
    monkeypatch.setenv("TENSORSTREAM_HOME", "/nonexistent-tensorstream-home")  # no local broker state


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_maps_to_librdkafka_names(mechanism, protocol):
    cfg = KafkaConfig(bootstrap_servers="b1:9093,b2:9093", security_protocol=protocol, sasl_mechanism=mechanism,
                      sasl_username="alice", sasl_password=SECRET, ssl_ca_location="/etc/ssl/ca.pem")
    rd = cfg.to_librdkafka()
    assert rd == {
        "bootstrap.servers": "b1:9093,b2:9093", "client.id": "tensorstream", "security.protocol": protocol,
        "sasl.mechanism": mechanism, "sasl.username": "alice", "sasl.password": SECRET,
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }
    assert cfg.client_settings() == rd and cfg.consumer_settings() == rd
    _built({k: v for k, v in rd.items() if k != "ssl.ca.location"})


def test_ssl_client_certificate_maps_to_librdkafka_names():
    cfg = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SSL", ssl_ca_location="ca.pem",
                      ssl_certificate_location="client.pem", ssl_key_location="client.key",
                      ssl_key_password=SECRET)
    rd = cfg.to_librdkafka()
    assert {k: rd[k] for k in ("security.protocol", "ssl.ca.location", "ssl.certificate.location",
                               "ssl.key.location", "ssl.key.password")} == {
        "security.protocol": "SSL", "ssl.ca.location": "ca.pem", "ssl.certificate.location": "client.pem",
        "ssl.key.location": "client.key", "ssl.key.password": SECRET}
    assert cfg.masked()["ssl.key.password"] == "**********"


def test_oauthbearer_passes_through_extra():
    extra = {
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.client.id": "tensorstream-worker",
        "sasl.oauthbearer.client.secret": OAUTH_SECRET,
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/oauth2/token",
        "sasl.oauthbearer.scope": "kafka",
    }
    cfg = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                      extra=extra)
    rd = cfg.to_librdkafka()
    assert rd["sasl.mechanism"] == "OAUTHBEARER"
    assert all(rd[k] == v for k, v in extra.items()), "extra passes through verbatim, by librdkafka name"
    assert cfg.masked()["sasl.oauthbearer.client.secret"] == "**********"
    assert OAUTH_SECRET not in repr(cfg) and OAUTH_SECRET not in str(cfg)
    _built(rd)


def test_librdkafka_refuses_a_wrong_name_passed_through():
    cfg = KafkaConfig(bootstrap_servers="b:9093", extra={"sasl.pasword": "typo"})
    with pytest.raises(KafkaException, match="sasl.pasword"):
        Consumer({**cfg.consumer_settings(), "group.id": "g"})


def test_secret_keys_cover_every_secret_field():
    cfg = KafkaConfig(bootstrap_servers="b:1", sasl_password="a", ssl_key_password="b")
    secret_fields = {n.replace("_", ".") for n, f in KafkaConfig.model_fields.items()
                     if "SecretStr" in str(f.annotation)}
    assert secret_fields == {"sasl.password", "ssl.key.password"} and secret_fields <= SECRET_KEYS
    assert set(cfg.masked().values()) >= {"**********"}


def test_secrets_masked_in_repr_str_dumps_and_logs(caplog):
    cfg = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
                      sasl_username="alice", sasl_password=SECRET, ssl_key_password=SECRET,
                      extra={"ssl.keystore.password": SECRET})
    shown = [repr(cfg), str(cfg), f"{cfg}", f"{cfg!r}", json.dumps(cfg.masked())]
    for text in shown:
        assert SECRET not in text, text
    # pydantic's own dumps mask the typed secret fields (SecretStr); values passed
    # through ``extra`` are plain strings there, so only repr/str/masked() hide them
    typed = cfg.model_copy(update={"extra": {}})
    assert SECRET not in typed.model_dump_json() and SECRET not in str(typed.model_dump())
    assert "alice" in str(cfg) and "**********" in str(cfg)
    log = logging.getLogger("tensorstream.test")
    with caplog.at_level(logging.DEBUG, logger="tensorstream"):
        log.info("connecting with %s", cfg)
        log.info("connecting with %r", cfg)
        log.debug("settings %s", cfg.masked())
        log.warning("config: %s", {"kafka": cfg})
    assert "alice" in caplog.text and SECRET not in caplog.text
    # the raw value is still there for the client itself
    assert cfg.to_librdkafka()["sasl.password"] == SECRET


def test_from_env_maps_variables_and_reads_file_variants(monkeypatch, tmp_path):
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")  # mounted secrets often end with a newline
    monkeypatch.setenv("TENSORSTREAM_BOOTSTRAP_SERVERS", "k1:9093")
    monkeypatch.setenv("TENSORSTREAM_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TENSORSTREAM_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("TENSORSTREAM_SASL_USERNAME", "svc-ml")
    monkeypatch.setenv("TENSORSTREAM_SASL_PASSWORD_FILE", str(secret_file))
    monkeypatch.setenv("TENSORSTREAM_SSL_CA_LOCATION", "/etc/kafka/ca.pem")
    monkeypatch.setenv("TENSORSTREAM_SESSION_TIMEOUT_MS", "10000")
    cfg = KafkaConfig.from_env()
    rd = cfg.to_librdkafka()
    assert rd["bootstrap.servers"] == "k1:9093" and rd["security.protocol"] == "SASL_SSL"
    assert rd["sasl.mechanism"] == "SCRAM-SHA-512" and rd["sasl.username"] == "svc-ml"
    assert rd["sasl.password"] == SECRET, "the *_FILE value, stripped"
    assert rd["ssl.ca.location"] == "/etc/kafka/ca.pem" and rd["session.timeout.ms"] == 10000
    assert SECRET not in repr(cfg)
    # the plain variable wins over the file variant; a flag wins over the variable
    monkeypatch.setenv("TENSORSTREAM_SASL_PASSWORD", "from-env")
    assert KafkaConfig.from_env().to_librdkafka()["sasl.password"] == "from-env"
    assert KafkaConfig.from_env("flag:9093").bootstrap_servers == "flag:9093"


def test_from_env_none_without_servers_and_errors_name_the_field(monkeypatch):
    assert KafkaConfig.from_env() is None
    monkeypatch.setenv("TENSORSTREAM_SASL_MECHANISM", "PLAIN-TEXT")
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaConfig.from_env("b:1")


def test_config_show_masks_secrets_in_table_and_json(monkeypatch, tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)
    monkeypatch.setenv("TENSORSTREAM_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TENSORSTREAM_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("TENSORSTREAM_SASL_USERNAME", "alice")
    monkeypatch.setenv("TENSORSTREAM_SASL_PASSWORD_FILE", str(secret_file))
    monkeypatch.setenv("TENSORSTREAM_SSL_KEY_PASSWORD", SECRET)
    monkeypatch.setenv("TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", f"sr-user:{SECRET}")
    runner = CliRunner()

    res = runner.invoke(app, ["config", "show", "-b", "kafka-1:9093", "--json"])
    assert res.exit_code == 0, res.output
    assert SECRET not in res.output
    eff = json.loads(res.output)
    assert eff["kafka"]["bootstrap.servers"] == "kafka-1:9093"
    assert eff["kafka"]["security.protocol"] == "SASL_SSL" and eff["kafka"]["sasl.mechanism"] == "SCRAM-SHA-256"
    assert eff["kafka"]["sasl.username"] == "alice"
    assert eff["kafka"]["sasl.password"] == eff["kafka"]["ssl.key.password"] == "**********"
    assert eff["origin"]["sasl.password"] == "$TENSORSTREAM_SASL_PASSWORD_FILE"
    assert eff["origin"]["bootstrap.servers"] == "--bootstrap-servers"
    assert eff["origin"]["client.id"] == "default"
    assert eff["schema_registry"] == {"basic.auth.user.info": "**********"}
    assert "session.timeout.ms" not in eff["kafka"], "librdkafka's default for a remote broker"

    res = runner.invoke(app, ["config", "show"], env={"TENSORSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
                                                      "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert SECRET not in res.output
    for text in ("sasl.password", "**********", "SCRAM-SHA-256", "$TENSORSTREAM_BOOTSTRAP_SERVERS",
                 "$TENSORSTREAM_SASL_PASSWORD_FILE", "default for a local broker"):
        assert text in res.output, (text, res.output)


def test_config_show_errors_never_echo_values(monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_SESSION_TIMEOUT_MS", SECRET)
    res = CliRunner().invoke(app, ["config", "show", "-b", "k:1"])
    assert res.exit_code == 2
    assert "TENSORSTREAM_SESSION_TIMEOUT_MS" in res.output and SECRET not in res.output
    monkeypatch.delenv("TENSORSTREAM_SESSION_TIMEOUT_MS")
    res = CliRunner().invoke(app, ["config", "show"])
    assert res.exit_code == 0 and "no bootstrap servers" in res.output
