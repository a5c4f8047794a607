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


def test_every_rank_of_a_tp_pp_instance_gets_its_own_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TP2 prefill and a TP1 decode on 6 cores: three rank sets of two cores; the prefill instance gets its
    two ranks' sets, which the service splits back into the same two (engine.parallel.runner.rank_devices)."""
    _fake_cuda(monkeypatch, 0)
    got = assign_devices(2, tuple(range(6)), use_cuda=True, ranks=[2, 1])
    assert got == [["--cpus", "0,1,2,3"], ["--cpus", "4,5"]]
    # uneven: 5 cores for 3 ranks -> sets of 2, 2, 1
    assert assign_devices(2, tuple(range(5)), use_cuda=False, ranks=[1, 2]) == [
        ["--cpus", "0,1"],
        ["--cpus", "2,3,4"],
    ]


def test_fewer_cores_than_ranks_oversubscribes_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_cuda(monkeypatch, 0)
    with caplog.at_level("WARNING", logger="pdserve.launcher"):
        got = assign_devices(2, (0, 1), use_cuda=True, ranks=[2, 2])
    assert got == [["--cpus", "0,1"], ["--cpus", "0,1"]]
    assert "4 ranks on 2 cores" in caplog.text
    with caplog.at_level("WARNING", logger="pdserve.launcher"):
        assert assign_devices(2, (0, 1, 2), use_cuda=False, ranks=[1, 4]) == [
            ["--cpus", "0"],
            ["--cpus", "0,1,2"],
        ]


def test_cuda_one_device_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 4)
    assert assign_devices(2, (), use_cuda=True, ranks=[2, 2]) == [["--cuda", "0"], ["--cuda", "2"]]
    # 3 ranks' worth of devices for 4 ranks: cores, unless shared (each instance's ranks on devices that exist)
    _fake_cuda(monkeypatch, 3)
    assert assign_devices(2, (0, 1, 2, 3), use_cuda=True, ranks=[2, 2]) == [
        ["--cpus", "0,1"],
        ["--cpus", "2,3"],
    ]
    assert assign_devices(2, (), use_cuda=True, share_cuda=True, ranks=[2, 2]) == [
        ["--cuda", "0"],
        ["--cuda", "0"],
    ]


def test_cluster_config_passes_each_roles_layout() -> None:
    from pdserve.launcher import ClusterConfig

    cfg = ClusterConfig(model_dir="m", prefill_tp=2, decode_pp=2)
    assert cfg.layout_args("prefill") == ["--tp", "2", "--pp", "1"]
    assert cfg.layout_args("decode") == ["--tp", "1", "--pp", "2"]
    assert ClusterConfig(model_dir="m").layout_args("prefill") == [] and cfg.layout_args("colocated") == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--prefill-tp", "3"],
            "--prefill-tp 3 --prefill-pp 1: tp=3 does not divide the model's 8 attention heads",
        ),
        (["--decode-pp", "9"], "--decode-tp 1 --decode-pp 9: pp=9 exceeds the model's 5 layers"),
        (["--prefill-tp", "2", "--colocated"], "do not apply to --colocated"),
    ],
)
def test_up_refuses_a_layout_the_model_cannot_take_before_starting_anything(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["up", "--port", "0", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
