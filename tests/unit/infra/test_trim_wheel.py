"""infra/device/trim_wheel.py on a hand-made wheel: what it drops, what it keeps, and a RECORD pip accepts."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _trim_module():
    spec = importlib.util.spec_from_file_location("trim_wheel", ROOT / "infra" / "device" / "trim_wheel.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trim_keeps_loadable_libraries_and_rewrites_record(tmp_path: Path) -> None:
    wheel = tmp_path / "libfoo-1.0-py3-none-any.whl"
    files = {
        "libfoo/__init__.py": b"",
        "libfoo/lib/libfoo.so": b"elf" * 100,
        "libfoo/lib/libfoo.so.0": b"elf" * 100,
        "libfoo/lib/libfoo.so.0.0.0": b"elf" * 100,
        "libfoo/lib/libfoo.a": b"ar" * 1000,
        "libfoo/lib/libfoo.la": b"libtool",
        "libfoo/lib/ucx/libfoo_perftest.so.0": b"x",
        "libfoo/bin/tool": b"x",
        "libfoo/include/foo.h": b"x",
        "libfoo-1.0.dist-info/METADATA": b"Name: libfoo\n",
        "libfoo-1.0.dist-info/RECORD": b"stale",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    before, after = _trim_module().trim(wheel)
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert names == {
            "libfoo/__init__.py",
            "libfoo/lib/libfoo.so",
            "libfoo/lib/libfoo.so.0",
            "libfoo-1.0.dist-info/METADATA",
            "libfoo-1.0.dist-info/RECORD",
        }
        rows = [r.split(",") for r in z.read("libfoo-1.0.dist-info/RECORD").decode().splitlines()]
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert (digest, size) == ("", "")
                continue
            data = z.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data) == len(files[name])
