"""OpenTelemetry for every pdserve process: setup from the standard environment, the span-name table,
W3C trace context in gRPC metadata, and the metric instruments.

Nothing is recorded or exported unless asked for (spans are then the API's non-recording no-ops and
instruments no-ops, so tracing costs nothing by default):

- OTLP over gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`)
  is set, or `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` name `otlp`; the exporter reads the other
  standard variables itself (`OTEL_EXPORTER_OTLP_INSECURE`, `..._HEADERS`, `..._TIMEOUT`, ...), the
  batch span processor `OTEL_BSP_*`, the metric reader `OTEL_METRIC_EXPORT_INTERVAL`, the sampler
  `OTEL_TRACES_SAMPLER`;
- the console when `PDSERVE_OTEL_CONSOLE=1` or the exporter variables name `console`;
- finished spans as JSON lines appended to `PDSERVE_TRACE_FILE` (what `pdserve trace` reads offline);
- a Prometheus scrape endpoint on `PDSERVE_PROMETHEUS_PORT` (0 = any free port, logged).

Spans made in engine threads get their parent explicitly (`parent=` a Context carried on the job)
and their times from `time.monotonic()` values (`wall_ns`), never from the thread's current context.
The names below are stable; docs/observability.md documents each span, attribute and metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from pdserve.errors import grpc_status

log = logging.getLogger(__name__)

# ---- span names (stable; documented in docs/observability.md) ------------------------------------
GATEWAY_GENERATE = "pdserve.gateway.generate"  # root: the whole request at the gateway (SERVER)
GATEWAY_RECEIVE = "pdserve.gateway.receive"  # validation, tokenization, request id
ROUTE = "pdserve.route"  # one routing decision (role, chosen instance, why)
GATEWAY_PREFILL = "pdserve.gateway.prefill"  # the Prefill call, one per attempt (CLIENT)
GATEWAY_DECODE = "pdserve.gateway.decode"  # the Decode call, one per attempt (CLIENT)
GATEWAY_STREAM = "pdserve.gateway.stream"  # first token to last message sent to the client
PREFILL_REQUEST = "pdserve.prefill.request"  # the Prefill RPC on the prefill instance (SERVER)
PREFILL_QUEUE = "pdserve.prefill.queue"  # submitted -> scheduled into a batch
PREFILL_COMPUTE = "pdserve.prefill.compute"  # the batch's forward pass + first token
KV_LEASE = "pdserve.kv.lease"  # prefill KV blocks held for decode: open -> released
DECODE_REQUEST = "pdserve.decode.request"  # the Decode RPC on the decode instance (SERVER)
DECODE_ADMISSION = "pdserve.decode.admission"  # submitted -> KV blocks reserved
KV_TRANSFER = "pdserve.kv.transfer"  # the KV pull: PULL sent -> trailer received (CLIENT)
KV_ENCODE = "pdserve.kv.encode"  # prefill-side codec encode, summed over layers (from the trailer)
KV_DECODE = "pdserve.kv.decode"  # decode-side frame checks + codec decode, summed over layers
DECODE_STEPS = "pdserve.decode.steps"  # joined the running batch -> finished (tokens, steps)
# conditional disaggregation only (not in SPAN_NAMES, the remote-prefill path): the decode instance's own
# prefill pass of a local_prefill request (no prefill.* or kv.* spans in that trace)
DECODE_LOCAL_PREFILL = "pdserve.decode.local_prefill"
EVENT_KV_PUBLISH = "pdserve.kv.publish"  # span event on PREFILL_COMPUTE: layer l's KV is ready

SPAN_NAMES = (
    GATEWAY_GENERATE,
    GATEWAY_RECEIVE,
    ROUTE,
    GATEWAY_PREFILL,
    GATEWAY_DECODE,
    GATEWAY_STREAM,
    PREFILL_REQUEST,
    PREFILL_QUEUE,
    PREFILL_COMPUTE,
    KV_LEASE,
    DECODE_REQUEST,
    DECODE_ADMISSION,
    KV_TRANSFER,
    KV_ENCODE,
    KV_DECODE,
    DECODE_STEPS,
)

SERVICE_PREFIX = "pdserve-"  # service.name = pdserve-coordinator | pdserve-prefill | pdserve-decode

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 33, 2))  # 1 KiB .. 4 GiB

# ---- process state ----------------------------------------------------------------------------------
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


@dataclass
class _State:
    tracer_provider: Any = None
    meter_provider: Any = None
    tracer: trace.Tracer = trace.NoOpTracer()
    meter: metrics.Meter = metrics.NoOpMeter("pdserve")
    instruments: Instruments | None = None
    prometheus_server: Any = None


_state = _State()


def wall_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` value as the epoch nanoseconds OpenTelemetry timestamps use."""
    return int(monotonic_s * 1e9) + _EPOCH_OFFSET_NS


def enabled() -> bool:
    """Whether spans are recorded (some exporter was asked for)."""
    return _state.tracer_provider is not None


def tracer() -> trace.Tracer:
    return _state.tracer


def instruments() -> Instruments:
    if _state.instruments is None:
        _state.instruments = Instruments(_state.meter)
    return _state.instruments


def _exporters(kind: str) -> set[str]:
    """Exporter names asked for `kind` ('traces' | 'metrics'); empty = nothing (the default)."""
    named = os.environ.get(f"OTEL_{kind.upper()}_EXPORTER", "").strip().lower()
    if named:
        out = {n.strip() for n in named.split(",") if n.strip()} - {"none"}
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"
    ):
        out = {"otlp"}
    else:
        out = set()
    if os.environ.get("PDSERVE_OTEL_CONSOLE", "") not in ("", "0"):
        out.add("console")
    return out


def setup(role: str, instance_id: str = "") -> bool:
    """Configure this process's tracing and metrics from the environment; True if anything is exported.

    Call once, before any engine thread starts; call `shutdown()` when the process stops.
    """
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {
            "service.name": SERVICE_PREFIX + role,
            "service.namespace": "pdserve",
            "service.instance.id": instance_id or f"{role}-{os.getpid()}",
        }
    )
    span_exporters = _span_exporters(_exporters("traces"))
    if span_exporters:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        _state.tracer_provider = provider
        _state.tracer = provider.get_tracer("pdserve")
    readers = _metric_readers(_exporters("metrics"))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        _state.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        _state.meter = _state.meter_provider.get_meter("pdserve")
        _state.instruments = None  # rebuilt on the real meter
    if span_exporters or readers:
        log.info(
            "telemetry: %s exports traces to %s, metrics to %d reader(s)",
            SERVICE_PREFIX + role,
            ", ".join(type(e).__name__ for e in span_exporters) or "nothing",
            len(readers),
        )
    return bool(span_exporters or readers)


def _span_exporters(names: set[str]) -> list[Any]:
    out: list[Any] = []
    for name in sorted(names):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        else:
            log.warning("telemetry: unknown traces exporter %r ignored (known: otlp, console, none)", name)
    path = os.environ.get("PDSERVE_TRACE_FILE")
    if path:
        out.append(JsonLinesSpanExporter(path))
    return out


def _metric_readers(names: set[str]) -> list[Any]:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    out: list[Any] = []
    for name in sorted(names):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            out.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            out.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            log.warning("telemetry: unknown metrics exporter %r ignored (known: otlp, console, none)", name)
    port = os.environ.get("PDSERVE_PROMETHEUS_PORT")
    if port:
        reader = _prometheus_reader(int(port))
        if reader is not None:
            out.append(reader)
    return out


def _prometheus_reader(port: int) -> Any | None:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError:
        log.warning("telemetry: PDSERVE_PROMETHEUS_PORT set but opentelemetry-exporter-prometheus is missing")
        return None
    server, _ = start_http_server(port, addr=os.environ.get("PDSERVE_PROMETHEUS_HOST", "0.0.0.0"))
    _state.prometheus_server = server
    log.info("telemetry: Prometheus metrics on :%d/metrics", server.server_port)
    print(f"PROMETHEUS :{server.server_port}", flush=True)
    return PrometheusMetricReader()


def prometheus_port() -> int | None:
    """The port of this process's Prometheus endpoint, if it serves one."""
    server = _state.prometheus_server
    return server.server_port if server is not None else None


def shutdown() -> None:
    """Flush and stop exporters (finished spans and a last metrics export); safe to call twice."""
    tp, mp, prom = _state.tracer_provider, _state.meter_provider, _state.prometheus_server
    _state.tracer_provider = _state.meter_provider = _state.prometheus_server = None
    if prom is not None:
        prom.shutdown()
        prom.server_close()
    _state.tracer, _state.meter, _state.instruments = trace.NoOpTracer(), metrics.NoOpMeter("pdserve"), None
    for provider in (tp, mp):
        if provider is not None:
            try:
                provider.shutdown()
            except Exception:  # noqa: BLE001 - a collector that went away must not block process exit
                log.warning("telemetry: shutdown of %s failed", type(provider).__name__, exc_info=True)


# ---- spans ------------------------------------------------------------------------------------------
def start_span(
    name: str,
    parent: Context | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    start: float | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A span whose parent is `parent` (not the current context); `start` is a time.monotonic() value
    (default now). All pdserve span times derive from the monotonic clock, so spans of one process
    nest exactly whatever the wall clock does meanwhile."""
    return _state.tracer.start_span(
        name,
        context=parent if parent is not None else Context(),
        kind=kind,
        attributes=attributes,
        start_time=wall_ns(time.monotonic() if start is None else start),
    )


def end_span(span: Span, end: float | None = None) -> None:
    """End `span` at `end` (a time.monotonic() value, default now)."""
    span.end(end_time=wall_ns(time.monotonic() if end is None else end))


def context_of(span: Span) -> Context:
    """A context whose current span is `span`: the parent for its children."""
    return trace.set_span_in_context(span, Context())


@contextlib.contextmanager
def span(
    name: str,
    parent: Context | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A child span of `parent` for the block; an exception leaving it is recorded, then re-raised."""
    s = start_span(name, parent, kind=kind, attributes=attributes)
    try:
        yield s
    except BaseException as exc:
        record_error(s, exc)
        raise
    finally:
        end_span(s)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception stands for (cancellation counts as CANCELLED)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc_status(exc)


def record_error(s: Span, exc: BaseException) -> grpc.StatusCode:
    """Mark `s` failed by `exc` (status ERROR + gRPC code; the exception event unless a cancellation)."""
    code, message = status_of(exc)
    if s.is_recording():
        s.set_attribute("rpc.grpc.status_code", code.value[0])
        s.set_attribute("pdserve.status_code", code.name)
        s.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
        if code != grpc.StatusCode.CANCELLED:
            s.record_exception(exc)
    return code


# ---- propagation in gRPC metadata -------------------------------------------------------------------
def outgoing_metadata(parent: Span | Context | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying `parent`'s W3C trace context (traceparent, tracestate), or None if none."""
    if parent is None:
        return None
    ctx = context_of(parent) if isinstance(parent, Span) else parent
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items()) or None


def incoming_context(metadata: Collection[tuple[str, Any]] | None) -> Context | None:
    """The trace context a caller put in its gRPC invocation metadata (None if it sent none)."""
    if not metadata or not enabled():
        return None
    carrier = {k: v for k, v in metadata if isinstance(v, str)}
    if "traceparent" not in carrier:
        return None
    return propagate.extract(carrier, context=Context())


def server_stream(name: str) -> Callable:
    """Decorate an aio server-streaming handler `fn(self, request, context, span)`: `span` is a SERVER
    span named `name`, child of the caller's propagated context, ended (with the error, if any) when
    the stream ends. Put it under `@stream_errors` so it sees the typed exception."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            s = start_span(name, incoming_context(context.invocation_metadata()), kind=SpanKind.SERVER)
            try:
                async for item in fn(self, request, context, s):
                    yield item
            except BaseException as exc:
                record_error(s, exc)
                raise
            finally:
                end_span(s)

        return wrapper

    return deco


# ---- metrics ----------------------------------------------------------------------------------------
class Instruments:
    """The metric instruments every pdserve process may record into (no-ops when metrics are off)."""

    def __init__(self, meter: metrics.Meter) -> None:
        def seconds(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(
                name, unit="s", description=description, explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S
            )

        self.ttft = seconds("pdserve.request.ttft", "time to first token at the gateway")
        self.tbt = seconds("pdserve.request.tbt", "time between consecutive token messages to the client")
        self.tpot = seconds("pdserve.request.tpot", "time per output token after the first, per request")
        self.duration = seconds("pdserve.request.duration", "request received -> last message")
        self.requests = meter.create_counter(
            "pdserve.requests", unit="{request}", description="finished requests by finish reason and status"
        )
        self.handoff_bytes = meter.create_histogram(
            "pdserve.kv.handoff.bytes",
            unit="By",
            description="KV bytes on the wire per hand-off, by codec and transport",
            explicit_bucket_boundaries_advisory=BYTES_BUCKETS,
        )
        self.handoff_seconds = seconds(
            "pdserve.kv.handoff.duration", "KV pull wall time per hand-off, by codec and transport"
        )
        self.failovers = meter.create_counter(
            "pdserve.gateway.failovers",
            unit="{call}",
            description="calls to instances that failed (instance died or went away) and were retried, by role",
        )
        self.restarts = meter.create_counter(
            "pdserve.launcher.restarts",
            unit="{process}",
            description="instances `pdserve up` restarted, by role",
        )
        self._meter = meter
        self._observed = False

    def observe_planner(self, status: Callable[[], Mapping[str, float]]) -> None:
        """Gauges of the coordinator's replanner, fed by `status()` (keys: predicted_attainment,
        measured_attainment, meets_slo (1/0), rate_rps; missing keys are not reported)."""
        from opentelemetry.metrics import CallbackOptions, Observation

        def gauge(key: str, name: str, unit: str, description: str) -> None:
            def callback(options: CallbackOptions) -> list[Observation]:
                s = status()
                return [Observation(s[key])] if key in s else []

            self._meter.create_observable_gauge(name, [callback], unit=unit, description=description)

        gauge(
            "predicted_attainment",
            "pdserve.planner.predicted_attainment",
            "1",
            "the running plan's SLO attainment the simulator predicts on the live window",
        )
        gauge(
            "measured_attainment", "pdserve.planner.measured_attainment", "1", "SLO attainment of the window"
        )
        gauge(
            "meets_slo",
            "pdserve.planner.meets_slo",
            "1",
            "1 while the running plan is predicted to meet the SLOs",
        )
        gauge("rate_rps", "pdserve.planner.rate", "{request}/s", "the live window's request rate")

    def failover(self, role: str) -> None:
        self.failovers.add(1, {"pdserve.role": role})

    def restart(self, role: str) -> None:
        self.restarts.add(1, {"pdserve.role": role})

    def observe_instance(self, role: str, instance_id: str, stats: Callable[[], Mapping[str, int]]) -> None:
        """Observable gauges fed by `stats()` (keys: queue_len, running, inflight, kv_blocks_free,
        kv_blocks_used, leases; missing keys are not reported). Once per process."""
        if self._observed:
            return
        self._observed = True
        from opentelemetry.metrics import CallbackOptions, Observation

        base = {"pdserve.role": role, "pdserve.instance.id": instance_id}

        def gauge(name: str, unit: str, description: str, keys: dict[str, dict[str, str]]) -> None:
            def callback(options: CallbackOptions) -> list[Observation]:
                s = stats()
                return [Observation(s[k], {**base, **extra}) for k, extra in keys.items() if k in s]

            self._meter.create_observable_gauge(name, [callback], unit=unit, description=description)

        gauge(
            "pdserve.queue.depth",
            "{request}",
            "requests waiting: prefill queue, decode admission + pull, gateway in flight",
            {"queue_len": {}, "inflight": {}},
        )
        gauge("pdserve.decode.running", "{request}", "sequences in the decode batch", {"running": {}})
        gauge(
            "pdserve.kv.blocks",
            "{block}",
            "KV cache blocks by state",
            {"kv_blocks_used": {"pdserve.kv.state": "used"}, "kv_blocks_free": {"pdserve.kv.state": "free"}},
        )
        gauge("pdserve.kv.leases", "{lease}", "prefill KV leases not yet pulled", {"leases": {}})


# ---- the gateway's view of one request --------------------------------------------------------------
class RequestTrace:
    """The gateway's telemetry of one request: the root span with its receive and stream children, and
    the request metrics (TTFT, TBT, TPOT, duration; requests by finish reason and status code)."""

    def __init__(self, metadata: Collection[tuple[str, Any]] | None, received: float | None = None) -> None:
        self.received = time.monotonic() if received is None else received
        self.root = start_span(
            GATEWAY_GENERATE, incoming_context(metadata), kind=SpanKind.SERVER, start=self.received
        )
        self.ctx = context_of(self.root)
        self.deadline: float | None = None  # time.monotonic() by which the caller gives up (None: none)
        self._receive: Span | None = start_span(GATEWAY_RECEIVE, self.ctx, start=self.received)
        self._stream: Span | None = None
        self._first: float | None = None
        self._last = 0.0
        self._tokens = 0
        self._messages = 0
        self._reason = ""

    def accepted(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        """Validation passed: the receive span ends."""
        attrs: dict[str, AttributeValue] = {
            "pdserve.request_id": request_id,
            "pdserve.prompt_tokens": prompt_tokens,
            "pdserve.max_tokens": max_tokens,
        }
        self.root.set_attributes(attrs)
        if self._receive is not None:
            self._receive.set_attributes(attrs)
            end_span(self._receive)
            self._receive = None

    def first_token(self) -> float:
        """The first token is being sent: records TTFT, starts the stream span; returns TTFT in s."""
        now = time.monotonic()
        self._first = self._last = now
        self._tokens = self._messages = 1
        ttft = now - self.received
        instruments().ttft.record(ttft)
        self._stream = start_span(GATEWAY_STREAM, self.ctx, start=now)
        return ttft

    def tokens(self, n: int) -> None:
        """`n` more tokens are being sent in one message."""
        now = time.monotonic()
        instruments().tbt.record(now - self._last)
        self._last = now
        self._tokens += n
        self._messages += 1

    def finished(self, reason: str) -> None:
        self._reason = reason

    def close(self, exc: BaseException | None) -> None:
        """The request is over (`exc` is what ended it early, if anything): end spans, record metrics."""
        now = time.monotonic()
        code = grpc.StatusCode.OK if exc is None else status_of(exc)[0]
        attrs: dict[str, AttributeValue] = {
            "pdserve.completion_tokens": self._tokens,
            "pdserve.status_code": code.name,
        }
        if self._reason:
            attrs["pdserve.finish_reason"] = self._reason
        for s in (self._receive, self._stream):
            if s is not None:
                if exc is not None:
                    record_error(s, exc)
                s.set_attributes(
                    {"pdserve.completion_tokens": self._tokens, "pdserve.messages": self._messages}
                )
                end_span(s, now)
        self._receive = self._stream = None
        self.root.set_attributes(attrs)
        if exc is not None:
            record_error(self.root, exc)
        else:
            self.root.set_attribute("rpc.grpc.status_code", 0)
        end_span(self.root, now)
        m = instruments()
        m.requests.add(1, {"pdserve.finish_reason": self._reason or "none", "pdserve.status_code": code.name})
        m.duration.record(now - self.received, {"pdserve.status_code": code.name})
        if self._first is not None and self._tokens > 1:
            m.tpot.record((self._last - self._first) / (self._tokens - 1))


def traced_request(fn: Callable) -> Callable:
    """Decorate the gateway's async generator `fn(self, request, rt)`, handing it the request's
    `RequestTrace` and closing it (with the error, if any) when the stream ends. The decorated method is
    `(self, request, metadata=None, time_remaining=None)`, callable from any front end: `metadata` is the
    caller's (key, value) pairs carrying its W3C trace context (gRPC invocation metadata, HTTP headers);
    `time_remaining()` (gRPC's) tells a deadline from a client cancel."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any,
        request: Any,
        metadata: Sequence[tuple[str, Any]] | None = None,
        time_remaining: Callable[[], float | None] | None = None,
    ):
        rt = RequestTrace(metadata)
        remaining = time_remaining() if time_remaining is not None else None
        rt.deadline = None if remaining is None else rt.received + remaining
        error: BaseException | None = None
        try:
            async for item in fn(self, request, rt):
                yield item
        except BaseException as exc:
            error = _deadline_or(exc, time_remaining)
            raise
        finally:
            rt.close(error)

    return wrapper


def _deadline_or(exc: BaseException, time_remaining: Callable[[], float | None] | None) -> BaseException:
    """A cancellation whose deadline has passed is a DEADLINE_EXCEEDED, not a client cancel."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit) and time_remaining is not None:
        remaining = time_remaining()
        if remaining is not None and remaining <= 0:
            from pdserve.errors import DeadlineExceeded

            return DeadlineExceeded("deadline exceeded")
    return exc


# ---- the JSON-lines span file -----------------------------------------------------------------------
def span_to_dict(s: Any) -> dict[str, Any]:
    """One finished SDK span as the JSON object `pdserve trace` reads (ids in hex, times in epoch ns)."""
    ctx = s.get_span_context()
    parent = s.parent
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": s.name,
        "service": s.resource.attributes.get("service.name", ""),
        "kind": s.kind.name,
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "status_description": s.status.description or "",
        "attributes": dict(s.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in s.events
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """A SpanExporter appending each finished span as one JSON line to `path` (shared by processes:
    each export is one O_APPEND write)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        data = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans).encode()
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("telemetry: cannot append spans to %s: %s", self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


# ---- gateway helpers --------------------------------------------------------------------------------
_RPC = {GATEWAY_PREFILL: ("pdserve.v1.Prefill", "Prefill"), GATEWAY_DECODE: ("pdserve.v1.Decode", "Decode")}
_POLICY = {
    "prefill": "fewest requests in flight from this gateway, then shortest registry queue",
    "decode": "most KV blocks not reserved by this gateway's requests",
}


def rpc_span(name: str, parent: Context | None, inst: Any) -> contextlib.AbstractContextManager[Span]:
    """A CLIENT span for one call to instance `inst` (a registry InstanceInfo)."""
    service, method = _RPC[name]
    attrs = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "server.address": inst.grpc_address,
        "pdserve.instance.id": inst.instance_id,
    }
    return span(name, parent, kind=SpanKind.CLIENT, attributes=attrs)


def route_attributes(role: str, inst: Any, attempt: int, router: Any) -> dict[str, Any]:
    """Why `inst` was chosen for `role`: the policy, the candidates, the chosen instance's load."""
    if not enabled():
        return {}
    if role == "decode":
        reason = f"{inst.kv_blocks_free}/{inst.kv_blocks_total} KV blocks free (registry)"
    else:
        reason = f"registry queue {inst.queue_len}"
    if attempt:
        reason += f"; attempt {attempt + 1} after a failed call"
    return {
        "pdserve.role": role,
        "pdserve.route.policy": _POLICY.get(role, ""),
        "pdserve.route.reason": reason,
        "pdserve.route.candidates": router.count(role),
        "pdserve.route.attempt": attempt,
        "pdserve.instance.id": inst.instance_id,
        "pdserve.instance.node": inst.node,
        "pdserve.instance.queue_len": inst.queue_len,
        "pdserve.instance.kv_blocks_free": inst.kv_blocks_free,
        "server.address": inst.grpc_address,
    }


def prefill_done(s: Span, done: Any) -> None:
    """The prefill instance's own timings (a PrefillDone) on the gateway's Prefill call span."""
    if s.is_recording():
        s.set_attributes(
            {
                "pdserve.prefill.queue_s": done.queue_s,
                "pdserve.prefill.compute_s": done.compute_s,
                "pdserve.first_token_id": done.first_token_id,
                "pdserve.kv.transfer_id": done.kv.transfer_id,
            }
        )


def parent_of(s: Span) -> Context | None:
    """What a job carries to engine threads as its spans' parent: None when tracing is off."""
    return context_of(s) if enabled() else None
