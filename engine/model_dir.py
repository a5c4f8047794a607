"""Where a model directory is: the shipped model (in a source checkout, or inside the installed package) and
the check that a named directory holds a model. Pure Python: the coordinator uses it without torch.

A model that cannot be found is an error naming the path; nothing falls back to a random model (that is
`engine.synth.cached_random_model`, which tests and benchmarks call by name).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

SHIPPED_MODEL = "pdserve-tiny-py"
# The files a model directory must have for pdserve to serve it (weights are checked by the loader:
# `model.safetensors`, or shards named by `model.safetensors.index.json`).
REQUIRED_FILES = ("config.json", "tokenizer.json")
# The shipped model's files a running service reads; the wheel carries these only (setup.py), not the
# training log, loss curve, held-out text and unigram counts, which only training and calibration read.
SHIPPED_RUNTIME_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "cachegen_plan.json",
    "cachegen_tables.safetensors",
    "cachegen_transform.safetensors",
    "cachegen_rate.json",
    "codec_profiles.json",
)
# models/pdserve-tiny-py of a source checkout (engine/ sits in the repository root)
CHECKOUT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / SHIPPED_MODEL


class ModelNotFoundError(FileNotFoundError):
    """A model directory does not exist or lacks a file pdserve needs; the message names the path."""


def packaged_model_dir() -> Path:
    """The shipped model inside the installed `pdserve` package (a wheel carries it as package data)."""
    return Path(str(importlib.resources.files("pdserve") / "models" / SHIPPED_MODEL))


def shipped_model_dir() -> str:
    """The shipped model: the checkout's `models/pdserve-tiny-py`, else the installed package's copy.
    Raises ModelNotFoundError naming both places when neither has it."""
    for candidate in (CHECKOUT_MODEL_DIR, packaged_model_dir()):
        if all((candidate / f).is_file() for f in REQUIRED_FILES):
            return str(candidate)
    raise ModelNotFoundError(
        f"the shipped model {SHIPPED_MODEL} is neither in a source checkout ({CHECKOUT_MODEL_DIR}) nor in "
        f"the installed package ({packaged_model_dir()}); reinstall pdserve or name a model with --model"
    )


def check_model_dir(path: str | os.PathLike[str]) -> str:
    """`path` as a string if it is a directory holding a model's REQUIRED_FILES, else ModelNotFoundError."""
    p = Path(path)
    if not p.is_dir():
        raise ModelNotFoundError(f"model directory {str(p)!r} does not exist")
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"model directory {str(p)!r} has no {', '.join(missing)}")
    return str(p)


def resolve_model_dir(path: str | os.PathLike[str] | None) -> str:
    """A `--model` flag's value: the named directory (checked), or the shipped model when none is named."""
    return check_model_dir(path) if path else shipped_model_dir()
