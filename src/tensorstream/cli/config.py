"""``tensorstream config show``: the effective Kafka settings, secrets masked.

What every Kafka-facing command would use, resolved the same way: the
``--bootstrap-servers`` flag (or ``$TENSORSTREAM_BOOTSTRAP_SERVERS``, or the
running ``tensorstream broker``), then ``TENSORSTREAM_<FIELD>`` variables and
their ``..._FILE`` variants. Each line says where its value came from. Secret
values (passwords, key material, OAuth client secrets) are never printed.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from rich.table import Table

from tensorstream.cli.common import fail, out, running_local_broker

app = typer.Typer(help="Connection settings: show what the commands will use.", no_args_is_help=True)

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="TENSORSTREAM_BOOTSTRAP_SERVERS",
                 help="Kafka bootstrap servers. Default: the local `tensorstream broker`."),
]

MASK = "**********"
#: besides KafkaConfig's own secret keys: anything that looks like one (e.g. passed through ``extra``)
_SECRET_WORDS = ("password", "secret", "token", "credential")




def _is_secret(key: str) -> bool:
    from tensorstream.kafka.config import SECRET_KEYS

    return key in SECRET_KEYS or any(w in key.lower() for w in _SECRET_WORDS)


def _origin(field: str, bootstrap_flag: str | None, local: str | None) -> str:
    from tensorstream.kafka.config import ENV_PREFIX

    env = ENV_PREFIX + field.upper()
    if field == "bootstrap_servers":
        if bootstrap_flag is None:
            return "local broker (tensorstream broker)" if local else "default"
        return f"${env}" if os.environ.get(env) == bootstrap_flag else "--bootstrap-servers"
    if env in os.environ:
        return f"${env}"
    if env + "_FILE" in os.environ:
        return f"${env}_FILE"
    return "default"


def effective_settings(bootstrap: str | None) -> dict[str, Any]:
    """``{"kafka": {librdkafka name: masked value}, "origin": {...}, "schema_registry": {...}}``."""
    from pydantic import ValidationError

    from tensorstream.codecs.avro import BASIC_AUTH_ENV
    from tensorstream.kafka.config import KafkaConfig

    local = None if bootstrap else running_local_broker()
    servers = bootstrap or local
    try:
        cfg = KafkaConfig.from_env(servers)
    except ValidationError as e:  # names the bad variable; never echoes the values (they may be secrets)
        bad = ", ".join(f"TENSORSTREAM_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                        for err in e.errors())
        raise ValueError(f"invalid Kafka settings in the environment: {bad}") from None
    except OSError as e:
        raise ValueError(f"cannot read a *_FILE setting: {e.filename}: {e.strerror}") from None
    if cfg is None:
        return {"kafka": {}, "origin": {}, "schema_registry": {},
                "note": "no bootstrap servers: `run` and `demo` start an embedded broker; "
                        "other commands need --bootstrap-servers or `tensorstream broker`"}
    tweaked: set[str] = set()
    if servers.startswith(("127.", "localhost")) and cfg.session_timeout_ms is None:
        # what kafka_settings() does for a broker on this machine
        cfg = cfg.model_copy(update={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500})
        tweaked = {"session_timeout_ms", "heartbeat_interval_ms"}
    kafka = {k: (MASK if _is_secret(k) else v) for k, v in cfg.masked().items()}
    origin = {}
    for field in KafkaConfig.model_fields:
        key = field.replace("_", ".")
        if key in kafka:
            origin[key] = "default for a local broker" if field in tweaked else _origin(field, bootstrap, local)
    for key in cfg.extra:
        origin[key] = "extra"
    kafka["enable.idempotence"] = cfg.idempotence  # the producers' setting (KafkaSink)
    origin["enable.idempotence"] = _origin("idempotence", bootstrap, local)
    registry = {}
    if BASIC_AUTH_ENV in os.environ or BASIC_AUTH_ENV + "_FILE" in os.environ:
        registry["basic.auth.user.info"] = MASK
        origin["schema_registry.basic.auth.user.info"] = (
            f"${BASIC_AUTH_ENV}" if BASIC_AUTH_ENV in os.environ else f"${BASIC_AUTH_ENV}_FILE")
    return {"kafka": kafka, "origin": origin, "schema_registry": registry}


@app.command()
def show(
    bootstrap_servers: BootstrapOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """The effective Kafka settings (flags, TENSORSTREAM_* env, *_FILE), secrets masked."""
    try:
        eff = effective_settings(bootstrap_servers)
    except ValueError as e:
        fail(str(e), code=2)
    if as_json:
        out.print_json(json.dumps(eff, default=str))
        return
    if not eff["kafka"]:
        out.print(eff["note"], highlight=False)
        return
    t = Table(title="Kafka settings (librdkafka names)")
    t.add_column("setting", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("from", no_wrap=True)
    for k, v in eff["kafka"].items():
        t.add_row(k, str(v), eff["origin"].get(k, ""))
    for k, v in eff["schema_registry"].items():
        t.add_row(f"schema registry {k}", str(v), eff["origin"].get(f"schema_registry.{k}", ""))
    out.print(t)
