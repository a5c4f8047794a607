"""End to end failover: instances killed (SIGKILL) under a request; the client's whole output must equal the
single-process reference (what `pdserve generate --local` prints), with no token lost or repeated.

Kills are triggered by what the client or an instance reports (tokens received, a Stats RPC showing the
request there), never by a sleep."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import Child, LocalCluster, instance_stats
from pdserve.v1 import common_pb2
from tests.cluster import assert_no_leaks

PROMPT = "class Stack:\n    def __init__(self):\n        self.items = []\n"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


def _expected(reference: LocalEngine, prompt_ids: list[int], kw: dict) -> list[int]:
    params = SamplingParams(ignore_eos=True, **kw)
    return reference.generate([prompt_ids], [params])[0]


def _child_of(cluster: LocalCluster, instance_id: str) -> Child:
    """The process of a registered instance (its id is role-host-PID-suffix)."""
    pid = int(instance_id.split("-")[-2])
    return next(c for c in cluster.children if c.proc.pid == pid)


def _stats(cluster: LocalCluster, role: str) -> list[tuple[str, common_pb2.InstanceStats]]:
    """(instance id, Stats) of the registered `role` instances that answer."""
    stats = instance_stats(
        cluster.redis_url, role, channel=cluster.instance_channel, timeout_s=5, skip_unreachable=True
    )
    return list(stats.items())


def _wait_gone(cluster: LocalCluster, pids: list[int], timeout_s: float = 10.0) -> None:
    """Until no registered instance belongs to one of `pids` (their keys expired: TTL)."""
    deadline = time.monotonic() + timeout_s
    while any(int(i.instance_id.split("-")[-2]) in pids for i in Registry(cluster.redis_url).instances()):
        assert time.monotonic() < deadline, f"killed instances {pids} still registered"
        time.sleep(0.1)


def _failovers(cluster: LocalCluster) -> list[str]:
    """The coordinator's failover log lines."""
    coord = next(c for c in cluster.children if c.role == "coordinator")
    assert coord.log_path is not None
    return [line for line in Path(coord.log_path).read_text().splitlines() if "retrying (failover" in line]


def _stream(
    cluster: LocalCluster, prompt_ids: list[int], kw: dict, on_tokens: Callable[[int], None]
) -> list[int]:
    """The whole output of one streamed request; on_tokens(count so far) after every message."""
    tokens: list[int] = []
    finish = ""
    with Client(cluster.gateway_address) as client:
        for msg in client.stream(prompt_ids, ignore_eos=True, timeout=120, **kw):
            tokens.extend(msg.token_ids)
            finish = msg.finish_reason or finish
            on_tokens(len(tokens))
    assert finish == "length"
    return tokens


@pytest.mark.parametrize(
    "kw",
    [{"max_tokens": 300}, {"max_tokens": 300, "temperature": 1.0, "top_k": 50, "seed": 11}],
    ids=["greedy", "seeded"],
)
def test_decode_killed_mid_stream_resumes_on_the_other_decode_exactly(
    kw: dict, tiny_model_dir: Path, reference: LocalEngine, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=2)
    prompt_ids = reference.tokenizer.encode(PROMPT)
    killed: list[int] = []

    def kill_serving_decode(received: int) -> None:
        if killed or received < 20:
            return
        busy = [iid for iid, s in _stats(cluster, "decode") if s.running > 0]
        assert len(busy) == 1, f"the request should run on one decode instance, found {busy}"
        child = _child_of(cluster, busy[0])
        killed.append(child.proc.pid)
        cluster.kill(child, signal.SIGKILL)

    out = _stream(cluster, prompt_ids, kw, kill_serving_decode)
    assert killed, "the stream finished before the kill"
    assert out == _expected(reference, prompt_ids, kw)
    assert len(_failovers(cluster)) >= 1
    _wait_gone(cluster, killed)
    assert_no_leaks(cluster)


def test_prefill_killed_before_the_kv_was_pulled_resumes_exactly(
    tiny_model_dir: Path, reference: LocalEngine, start_cluster: Callable[..., LocalCluster]
) -> None:
    """The decode instance is stopped (SIGSTOP) so it cannot pull; the prefill instance dies holding the
    lease once the first token is out; the decode instance, resumed, fails its pull and the gateway resumes
    the request there from prompt + first token."""
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1)
    prompt_ids = reference.tokenizer.encode(PROMPT)
    kw = {"max_tokens": 40}
    decode = next(c for c in cluster.children if c.role == "decode")
    prefill = next(c for c in cluster.children if c.role == "prefill")
    decode.proc.send_signal(signal.SIGSTOP)
    killed: list[int] = []

    def kill_prefill(received: int) -> None:
        if not killed:
            killed.append(prefill.proc.pid)
            cluster.kill(prefill, signal.SIGKILL)
            decode.proc.send_signal(signal.SIGCONT)

    try:
        out = _stream(cluster, prompt_ids, kw, kill_prefill)
    finally:
        decode.proc.send_signal(signal.SIGCONT)
    assert out == _expected(reference, prompt_ids, kw)
    assert len(_failovers(cluster)) == 1
    _wait_gone(cluster, killed)
    assert_no_leaks(cluster)


def test_prefill_killed_mid_prompt_is_retried_on_the_other_prefill_exactly(
    tiny_model_dir: Path, reference: LocalEngine, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, prefill=2, decode=1)
    text = PROMPT * 200
    prompt_ids = reference.tokenizer.encode(text)[:1500]  # several prefill passes: time to see it running
    kw = {"max_tokens": 24}
    result: list[list[int]] = []
    errors: list[BaseException] = []
    first_token = threading.Event()

    def run() -> None:
        try:
            result.append(_stream(cluster, prompt_ids, kw, lambda n: first_token.set()))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            errors.append(exc)

    client = threading.Thread(target=run)
    client.start()
    killed: list[int] = []
    deadline = time.monotonic() + 60
    while not killed:
        assert time.monotonic() < deadline and not first_token.is_set(), "never saw the prompt on a prefill"
        holding = [iid for iid, s in _stats(cluster, "prefill") if s.leases > 0]
        if holding:
            child = _child_of(cluster, holding[0])
            killed.append(child.proc.pid)
            cluster.kill(child, signal.SIGKILL)
    client.join(120)
    assert not errors, errors
    assert result == [_expected(reference, prompt_ids, kw)]
    assert any("prefill instance" in line for line in _failovers(cluster))
    _wait_gone(cluster, killed)
    assert_no_leaks(cluster)


def test_no_decode_back_in_time_is_a_clear_unavailable(
    tiny_model_dir: Path, reference: LocalEngine, start_cluster: Callable[..., LocalCluster]
) -> None:
    """1P1D, nothing restarts the decode instance: after --failover-wait the client gets UNAVAILABLE naming
    the failure, after the tokens it already had (a status, not a reset)."""
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1, failover_wait_s=1.0)
    decode = next(c for c in cluster.children if c.role == "decode")
    prompt_ids = reference.tokenizer.encode(PROMPT)
    received: list[int] = []
    with Client(cluster.gateway_address) as client, pytest.raises(grpc.RpcError) as err:
        for msg in client.stream(prompt_ids, max_tokens=300, ignore_eos=True, timeout=60):
            received.extend(msg.token_ids)
            if len(received) >= 20 and decode.proc.poll() is None:
                decode.proc.send_signal(signal.SIGKILL)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details() or ""
    assert "no decode instance" in details and "waited 1s" in details and "decode instance" in details
    expected = _expected(reference, prompt_ids, {"max_tokens": 300})
    assert 20 <= len(received) < 300 and received == expected[: len(received)]
