"""End to end overload: beyond --max-queue requests waiting for their first token, the gateway answers
RESOURCE_EXHAUSTED at once (no timeout), and the queued request is served once the prefill moves again."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import grpc

from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import assert_no_leaks


def test_requests_beyond_max_queue_get_resource_exhausted_at_once(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, max_queue=1)
    prefill = next(c for c in cluster.children if c.role == "prefill")
    prefill.proc.send_signal(signal.SIGSTOP)  # every request waits for its first token

    def call(i: int) -> tuple[str, float]:
        start = time.monotonic()
        with Client(cluster.gateway_address) as client:
            try:
                client.generate(f"request {i}", max_tokens=4, ignore_eos=True, timeout=120)
                return "OK", time.monotonic() - start
            except grpc.RpcError as exc:
                return exc.code().name, time.monotonic() - start

    try:
        with ThreadPoolExecutor(3) as pool:
            pending = {pool.submit(call, i) for i in range(3)}
            refused: list[tuple[str, float]] = []  # (status code name, seconds to the answer)
            while len(refused) < 2:  # two answers come back while the prefill is still stopped
                done, pending = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                assert done, "no answer within 60 s: the gateway queued beyond --max-queue"
                refused += [f.result() for f in done]
            prefill.proc.send_signal(signal.SIGCONT)
            (served,) = [f.result() for f in pending]
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
    assert [code for code, _ in refused] == ["RESOURCE_EXHAUSTED"] * 2
    assert all(took < 10 for _, took in refused)
    assert served[0] == "OK"
    assert_no_leaks(cluster)
