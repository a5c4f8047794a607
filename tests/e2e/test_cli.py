"""The user's path: `pdserve up` in a subprocess, `pdserve generate` against it, `--local` as the
reference, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.cluster import assert_no_processes_left

PDSERVE = [sys.executable, "-m", "pdserve"]


def test_up_generate_and_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "sk-cli-test-key"
    up = subprocess.Popen(
        [
            *PDSERVE,
            "up",
            "--model",
            str(tiny_model_dir),
            "--port",
            "0",
            "--http-port",
            "0",
            "--api-key",
            key,
            "--cpu",
            "--log-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        addr = None
        deadline = time.monotonic() + 120
        lines: list[str] = []
        assert up.stdout is not None  # stdout=PIPE
        while addr is None and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, f"pdserve up exited early: {''.join(lines)}"
            lines.append(line)
            m = re.search(r"serving on (\S+)", line)
            addr = m.group(1) if m else None
        assert addr, "pdserve up never reported serving"
        http = re.search(r"HTTP API on http://(\S+)/v1", up.stdout.readline())
        assert http, "pdserve up did not report its HTTP API"
        assert httpx.get(f"http://{http.group(1)}/health", timeout=10).json() == {"status": "SERVING"}
        redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)", "".join(lines))
        assert redis_port

        prompt = "def fibonacci(n):"
        common = ["--model", str(tiny_model_dir), "--max-tokens", "12", "--ignore-eos"]
        cluster = subprocess.run(
            [*PDSERVE, "generate", "--addr", addr, "--api-key", key, *common, prompt],
            capture_output=True,
            text=True,
            timeout=120,
        )
        local = subprocess.run(
            [*PDSERVE, "generate", "--local", *common, prompt], capture_output=True, text=True, timeout=120
        )
        assert cluster.returncode == 0, cluster.stderr
        assert local.returncode == 0, local.stderr
        assert cluster.stdout == local.stdout, "cluster completion differs from the single-process reference"
        assert cluster.stdout.strip(), "empty completion"

        for args, fragment in ((["--max-tokens", "0"], "max_tokens"), (["--max-kv-kl", "-1"], "max_kv_kl")):
            bad = subprocess.run(  # the key from the environment
                [*PDSERVE, "generate", "--addr", addr, *args, prompt],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PDSERVE_API_KEY": key},
            )
            assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and fragment in bad.stderr
        env = {k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"}
        unauth = subprocess.run(
            [*PDSERVE, "generate", "--addr", addr, prompt],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert unauth.returncode == 1 and "UNAUTHENTICATED" in unauth.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    assert_no_processes_left(f"127.0.0.1:{redis_port.group(1)}")  # its redis-server, instances, gateway
