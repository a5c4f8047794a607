"""The services' engines across layouts, in one process with real rank processes: a TP2 prefill engine (each
rank leases its own KV shard from its own KVServer) hands the prompt to a TP1 decode engine, and a TP1 prefill
engine to a TP2 decode engine (each rank pulls its own shard), also with a model of ONE KV head, which both
decode ranks hold and pull (a replicated head: the prefill lease waits for both copies); the greedy output
equals the single-process reference, and every rank's lease and every block is released afterwards."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest

from decode_service.engine import DecodeEngine, DecodeJob, Tokens
from decode_service.parallel import ParallelDecodeEngine
from engine.local import LocalEngine
from engine.parallel.layout import Layout
from engine.parallel.runner import ParallelRunner
from engine.params import SamplingParams
from engine.runner import ModelRunner
from kv_transfer.client import KVPuller
from kv_transfer.ranks import RankKVConfig
from kv_transfer.server import KVServer
from kv_transfer.transport import transport_for
from prefill_service.engine import Done, PrefillEngine, PrefillJob
from prefill_service.parallel import ParallelPrefillEngine

WAIT_S = 60.0  # bounds a broken test; every wait is for an event
PROMPT = [(13 * i + 7) % 2000 for i in range(37)]
MAX_TOKENS = 6


def prefill_engine(runner: ModelRunner) -> PrefillEngine:
    server = KVServer(transport_for("tcp"), "127.0.0.1", fingerprint=runner.fingerprint)
    server.start()
    if isinstance(runner, ParallelRunner):
        return ParallelPrefillEngine(runner, server, 256, 16)
    return PrefillEngine(runner, server, 256, 16)


def decode_engine(runner: ModelRunner) -> DecodeEngine:
    puller = KVPuller(fingerprint=runner.fingerprint, timeout_s=30.0)
    if isinstance(runner, ParallelRunner):
        return ParallelDecodeEngine(runner, puller, 8, 16, 256)
    return DecodeEngine(runner, puller, 8, 16, 256)


def hand_off(prefill: PrefillEngine, decode: DecodeEngine) -> list[int]:
    """One request through both engines, as the gateway drives them. -> its tokens (the first included)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    prefill.submit(PrefillJob("r", list(PROMPT), params, events.put))
    while not isinstance(done := events.get(timeout=WAIT_S), Done):
        assert not isinstance(done, Exception), done
    runner = prefill.runner
    ranks = runner.kv_addresses if isinstance(runner, ParallelRunner) else [prefill.kv_server.address]
    layout = runner.layout if isinstance(runner, ParallelRunner) else Layout()
    kv_layout = {
        "tp": layout.tp,
        "pp": layout.pp,
        "num_layers": runner.config.num_layers,
        "num_kv_heads": runner.config.num_kv_heads,
        "rank_addresses": list(ranks),
    }
    decode.submit(
        DecodeJob(
            "r",
            list(PROMPT),
            params,
            events.put,
            kv_address=prefill.kv_server.address,
            transfer_id=done.transfer_id,
            codec="raw",
            first_token_id=done.first_token_id,
            kv_token=done.token,
            kv_layout=kv_layout,
        )
    )
    tokens = [done.first_token_id]
    while True:
        ev = events.get(timeout=WAIT_S)
        assert isinstance(ev, Tokens), ev
        tokens += ev.token_ids
        if ev.finish_reason:
            return tokens


def reference(model_dir: Path) -> list[int]:
    ref = LocalEngine.from_model_dir(str(model_dir))
    return ref.generate([PROMPT], [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)])[0]


@pytest.fixture(scope="module")
def one_kv_head_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's shape with ONE KV head: under decode TP2 both ranks hold (and pull) it."""
    from engine.synth import make_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama-1kv"
    make_random_model(
        path, layers=2, hidden=128, heads=4, kv_heads=1, intermediate=344, vocab_size=2048, seed=2
    )
    return path


@pytest.mark.parametrize(
    "sharded,kv_heads",
    [("prefill", 2), ("decode", 2), ("decode", 1)],
    ids=["tp2-to-tp1", "tp1-to-tp2", "tp1-to-tp2-replicated-kv-head"],
)
def test_sharded_hand_off_equals_the_reference(
    sharded: str, kv_heads: int, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue("tiny_model_dir" if kv_heads == 2 else "one_kv_head_model_dir")
    expected = reference(model_dir)
    model = str(model_dir)
    single = ModelRunner(model, num_kv_blocks=64)
    parallel = ParallelRunner(
        model, Layout(2, 1), num_kv_blocks=64, kv=RankKVConfig(sharded, "tcp").to_dict()
    )
    prefill = prefill_engine(parallel if sharded == "prefill" else single)
    decode = decode_engine(parallel if sharded == "decode" else single)
    prefill.start()
    decode.start()
    try:
        assert hand_off(prefill, decode) == expected
        # the decode engine retired the request; the prefill engine frees its blocks once every rank's lease
        # was pulled: wait for that, then nothing is held anywhere
        with prefill._cond:
            assert prefill._cond.wait_for(lambda: not prefill._admitted, WAIT_S), "a lease was never released"
        for engine in (prefill, decode):
            engine.check_integrity()
            assert engine.block_manager.num_free == engine.block_manager.num_blocks
        assert prefill.kv_server.num_leases() == 0
    finally:
        prefill.stop()
        decode.stop()
        prefill.kv_server.stop()
        parallel.close()
    assert parallel.lost is None
