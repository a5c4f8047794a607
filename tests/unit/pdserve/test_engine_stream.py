"""EngineStream's hand-off from engine threads to the event loop: order kept, one wake-up per burst."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve import instance


def test_events_from_threads_arrive_in_order_per_stream() -> None:
    async def main() -> tuple[list[int], list[int]]:
        a, b = instance.EngineStream(), instance.EngineStream()

        def produce() -> None:
            for i in range(500):
                a.emit(i)
                b.emit(-i)

        threads = [threading.Thread(target=produce)]
        for th in threads:
            th.start()
        got_a = [await a._queue.get() for _ in range(500)]
        got_b = [await b._queue.get() for _ in range(500)]
        for th in threads:
            th.join()
        return got_a, got_b

    got_a, got_b = asyncio.run(main())
    assert got_a == list(range(500))
    assert got_b == [-i for i in range(500)]


def test_a_burst_posted_before_the_loop_runs_wakes_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        streams = [instance.EngineStream() for _ in range(16)]

        def step() -> None:  # one decode step of a batch of 16: one token per request
            for i, s in enumerate(streams):
                s.emit(i)

        th = threading.Thread(target=step)
        th.start()
        th.join()  # the loop did not run meanwhile: every event is in the mailbox
        got = [await s._queue.get() for s in streams]
        step()  # and again from the loop's own thread, after the first drain
        await asyncio.sleep(0)
        got += [s._queue.get_nowait() for s in streams]
        return wakeups, got

    wakeups, got = asyncio.run(main())
    assert got == list(range(16)) * 2
    assert wakeups == 2


def test_a_closed_loop_does_not_wedge_the_mailbox() -> None:
    loop = asyncio.new_event_loop()
    box = instance._Mailbox(loop)
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop.close()
    for _ in range(2):  # each post raises (nothing reads these events); none leaves the mailbox stuck
        try:
            box.post(queue, 1)
        except RuntimeError:
            pass
        else:
            raise AssertionError("posting to a closed loop must raise")
    assert box._items == []
