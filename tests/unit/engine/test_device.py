from __future__ import annotations

import os

import pytest
import torch

from engine.device import Device, bind, parse_cpus


def test_parse_cpus():
    assert parse_cpus("0-1,3") == (0, 1, 3)
    assert parse_cpus("5, 2-3,2") == (2, 3, 5)
    assert parse_cpus("") == ()
    for bad in ("a", "3-1", "1-", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_device_constructors():
    assert Device.cpu("0-1") == Device("cpu", None, (0, 1))
    assert Device.cuda(1).torch_device == torch.device("cuda", 1)
    assert Device("cuda").cuda_index == 0
    with pytest.raises(ValueError):
        Device("tpu")  # type: ignore[arg-type]  # a kind the Literal type excludes: refused at run time too


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_bind_pins_to_available_cpus_and_skips_missing_ones():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        cpu = min(before)
        assert bind(Device("cpu", None, (cpu, 100_000))) == torch.device("cpu")  # 100000 does not exist
        assert os.sched_getaffinity(0) == {cpu}
        assert torch.get_num_threads() == 1
        bind(Device("cpu", None, (100_000,)))  # nothing usable: must not fail, must not change anything
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_bind_cuda_without_cuda_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        bind(Device.cuda(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bind_cuda_selects_the_device():
    assert bind(Device.cuda(0)) == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0


def test_pin_process_pins_threads_started_before_it() -> None:
    """Run in a child process (pinning pytest itself would slow the rest of the suite)."""
    import subprocess
    import sys

    code = """
import os, threading
from engine.device import pin_process
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
first = min(os.sched_getaffinity(0))
pin_process((first, 10_000))  # 10_000: not a cpu here, skipped
got = os.sched_getaffinity(t.native_id), os.sched_getaffinity(0)
stop.set(); t.join()
assert got == ({first}, {first}), got
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
