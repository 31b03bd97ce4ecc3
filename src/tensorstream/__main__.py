"""``python -m tensorstream`` = the ``tensorstream`` command."""

from tensorstream.cli import app

app()
