"""Open-loop load over the public gRPC API: send each request at its scheduled time, record its tokens.

:func:`run_open_loop` is the scheduler: request ``i`` is sent at ``start + scheduled_s`` whatever happened to
earlier requests (open loop: a slow system builds a queue, it does not slow the arrivals down), each send runs
in its own task, a request still running ``request_timeout_s`` after its scheduled arrival is cancelled and
counted as failed, and the whole run ends at most ``drain_s`` after the last scheduled arrival (stragglers are
cancelled and failed).  It only needs a ``send(request, record, now)`` coroutine, so it is tested on a fake
clock; :func:`grpc_sender` is the real one (``pdserve.v1.Generation/Generate`` over one ``grpc.aio`` channel, so
hundreds of concurrent streams are cheap), and :func:`run_load` puts the two together.

Times in the :class:`bench.metrics.RequestRecord` are seconds since the run start on one monotonic clock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from bench.metrics import RequestRecord
from bench.workload import BenchRequest
from pdserve.v1 import generation_pb2, generation_pb2_grpc

Now = Callable[[], float]
Send = Callable[[BenchRequest, RequestRecord, Now], Awaitable[None]]


class Clock:
    """The run's clock: ``now()`` in seconds, ``sleep_until(t)``. The real one is ``time.perf_counter``."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_open_loop(
    requests: Sequence[BenchRequest],
    send: Send,
    *,
    request_timeout_s: float,
    drain_s: float,
    clock: Clock | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
    stop: threading.Event | None = None,
) -> list[RequestRecord]:
    """Send every request on schedule; return one record per request, in request order.

    Setting `stop` (from another thread) ends the run early: nothing more is sent, requests in flight are
    cancelled and every request not answered counts as failed."""
    clock = clock or Clock()
    order = sorted(range(len(requests)), key=lambda i: requests[i].scheduled_s)
    records = [RequestRecord(r.index, r.scheduled_s, r.prompt_len, r.output_len) for r in requests]
    start = clock.now()

    def now() -> float:
        return clock.now() - start

    async def one(req: BenchRequest, rec: RequestRecord, budget_s: float) -> None:
        try:
            await asyncio.wait_for(send(req, rec, now), timeout=max(budget_s, 0.0))
        except TimeoutError:
            rec.fail("timeout: no complete answer within the request timeout")
        except asyncio.CancelledError:
            rec.fail("timeout: cancelled at the end of the run")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is an SLO miss, recorded with its cause
            rec.fail(f"{type(exc).__name__}: {exc}")
        finally:
            if on_done is not None:
                on_done(rec)

    tasks: list[asyncio.Task] = []
    for i in order:
        req, rec = requests[i], records[i]
        while stop is not None and not stop.is_set() and clock.now() < start + req.scheduled_s:
            await clock.sleep_until(min(start + req.scheduled_s, clock.now() + 0.2))
        if stop is not None and stop.is_set():
            break
        await clock.sleep_until(start + req.scheduled_s)
        rec.sent_s = now()
        budget_s = req.scheduled_s + request_timeout_s - rec.sent_s  # the timeout runs from the arrival
        tasks.append(asyncio.create_task(one(req, rec, budget_s)))
    for rec in records:
        if rec.sent_s is None:
            rec.fail("not sent: the run was stopped")
    if tasks:
        last = max(r.scheduled_s for r in requests)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, last + drain_s - now())
        pending = set(tasks)
        while pending and loop.time() < deadline and not (stop is not None and stop.is_set()):
            _, pending = await asyncio.wait(pending, timeout=min(0.2, max(0.0, deadline - loop.time())))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records


def grpc_sender(stub: generation_pb2_grpc.GenerationStub) -> Send:
    """Generate with the request's prompt ids, greedy, forcing ``output_len`` tokens (``ignore_eos``)."""

    async def send(req: BenchRequest, rec: RequestRecord, now: Now) -> None:
        msg = generation_pb2.GenerateRequest(
            prompt_token_ids=list(req.prompt_ids), max_tokens=req.output_len, ignore_eos=True
        )
        call = stub.Generate(msg)
        try:
            async for resp in call:
                if resp.token_ids:
                    rec.on_tokens(now(), len(resp.token_ids))
        except grpc.aio.AioRpcError as exc:
            rec.fail(f"{exc.code().name}: {exc.details()}")
        finally:
            if not call.done():
                call.cancel()

    return send


async def run_load(
    address: str,
    requests: Sequence[BenchRequest],
    *,
    request_timeout_s: float,
    drain_s: float,
    on_done: Callable[[RequestRecord], None] | None = None,
    stop: threading.Event | None = None,
) -> list[RequestRecord]:
    """:func:`run_open_loop` against a gateway at ``address`` over one channel."""
    options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 * 2**20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        stub = generation_pb2_grpc.GenerationStub(channel)
        return await run_open_loop(
            requests,
            grpc_sender(stub),
            request_timeout_s=request_timeout_s,
            drain_s=drain_s,
            on_done=on_done,
            stop=stop,
        )
