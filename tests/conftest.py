"""Shared fixtures: one real embedded broker (Tansu over TCP) for the session."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# In this environment importing triton (torch._dynamo, pulled in by any torch.optim
# constructor) AFTER tensorflow segfaults; import it first so test order never matters.
import torch._dynamo  # noqa: E402,F401

from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Pipelines keep state (checkpoints) under ./.tensorstream: give each test its own."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    from procutil import kill_leftovers

    kill_leftovers()


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def kafka_config(broker) -> KafkaConfig:
    return KafkaConfig.local(broker.bootstrap_servers)


@pytest.fixture
def admin(kafka_config) -> KafkaAdmin:
    return KafkaAdmin(kafka_config)


@pytest.fixture
def topic_factory(admin):
    """Create uniquely named topics: ``topic_factory(partitions=3) -> name``."""

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin.ensure_topic(name, partitions)
        return name

    return make


@pytest.fixture
def group_id() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"
