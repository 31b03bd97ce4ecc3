"""The ``tensorstream`` command line (typer + rich).

Every command that talks to Kafka takes ``--bootstrap-servers`` (env
``TENSORSTREAM_BOOTSTRAP_SERVERS``). Without it, commands use the broker that
``tensorstream broker`` is running on this machine, if any; ``demo`` and ``run``
start an embedded broker themselves.

Commands live in their own modules (this package's, and ``bench/command.py``,
``observe/commands.py``, ``vision/commands.py``); they share ``cli/common.py``.
Importing this package is cheap: frameworks load when a command runs.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer import rich_utils

from tensorstream import __version__
from tensorstream.bench.command import bench
from tensorstream.cli import broker, config, data, demo, export, models, run
from tensorstream.cli.common import fail, out, setup_logging
from tensorstream.observe.commands import dashboard, report
from tensorstream.vision import commands as video

if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH") and not os.environ.get("COLUMNS"):
    rich_utils.MAX_WIDTH = 160  # --help piped or captured: wrap at 160 columns, not rich's 80 (options were cut)

app = typer.Typer(
    name="tensorstream",
    help="Streaming machine learning on Kafka-protocol brokers (PyTorch and TensorFlow).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
    add_completion=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    log_format: Annotated[str, typer.Option(
        "--log-format", help="text, or json: one JSON object per log line on stderr, progress included "
                             "(for production log shippers; no live displays).")] = "text",
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and errors: no progress displays.")] = False,
) -> None:
    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format!r}: use text or json", code=2)
    setup_logging(verbose, log_format, quiet)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)



app.command()(broker.broker)
app.command()(data.produce)
app.command()(data.consume)
app.command()(run.run)
app.command()(demo.demo)
app.command()(bench)
app.command()(dashboard)
app.command()(report)
app.command()(export.export)
app.add_typer(models.app, name="models")
app.add_typer(config.app, name="config")
app.add_typer(video.app, name="video")


def run_cli() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
