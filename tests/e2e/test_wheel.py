"""The package as a new user gets it: a wheel built from a clean `git archive` of HEAD (no generated stubs, no
training files), installed into a fresh virtual environment with its dependencies from the package index,
run outside the source tree. It must carry the gRPC stubs and the shipped model, leave the build-only and
optional dependencies out, and `pdserve generate --local` must print what the checkout prints.

The fresh environment installs torch==2.13.0 (the pinned CPU build) and the wheel's other dependencies from
the index the machine's pip is set up with: the test runs what `pip install pdserve` runs, instead of
borrowing the development environment's packages. That install is most of its time (2-4 minutes on a busy
2-core machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "def fibonacci(n):"
GENERATE = ["generate", "--local", PROMPT, "--max-tokens", "16"]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _clean_env(tmp: Path) -> dict[str, str]:
    """No PYTHONPATH or virtual environment of the checkout; a private kernel cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PDSERVE_CACHE_DIR"] = str(tmp / "cache")
    return env


@pytest.mark.timeout(900)
def test_wheel_from_a_clean_export_installs_and_generates_like_the_checkout(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.fail(f"not a git checkout: {head.stderr}")
    export = tmp_path / "export"
    export.mkdir()
    archive = tmp_path / "head.tar"
    _run(["git", "archive", "--format=tar", "-o", str(archive), "HEAD"], ROOT)
    with tarfile.open(archive) as tar:
        tar.extractall(export, filter="data")
    assert not list((export / "pdserve" / "v1").glob("*_pb2*.py")), "stubs are generated, never committed"

    # build: PEP 517 in an isolated environment, so [build-system] requires must suffice (grpcio-tools)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(export)], tmp_path)
    (wheel,) = dist.glob("pdserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("common_pb2.py", "generation_pb2.py", "generation_pb2_grpc.py", "prefill_pb2_grpc.py"):
        assert f"pdserve/v1/{stub}" in names, stub
    model = "pdserve/models/pdserve-tiny-py/"
    assert {model + f for f in ("config.json", "model.safetensors", "tokenizer.json")} <= names
    assert not {model + f for f in ("training_log.json", "loss_curve.png", "heldout.txt")} & names
    assert [n for n in names if n.startswith("kv_transfer/codec/_rans") and n.endswith(".so")], (
        "the rANS coder is compiled by the wheel's build (setup.py), not on first use"
    )

    # a fresh environment without pip of its own (ensurepip costs more than the rest of the set-up); this
    # interpreter's pip installs into it, resolving the wheel's dependencies as `pip install` does
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py, env = venv / "bin" / "python", _clean_env(tmp_path)
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0", str(wheel)], tmp_path, env)

    outside = tmp_path / "elsewhere"  # not the checkout, not the export: only the installed package
    outside.mkdir()
    probe = (
        "import importlib.util as u, pdserve.client, pdserve.v1.generation_pb2 as g; "
        "from engine.model_dir import shipped_model_dir; from engine.kernels import kernels_available; "
        "from kv_transfer.codec import rans; "
        "print(shipped_model_dir()); print(g.__file__); print(kernels_available(), rans.library_origin()); "
        "print(*[m for m in ('grpc_tools', 'kubernetes', 'kopf', 'ucxx') if u.find_spec(m)])"
    )
    model_dir, stubs, compiled, extra = _run([str(py), "-c", probe], outside, env).splitlines()
    assert compiled == "True built", (
        "the C kernels build from the wheel; the rANS coder is the library the wheel's build compiled"
    )
    site = str(venv / "lib")
    assert model_dir.startswith(site) and model_dir.endswith("pdserve/models/pdserve-tiny-py"), model_dir
    assert stubs.startswith(site), stubs
    assert extra == "", f"build-only or optional packages installed by the plain wheel: {extra}"

    installed = _run([str(venv / "bin" / "pdserve"), *GENERATE], outside, env)
    checkout = _run([sys.executable, "-m", "pdserve", *GENERATE], ROOT, {**env, "PYTHONPATH": str(ROOT)})
    assert installed.strip() and installed == checkout

    missing = subprocess.run(
        [str(venv / "bin" / "pdserve"), "generate", "--local", "--model", str(outside / "nope"), PROMPT],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
