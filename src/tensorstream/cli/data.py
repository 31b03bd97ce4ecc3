"""``tensorstream produce`` and ``consume``: replay datasets into topics, read topics back."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorstream.cli.common import BootstrapOpt, console, fail, kafka_settings, out, resolve_bootstrap


def produce(
    source: Annotated[str, typer.Argument(help="river:NAME[?k=v], or a .csv / .jsonl / .parquet file.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Target topic (created if missing).")],
    bootstrap_servers: BootstrapOpt = None,
    encoding: Annotated[str, typer.Option(help="json or frame (tensor frames of the numeric fields).")] = "json",
    rate: Annotated[float, typer.Option(help="Records per second (0 = as fast as possible).")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Stop after N records (required for endless generators).")] = None,
    key_field: Annotated[str | None, typer.Option(help="Record field used as the message key.")] = None,
    partitions: Annotated[int, typer.Option(help="Partitions when the topic is created.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Replay a dataset or file into a topic, at a rate or as fast as possible."""
    from tensorstream.data.produce import ProduceError, produce_records

    servers = resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        try:
            stats = produce_records(cfg, source, topic, encoding=encoding, rate=rate, limit=limit,
                                    key_field=key_field, partitions=partitions,
                                    progress=not quiet and not console.quiet)  # nor with --quiet / JSON logs
        except (ProduceError, FileNotFoundError, ValueError) as e:
            fail(str(e))
    console.print(f"produced [bold]{stats.records}[/] records to {topic} in {stats.seconds:.2f}s "
                  f"({stats.records / max(stats.seconds, 1e-9):,.0f} rec/s)")


def consume(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    bootstrap_servers: BootstrapOpt = None,
    group: Annotated[str | None, typer.Option(help="Consumer group (default: a fresh one, nothing committed).")] = None,
    decode: Annotated[str, typer.Option(help="json, frame or raw.")] = "json",
    max_records: Annotated[int | None, typer.Option("--max", "-n", help="Stop after N records.")] = None,
    timeout: Annotated[float, typer.Option(help="Stop after this many seconds with no new record.")] = 5.0,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of records.")] = False,
    commit: Annotated[bool, typer.Option(help="Commit offsets of what was read (with --group).")] = False,
) -> None:
    """Print (or count) records from a topic, from the beginning: for debugging and tests."""
    from tensorstream.data.consume import consume_records

    servers = resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        n = 0
        try:
            for line in consume_records(cfg, topic, group=group, decode=decode, max_records=max_records,
                                        idle_timeout=timeout, commit=commit):
                n += 1
                if not count:
                    out.print(line, markup=False, highlight=False, soft_wrap=True)
        except ValueError as e:
            fail(str(e))
    if count:
        out.print(n)
