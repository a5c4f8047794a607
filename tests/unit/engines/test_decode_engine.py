"""The decode step loop in process, with a fake runner and a fake KV puller: admission when the blocks
for prompt + max_tokens are free, no decoding before the pulled KV is complete, local prefill between
two decode steps, finishing / cancelling / failing in every phase frees the blocks, and requests that
can never fit are rejected at submit."""

from __future__ import annotations

import threading

import pytest

from decode_service.engine import DecodeEngine, DecodeJob, Tokens
from engine.params import SamplingParams
from pdserve.errors import Cancelled, CapacityExceeded, InvalidRequest, PDServeError, Unavailable


@pytest.fixture
def engine_for(make_runner, puller, started):
    def build(num_blocks: int, max_running: int = 8, max_batch_tokens: int = 16) -> DecodeEngine:
        runner = make_runner(num_blocks)
        return started(
            DecodeEngine(runner, puller, max_running, max_queue=8, max_batch_tokens=max_batch_tokens)
        )

    return build


def _job(
    events, rid: str, prompt_len: int, max_tokens: int, local: bool = False, max_kl: float | None = None
) -> DecodeJob:
    return DecodeJob(
        rid,
        [100 + i for i in range(prompt_len)],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        events.emit_for(rid),
        kv_address="" if local else "tcp://prefill:1",
        transfer_id="" if local else rid,
        codec="raw",
        first_token_id=None,
        local_prefill=local,
        max_kl=max_kl,
    )


def _finished(ev) -> bool:
    return isinstance(ev, Tokens) and ev.finish_reason is not None


def _tokens(events, rid: str) -> list[int]:
    return [t for ev in events.of[rid] if isinstance(ev, Tokens) for t in ev.token_ids]


def _all_free(engine: DecodeEngine) -> bool:
    return engine.block_manager.num_free == engine.block_manager.num_blocks


def test_decodes_only_after_the_whole_prompt_kv_arrived(engine_for, events, puller, timeline):
    engine = engine_for(num_blocks=16)
    job = _job(events, "a", prompt_len=6, max_tokens=4, max_kl=0.002)
    engine.submit(job)
    timeline.wait_for(lambda: ("pull", "a") in timeline.entries)
    assert puller.floors == [0.002]  # the request's max_kv_kl goes into the PULL
    puller.send_layers("a", 1, 6)  # layer 0 arrives; the sequence must not decode yet
    timeline.wait_for(lambda: ("layer", "a", 0) in timeline.entries)
    puller.send_layers("a", 1, 6)
    puller.finish("a", first_token_id=500, num_tokens=6)
    events.wait("a", _finished)
    (layer0, blocks), (layer1, blocks1) = engine.runner.kv_cache.writes
    assert (layer0, layer1) == (0, 1) and blocks == blocks1
    assert len(blocks) == 3  # the job's blocks: prompt + max_tokens = 10 tokens, 4 per block
    assert timeline.index("layer", "a", 1) < timeline.index("pass", "decode", ["a"])
    first = events.of["a"][0]
    assert first.token_ids == [] and first.transfer_s > 0  # the prefill instance sampled token 500
    assert _tokens(events, "a") == [501, 502, 503] and events.of["a"][-1].finish_reason == "length"
    assert timeline.passes() == [("decode", ["a"], [1])] * 3
    assert _all_free(engine)
    engine.check_integrity()


def test_admits_when_the_blocks_for_prompt_and_max_tokens_are_free(engine_for, events, puller, timeline):
    engine = engine_for(num_blocks=8)  # 32 tokens
    a, b = _job(events, "a", 8, 12), _job(events, "b", 8, 8)  # 5 blocks, then 4: b must wait for a
    engine.submit(a)
    engine.submit(b)
    timeline.wait_for(lambda: ("pull", "a") in timeline.entries)
    assert engine.stats() == {"queue_len": 2, "running": 0}  # a pulling, b waiting
    puller.finish("a", 200, 8)
    events.wait("a", _finished)
    timeline.wait_for(lambda: ("pull", "b") in timeline.entries)
    assert timeline.index("event", "a") < timeline.index("pull", "b")
    a_done = max(i for i, e in enumerate(timeline.entries) if e[:2] == ("event", "a"))
    assert a_done < timeline.index("pull", "b")  # b's blocks came from a's finish
    puller.finish("b", 300, 8)
    events.wait("b", _finished)
    assert _tokens(events, "a") == list(range(201, 212)) and _tokens(events, "b") == list(range(301, 308))
    assert _all_free(engine)
    engine.check_integrity()


def test_max_running_bounds_the_admitted_sequences(engine_for, events, puller, timeline):
    engine = engine_for(num_blocks=64, max_running=2)
    jobs = [_job(events, rid, 4, 2) for rid in "abc"]
    for job in jobs:
        engine.submit(job)
    timeline.wait_for(lambda: ("pull", "b") in timeline.entries)
    assert engine.stats() == {"queue_len": 3, "running": 0}
    puller.finish("a", 10, 4)
    events.wait("a", _finished)
    timeline.wait_for(lambda: ("pull", "c") in timeline.entries)
    assert timeline.index("pull", "c") > max(
        i for i, e in enumerate(timeline.entries) if e[:2] == ("event", "a")
    )
    puller.finish("b", 10, 4)
    puller.finish("c", 10, 4)
    events.wait("c", _finished)
    timeline.wait_for(lambda: _all_free(engine))
    engine.check_integrity()


def test_local_prefill_runs_between_two_decode_steps(engine_for, events, puller, timeline):
    engine = engine_for(num_blocks=64)
    running = _job(events, "r", 4, 40)
    engine.runner.hold()
    engine.submit(running)
    puller.finish("r", 7, 4)
    timeline.wait_for(lambda: ("pass", "decode", ["r"], [1]) in timeline.entries)  # r's first step, held
    local = _job(events, "l", 6, 3, local=True)
    engine.submit(local)
    engine.runner.release()
    events.wait("l", _finished)
    passes = timeline.passes()
    i = passes.index(("prefill", ["l"], [6]))
    assert passes[i - 1] == ("decode", ["r"], [1])  # the held step
    assert passes[i + 1] == ("decode", ["r"], [1])  # l joins from the next step on
    assert passes[i + 2] == ("decode", ["r", "l"], [1, 1])
    assert _tokens(events, "l") == [106, 107, 108]  # a local first token is streamed
    events.wait("r", _finished)
    assert _tokens(events, "r") == list(range(8, 47))  # no step of r was lost or repeated
    assert _all_free(engine)
    engine.check_integrity()


def test_cancel_frees_blocks_waiting_pulling_and_running(engine_for, events, puller, timeline):
    engine = engine_for(num_blocks=16)  # 64 tokens
    running, pulling, waiting = _job(events, "r", 4, 40), _job(events, "p", 4, 4), _job(events, "w", 4, 20)
    engine.runner.hold()
    engine.submit(running)
    puller.finish("r", 7, 4)
    timeline.wait_for(lambda: len(timeline.passes()) >= 1)  # r's first step, held
    engine.submit(pulling)
    engine.submit(waiting)  # 11 + 2 blocks used, it needs 6
    engine.runner.allow(1)
    timeline.wait_for(lambda: ("pull", "p") in timeline.entries)
    for job in (running, pulling, waiting):
        engine.cancel(job)
    engine.runner.release()
    events.wait("w", lambda ev: isinstance(ev, Cancelled))
    events.wait("r", lambda ev: isinstance(ev, Cancelled))
    assert not _all_free(engine)  # p's pull still writes into its blocks
    puller.finish("p", 9, 4)
    events.wait("p", lambda ev: isinstance(ev, Cancelled))
    assert _all_free(engine) and engine.stats() == {"queue_len": 0, "running": 0}
    engine.check_integrity()


def test_a_failed_or_inconsistent_pull_fails_the_request_and_frees_its_blocks(engine_for, events, puller):
    engine = engine_for(num_blocks=16)
    jobs = [_job(events, rid, 4, 4) for rid in ("broken", "short")]
    for job in jobs:
        engine.submit(job)
    puller.fail("broken", ConnectionResetError("peer went away"))
    puller.finish("short", 9, 3)  # the stream has 3 tokens, the prompt 4
    broken = events.wait("broken", lambda ev: isinstance(ev, PDServeError))
    short = events.wait("short", lambda ev: isinstance(ev, PDServeError))
    assert isinstance(broken, Unavailable) and "peer went away" in str(broken)
    assert isinstance(short, Unavailable) and "3 tokens" in str(short)
    assert _all_free(engine)
    engine.check_integrity()


def test_a_failed_step_fails_its_sequences_and_the_instance_lives_on(engine_for, events, puller):
    engine = engine_for(num_blocks=16)
    engine.runner.fail_next = RuntimeError("kernel fault")
    engine.submit(_job(events, "a", 4, 4, local=True))
    err = events.wait("a", lambda ev: isinstance(ev, PDServeError))
    assert "prefill failed: kernel fault" in str(err) and _all_free(engine)
    engine.submit(_job(events, "b", 4, 3, local=True))
    events.wait("b", _finished)
    assert _tokens(events, "b") == [104, 105, 106]
    engine.check_integrity()


def test_requests_that_can_never_fit_are_rejected_at_submit(engine_for, events):
    engine = engine_for(num_blocks=4)  # 16 tokens
    with pytest.raises(CapacityExceeded, match="needs 5 KV blocks \\(prompt \\+ max_tokens\\)"):
        engine.submit(_job(events, "big", 8, 10))
    bad = _job(events, "bad", 4, 4)
    bad.first_token_id = 10**6
    with pytest.raises(InvalidRequest, match="first_token_id"):
        engine.submit(bad)
    assert engine.stats() == {"queue_len": 0, "running": 0} and _all_free(engine)


def test_stop_fails_queued_requests_and_returns_once_the_pulls_in_flight_do(
    make_runner, puller, events, timeline
):
    engine = DecodeEngine(make_runner(8), puller, max_running=8, max_queue=8, max_batch_tokens=16)
    engine.start()
    pulling, queued = _job(events, "p", 8, 12), _job(events, "q", 8, 12)  # 5 blocks each: q waits
    engine.submit(pulling)
    engine.submit(queued)
    timeline.wait_for(lambda: ("pull", "p") in timeline.entries)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    assert isinstance(events.wait("q", lambda ev: isinstance(ev, PDServeError)), Cancelled)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(_job(events, "late", 4, 4))
    assert stopper.is_alive()  # the step loop waits for p's pull, which writes into p's blocks
    puller.finish("p", 9, 8)
    stopper.join(30)
    assert not stopper.is_alive()
    assert isinstance(events.of["p"][-1], Cancelled) and _all_free(engine)
    engine.check_integrity()


def test_a_job_with_nothing_queued_ahead_starts_its_pull_during_the_running_step(
    engine_for, events, puller, timeline
):
    engine = engine_for(num_blocks=16)
    engine.runner.hold()
    a = _job(events, "a", prompt_len=4, max_tokens=4)
    engine.submit(a)
    timeline.wait_for(lambda: ("pull", "a") in timeline.entries)
    puller.send_layers("a", 2, 4)
    puller.finish("a", first_token_id=500, num_tokens=4)
    timeline.wait_for(lambda: ("pass", "decode", ["a"], [1]) in timeline.entries)  # a's first step is held
    engine.submit(_job(events, "b", prompt_len=4, max_tokens=2))
    # b is admitted and pulling while a's step still waits for its permit: not one step later
    timeline.wait_for(lambda: ("pull", "b") in timeline.entries)
    assert timeline.passes() == [("decode", ["a"], [1])]
    engine.runner.release()
    puller.send_layers("b", 2, 4)
    puller.finish("b", first_token_id=700, num_tokens=4)
    events.wait("a", _finished)
    events.wait("b", _finished)
    assert _tokens(events, "a") == [501, 502, 503] and _tokens(events, "b") == [701]
    assert _all_free(engine)
    engine.check_integrity()
