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


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_flood_past_the_kv_budget_is_refused_at_once_and_memory_stays_bounded(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    # 1P1D, 16 blocks of 16 tokens on the decode instance: a KV budget of 1.0 is 256 tokens, and each
    # request reserves 8 prompt + 24 output = 32 of them, so exactly 8 are admitted at a time.
    # The pure split: with the prefill instance stopped, no prompt may be prefilled on the decode instance.
    cluster = start_cluster(tiny_model_dir, num_kv_blocks=16, kv_budget=1.0, local_prefill="off")
    admitted, flood = 8, 300
    coordinator = next(c for c in cluster.children if c.role == "coordinator")
    prefill = next(c for c in cluster.children if c.role == "prefill")
    prefill.proc.send_signal(signal.SIGSTOP)  # the admitted requests hold their KV budget until SIGCONT

    def call(client: Client) -> tuple[str, float, str]:
        start = time.monotonic()
        try:
            client.generate(list(range(1, 9)), max_tokens=24, ignore_eos=True, timeout=120)
            return "OK", time.monotonic() - start, ""
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - start, exc.details() or ""

    rss: list[int] = []  # the coordinator's RSS (KiB) after the warm-up and at the end of the flood
    try:
        with Client(cluster.gateway_address) as client, ThreadPoolExecutor(admitted + 8) as pool:
            futures = [pool.submit(call, client) for _ in range(flood)]
            pending = set(futures)
            deadline = time.monotonic() + 180
            while len(pending) > admitted:  # every request but the admitted ones is answered: none waits
                assert time.monotonic() < deadline, (
                    f"{len(pending)} requests unanswered: admitted past the budget"
                )
                done, pending = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                if not rss and flood - len(pending) >= 50:
                    rss.append(_rss_kib(coordinator.proc.pid))
            rss.append(_rss_kib(coordinator.proc.pid))
            prefill.proc.send_signal(signal.SIGCONT)
            results = [f.result() for f in futures]
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
    codes = [code for code, _, _ in results]
    assert codes.count("OK") == admitted and codes.count("RESOURCE_EXHAUSTED") == flood - admitted, codes
    refused = [(took, detail) for code, took, detail in results if code == "RESOURCE_EXHAUSTED"]
    assert all("KV budget" in detail for _, detail in refused), refused[0]
    assert max(took for took, _ in refused) < 10, "a refusal was not at once"
    # 250 refusals after the warm-up leave the gateway's memory where it was (a few MiB of allocator noise)
    assert rss[1] - rss[0] < 8 * 1024, f"coordinator RSS grew {rss[0]} -> {rss[1]} KiB under the flood"
    assert_no_leaks(cluster)
