"""Data in and out of topics: River datasets and files as records (``datasets``), replaying them into
a topic (``produce``: the ``tensorstream produce`` command), reading a topic back (``consume``)."""

from tensorstream.data.consume import consume_records
from tensorstream.data.datasets import LABEL_FIELD, open_source
from tensorstream.data.produce import ProduceError, produce_records

__all__ = ["LABEL_FIELD", "ProduceError", "consume_records", "open_source", "produce_records"]
