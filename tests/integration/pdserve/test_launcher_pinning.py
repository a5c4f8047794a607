"""A local cluster pins what it is told to: every thread of each instance to its cores (gRPC's and the
telemetry exporter's included, which start before the engine pins itself), and the coordinator to
`coordinator_cpus`. Real processes; Linux only (/proc)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.launcher import ClusterConfig, LocalCluster

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")


def _thread_affinities(pid: int) -> set[frozenset[int]]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:  # the thread exited meanwhile
            pass
    return out


def test_instances_and_coordinator_are_pinned(tiny_model_dir: Path, tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    a, b = cores[0], cores[1]
    cfg = ClusterConfig(
        model_dir=str(tiny_model_dir),
        port=0,
        use_cuda=False,
        cpus=(a, b),
        coordinator_cpus=(a,),
        num_kv_blocks=64,
        log_dir=str(tmp_path / "logs"),
    )
    cluster = LocalCluster(cfg).start(timeout_s=120)
    try:
        want = {"prefill": {frozenset({a})}, "decode": {frozenset({b})}, "coordinator": {frozenset({a})}}
        for child in cluster.children:
            assert _thread_affinities(child.proc.pid) == want[child.role], child.role
    finally:
        cluster.stop()
