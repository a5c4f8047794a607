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

PDSERVE = [sys.executable, "-m", "pdserve"]


def _procs_mentioning(fragment: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            pids.append(int(entry))
    return pids


def test_up_generate_and_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
    up = subprocess.Popen(
        [*PDSERVE, "up", "--model", str(tiny_model_dir), "--port", "0", "--cpu", "--log-dir", str(tmp_path)],
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
        redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)", "".join(lines))
        assert redis_port

        prompt = "def fibonacci(n):"
        common = ["--model", str(tiny_model_dir), "--max-tokens", "12", "--ignore-eos"]
        cluster = subprocess.run(
            [*PDSERVE, "generate", "--addr", addr, *common, prompt],
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
            bad = subprocess.run(
                [*PDSERVE, "generate", "--addr", addr, *args, prompt],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and fragment in bad.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    time.sleep(0.5)
    leftovers = _procs_mentioning(f"127.0.0.1:{redis_port.group(1)}")
    assert leftovers == [], f"processes left behind after Ctrl-C: {leftovers}"
