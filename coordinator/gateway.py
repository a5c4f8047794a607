"""The public `pdserve.v1.Generation` service: validate, route, run prefill then decode, stream.

One request's life here: (1) validate and assign an id; (2) pick a prefill and a decode instance;
(3) stream `Prefill` until its first token (sent to the client at once: TTFT); (4) stream `Decode`
with the KV handle, relaying tokens (conditional disaggregation, `local_prefill`: a short prompt may
skip (3), its decode instance prefills it and sends the first token itself); (5) whatever happens
(finish, error, client cancel, deadline), make sure the prefill lease is released and the decode
request is cancelled, so no KV block leaks.
A prefill or decode instance that refuses the connection before it produced anything is skipped
and the step is retried on another instance: the KV lease keeps the prompt's cache meanwhile.
In colocated mode (the baseline pdserve is benchmarked against) steps (2)-(4) are one relayed call to a
colocated instance, which runs prefill and decode in one engine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from coordinator.config import CoordinatorConfig
from coordinator.registry import InstanceInfo
from coordinator.router import Router
from engine.config import ModelConfig
from engine.params import SamplingParams, generation_defaults
from engine.stream import StopChecker
from engine.tokenizer import Tokenizer
from kv_transfer.choice import CodecProfile, choose_codec, load_profiles
from pdserve import telemetry
from pdserve.errors import CapacityExceeded, InvalidRequest, PDServeError, Unavailable
from pdserve.rpc import params_to_proto, stream_errors
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

MAX_ATTEMPTS = 3  # instances tried per phase when one refuses the connection


def _refused(exc: grpc.RpcError) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


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
) -> str:
    """The codec of one hand-off. A fixed --codec is used as configured unless the request set a floor its
    measured profile does not meet (or it has none): then raw. With "auto", the fastest codec within the
    floor (the request's, else cfg.max_kl) on the link's measured bandwidth; raw while it is unmeasured."""
    if cfg.codec != "auto":
        if floor is None or cfg.codec == "raw":
            return cfg.codec
        kl = next((p.kl_mean for p in profiles if p.name == cfg.codec), None)
        return cfg.codec if kl is not None and kl <= floor else "raw"
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
        self.local_pending = 0  # local prefills sent to decode instances whose first token has not come back

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
        rt.accepted(request_id, len(prompt_ids), params.max_tokens)
        self.inflight += 1
        if self.cfg.colocated:  # baseline mode: one colocated instance does the whole request
            try:
                async for msg in self._colocated(request, request_id, prompt_ids, received):
                    yield msg
            finally:
                self.inflight -= 1
            return
        stop = StopChecker(self.tokenizer, params)
        state = _RequestState(rt, kv_floor)
        try:
            async for msg in self._run(request_id, prompt_ids, params, stop, state, received):
                yield msg
        finally:
            self.inflight -= 1
            state.cancel_calls()
            if state.handle is not None and not state.kv_consumed:
                self._release_later(state.prefill_address, state.handle.transfer_id)

    async def _run(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopChecker,
        state: _RequestState,
        received: float,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        # Layer-wise streaming (where `_layerwise` says it pays): decode is asked to pull as soon as prefill
        # has scheduled the request, so the KV moves layer by layer while later layers still compute.
        pump = state.pump
        stream_kv = params.max_tokens > 1

        def on_scheduled(handle: common_pb2.KVHandle) -> None:
            pump.start(self._decode(request_id, prompt_ids, params, None, handle, state))

        if self._prefill_locally(len(prompt_ids)):
            self.local_pending += 1
            try:
                pump.start(self._decode(request_id, prompt_ids, params, None, None, state))
                first_token = await pump.first_token()
            finally:
                self.local_pending -= 1
        else:
            first_token = await self._prefill(
                request_id, prompt_ids, params, state, on_scheduled if stream_kv else None
            )
        ttft = time.monotonic() - received
        state.trace.first_token()
        completion = [first_token]
        reason = stop.push(first_token)
        if reason is None and not pump.started:  # decode starts pulling before the first token is written
            assert state.handle is not None
            pump.start(self._decode(request_id, prompt_ids, params, first_token, state.handle, state))
        yield generation_pb2.GenerateResponse(
            request_id=request_id, token_ids=[first_token], text=stop.take_text()
        )
        if reason is None:
            async for tokens, decode_reason in pump:
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
        pump.cancel()
        state.trace.finished(reason or "length")
        usage = common_pb2.Usage(
            prompt_tokens=len(prompt_ids), completion_tokens=len(completion), ttft_s=ttft
        )
        yield generation_pb2.GenerateResponse(
            request_id=request_id,
            text=stop.take_text(final=True),
            finish_reason=reason or "length",
            usage=usage,
        )

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
        last_exc: BaseException | None = None
        for attempt in range(MAX_ATTEMPTS):
            with telemetry.span(telemetry.ROUTE, state.trace.ctx) as route:
                inst = self.router.pick_prefill()
                route.set_attributes(telemetry.route_attributes("prefill", inst, attempt, self.router))
            stub = prefill_pb2_grpc.PrefillStub(self.router.channel(inst.grpc_address))
            scheduled = on_scheduled if on_scheduled is not None and self._layerwise(inst) else None
            got_event = False
            with (
                self.router.track(inst),
                telemetry.rpc_span(telemetry.GATEWAY_PREFILL, state.trace.ctx, inst) as span,
            ):
                call = stub.Prefill(req, metadata=telemetry.outgoing_metadata(span))
                state.prefill_call = call
                state.prefill_address = inst.grpc_address
                try:
                    async for ev in call:
                        got_event = True
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
                    if _refused(exc) and not got_event:
                        telemetry.record_error(span, exc)
                        self.router.mark_suspect(inst)
                        last_exc = exc
                        continue
                    raise
            raise Unavailable(f"prefill instance {inst.instance_id} ended the stream without a result")
        raise Unavailable(f"no prefill instance reachable after {MAX_ATTEMPTS} attempts: {last_exc}")

    async def _decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        first_token: int | None,
        handle: common_pb2.KVHandle | None,
        state: _RequestState,
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        """Run decode on some instance, yielding (new tokens, finish reason or None) per event.
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
        last_exc: BaseException | None = None
        for attempt in range(MAX_ATTEMPTS):
            with telemetry.span(telemetry.ROUTE, state.trace.ctx) as route:
                inst = self.router.pick_decode(num_tokens)
                route.set_attributes(telemetry.route_attributes("decode", inst, attempt, self.router))
            if handle is not None:
                req.kv.codec = self._codec_for(len(prompt_ids), handle.address, inst, state.kv_floor)
            stub = decode_pb2_grpc.DecodeStub(self.router.channel(inst.grpc_address))
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
                    async for ev in call:
                        if not got_event:
                            state.kv_consumed = True  # decode pulled the KV: the lease is gone
                        got_event = True
                        yield list(ev.token_ids), (ev.finish_reason or None)
                        if ev.finish_reason:
                            return
                except grpc.aio.AioRpcError as exc:
                    if _refused(exc) and not got_event:
                        telemetry.record_error(span, exc)
                        self.router.mark_suspect(inst)
                        last_exc = exc
                        continue
                    raise
            raise Unavailable(f"decode instance {inst.instance_id} ended the stream without finishing")
        raise Unavailable(f"no decode instance reachable after {MAX_ATTEMPTS} attempts: {last_exc}")

    async def _colocated(
        self,
        request: generation_pb2.GenerateRequest,
        request_id: str,
        prompt_ids: list[int],
        received: float,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Relay Generate to the colocated instance with the fewest requests in flight (retrying one
        that refuses the connection before answering); the usage's TTFT is the gateway's."""
        req = generation_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.request_id = request_id
        req.ClearField("prompt")
        req.prompt_token_ids[:] = prompt_ids
        last_exc: BaseException | None = None
        for _ in range(MAX_ATTEMPTS):
            inst = self.router.pick_colocated(len(prompt_ids) + request.max_tokens)
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
                    if _refused(exc) and ttft is None:
                        self.router.mark_suspect(inst)
                        last_exc = exc
                        continue
                    raise
                finally:
                    if not call.done():  # the client went away: cancelling frees the instance's blocks
                        call.cancel()
        raise Unavailable(f"no colocated instance reachable after {MAX_ATTEMPTS} attempts: {last_exc}")

    def _codec_for(
        self, prompt_len: int, kv_address: str, decode: InstanceInfo, floor: float | None = None
    ) -> str:
        """This hand-off's codec (`pick_codec`): `floor` is the request's max_kv_kl, None when unset."""
        m = self.model
        raw_bytes = prompt_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4  # K and V, fp32
        link_bps = decode.links.get(kv_address)
        return pick_codec(self.cfg, self.codec_profiles, raw_bytes, link_bps, m.num_layers, floor)

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

    def __init__(self, trace: telemetry.RequestTrace, kv_floor: float | None = None) -> None:
        self.trace = trace
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


_END = object()


class _DecodePump:
    """Runs the decode stream in its own task (so it can start before prefill ends) and hands its
    events to the request task through a queue; errors travel through the queue too."""

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
