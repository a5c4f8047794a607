"""Cluster harness for e2e and integration tests: LocalClusters on loopback started with the suite's
defaults, and the one leak check every cluster test ends with (on every instance: all KV blocks free, no
leases, no request running or queued, block-manager integrity; no process left once a cluster stops).
The fixtures in tests/e2e/conftest.py are built on it; tests import its functions as `tests.cluster`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from pdserve import launcher
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.v1 import common_pb2

# Code-like prompts of varied lengths that the e2e and integration tests serve (the tiny and shipped models
# are trained on Python source).
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox",
    "for i in range(10):\n    print(i)",
    "# Licensed under the Apache License",
    "return",
    "x",
]
START_TIMEOUT_S = 180.0  # a CUDA cluster's start (model load, CUDA init) on a loaded host


def start_cluster(
    model_dir: Path, log_dir: Path, *, env: Mapping[str, str] | None = None, **kw: Any
) -> LocalCluster:
    """A CPU cluster (1P1D unless `prefill`/`decode` say otherwise) on a free port with a private
    redis-server, 256 KV blocks per instance and a 1.5 s heartbeat TTL; `kw` overrides any ClusterConfig
    field. `env` is set for the children only (e.g. PDSERVE_TRACE_FILE); this process is left as it was."""
    fields: dict[str, Any] = {
        "port": 0,
        "use_cuda": False,
        "num_kv_blocks": 256,
        "heartbeat_ttl_s": 1.5,
        "log_dir": str(log_dir),
    }
    fields.update(kw)
    cfg = ClusterConfig(model_dir=str(model_dir), **fields)
    with pytest.MonkeyPatch.context() as mp:  # the children inherit the environment at spawn time
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        return LocalCluster(cfg).start(timeout_s=START_TIMEOUT_S)


def stop_cluster(cluster: LocalCluster) -> None:
    """Stop it, then check that every process it started has exited (with a private redis-server: also
    that no process at all still has that Redis address on its command line)."""
    cluster.stop()
    assert all(c.proc.poll() is not None for c in cluster.children), "a process outlived stop()"
    if cluster.cfg.redis_url is None and cluster.redis_url:
        assert_no_processes_left(redis_address(cluster.redis_url))


def stop_all(clusters: list[LocalCluster]) -> None:
    """Stop several clusters side by side (their shutdowns overlap), then check each as stop_cluster does."""
    with ThreadPoolExecutor(max(1, len(clusters))) as pool:
        list(pool.map(lambda c: c.stop(), clusters))
    for c in clusters:
        stop_cluster(c)  # already stopped: only the checks run


def start_many(
    specs: Mapping[str, tuple[Path, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LocalCluster]:
    """{name: (model_dir, ClusterConfig overrides)} -> {name: started cluster}, started side by side. If any
    fails to start, the others are stopped and one error names every cause. (No `env` here: the
    environment is the process's, and these start at the same time.)"""
    started: dict[str, LocalCluster] = {}
    errors: list[str] = []
    with ThreadPoolExecutor(max(1, len(specs))) as pool:
        futures = {
            name: pool.submit(start_cluster, model, tmp_path_factory.mktemp(f"cluster-{name}") / "logs", **kw)
            for name, (model, kw) in specs.items()
        }
        for name, fut in futures.items():
            try:
                started[name] = fut.result()
            except Exception as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
    if errors:
        stop_all(list(started.values()))
        raise RuntimeError("cluster start failed: " + "; ".join(errors))
    return started


@contextmanager
def running_cluster(model_dir: Path, log_dir: Path, **kw: Any) -> Iterator[LocalCluster]:
    """start_cluster ... stop_cluster around a block."""
    cluster = start_cluster(model_dir, log_dir, **kw)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def instance_stats(cluster: LocalCluster | str) -> list[common_pb2.InstanceStats]:
    """Every registered instance's Stats RPC (prefill, decode or colocated); `cluster` or its Redis URL (a
    cluster `pdserve up` started in a subprocess)."""
    redis_url = cluster if isinstance(cluster, str) else cluster.redis_url
    return list(launcher.instance_stats(redis_url, timeout_s=5).values())


def _idle(s: common_pb2.InstanceStats) -> bool:
    return (
        s.kv_blocks_free == s.kv_blocks_total
        and s.leases == 0
        and s.running == 0
        and s.queue_len == 0
        and s.integrity_ok
    )


def assert_no_leaks(cluster: LocalCluster | str, timeout_s: float = 10.0) -> None:
    """Within timeout_s every instance (of `cluster`, or of the cluster registered at this Redis URL) is back
    to all KV blocks free, no leases, no request running or queued, and its block manager's integrity check
    holds (waits for it: a cancelled request's blocks come back asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stats = instance_stats(cluster)
        except grpc.RpcError as e:  # an instance that just died is in the registry until its entry's TTL
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if (stats and all(_idle(s) for s in stats)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats, "no instances registered"
    for s in stats:
        who = f"{s.role} {s.instance_id}"
        assert s.integrity_ok, f"{who}: check_integrity failed"
        assert s.leases == 0, f"{who}: {s.leases} KV leases still held"
        assert s.kv_blocks_free == s.kv_blocks_total, (
            f"{who}: {s.kv_blocks_total - s.kv_blocks_free} blocks leaked"
        )
        assert s.running == 0 and s.queue_len == 0, f"{who}: {s.running} running, {s.queue_len} queued"


def redis_address(redis_url: str) -> str:
    """redis://127.0.0.1:6390/0 -> 127.0.0.1:6390 (what every process of that cluster has on its command
    line: the children's --redis-url, and the private redis-server's process title)."""
    parts = urlsplit(redis_url)
    return f"{parts.hostname}:{parts.port}"


def processes_mentioning(fragment: str) -> list[int]:
    """Pids (other than this one) whose command line contains `fragment`."""
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


def assert_no_processes_left(fragment: str, timeout_s: float = 2.0) -> None:
    """Within timeout_s no process has `fragment` on its command line. Called once whatever started them has
    waited for them, so none should remain at all; the short grace is for grandchildren a dying child did not
    wait for (re-parented, they exit on their own)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(fragment)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"processes left behind: {left} ({fragment})"


def log_tails(clusters: list[LocalCluster], lines: int = 30) -> str:
    """The last `lines` lines of each child's log file of `clusters` (what a failed test reports)."""
    out = []
    for c in clusters:
        if not c.cfg.log_dir:
            continue
        for f in sorted(Path(c.cfg.log_dir).glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(out)


class Clusters:
    """Starts clusters into per-cluster temporary log folders; `close()` stops every one still running and
    runs the process leak check on each. A failed test reports their logs' tails (tests/e2e/conftest.py)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._started: list[LocalCluster] = []

    def start(self, model_dir: Path, *, env: Mapping[str, str] | None = None, **kw: object) -> LocalCluster:
        cluster = start_cluster(model_dir, self._tmp.mktemp("cluster") / "logs", env=env, **kw)
        self._started.append(cluster)
        return cluster

    def start_many(self, specs: Mapping[str, tuple[Path, dict[str, object]]]) -> dict[str, LocalCluster]:
        started = start_many(specs, self._tmp)
        self._started.extend(started.values())
        return started

    @property
    def started(self) -> list[LocalCluster]:
        return list(self._started)

    def close(self) -> None:
        started, self._started = self._started, []
        stop_all(started)
