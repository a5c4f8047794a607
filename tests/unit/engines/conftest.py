"""Fakes for testing the step loops in process (no model, no KV network), and fixtures that build them.

`FakeRunner` stands in for `ModelRunner`: its token after a sequence is `(last token + 1) % vocab`, so
outputs are known in advance; it checks what a real runner would reject (blocks too small, a chunk past
the prompt, a decode without the cached prefix) and records every pass. `hold()` makes each pass wait
for `allow(n)`, so a test can act while a pass is in flight. `FakeKVServer` (prefill side) keeps leases
in a dict and releases them when the test says a decode instance pulled one; `FakeKVPuller` (decode
side) writes layers and returns a trailer when the test says so. All three and `Events` log into one
`Timeline`, so tests assert the order in which things happened, never how long they took.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from engine.config import ModelConfig
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from kv_transfer.client import PullStats, Trailer
from kv_transfer.server import KVServerCounters

E = TypeVar("E")
WAIT_S = 30.0  # every wait below is for a condition; this only bounds a broken test


class Timeline:
    """What happened, in order: ("pass", kind, request ids, new tokens), ("pull", transfer id),
    ("release", transfer id, reason), ("event", request id, event)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, ...]] = []
        self.cond = threading.Condition()

    def add(self, *entry: Any) -> None:
        with self.cond:
            self.entries.append(entry)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, WAIT_S), f"timed out; timeline: {self.entries}"

    def index(self, *prefix: Any) -> int:
        """Position of the first entry starting with `prefix`."""
        with self.cond:
            return next(i for i, e in enumerate(self.entries) if e[: len(prefix)] == prefix)

    def passes(self) -> list[tuple[str, list[str], list[int]]]:
        with self.cond:
            return [(e[1], e[2], e[3]) for e in self.entries if e[0] == "pass"]


class FakeKVCache:
    """Records writes; reads return zeros of the right token count. Shapes: K/V [T, 1, 1]."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.writes: list[tuple[int, tuple[int, ...]]] = []  # (layer, blocks)

    def write(self, layer: int, blocks: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.writes.append((layer, tuple(blocks)))

    def read(self, layer: int, blocks: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(num_tokens, 1, 1), torch.zeros(num_tokens, 1, 1)


class FakeRunner:
    def __init__(self, model_dir: Path, timeline: Timeline, num_blocks: int, block_size: int = 4) -> None:
        self.config = ModelConfig.from_hf_dir(str(model_dir))
        self.tokenizer = Tokenizer(str(model_dir))
        self.block_size = block_size
        self.kv_cache = FakeKVCache(num_blocks)
        self.fingerprint = "fake"
        self.timeline = timeline
        self.fail_next: Exception | None = None  # the next pass raises it
        self._permits: int | None = None  # None: passes run freely
        self._cond = threading.Condition()

    def next_token(self, ids: list[int]) -> int:
        return (ids[-1] + 1) % self.config.vocab_size

    # ---- pacing ---------------------------------------------------------------------------
    def hold(self) -> None:
        """From now on each pass waits for a permit (`allow`)."""
        with self._cond:
            self._permits = 0

    def allow(self, n: int = 1) -> None:
        with self._cond:
            assert self._permits is not None, "hold() first"
            self._permits += n
            self._cond.notify_all()

    def release(self) -> None:
        """Passes run freely again (the held one too)."""
        with self._cond:
            self._permits = None
            self._cond.notify_all()

    def _enter(self, kind: str, seqs: list[Sequence], num_new: list[int]) -> None:
        self.timeline.add("pass", kind, [s.request_id for s in seqs], list(num_new))
        with self._cond:
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            assert self._cond.wait_for(lambda: self._permits is None or self._permits > 0, WAIT_S)
            if self._permits is not None:
                self._permits -= 1

    # ---- the ModelRunner interface the engines use -------------------------------------------
    def prefill(self, seqs: list[Sequence], on_layer: Any = None, num_new: Any = None) -> list[int | None]:
        """Like ModelRunner.prefill: `num_new` tokens per seq (default: all uncached), on_layer per layer."""
        if num_new is None:
            num_new = [s.num_tokens - s.num_cached for s in seqs]
        for s, n in zip(seqs, num_new, strict=True):
            assert 0 < n <= s.num_tokens - s.num_cached, f"{s.request_id}: chunk of {n}"
            assert len(s.blocks) * self.block_size >= s.num_cached + n, f"{s.request_id}: blocks too small"
        self._enter("prefill", seqs, num_new)
        for layer in range(self.config.num_layers):
            if on_layer is not None:
                on_layer(layer)
            for s, n in zip(seqs, num_new, strict=True):  # the real runner writes them layer by layer
                assert len(s.blocks) * self.block_size >= s.num_cached + n, f"{s.request_id}: blocks freed"
        for s, n in zip(seqs, num_new, strict=True):
            s.num_cached += n
        return [self.next_token(s.all_ids) if s.num_cached == s.num_tokens else None for s in seqs]

    def decode(self, seqs: list[Sequence]) -> list[int]:
        for s in seqs:
            assert s.num_cached == s.num_tokens - 1, f"{s.request_id}: {s.num_cached}/{s.num_tokens} cached"
            assert len(s.blocks) * self.block_size >= s.num_tokens, f"{s.request_id}: blocks too small"
        self._enter("decode", seqs, [1] * len(seqs))
        for s in seqs:
            s.num_cached += 1
        return [self.next_token(s.all_ids) for s in seqs]


@dataclass
class FakeLease:
    num_layers: int
    num_tokens: int
    on_release: Callable[[str, str], None]
    ready: list[int] = field(default_factory=list)  # every mark_ready, in order
    first_token_id: int | None = None


class FakeKVServer:
    """The prefill engine's side of `kv_transfer.server.KVServer`: leases in a dict."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.leases: dict[str, FakeLease] = {}  # open leases
        self.opened: list[str] = []
        self._lock = threading.Lock()

    def open_lease(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        read_layer: Callable[[int], Any],
        on_release: Callable[[str, str], None],
        token_ids: list[int],
    ) -> bytes:
        """Returns the lease's pull token, as the real server does."""
        assert read_layer(0)[0].shape[0] == num_tokens == len(token_ids)
        with self._lock:
            self.leases[transfer_id] = FakeLease(num_layers, num_tokens, on_release)
            self.opened.append(transfer_id)
        return transfer_id.encode()

    def counters(self) -> KVServerCounters:
        return KVServerCounters(0, 0, 0)

    def mark_ready(self, transfer_id: str, num_layers_ready: int) -> bool:
        with self._lock:
            lease = self.leases.get(transfer_id)
            if lease is not None:
                lease.ready.append(num_layers_ready)
            return lease is not None

    def finish(self, transfer_id: str, first_token_id: int) -> bool:
        with self._lock:
            lease = self.leases.get(transfer_id)
            if lease is not None:
                lease.first_token_id = first_token_id
            return lease is not None

    def cancel(self, transfer_id: str) -> bool:
        return self.release(transfer_id, "cancelled")

    def release(self, transfer_id: str, reason: str) -> bool:
        """Release a lease once, as the real server does: `reason` "pulled" when a decode instance has it."""
        with self._lock:
            lease = self.leases.pop(transfer_id, None)
        if lease is None:
            return False
        self.timeline.add("release", transfer_id, reason)
        lease.on_release(transfer_id, reason)
        return True


class FakeKVPuller:
    """The decode engine's `KVPuller`: each pull waits for the test to `send_layers` / `finish` / `fail` it."""

    def __init__(self, timeline: Timeline, num_layers: int) -> None:
        self.timeline = timeline
        self.num_layers = num_layers
        self._script: dict[str, list[tuple[Any, ...]]] = {}
        self._cond = threading.Condition()
        self.tokens: list[bytes] = []  # the lease token of each pull, in order
        self.floors: list[float | None] = []  # the quality floor (max_kl) each pull declared, in order

    def send_layers(self, transfer_id: str, num_layers: int, num_tokens: int) -> None:
        self._add(transfer_id, ("layers", num_layers, num_tokens))

    def finish(self, transfer_id: str, first_token_id: int, num_tokens: int) -> None:
        self._add(transfer_id, ("done", first_token_id, num_tokens))

    def fail(self, transfer_id: str, exc: BaseException) -> None:
        self._add(transfer_id, ("fail", exc))

    def _add(self, transfer_id: str, step: tuple[Any, ...]) -> None:
        with self._cond:
            self._script.setdefault(transfer_id, []).append(step)
            self._cond.notify_all()

    def pull(
        self,
        handle_address: str,
        transfer_id: str,
        codec: str,
        write_layer: Callable[..., None],
        *,
        token: bytes,
        max_kl: float | None = None,
        dest: Callable[..., Any] | None = None,  # the real puller may decode into it; this fake always copies
    ) -> Trailer:
        self.timeline.add("pull", transfer_id)
        self.tokens.append(token)
        self.floors.append(max_kl)
        sent = 0
        while True:
            with self._cond:
                assert self._cond.wait_for(lambda: self._script.get(transfer_id), WAIT_S)
                step = self._script[transfer_id].pop(0)
            if step[0] == "fail":
                raise step[1]
            if step[0] == "done":
                stats = PullStats(bytes_on_wire=1000, server_send_s=0.001)
                return Trailer(step[1], step[2], self.num_layers, stats)
            _, num_layers, num_tokens = step
            for layer in range(sent, sent + num_layers):
                write_layer(layer, torch.zeros(num_tokens, 1, 1), torch.zeros(num_tokens, 1, 1))
                self.timeline.add("layer", transfer_id, layer)
            sent += num_layers


class Events:
    """Collects each job's events (also into the timeline); `emit_for(rid)` is a job's `emit`."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.of: dict[str, list[Any]] = {}

    def emit_for(self, rid: str) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            with self.timeline.cond:
                self.of.setdefault(rid, []).append(event)
            self.timeline.add("event", rid, event)

        return emit

    def wait(self, rid: str, pred: Callable[[Any], bool]) -> Any:
        """The first event of `rid` that `pred` accepts (waits for it)."""
        self.timeline.wait_for(lambda: any(pred(e) for e in self.of.get(rid, [])))
        return next(e for e in self.of[rid] if pred(e))


@pytest.fixture
def started() -> Iterator[Callable[[E], E]]:
    """`started(engine)` starts an engine; every engine started so is stopped after the test."""
    engines: list[Any] = []

    def start(engine: E) -> E:
        engine.start()  # type: ignore[attr-defined]
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def events(timeline: Timeline) -> Events:
    return Events(timeline)


@pytest.fixture
def make_runner(tiny_model_dir: Path, timeline: Timeline) -> Callable[..., FakeRunner]:
    return lambda num_blocks, block_size=4: FakeRunner(tiny_model_dir, timeline, num_blocks, block_size)


@pytest.fixture
def kv_server(timeline: Timeline) -> FakeKVServer:
    return FakeKVServer(timeline)


@pytest.fixture
def puller(timeline: Timeline, tiny_model_dir: Path) -> FakeKVPuller:
    return FakeKVPuller(timeline, ModelConfig.from_hf_dir(str(tiny_model_dir)).num_layers)
