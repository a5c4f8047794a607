"""Shared fixtures for engine tests: one thread, a tiny random checkpoint, helpers to run the model."""

from __future__ import annotations

import pytest
import torch

from engine.synth import ModelShape, make_random_model

torch.set_num_threads(1)

TINY: ModelShape = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "vocab_size": 512,
    "max_pos": 512,
}


@pytest.fixture(scope="session")
def engine_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama with a 512-token byte-level BPE; built once per test session."""
    return make_random_model(tmp_path_factory.mktemp("tiny-llama"), **TINY)
