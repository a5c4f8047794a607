"""engine.cbuild: a library is built once per (source, flags) and, for -march=native only, per CPU; with
PDSERVE_MARCH set (what the image's build stage does) the CPU's flags are not in the key, so a library built
on one host of that level is found, not rebuilt, on another."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from engine import cbuild

SOURCE = "int answer(void) { return 42; }\n"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="-march=x86-64 is an x86 level")
def test_native_and_level_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PDSERVE_MARCH", raising=False)
    native = cbuild.build_library("t_answer", SOURCE)
    assert "-march=native" in cbuild.default_cflags() and ctypes.CDLL(str(native)).answer() == 42
    monkeypatch.setenv("PDSERVE_MARCH", "x86-64")
    level = cbuild.build_library("t_answer", SOURCE)
    assert level != native and "-march=x86-64" in cbuild.default_cflags()
    assert ctypes.CDLL(str(level)).answer() == 42
    # another CPU: the level build is the same file (no rebuild); a native build would differ
    monkeypatch.setattr(cbuild, "cpu_flags", lambda: "flags : some other cpu")
    assert cbuild.build_library("t_answer", SOURCE) == level
    monkeypatch.delenv("PDSERVE_MARCH")
    assert cbuild.build_library("t_answer", SOURCE) not in (native, level)
