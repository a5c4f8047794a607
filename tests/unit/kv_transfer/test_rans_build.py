"""The rANS coder is compiled by the package build (setup.py's extension), not on first use: the built
library carries rans.c's id, decodes what the loaded coder encodes, and the loader says where its library
came from."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec import rans

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not rans.available(), reason="no C compiler for the rANS coder")


def test_setup_builds_the_coder_with_the_sources_id(tmp_path: Path) -> None:
    lib_dir, tmp_dir = tmp_path / "lib", tmp_path / "tmp"
    proc = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(lib_dir),
            "--build-temp",
            str(tmp_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = rans.built_library(lib_dir / "kv_transfer" / "codec")
    assert built is not None
    lib = ctypes.CDLL(str(built))
    lib.cg_source_id.restype = ctypes.c_char_p
    assert lib.cg_source_id().decode() == rans.source_id((ROOT / "kv_transfer/codec/rans.c").read_text())
    # the built library decodes the loaded coder's words (both are this rans.c)
    g = np.random.default_rng(0)
    c, t = 3, 101
    sym = (np.clip(np.round(g.laplace(0, 2, 2 * c * t)), -127, 127) + klt.QMAX).astype(np.uint8)
    bounds = np.array([0, t])
    words, nw, rho, amax = rans.code5(sym, c, bounds, klt.QMAX, klt._symbol_weights())
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cg5_uncode.restype = i64
    lib.cg5_uncode.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, p, i64]
    wsym = klt._symbol_weights()
    for simd in (
        1,
        0,
    ):  # built without -march: the AVX2 coder is chosen at run time, the portable one on request
        out = np.empty_like(sym)
        rc = lib.cg5_uncode(
            words.ctypes.data, words.size, c, 1, bounds.ctypes.data, nw.ctypes.data, rho.ctypes.data,
            amax.ctypes.data, klt.QMAX, wsym.ctypes.data, out.ctypes.data, simd,
        )  # fmt: skip
        assert rc == 0 and np.array_equal(out, sym)


def test_library_origin_is_reported() -> None:
    """A checkout without an in-place build compiles on first use; an installed package loads the built one."""
    expected = "built" if rans.built_library() is not None else "first use"
    assert rans.library_origin() in {expected, "first use"}  # a stale in-place build also falls back
