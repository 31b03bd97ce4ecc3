"""``python -m tensorstream.cli``."""

from tensorstream.cli import app

app()
