"""The training corpus: the running interpreter's standard-library ``.py`` files.

Which files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, walked in sorted order, except
  * test suites (any directory named ``test``, ``tests`` or ``idle_test``: ``test/``, ``idlelib/idle_test``,
    ``lib2to3/tests``, ``ctypes/test``, ``unittest/test``, ...),
  * ``site-packages`` / ``dist-packages`` (third-party code), ``__pycache__``, ``lib-dynload`` and the
    ``config-*`` build directory,
  * machine-specific or generated data: ``_sysconfigdata*.py`` and the gencodec character-mapping tables
    (``encodings/cp1252.py`` and friends: 256-entry hex tables, not Python anyone writes),
  * files that are not valid UTF-8.
Line endings are normalised to ``\\n``.

The split is by file and deterministic: files are ordered by the SHA-256 of their relative path and taken
greedily into the held-out split (files up to ``max_file_chars`` only) until it holds ``heldout_chars``
characters; everything else is training text. Documents are joined as ``<|endoftext|>`` + text, so the
held-out text file is a single string that tokenizes to exactly the token stream evaluated.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from training import EOT

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
CHARMAP_MARKER = "Python Character Mapping Codec"


@dataclass(frozen=True)
class Doc:
    relpath: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_stdlib(root: Path | None = None) -> list[Doc]:
    """Every eligible stdlib source file, in sorted relative-path order."""
    root = Path(root) if root is not None else stdlib_root()
    docs: list[Doc] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if CHARMAP_MARKER in text[:200]:
                continue
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text.strip():
                docs.append(Doc(path.relative_to(root).as_posix(), text))
    docs.sort(key=lambda d: d.relpath)
    return docs


def split_docs(
    docs: list[Doc], heldout_chars: int = 150_000, max_file_chars: int = 30_000
) -> tuple[list[Doc], list[Doc]]:
    """(train, heldout), both in relative-path order. See the module docstring for the rule."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d.relpath.encode()).hexdigest())
    held: set[str] = set()
    total = 0
    for d in order:
        if total >= heldout_chars:
            break
        if len(d.text) <= max_file_chars and total + len(d.text) <= heldout_chars * 1.1:
            held.add(d.relpath)
            total += len(d.text)
    ordered = sorted(docs, key=lambda d: d.relpath)
    train = [d for d in ordered if d.relpath not in held]
    heldout = [d for d in ordered if d.relpath in held]
    return train, heldout


def join_docs(docs: list[Doc]) -> str:
    """The documents as one string: ``<|endoftext|>`` before every document."""
    return "".join(EOT + d.text for d in docs)
