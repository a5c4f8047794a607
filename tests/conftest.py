"""Shared fixtures: a real redis-server on a free port, and small deterministic models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.redis_server import RedisServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama (fast enough for many end-to-end requests on 2 cores)."""
    from engine.synth import make_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_random_model(
        path, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=344, vocab_size=2048, seed=1
    )
    return path
