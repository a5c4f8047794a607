"""A colocated instance run as TP2 x PP2 rank processes (`--tp 2 --pp 2`) behind the gateway: greedy output equals the
single-process reference, the registry records the layout, and killing one rank takes the instance out of
the registry with a clear error for the request it was serving, no hang and no process left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import assert_no_leaks, running_cluster

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n" * 3, "x"]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(
        tiny_model_dir,
        tmp_path_factory.mktemp("colocated-tp2") / "logs",
        colocated=1,
        extra_instance_args=("--tp", "2", "--pp", "2"),
    ) as c:
        yield c


def rank_pids(instance_pid: int) -> list[int]:
    """Pids of the rank processes an instance started (its children running engine.parallel.worker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == instance_pid and b"engine.parallel.worker" in cmd:
            out.append(int(entry))
    return out


def test_tp2xpp2_greedy_output_equals_single_process_reference(
    cluster: LocalCluster, tiny_model_dir: Path
) -> None:
    reference = LocalEngine.from_model_dir(str(tiny_model_dir))
    tok = reference.tokenizer
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = reference.generate([tok.encode(p) for p in PROMPTS], params)
    with Client(cluster.gateway_address) as client:
        for prompt, p, want in zip(PROMPTS, params, expected, strict=True):
            got = client.generate(prompt, max_tokens=p.max_tokens, ignore_eos=True, timeout=60)
            assert got.token_ids == want, f"prompt {prompt!r}: TP2xPP2 {got.token_ids} != reference {want}"
    (info,) = Registry(cluster.redis_url).instances("colocated")
    assert (info.tp, info.pp) == (2, 2)
    assert len(info.rank_devices) == 4 and all(d.startswith("cpu:") for d in info.rank_devices)
    assert_no_leaks(cluster)


def test_killing_one_rank_takes_the_instance_out_with_a_clear_error(cluster: LocalCluster) -> None:
    (info,) = Registry(cluster.redis_url).instances("colocated")
    instance = next(c for c in cluster.children if c.role == "colocated")
    ranks = rank_pids(instance.proc.pid)
    assert len(ranks) == 3
    victim: int | None = ranks[1]
    with Client(cluster.gateway_address) as client:
        stream = client.stream("def fibonacci(n):" * 4, max_tokens=1500, ignore_eos=True, timeout=60)
        got = 0
        with pytest.raises(grpc.RpcError) as err:
            for msg in stream:
                got += len(msg.token_ids)
                if got >= 3 and victim is not None:
                    os.kill(victim, signal.SIGKILL)
                    victim = None
    assert victim is None, "the rank was killed mid-stream"
    # the gateway had no other instance to resume on: the client hears why instead of hanging
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    instance.proc.wait(timeout=15)  # the instance stopped itself
    deadline = time.monotonic() + 10
    while any(i.instance_id == info.instance_id for i in Registry(cluster.redis_url).instances()):
        assert time.monotonic() < deadline, "the broken instance is still registered"
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while left := [pid for pid in ranks if alive(pid)]:
        assert time.monotonic() < deadline, f"rank processes {left} outlived their instance"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
