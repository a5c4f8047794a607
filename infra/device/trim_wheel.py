"""Rewrite a wheel without the files a runtime import never opens, so it fits the device tool's transfer limit.

`python infra/device/trim_wheel.py WHEEL` replaces WHEEL in place. Dropped: static archives (``*.a``),
libtool files (``*.la``), fully versioned shared-object copies (``*.so.X.Y.Z``: a zip holds no symlinks, so a
wheel carries ``libfoo.so``, ``libfoo.so.0`` and ``libfoo.so.0.0.0`` as three copies, and the loader opens the
first two), perftest modules, executables under ``bin/``, headers, CMake and pkg-config files. RECORD is
rewritten with the remaining files' hashes. Checked with libucx-cu12 1.21: ucxx imports and pdserve's UCX
transport tests pass on the trimmed package (139 MB installed -> 31 MB).
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

DROP = re.compile(
    r"(\.a$|\.la$|\.so\.\d+\.\d+\.\d+$|perftest|/bin/|/include/|/cmake/|/pkgconfig/|\.h$|\.hpp$)"
)


def trim(path: Path) -> tuple[int, int]:
    """Rewrite the wheel at `path`; -> (bytes before, bytes after)."""
    before = path.stat().st_size
    tmp = path.with_suffix(".trimmed")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record_name or DROP.search(info.filename):
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(path)
    return before, path.stat().st_size


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        b, a = trim(Path(arg))
        print(f"{arg}: {b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB")
