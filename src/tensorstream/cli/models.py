"""``tensorstream models ...``: list, show, promote and roll back model versions.

Versions are signed announcements on ``<pipeline>.models`` (see
``checkpoint/versions.py``); promoting a checkpoint of the pipeline's checkpoint
store announces it, and inference workers with ``versions.watch: true`` swap it
in between batches. The HMAC key comes from the spec's ``versions.key_env``
(default ``TENSORSTREAM_MODELS_HMAC_KEY``, or ``..._FILE``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tensorstream.checkpoint.versions import REJECT_REASONS, ModelAnnouncement
from tensorstream.cli.common import console, fail, kafka_settings, load_spec_or_fail, out, resolve_bootstrap

app = typer.Typer(help="Model versions: list, show, promote, rollback.", no_args_is_help=True)

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="TENSORSTREAM_BOOTSTRAP_SERVERS",
                 help="Kafka bootstrap servers. Default: the local `tensorstream broker`."),
]
SpecArg = Annotated[Path, typer.Argument(metavar="PIPELINE.yaml", help="The pipeline spec (name, key, store).")]




def _open(spec_path: Path, bootstrap: str | None, state_dir: str | None):  # noqa: ANN202
    from tensorstream.checkpoint.versions import ModelRegistry, SigningKeyError, resolve_key
    from tensorstream.pipeline.hotswap import env_key as _env_key

    spec = load_spec_or_fail(spec_path, state_dir)
    servers = resolve_bootstrap(bootstrap)
    v = spec.versions
    try:
        key = resolve_key(_env_key(v.key_env), allow_unsigned=v.allow_unsigned)
    except SigningKeyError as e:
        fail(str(e))
    return spec, servers, key, ModelRegistry


@app.command("list")
def list_versions(spec_path: SpecArg, bootstrap_servers: BootstrapOpt = None) -> None:
    """Every announcement on <pipeline>.models, oldest first; the current one marked."""


    spec, servers, key, Registry = _open(spec_path, bootstrap_servers, None)
    with kafka_settings(servers) as cfg, Registry(cfg, spec.name, key,
                                                 allow_unsigned=spec.versions.allow_unsigned) as reg:
        history = reg.history()
        serving, unusable = reg.serving()
        rows = format_history(history, serving, unusable)
        rejected = format_rejected(reg.rejected)
    if not rows:
        console.print(f"no versions announced on {spec.name}.models")
        return
    t = Table(title=f"{spec.name}.models")
    for col in rows[0]:
        t.add_column(col, no_wrap=col == "version", min_width=15 if col == "version" else None)
    for r in rows:
        t.add_row(*r.values())
    out.print(t)
    for reason, n in rejected:
        console.print(f"[yellow]rejected[/] {n} announcement(s): {reason}")


@app.command()
def show(spec_path: SpecArg, version: Annotated[str, typer.Argument(help="Version id.")],
         bootstrap_servers: BootstrapOpt = None) -> None:
    """One version's announcement: URL, sha256, metrics, signature."""
    from tensorstream.checkpoint.versions import ModelVersionError


    spec, servers, key, Registry = _open(spec_path, bootstrap_servers, None)
    with kafka_settings(servers) as cfg, Registry(cfg, spec.name, key,
                                                 allow_unsigned=spec.versions.allow_unsigned) as reg:
        try:
            ann = reg.find(version)
        except ModelVersionError as e:
            fail(str(e))
        cur, _ = reg.serving()
        for k, v in format_announcement(ann, is_current=cur is not None and cur.version == ann.version):
            out.print(f"{k:<12} {v}", highlight=False)


@app.command()
def promote(
    spec_path: SpecArg,
    version: Annotated[str, typer.Argument(help="A checkpoint id of the pipeline's store, or a known version.")],
    bootstrap_servers: BootstrapOpt = None,
    state_dir: Annotated[str | None, typer.Option(help="Override the spec's state_dir.")] = None,
) -> None:
    """Announce a checkpoint (or re-announce an older version) as the current model."""
    from tensorstream.checkpoint import CheckpointError, CheckpointStore
    from tensorstream.checkpoint.versions import ModelVersionError


    spec, servers, key, Registry = _open(spec_path, bootstrap_servers, state_dir)
    store = CheckpointStore(spec.checkpoint_url, keep_last=None)
    with kafka_settings(servers) as cfg, Registry(cfg, spec.name, key,
                                                 allow_unsigned=spec.versions.allow_unsigned) as reg:
        try:
            try:
                _, info = store.load(version)  # verifies every hash before announcing it
            except CheckpointError:
                info = None
            if info is not None:
                ann = reg.publish(info.id, info.state_url, metrics=info.metrics, backend=info.backend,
                                  spec_hash=info.spec_hash)
                store.mark_promoted(info.id, ann.version)
            else:
                ann = reg.promote(version)
        except ModelVersionError as e:
            fail(f"{e} (not a checkpoint in {spec.checkpoint_url} either)")
    console.print(f"[green]promoted[/] {ann.version} ({ann.url})")


@app.command()
def rollback(spec_path: SpecArg, bootstrap_servers: BootstrapOpt = None) -> None:
    """Make the previously promoted version current again."""
    from tensorstream.checkpoint.versions import ModelVersionError


    spec, servers, key, Registry = _open(spec_path, bootstrap_servers, None)
    with kafka_settings(servers) as cfg, Registry(cfg, spec.name, key,
                                                 allow_unsigned=spec.versions.allow_unsigned) as reg:
        try:
            ann = reg.rollback()
        except ModelVersionError as e:
            fail(str(e))
    console.print(f"[green]rolled back[/] to {ann.version}")


@app.command()
def checkpoints(spec_path: SpecArg,
                state_dir: Annotated[str | None, typer.Option(help="Override the spec's state_dir.")] = None) -> None:
    """The pipeline's checkpoints (verified), oldest first."""
    from tensorstream.checkpoint import CheckpointStore

    spec = load_spec_or_fail(spec_path, state_dir)
    infos = CheckpointStore(spec.checkpoint_url, keep_last=None).list(verify=True)
    t = Table(title=spec.checkpoint_url)
    t.add_column("id", no_wrap=True, min_width=15)  # ids are what users copy: never truncated
    for col in ("created", "records learned", "offsets", "promoted as", "accuracy"):
        t.add_column(col)
    for i in infos:
        t.add_row(i.id, i.created_at.isoformat(timespec="seconds"), f"{i.n_learned:,}",
                  ", ".join(f"{tp}[{p}]={o}" for (tp, p), o in i.offsets.items()), i.promoted or "",
                  f"{i.metrics['accuracy']:.4f}" if "accuracy" in i.metrics else "")
    out.print(t)


# -- plain rows (rendered by the commands above) ---------------------------------------
HISTORY_COLUMNS = ("#", "version", "action", "created_at", "backend", "metrics", "sha256", "current", "status")


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def format_history(history: list[ModelAnnouncement], current: ModelAnnouncement | None = None,
                   unusable: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """``models list``: one row per announcement (keys = ``HISTORY_COLUMNS``), oldest first.

    ``current`` (the version workers serve) defaults to the last announcement; ``unusable``
    maps versions whose weights do not verify to the reason (shown in ``status``).
    """
    unusable = unusable or {}
    if current is None and history:
        current = history[-1]
    return [{
        "#": str(i),
        "version": a.version,
        "action": a.action,
        "created_at": a.created_at.isoformat(timespec="seconds"),
        "backend": a.backend,
        "metrics": _metrics_text(a.metrics),
        "sha256": a.sha256[:12],
        "current": "*" if a == current else "",
        "status": f"unavailable: {unusable[a.version]}"[:80] if a.version in unusable else "",
    } for i, a in enumerate(history)]


def format_announcement(ann: ModelAnnouncement, *, is_current: bool | None = None) -> list[tuple[str, str]]:
    """``models show VERSION``: (field, value) pairs, full sha256 and URL included."""
    rows = [
        ("pipeline", ann.pipeline), ("version", ann.version), ("action", ann.action),
        ("url", ann.url), ("sha256", ann.sha256), ("created_at", ann.created_at.isoformat()),
        ("backend", ann.backend), ("spec_hash", ann.spec_hash),
    ]
    rows += [(f"metrics.{k}", f"{v:.6g}") for k, v in sorted(ann.metrics.items())]
    rows.append(("signed", "yes" if ann.signature else "NO (allow_unsigned)"))
    if is_current is not None:
        rows.append(("current", "yes" if is_current else "no"))
    return rows


def format_rejected(rejected: Mapping[str, int]) -> list[tuple[str, int]]:
    """Reject counts as (reason, count) rows, in ``REJECT_REASONS`` order, zeros left out."""
    extra = sorted(set(rejected) - set(REJECT_REASONS))
    return [(r, int(rejected[r])) for r in (*REJECT_REASONS, *extra) if rejected.get(r)]
