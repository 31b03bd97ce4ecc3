"""The example pipeline specs shipped with tensorstream (``*.yaml`` beside this file).

>>> example_spec("phishing.yaml").name
'phishing'
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from tensorstream.spec import PipelineSpec, load_spec


def example_spec(name: str, **overrides: Any) -> PipelineSpec:
    """Load one of the specs shipped in ``tensorstream/examples``."""
    with resources.as_file(resources.files("tensorstream") / "examples" / name) as path:
        return load_spec(path, **overrides)
