"""The public `pdserve.v1.Generation` service: validate, route, run prefill then decode, stream.

One request's life here: (1) validate and assign an id; (2) pick a prefill and a decode instance;
(3) stream `Prefill` until its first token (sent to the client at once: TTFT); (4) stream `Decode`
with the KV handle, relaying tokens (conditional disaggregation, `local_prefill`: a short prompt may
skip (3), its decode instance prefills it and sends the first token itself); (5) whatever happens
(finish, error, client cancel, deadline), make sure the prefill lease is released and the decode
request is cancelled, so no KV block leaks.
Failover (`_Failover`, the one retry policy of every call a request makes): a call that fails because
its instance died or went away (UNAVAILABLE, a reset, a stream ending early) is retried. A prefill is
re-run on another prefill instance (or the restarted one; the dead one's lease is dropped with it). A
decode that dies mid-stream is resumed on another decode instance (or the restarted one): that instance
prefills prompt + the tokens already sent itself (`local_prefill`) and continues with max_tokens reduced
by them and `step_offset` = their count, so greedy and seeded sampling give exactly the undisturbed
output and the client sees one stream, no token lost or repeated. While no instance of a role is usable
the request waits for the registry to show one, up to `failover_wait_s` and never past its deadline.
In colocated mode (the baseline pdserve is benchmarked against) steps (2)-(4) are one relayed call to a
colocated instance, which runs prefill and decode in one engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from coordinator.config import CoordinatorConfig
from coordinator.registry import InstanceInfo
from coordinator.router import Router
from coordinator.token_stream import StreamBroken, Subscription, TokenStreams
from engine.config import ModelConfig
from engine.params import SamplingParams, generation_defaults
from engine.stream import StopChecker
from engine.tokenizer import Tokenizer
from kv_transfer.choice import CodecProfile, choose_codec, load_profiles
from pdserve import telemetry
from pdserve.errors import CapacityExceeded, DeadlineExceeded, InvalidRequest, PDServeError, Unavailable
from pdserve.rpc import params_to_proto, server_error_class, stream_errors
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

log = logging.getLogger(__name__)

# Status codes of a call that another instance (or the same one restarted) may answer: the instance died,
# refused the connection, or shut down under the call. Any other status is the request's answer.
RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _CallFailed(Exception):
    """A call to `inst` (a `role` instance) failed in a way a retry elsewhere may not. `at_fault`: the
    instance itself is gone (transport failure), not an answer it gave (e.g. a decode whose KV pull failed
    because the prefill instance died): only then is it skipped for a while."""

    def __init__(self, role: str, inst: InstanceInfo, why: str, at_fault: bool = True) -> None:
        super().__init__(f"{role} instance {inst.instance_id} ({inst.grpc_address}): {why}")
        self.role = role
        self.inst = inst
        self.at_fault = at_fault


def _call_failed(role: str, inst: InstanceInfo, exc: grpc.aio.AioRpcError) -> _CallFailed | None:
    """The retriable failure `exc` is, or None when it is the request's answer (re-raise it)."""
    if exc.code() not in RETRIABLE:
        return None
    typed = server_error_class(exc)
    return _CallFailed(role, inst, f"{exc.code().name}: {exc.details()}", at_fault=typed is None)


def sampling_from_request(
    req: generation_pb2.GenerateRequest, defaults: dict[str, float] | None = None
) -> SamplingParams:
    """The request's sampling parameters; `defaults` (the model's generation_config) fill unset fields."""
    defaults = defaults or {}
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        top_k=req.top_k,
        seed=req.seed if req.HasField("seed") else None,
        stop=tuple(req.stop),
        ignore_eos=req.ignore_eos,
        repetition_penalty=req.repetition_penalty
        if req.HasField("repetition_penalty")
        else defaults.get("repetition_penalty", 1.0),
    )


def kv_floor_from_request(req: generation_pb2.GenerateRequest) -> float | None:
    """The request's KV quality floor (mean per-token KL in nats a lossy codec may add), None when unset."""
    if not req.HasField("max_kv_kl"):
        return None
    floor = req.max_kv_kl
    if not math.isfinite(floor) or floor < 0:
        raise InvalidRequest(
            f"max_kv_kl must be a finite KL >= 0 (nats per token; 0 = lossless), got {floor}"
        )
    return floor


def pick_codec(
    cfg: CoordinatorConfig,
    profiles: tuple[CodecProfile, ...],
    raw_bytes: float,
    link_bps: float | None,
    num_layers: int,
    floor: float | None,
    codec: str | None = None,
) -> str:
    """The codec of one hand-off. A fixed --codec is used as configured unless the request set a floor its
    measured profile does not meet (or it has none): then raw. With "auto", the fastest codec within the
    floor (the request's, else cfg.max_kl) on the link's measured bandwidth; raw while it is unmeasured.
    `codec` (the plan's codec for this link) stands in for cfg.codec."""
    codec = codec or cfg.codec
    if codec != "auto":
        if floor is None or codec == "raw":
            return codec
        kl = next((p.kl_mean for p in profiles if p.name == codec), None)
        return codec if kl is not None and kl <= floor else "raw"
    if not link_bps:
        return "raw"
    max_kl = cfg.max_kl if floor is None else floor
    if not any(p.kl_mean <= max_kl for p in profiles):  # e.g. profiles measured without raw
        return "raw"
    return choose_codec(raw_bytes, link_bps, profiles, max_kl, num_layers).name


class Gateway(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self, cfg: CoordinatorConfig, router: Router, tokenizer: Tokenizer, model: ModelConfig
    ) -> None:
        self.cfg = cfg
        self.router = router
        self.tokenizer = tokenizer
        self.model = model
        self.inflight = 0
        self.codec_profiles = load_profiles(cfg.model_dir)
        self.generation_defaults = generation_defaults(cfg.model_dir)
        self._background: set[asyncio.Task] = set()
        # one token stream per decode instance (`coordinator.token_stream`); off: each call streams its own
        self.token_streams = TokenStreams(router.channel) if cfg.token_stream else None
        self.queued = (
            0  # requests accepted whose first token has not come back (`CoordinatorConfig.max_queue`)
        )
        self.local_pending = 0  # local prefills sent to decode instances whose first token has not come back
        self.kv_reserved = 0  # KV tokens (prompt + max_tokens) of the requests in flight (`cfg.kv_budget`)
        # Called with each request served to its end (the replanner's live window): (received, prompt
        # tokens, tokens sent, TTFT s, TPOT s or None), times on time.monotonic(). None: nobody listens.
        self.on_finished: Callable[[float, int, int, float, float | None], None] | None = None

    def close(self) -> None:
        """The gateway is stopping: close its token streams."""
        if self.token_streams is not None:
            self.token_streams.close()

    # ---- validation -----------------------------------------------------------------------
    def _prompt_ids(self, req: generation_pb2.GenerateRequest) -> list[int]:
        if req.prompt and req.prompt_token_ids:
            raise InvalidRequest("give either prompt or prompt_token_ids, not both")
        ids = list(req.prompt_token_ids) if req.prompt_token_ids else self.tokenizer.encode(req.prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids out of range [0, {self.model.vocab_size}): {bad[:5]}")
        return ids

    # ---- the RPC, and the front-end-neutral request every front end runs -----------------
    @stream_errors
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        stream = self.generate(request, context.invocation_metadata(), context.time_remaining)
        try:
            async for msg in stream:
                yield msg
        finally:  # closed at a yield (the call went away): clean up now, not when the stream is collected
            await stream.aclose()

    @telemetry.traced_request
    async def generate(
        self, request: generation_pb2.GenerateRequest, rt: telemetry.RequestTrace
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """One request, whichever front end received it (gRPC `Generate`, the HTTP API): validate, route,
        stream its messages; raises typed `PDServeError`s. Called as `generate(request, metadata=None,
        time_remaining=None)` (`telemetry.traced_request`: the caller's trace context, gRPC's deadline).
        Closing or cancelling the iterator early cancels the instances' calls and frees the KV."""
        received = rt.received
        request_id = request.request_id or uuid.uuid4().hex
        prompt_ids = self._prompt_ids(request)
        params = sampling_from_request(request, self.generation_defaults)
        params.validate(len(prompt_ids), self.model.max_position_embeddings)
        kv_floor = kv_floor_from_request(request)
        if self.inflight >= self.cfg.max_inflight:
            raise CapacityExceeded(
                f"gateway has {self.inflight} requests in flight (limit {self.cfg.max_inflight})"
            )
        if self.cfg.max_queue and self.queued >= self.cfg.max_queue:
            raise CapacityExceeded(
                f"gateway has {self.queued} requests waiting for their first token (limit {self.cfg.max_queue})"
            )
        kv_tokens = len(prompt_ids) + params.max_tokens
        self._check_kv_budget(kv_tokens)
        rt.accepted(request_id, len(prompt_ids), params.max_tokens)
        self.inflight += 1
        self.kv_reserved += kv_tokens
        failover = _Failover(self.cfg, self.router, rt)
        if self.cfg.colocated:  # baseline mode: one colocated instance does the whole request
            try:
                async for msg in self._colocated(request, request_id, prompt_ids, received, failover):
                    yield msg
            finally:
                self.inflight -= 1
                self.kv_reserved -= kv_tokens
            return
        stop = StopChecker(self.tokenizer, params)
        state = _RequestState(rt, failover, kv_floor)
        self.queued += 1
        state.queued = True
        try:
            async for msg in self._run(request_id, prompt_ids, params, stop, state, received):
                yield msg
        finally:
            self.inflight -= 1
            self.kv_reserved -= kv_tokens
            self._dequeue(state)
            state.cancel_calls()
            self._drop_lease(state)

    def _check_kv_budget(self, kv_tokens: int) -> None:
        """RESOURCE_EXHAUSTED when admitting `kv_tokens` more would pass `cfg.kv_budget` x the KV capacity of
        the registered decode (colocated) instances. With none registered there is no capacity to measure
        against: the request goes on and waits for one (`_Failover.pick`)."""
        if not self.cfg.kv_budget:
            return
        capacity = self.router.kv_capacity("colocated" if self.cfg.colocated else "decode")
        budget = int(self.cfg.kv_budget * capacity)
        if capacity and self.kv_reserved + kv_tokens > budget:
            raise CapacityExceeded(
                f"KV budget: the gateway's {self.inflight} requests in flight reserve {self.kv_reserved} KV "
                f"tokens; {kv_tokens} more would pass the budget of {budget} ({self.cfg.kv_budget:g} x "
                f"{capacity} tokens of the registered instances)"
            )

    async def _run(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopChecker,
        state: _RequestState,
        received: float,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        first_token = await self._first_token(request_id, prompt_ids, params, state)
        self._dequeue(state)
        ttft = time.monotonic() - received
        state.trace.first_token()
        completion = [first_token]  # every token sent to the client, in order
        reason = stop.push(first_token)
        if (
            reason is None and not state.pump.started
        ):  # decode starts pulling before the first token is written
            assert state.handle is not None
            state.pump.start(self._decode(request_id, prompt_ids, params, first_token, state.handle, state))
        yield generation_pb2.GenerateResponse(
            request_id=request_id, token_ids=[first_token], text=stop.take_text()
        )
        while reason is None:
            try:
                async for tokens, decode_reason in state.pump:
                    checked = None
                    for t in tokens:
                        completion.append(t)
                        checked = stop.push(t) or checked
                    if tokens:
                        state.trace.tokens(len(tokens))
                        yield generation_pb2.GenerateResponse(
                            request_id=request_id, token_ids=tokens, text=stop.take_text()
                        )
                    if decode_reason is not None or checked is not None:
                        reason = decode_reason or checked
                        break
                else:  # the pump ends with a finish reason or an error; never without either
                    raise Unavailable("decode stream ended without a finish reason")
            except _CallFailed as exc:
                await state.failover.failed(exc)  # raises the client's error when out of retries or time
                if len(completion) >= params.max_tokens:  # died after the last token, before its finish
                    reason = "length"
                    break
                self._resume(request_id, prompt_ids, params, completion, state)
        state.pump.cancel()
        state.trace.finished(reason or "length")
        if self.on_finished is not None:
            n = len(completion)
            tpot = (time.monotonic() - received - ttft) / (n - 1) if n > 1 else None
            self.on_finished(received, len(prompt_ids), n, ttft, tpot)
        usage = common_pb2.Usage(
            prompt_tokens=len(prompt_ids), completion_tokens=len(completion), ttft_s=ttft
        )
        yield generation_pb2.GenerateResponse(
            request_id=request_id,
            text=stop.take_text(final=True),
            finish_reason=reason or "length",
            usage=usage,
        )

    async def _first_token(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, state: _RequestState
    ) -> int:
        """Prefill the prompt (on a prefill instance, or locally on a decode instance) until some instance
        returns the first token; a failed attempt is retried (`_Failover`) with the dead lease dropped."""
        # Layer-wise streaming (where `_layerwise` says it pays): decode is asked to pull as soon as prefill
        # has scheduled the request, so the KV moves layer by layer while later layers still compute.
        stream_kv = params.max_tokens > 1

        def on_scheduled(handle: common_pb2.KVHandle) -> None:
            state.pump.start(self._decode(request_id, prompt_ids, params, None, handle, state))

        while True:
            try:
                if not self._prefill_locally(len(prompt_ids)):
                    return await self._prefill(
                        request_id, prompt_ids, params, state, on_scheduled if stream_kv else None
                    )
                self.local_pending += 1
                try:
                    state.pump.start(self._decode(request_id, prompt_ids, params, None, None, state))
                    return await state.pump.first_token()
                finally:
                    self.local_pending -= 1
            except _CallFailed as exc:
                await state.failover.failed(exc)
                state.restart_pump()
                if exc.role == "prefill":  # its instance is gone, and its lease with it: nothing to release
                    state.handle = None
                else:
                    self._drop_lease(state)

    def _resume(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sent: list[int],
        state: _RequestState,
    ) -> None:
        """Continue a request whose decode call failed after `sent` tokens reached the client: a decode
        instance prefills prompt + sent itself and samples from step len(sent) on, for the tokens left."""
        self._drop_lease(state)  # a lease the failed decode did not consume (it may never have pulled)
        state.restart_pump()
        rest = dataclasses.replace(
            params, max_tokens=params.max_tokens - len(sent), step_offset=params.step_offset + len(sent)
        )
        state.pump.start(self._decode(request_id, prompt_ids + sent, rest, None, None, state))

    def _dequeue(self, state: _RequestState) -> None:
        if state.queued:
            state.queued = False
            self.queued -= 1

    def _drop_lease(self, state: _RequestState) -> None:
        """Release the request's prefill lease unless decode consumed it (or there is none)."""
        if state.handle is not None and not state.kv_consumed:
            self._release_later(state.prefill_address, state.handle.transfer_id)
        state.handle = None
        state.kv_consumed = False

    def _prefill_locally(self, prompt_len: int) -> bool:
        """Conditional disaggregation (`CoordinatorConfig.local_prefill`): prefill on the decode instance?"""
        policy = self.cfg.local_prefill
        if policy == "off" or prompt_len > self.cfg.local_prefill_max_tokens:
            return False
        if policy == "always":
            return True
        return self.router.prefill_busy(self.cfg.local_prefill_depth) and self.local_pending < max(
            1, self.router.count("decode")
        )

    def _layerwise(self, prefill: InstanceInfo) -> bool:
        """Start the decode pull when `prefill` schedules the request (`CoordinatorConfig.layerwise`)?
        "auto": only for a CUDA prefill instance, whose transfer does not take its compute's processor."""
        policy = self.cfg.layerwise
        return policy == "on" or (policy == "auto" and prefill.devices.startswith("cuda"))

    async def _prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        state: _RequestState,
        on_scheduled: Callable[[common_pb2.KVHandle], None] | None,
    ) -> int:
        """Run prefill on some instance; returns the first token. `on_scheduled(handle)` fires once
        the KV handle is valid (before the KV is complete), if that instance streams layer-wise."""
        req = prefill_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=params_to_proto(params),
            codec=self.cfg.codec,
        )
        inst = await state.failover.pick("prefill", self.router.pick_prefill)
        stub = prefill_pb2_grpc.PrefillStub(self.router.channel(inst.grpc_address))
        scheduled = on_scheduled if on_scheduled is not None and self._layerwise(inst) else None
        with (
            self.router.track(inst),
            telemetry.rpc_span(telemetry.GATEWAY_PREFILL, state.trace.ctx, inst) as span,
        ):
            call = stub.Prefill(req, metadata=telemetry.outgoing_metadata(span))
            state.prefill_call = call
            state.prefill_address = inst.grpc_address
            try:
                async for ev in call:
                    if ev.HasField("scheduled"):
                        span.add_event("scheduled", {"pdserve.kv.transfer_id": ev.scheduled.transfer_id})
                        state.handle = ev.scheduled
                        if scheduled is not None:
                            scheduled(ev.scheduled)
                    elif ev.HasField("done"):
                        telemetry.prefill_done(span, ev.done)
                        state.handle = ev.done.kv
                        return ev.done.first_token_id
            except grpc.aio.AioRpcError as exc:
                failed = _call_failed("prefill", inst, exc)
                if failed is None:
                    raise
                telemetry.record_error(span, exc)
                raise failed from None
        raise _CallFailed("prefill", inst, "ended the stream without a result")

    async def _decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        first_token: int | None,
        handle: common_pb2.KVHandle | None,
        state: _RequestState,
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        """Run decode on some instance, yielding (new tokens, finish reason or None) per event (on the
        instance's token stream, `coordinator.token_stream`, they go from its reader to the pump's queue
        directly, and this returns once the last one did).
        Without `first_token` the decode instance takes it from the KV stream's trailer; without a
        `handle` it prefills the prompt itself (local prefill) and its first event carries the first token."""
        req = decode_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=params_to_proto(params),
            kv=handle,
            local_prefill=handle is None,
        )
        if first_token is not None:
            req.first_token_id = first_token
        num_tokens = len(prompt_ids) + params.max_tokens
        kv_address = handle.address if handle is not None else ""
        inst = await state.failover.pick("decode", lambda: self.router.pick_decode(num_tokens, kv_address))
        if handle is not None:
            req.kv.codec = self._codec_for(len(prompt_ids), handle.address, inst, state.kv_floor)
            if state.kv_floor is not None:  # the prefill side's encoder spends it (sent in the KV PULL)
                req.kv.max_kv_kl = state.kv_floor
        stub = decode_pb2_grpc.DecodeStub(self.router.channel(inst.grpc_address))
        stream = await self.token_streams.get(inst.grpc_address) if self.token_streams else None
        sub = None
        if stream is not None:  # the tokens come on the instance's token stream, the call only ends
            pump = state.pump  # the one running this generator (a restart cancels it first)

            # called by the stream's reader for each event of this call: straight onto the request's queue
            def deliver(ev: decode_pb2.DecodeEvent) -> None:
                if handle is not None:
                    state.kv_consumed = True  # decode pulled the KV: the lease is gone
                pump.put((list(ev.token_ids), ev.finish_reason or None))

            sub = Subscription(deliver)
            req.token_stream, req.token_stream_tag = stream.stream_id, stream.subscribe(sub)
        got_event = False
        with (
            self.router.track(inst, num_tokens),
            telemetry.rpc_span(telemetry.GATEWAY_DECODE, state.trace.ctx, inst) as span,
        ):
            call = stub.Decode(req, metadata=telemetry.outgoing_metadata(span))
            state.decode_call = call
            try:
                if handle is None:
                    span.set_attribute("pdserve.prefill.local", True)
                else:  # why this codec: the request's floor, when it set one
                    span.set_attribute("pdserve.kv.codec", req.kv.codec)
                    if state.kv_floor is not None:
                        span.set_attribute("pdserve.kv.max_kl", state.kv_floor)
                if sub is not None:
                    await sub.follow(call)
                    return
                async for ev in call:
                    if not got_event and handle is not None:
                        state.kv_consumed = True  # decode pulled the KV: the lease is gone
                    got_event = True
                    yield list(ev.token_ids), (ev.finish_reason or None)
                    if ev.finish_reason:
                        return
            except grpc.aio.AioRpcError as exc:
                failed = _call_failed("decode", inst, exc)
                if failed is None:
                    raise
                telemetry.record_error(span, exc)
                raise failed from None
            except StreamBroken as exc:
                telemetry.record_error(span, exc)
                raise _CallFailed("decode", inst, str(exc)) from None
            finally:
                if stream is not None:
                    stream.unsubscribe(req.token_stream_tag)
        raise _CallFailed("decode", inst, "ended the stream without finishing")

    async def _colocated(
        self,
        request: generation_pb2.GenerateRequest,
        request_id: str,
        prompt_ids: list[int],
        received: float,
        failover: _Failover,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Relay Generate to the colocated instance with the fewest requests in flight (retrying, per
        `failover`, a call that failed before anything was relayed); the usage's TTFT is the gateway's."""
        req = generation_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.request_id = request_id
        req.ClearField("prompt")
        req.prompt_token_ids[:] = prompt_ids
        num_tokens = len(prompt_ids) + request.max_tokens
        while True:
            inst = await failover.pick("colocated", lambda: self.router.pick_colocated(num_tokens))
            stub = generation_pb2_grpc.GenerationStub(self.router.channel(inst.grpc_address))
            ttft: float | None = None
            with self.router.track(inst):
                call = stub.Generate(req)
                try:
                    async for msg in call:
                        if ttft is None:
                            ttft = time.monotonic() - received
                        if msg.finish_reason:
                            msg.usage.ttft_s = ttft
                        yield msg
                    return
                except grpc.aio.AioRpcError as exc:
                    failed = _call_failed("colocated", inst, exc)
                    if failed is None or ttft is not None:  # no resume once tokens were relayed
                        raise
                finally:
                    if not call.done():  # the client went away: cancelling frees the instance's blocks
                        call.cancel()
            await failover.failed(failed)

    def _codec_for(
        self, prompt_len: int, kv_address: str, decode: InstanceInfo, floor: float | None = None
    ) -> str:
        """This hand-off's codec (`pick_codec`): `floor` is the request's max_kv_kl, None when unset."""
        m = self.model
        raw_bytes = prompt_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4  # K and V, fp32
        link_bps = decode.links.get(kv_address)
        planned = self.router.link_codec(kv_address, decode.instance_id)
        return pick_codec(self.cfg, self.codec_profiles, raw_bytes, link_bps, m.num_layers, floor, planned)

    def _release_later(self, address: str, transfer_id: str) -> None:
        """Release a prefill lease without blocking the (possibly cancelled) request task."""

        async def release() -> None:
            stub = prefill_pb2_grpc.PrefillStub(self.router.channel(address))
            try:
                await stub.Release(prefill_pb2.ReleaseRequest(transfer_id=transfer_id), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "release of lease %s at %s failed: %s (it expires by TTL)",
                    transfer_id,
                    address,
                    exc.code(),
                )

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _RequestState:
    """What must be cleaned up if a request ends early (and the request's telemetry)."""

    def __init__(
        self, trace: telemetry.RequestTrace, failover: _Failover, kv_floor: float | None = None
    ) -> None:
        self.trace = trace
        self.failover = failover
        self.queued = False  # counted in Gateway.queued (accepted, no first token yet)
        self.kv_floor = kv_floor  # the request's max_kv_kl (None: unset)
        self.handle: common_pb2.KVHandle | None = None
        self.prefill_address = ""
        self.kv_consumed = False
        self.prefill_call: grpc.aio.Call | None = None
        self.decode_call: grpc.aio.Call | None = None
        self.pump = _DecodePump()

    def cancel_calls(self) -> None:
        for call in (self.prefill_call, self.decode_call):
            if call is not None and not call.done():
                call.cancel()
        self.pump.cancel()

    def restart_pump(self) -> None:
        """A fresh decode pump after a failed one (cancelled, with its call: nothing of it is read again)."""
        self.cancel_calls()
        self.pump = _DecodePump()


class _Failover:
    """The one retry policy of a request's calls to instances (prefill, decode, colocated alike).

    `pick(role, choose)`: the instance for the next call; while `choose()` finds none usable (none
    registered yet, all dead or suspect), the registry snapshot is polled every `refresh_s` up to
    `failover_wait_s`, never past the request's deadline. `failed(exc)`: a call failed retriably; the
    instance is skipped for `suspect_s` when it is at fault, and the caller may retry, unless the request
    has used its `max_failovers` or its deadline: then the client's error (UNAVAILABLE / DEADLINE_EXCEEDED,
    naming the last failure) is raised."""

    def __init__(self, cfg: CoordinatorConfig, router: Router, trace: telemetry.RequestTrace) -> None:
        self.cfg = cfg
        self.router = router
        self.trace = trace
        self.failures = 0
        self.last: _CallFailed | None = None

    async def pick(self, role: str, choose: Callable[[], InstanceInfo]) -> InstanceInfo:
        give_up = time.monotonic() + self.cfg.failover_wait_s
        deadline = self.trace.deadline
        while True:
            try:
                with telemetry.span(telemetry.ROUTE, self.trace.ctx) as route:
                    inst = choose()
                    route.set_attributes(telemetry.route_attributes(role, inst, self.failures, self.router))
                return inst
            except Unavailable as exc:
                now = time.monotonic()
                after = f"; after {self.last}" if self.last is not None else ""
                if deadline is not None and now + self.router.refresh_s >= deadline:
                    raise DeadlineExceeded(f"{exc} before the request's deadline{after}") from None
                if now >= give_up:
                    raise Unavailable(f"{exc} (waited {self.cfg.failover_wait_s:g}s){after}") from None
                await asyncio.sleep(self.router.refresh_s)  # the registry refreshes at this period

    async def failed(self, exc: _CallFailed) -> None:
        self.failures += 1
        self.last = exc
        if exc.at_fault:
            self.router.mark_suspect(exc.inst)
        if self.failures > self.cfg.max_failovers:
            raise Unavailable(f"{self.failures} calls of this request failed; the last: {exc}")
        deadline = self.trace.deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline passed after {exc}")
        log.warning("%s; retrying (failover %d of %d)", exc, self.failures, self.cfg.max_failovers)
        telemetry.instruments().failover(exc.role)


_END = object()


class _DecodePump:
    """Runs the decode stream in its own task (so it can start before prefill ends) and hands its
    events to the request task through a queue (a token stream's reader puts them there itself: `put`);
    errors travel through the queue too."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._front: list = []  # at most one event first_token() put back
        self._task: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self, events: AsyncIterator[tuple[list[int], str | None]]) -> None:
        async def pump() -> None:
            try:
                async for item in events:
                    await self._queue.put(item)
                await self._queue.put(_END)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the request task
                await self._queue.put(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        self._task = asyncio.get_running_loop().create_task(pump())

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def put(self, item: tuple[list[int], str | None]) -> None:
        """An event delivered from outside the pump's task (`coordinator.token_stream`), in order."""
        self._queue.put_nowait(item)

    async def first_token(self) -> int:
        """Local prefill: take the first token from the first event (later tokens of that event, or its
        finish, are put back in front); the stream ending without one is UNAVAILABLE."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END or not item[0]:
            raise Unavailable("decode instance ended a local prefill without a first token")
        tokens, reason = item
        if tokens[1:] or reason is not None:
            self._front.append((tokens[1:], reason))
        return tokens[0]

    async def __aiter__(self) -> AsyncIterator[tuple[list[int], str | None]]:
        while True:
            item = self._front.pop() if self._front else await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


__all__ = ["Gateway", "PDServeError"]
