"""Shared pieces of the spec models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

BackendName = Literal["torch", "tensorflow"]
Mode = Literal["train", "infer", "train+infer"]


class SpecError(ValueError):
    """A pipeline spec that does not validate; the message names each bad field."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid")
