"""The open-loop load runner on a fake clock: sends on schedule whatever the completions, records
tokens, and turns errors, timeouts and end-of-run stragglers into failed records."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.metrics import RequestRecord
from bench.serving import Clock, run_open_loop
from bench.workload import BenchRequest, Workload, make_requests


class FakeClock(Clock):
    """Time moves only when the scheduler sleeps: every send happens exactly at its scheduled time."""

    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        await asyncio.sleep(0)


def _requests(n: int = 20) -> list[BenchRequest]:
    return make_requests(Workload("w", n_requests=n, rate=5.0, seed=3), list(range(1000)))


def test_sends_on_schedule_without_waiting_for_completions() -> None:
    reqs = _requests()
    clock = FakeClock()
    release = asyncio.Event()
    sent: list[tuple[int, float]] = []

    async def send(req: BenchRequest, rec: RequestRecord, now) -> None:
        sent.append((req.index, now()))
        if len(sent) == len(reqs):
            release.set()
        await release.wait()  # nothing completes until everything was sent: open loop
        rec.on_tokens(now(), req.output_len)

    records = asyncio.run(run_open_loop(reqs, send, request_timeout_s=5, drain_s=5, clock=clock))
    assert [i for i, _ in sent] == [r.index for r in sorted(reqs, key=lambda r: r.scheduled_s)]
    for req, rec in zip(reqs, records, strict=True):
        assert rec.sent_s == pytest.approx(req.scheduled_s, abs=1e-9)
        assert rec.ok and len(rec.token_times) == req.output_len
    assert [r.index for r in records] == [r.index for r in reqs]


def test_errors_and_timeouts_are_failed_records() -> None:
    reqs = _requests(6)

    async def send(req: BenchRequest, rec: RequestRecord, now) -> None:
        if req.index % 3 == 0:
            raise RuntimeError("boom")
        if req.index % 3 == 1:
            await asyncio.Event().wait()  # never answers
        rec.on_tokens(now(), 1)

    records = asyncio.run(run_open_loop(reqs, send, request_timeout_s=0.05, drain_s=1.0, clock=FakeClock()))
    for rec in records:
        if rec.index % 3 == 0:
            assert not rec.ok and "boom" in (rec.error or "")
        elif rec.index % 3 == 1:
            assert not rec.ok and (rec.error or "").startswith("timeout")
        else:
            assert rec.ok and len(rec.token_times) == 1


def test_run_is_bounded_in_time() -> None:
    reqs = _requests(4)
    done: list[int] = []

    async def send(req: BenchRequest, rec: RequestRecord, now) -> None:
        await asyncio.Event().wait()

    records = asyncio.run(
        run_open_loop(
            reqs,
            send,
            request_timeout_s=60,
            drain_s=0.1,
            clock=FakeClock(),
            on_done=lambda r: done.append(r.index),
        )
    )
    assert all(not r.ok and (r.error or "").startswith("timeout") for r in records)
    assert sorted(done) == [r.index for r in reqs]


def test_stop_ends_the_run_early() -> None:
    reqs = make_requests(Workload("w", n_requests=10, rate=1.0, seed=3), list(range(1000)))  # spans ~10 s
    stop = threading.Event()

    async def send(req: BenchRequest, rec: RequestRecord, now) -> None:
        if req.index == 1:
            stop.set()
        await asyncio.Event().wait()

    t = time.monotonic()
    records = asyncio.run(run_open_loop(reqs, send, request_timeout_s=60, drain_s=60, stop=stop))
    assert time.monotonic() - t < 2.0
    assert all(not r.ok for r in records)
    assert sum(r.sent_s is None for r in records) >= 7
