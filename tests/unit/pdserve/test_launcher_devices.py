"""Device assignment of the local launcher: disjoint CUDA devices or CPU cores, and --share-cuda.

The CUDA device count is faked (monkeypatched torch.cuda) so that the multi-GPU and one-GPU cases run on
CPU-only CI; the launcher only reads the count.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.launcher import assign_devices


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_one_cuda_device_per_instance_when_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 4)
    assert assign_devices(2, (), use_cuda=True) == [["--cuda", "0"], ["--cuda", "1"]]


def test_too_few_cuda_devices_fall_back_to_disjoint_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1)
    assert assign_devices(2, (0, 1, 2), use_cuda=True) == [["--cpus", "0,1"], ["--cpus", "2"]]


def test_share_cuda_puts_instances_round_robin_on_the_devices_there_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_cuda(monkeypatch, 2)
    got = assign_devices(3, (0, 1), use_cuda=True, share_cuda=True)
    assert got == [["--cuda", "0"], ["--cuda", "1"], ["--cuda", "0"]]


def test_share_cuda_without_cuda_and_use_cuda_off_use_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    assert assign_devices(2, (0, 1), use_cuda=True, share_cuda=True) == [["--cpus", "0"], ["--cpus", "1"]]
    _fake_cuda(monkeypatch, 2)
    assert assign_devices(2, (0, 1), use_cuda=False, share_cuda=True) == [["--cpus", "0"], ["--cpus", "1"]]
