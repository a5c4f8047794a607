"""Build a C source into a shared library once per (source, flags, CPU) and cache it.

Used by the engine's CPU kernels (`engine.kernels`) and the KV codec's rANS coder
(`kv_transfer.codec.rans`). The library lands in `<pdserve cache>/kernels/<name>-<key>.so`, where the key
hashes the source and the flags, written atomically (temp file renamed into place) so concurrent processes
never load a half-written file.

Sources are built for this CPU (`-march=native`; the key then also hashes the CPU's feature flags, so a
library is never loaded on a CPU it was not built for). `PDSERVE_MARCH=x86-64-v3` (any `-march` value)
builds for a CPU level instead, without the CPU's flags in the key: what an image does at build time
(infra/docker/Dockerfile), so that its libraries load on every host of that level.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

BASE_CFLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC")


def default_cflags() -> tuple[str, ...]:
    """BASE_CFLAGS and `-march=$PDSERVE_MARCH` (default native)."""
    return (*BASE_CFLAGS, f"-march={os.environ.get('PDSERVE_MARCH') or 'native'}")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_library(name: str, source: str, cflags: tuple[str, ...] | None = None) -> Path:
    """-> path of the compiled library (built now unless cached). RuntimeError without a compiler or when
    the build fails (with the compiler's message)."""
    from engine.synth import cache_dir

    cflags = cflags if cflags is not None else default_cflags()
    cache = cache_dir() / "kernels"
    cpu = cpu_flags() if "-march=native" in cflags else ""  # a -march=LEVEL library fits any such CPU
    key = hashlib.sha256("\n".join([source, *cflags, cpu]).encode()).hexdigest()[:16]
    target = cache / f"{name}-{key}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, so = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        proc = subprocess.run([cc, *cflags, "-o", str(so), str(src), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(so, target)
    return target
