"""The prefill step loop in process, with a fake runner and a fake KV server: admission under the token
budget and by free blocks, the lease's life (opened before compute, every layer published, finished
with the first token, blocks held until it is released), cancellation and failures free blocks."""

from __future__ import annotations

import pytest

from engine.params import SamplingParams
from pdserve.errors import Cancelled, CapacityExceeded, PDServeError
from prefill_service.engine import Done, PrefillEngine, PrefillJob, Scheduled

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture
def engine_for(make_runner, kv_server, started):
    def build(num_blocks: int, max_batch_tokens: int = 16) -> PrefillEngine:
        return started(PrefillEngine(make_runner(num_blocks), kv_server, max_batch_tokens, max_queue=8))

    return build


def _job(events, rid: str, n: int) -> PrefillJob:
    return PrefillJob(rid, [10 + i for i in range(n)], PARAMS, events.emit_for(rid))


def _all_free(engine: PrefillEngine) -> bool:
    return engine.block_manager.num_free == engine.block_manager.num_blocks


def _done(ev) -> bool:
    return isinstance(ev, Done)


def test_batches_queued_prompts_fifo_up_to_the_token_budget(engine_for, events, timeline):
    engine = engine_for(num_blocks=32, max_batch_tokens=16)
    engine.runner.hold()
    jobs = {rid: _job(events, rid, n) for rid, n in [("a", 10), ("b", 6), ("c", 8), ("d", 4), ("e", 20)]}
    engine.submit(jobs["a"])
    timeline.wait_for(lambda: len(timeline.passes()) == 1)  # a is in its pass; the rest queue behind it
    for rid in "bcde":
        engine.submit(jobs[rid])
    assert engine.stats() == {"queue_len": 4, "leases": 1, "kv_unauthorized_pulls": 0}
    engine.runner.release()
    for rid, job in jobs.items():
        done = events.wait(rid, _done)
        assert done.first_token_id == job.prompt_ids[-1] + 1 and done.num_tokens == len(job.prompt_ids)
    # b + c = 14 fit 16, d would make 18; e (20) is over the budget but goes alone
    assert timeline.passes() == [
        ("prefill", ["a"], [10]),
        ("prefill", ["b", "c"], [6, 8]),
        ("prefill", ["d"], [4]),
        ("prefill", ["e"], [20]),
    ]


def test_lease_opens_before_compute_and_holds_the_blocks_until_pulled(
    engine_for, events, kv_server, timeline
):
    engine = engine_for(num_blocks=32)
    engine.runner.hold()
    job = _job(events, "a", 10)
    engine.submit(job)
    scheduled = events.wait("a", lambda ev: isinstance(ev, Scheduled))
    timeline.wait_for(lambda: len(timeline.passes()) == 1)
    assert scheduled.transfer_id == job.transfer_id and scheduled.num_tokens == 10
    assert kv_server.opened == [job.transfer_id] and not any(_done(e) for e in events.of["a"])
    engine.runner.release()
    done = events.wait("a", _done)
    lease = kv_server.leases[job.transfer_id]
    assert lease.ready == [1, 2] and lease.num_tokens == 10  # each layer published as it was written
    assert lease.first_token_id == done.first_token_id == 20
    assert done.queue_s >= 0 and done.compute_s >= 0
    assert engine.block_manager.num_free == 32 - 3  # 10 tokens, 4 per block
    assert engine.stats() == {"queue_len": 0, "leases": 1, "kv_unauthorized_pulls": 0}
    engine.check_integrity()
    assert kv_server.release(job.transfer_id, "pulled")
    assert _all_free(engine) and engine.stats()["leases"] == 0
    engine.check_integrity()


def test_a_prompt_waits_for_blocks_until_a_lease_is_released(engine_for, events, kv_server, timeline):
    engine = engine_for(num_blocks=4)  # 16 tokens
    a, b = _job(events, "a", 12), _job(events, "b", 8)
    engine.submit(a)
    events.wait("a", _done)
    engine.submit(b)  # needs 2 blocks, 1 is free: back-pressure
    assert engine.stats()["queue_len"] == 1
    kv_server.release(a.transfer_id, "expired")
    events.wait("b", _done)
    assert timeline.index("release", a.transfer_id) < timeline.index("pass", "prefill", ["b"])
    kv_server.release(b.transfer_id, "pulled")
    assert _all_free(engine)
    engine.check_integrity()


def test_cancel_frees_blocks_queued_computing_and_leased(engine_for, events, kv_server, timeline):
    engine = engine_for(num_blocks=32, max_batch_tokens=8)
    engine.runner.hold()
    computing, queued, leased = (
        _job(events, "computing", 8),
        _job(events, "queued", 4),
        _job(events, "leased", 4),
    )
    engine.submit(computing)
    timeline.wait_for(lambda: len(timeline.passes()) == 1)
    engine.submit(queued)
    engine.cancel(queued)
    engine.cancel(computing)  # its lease is open: released now, the pass still runs
    assert not kv_server.leases
    engine.submit(leased)
    engine.runner.release()
    events.wait("queued", lambda ev: isinstance(ev, Cancelled))
    events.wait("leased", _done)
    engine.cancel(leased)
    timeline.wait_for(lambda: _all_free(engine))
    assert [p[1] for p in timeline.passes()] == [["computing"], ["leased"]]  # the queued one never ran
    assert not kv_server.leases and engine.stats() == {
        "queue_len": 0,
        "leases": 0,
        "kv_unauthorized_pulls": 0,
    }
    engine.check_integrity()


def test_a_lease_released_mid_pass_keeps_its_blocks_until_the_pass_ends(
    engine_for, events, kv_server, timeline
):
    # Found under load (10 clients with 50-450 ms deadlines): a cancel freed a computing job's blocks under
    # the model, whose pass then failed every request batched with it ("sequence owns 0" -> INTERNAL).
    engine = engine_for(num_blocks=32, max_batch_tokens=16)
    engine.runner.hold()
    head, a, b = _job(events, "head", 4), _job(events, "a", 6), _job(events, "b", 6)
    engine.submit(head)
    timeline.wait_for(lambda: len(timeline.passes()) == 1)
    engine.submit(a)
    engine.submit(b)
    engine.runner.allow(1)  # head's pass ends; a and b go in one pass, held
    timeline.wait_for(lambda: len(timeline.passes()) == 2)
    engine.cancel(a)  # its lease is released now, its blocks only once the pass is done with them
    kv_server.release(head.transfer_id, "expired")  # not computing: freed at once
    assert a.transfer_id not in kv_server.leases and len(a.seq.blocks) == 2
    assert engine.block_manager.num_free == 32 - 4
    engine.runner.release()
    done = events.wait("b", _done)  # the request batched with the cancelled one is served
    assert done.first_token_id == b.prompt_ids[-1] + 1
    c = _job(events, "c", 4)
    engine.submit(c)
    events.wait("c", _done)  # the step loop ended a and b's pass before it ran c's
    assert engine.block_manager.num_free == 32 - 2 - 1  # only b's and c's leases hold blocks
    assert not any(isinstance(ev, PDServeError) for ev in events.of["b"])
    kv_server.release(b.transfer_id, "pulled")
    kv_server.release(c.transfer_id, "pulled")
    assert _all_free(engine)
    engine.check_integrity()


def test_a_failed_pass_fails_its_requests_and_releases_their_leases(engine_for, events, kv_server):
    engine = engine_for(num_blocks=32)
    engine.runner.fail_next = RuntimeError("device lost")
    a = _job(events, "a", 5)
    engine.submit(a)
    err = events.wait("a", lambda ev: isinstance(ev, PDServeError))
    assert "prefill failed: device lost" in str(err)
    assert not kv_server.leases and _all_free(engine)
    b = _job(events, "b", 5)  # the instance lives on
    engine.submit(b)
    events.wait("b", _done)
    kv_server.release(b.transfer_id, "pulled")
    engine.check_integrity()


def test_a_prompt_larger_than_the_cache_is_rejected_at_submit(engine_for, events):
    engine = engine_for(num_blocks=4)
    with pytest.raises(CapacityExceeded, match="needs 5 KV blocks \\(prompt\\)"):
        engine.submit(_job(events, "big", 17))
    assert engine.stats() == {"queue_len": 0, "leases": 0, "kv_unauthorized_pulls": 0}
