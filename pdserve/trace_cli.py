"""`pdserve trace REQUEST_ID`: one request's spans, from every service, as a text waterfall.

Spans come from the JSON-lines file the services append to when `PDSERVE_TRACE_FILE` is set (works
offline), or from a Jaeger query API (`--jaeger http://host:16686`). The request is found by the
gateway's `pdserve.request_id` attribute (a trace id works too). `OTLPReceiver` is a minimal in-process
OTLP/gRPC receiver (traces and metrics) that tests and benchmarks point the services at.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_ATTR = "pdserve.request_id"
_HEX32 = re.compile(r"[0-9a-f]{32}")


@dataclass
class SpanRecord:
    """One finished span, whatever it was read from (times in epoch ns, ids in lowercase hex)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    kind: str = "INTERNAL"
    status: str = "UNSET"
    status_description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpanRecord:
        return cls(
            trace_id=d["trace_id"],
            span_id=d["span_id"],
            parent_span_id=d.get("parent_span_id") or None,
            name=d["name"],
            service=d.get("service", ""),
            start_ns=int(d["start_ns"]),
            end_ns=int(d["end_ns"]),
            kind=d.get("kind", "INTERNAL"),
            status=d.get("status", "UNSET"),
            status_description=d.get("status_description", ""),
            attributes=dict(d.get("attributes") or {}),
            events=list(d.get("events") or []),
        )


# ---- sources ----------------------------------------------------------------------------------------
def load_file(path: str) -> list[SpanRecord]:
    """Every span in a JSON-lines span file (a torn last line, from a writer still running, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(SpanRecord.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError):
                continue
    return out


def find_trace(spans: Iterable[SpanRecord], request_id: str) -> list[SpanRecord]:
    """The spans of the trace whose gateway span carries `request_id` (or whose trace id it is)."""
    spans = list(spans)
    trace_ids = {s.trace_id for s in spans if s.attributes.get(REQUEST_ID_ATTR) == request_id}
    if not trace_ids and _HEX32.fullmatch(request_id.lower()):
        trace_ids = {request_id.lower()}
    if len(trace_ids) > 1:
        roots = [s for s in spans if s.trace_id in trace_ids and s.parent_span_id is None]
        trace_ids = {max(roots, key=lambda s: s.start_ns).trace_id} if roots else trace_ids
    return [s for s in spans if s.trace_id in trace_ids]


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the operator's Jaeger URL
        return json.load(resp)


def load_jaeger(base_url: str, request_id: str, timeout: float = 10.0) -> list[SpanRecord]:
    """The request's trace from a Jaeger query API (found by the request id tag, or as a trace id)."""
    base = base_url.rstrip("/")
    tags = json.dumps({REQUEST_ID_ATTR: request_id})
    query = urllib.parse.urlencode(
        {"service": "pdserve-coordinator", "tags": tags, "limit": 5, "lookback": "7d"}
    )
    found = _get_json(f"{base}/api/traces?{query}", timeout).get("data") or []
    if not found and _HEX32.fullmatch(request_id.lower()):
        found = _get_json(f"{base}/api/traces/{request_id.lower()}", timeout).get("data") or []
    return [s for trace in found for s in jaeger_spans(trace)]


def jaeger_spans(trace: dict[str, Any]) -> list[SpanRecord]:
    """Spans of one trace in Jaeger's query-API JSON (microsecond times, tags, CHILD_OF references)."""
    services = {pid: p.get("serviceName", "") for pid, p in (trace.get("processes") or {}).items()}
    out = []
    for s in trace.get("spans") or []:
        tags = {t["key"]: t.get("value") for t in s.get("tags") or []}
        parent = next(
            (r["spanID"] for r in s.get("references") or [] if r.get("refType") == "CHILD_OF"), None
        )
        start_ns = int(s["startTime"]) * 1000
        status = (
            "ERROR"
            if tags.get("error") in (True, "true") or tags.get("otel.status_code") == "ERROR"
            else "OK"
        )
        out.append(
            SpanRecord(
                trace_id=s["traceID"].rjust(32, "0"),
                span_id=s["spanID"].rjust(16, "0"),
                parent_span_id=parent.rjust(16, "0") if parent else None,
                name=s["operationName"],
                service=services.get(s.get("processID", ""), ""),
                start_ns=start_ns,
                end_ns=start_ns + int(s.get("duration", 0)) * 1000,
                kind=str(tags.get("span.kind", "internal")).upper(),
                status=status,
                status_description=str(tags.get("otel.status_description", "")),
                attributes=tags,
                events=[
                    {
                        "name": next((f["value"] for f in lg.get("fields", []) if f["key"] == "event"), ""),
                        "time_ns": int(lg["timestamp"]) * 1000,
                        "attributes": {f["key"]: f.get("value") for f in lg.get("fields", [])},
                    }
                    for lg in s.get("logs") or []
                ],
            )
        )
    return out


# ---- the waterfall ----------------------------------------------------------------------------------
def _tree_order(spans: list[SpanRecord]) -> Iterator[tuple[int, SpanRecord]]:
    """(depth, span) depth-first, children by start time; spans whose parent is missing are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for s in spans:
        key = s.parent_span_id if s.parent_span_id in ids else None
        children.setdefault(key, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, -s.end_ns))

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, SpanRecord]]:
        for s in children.get(parent, []):
            yield depth, s
            yield from walk(s.span_id, depth + 1)

    yield from walk(None, 0)


_DETAILS = {  # attribute -> label in the waterfall's detail column
    "pdserve.instance.id": "instance",
    "pdserve.route.reason": "why",
    "pdserve.batch.size": "batch",
    "pdserve.kv.codec": "codec",
    "pdserve.kv.transport": "transport",
    "pdserve.kv.bytes_on_wire": "wire_bytes",
    "pdserve.kv.bytes_in": "bytes_in",
    "pdserve.kv.bytes_out": "bytes_out",
    "pdserve.decode.steps": "steps",
    "pdserve.completion_tokens": "tokens",
    "pdserve.finish_reason": "finish",
    "pdserve.kv.release_reason": "released",
}


def _details(s: SpanRecord) -> str:
    parts = [f"{label}={s.attributes[k]}" for k, label in _DETAILS.items() if k in s.attributes]
    if s.status == "ERROR":
        parts.insert(0, f"ERROR {s.status_description}".strip())
    return "  ".join(parts)


def waterfall(spans: list[SpanRecord], width: int = 40, details: bool = True) -> str:
    """A text waterfall: offset and duration (ms) from the trace's start, service, indented name, a bar."""
    if not spans:
        return "no spans"
    t0 = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - t0, 1)
    services = {s.service for s in spans}
    head = (
        f"trace {spans[0].trace_id}  {total / 1e6:.2f} ms  {len(spans)} spans  "
        f"services: {', '.join(sorted(services))}"
    )
    rows = list(_tree_order(spans))
    name_w = max(len("  " * d + s.name) for d, s in rows)
    svc_w = max(len(s.service.removeprefix("pdserve-")) for _, s in rows)
    lines = [head, f"{'start ms':>10} {'dur ms':>9}  {'service':<{svc_w}}  {'span':<{name_w}}  |timeline"]
    for depth, s in rows:
        a = int((s.start_ns - t0) / total * width)
        b = max(a + 1, int(round((s.end_ns - t0) / total * width)))
        bar = " " * a + "#" * (b - a) + " " * (width - b)
        line = (
            f"{(s.start_ns - t0) / 1e6:10.2f} {s.duration_ms:9.2f}  {s.service.removeprefix('pdserve-'):<{svc_w}}  "
            f"{'  ' * depth + s.name:<{name_w}}  |{bar}|"
        )
        if details and (d := _details(s)):
            line += "  " + d
        lines.append(line)
    return "\n".join(lines)


# ---- an in-process OTLP receiver (tests, benchmarks) ------------------------------------------------
def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def otlp_spans(request: Any) -> list[SpanRecord]:
    """SpanRecords of one OTLP ExportTraceServiceRequest."""
    out = []
    for rs in request.resource_spans:
        service = str(_attrs(rs.resource.attributes).get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanRecord(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        service=service,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        kind=("INTERNAL", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")[s.kind],
                        status=("UNSET", "OK", "ERROR")[s.status.code],
                        status_description=s.status.message,
                        attributes=_attrs(s.attributes),
                        events=[
                            {"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                            for e in s.events
                        ],
                    )
                )
    return out


class OTLPReceiver:
    """A gRPC OTLP receiver on `host:port` (0 = a free port) that keeps every span and metric exported
    to it: point services at `endpoint` with OTEL_EXPORTER_OTLP_ENDPOINT."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep_spans: bool = True) -> None:
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.keep_spans = keep_spans
        self.spans: list[SpanRecord] = []
        self.span_count = 0
        self.metrics: list[Any] = []  # ExportMetricsServiceRequest messages
        self._lock = threading.Lock()
        receiver = self

        class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add_spans(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                with receiver._lock:
                    receiver.metrics.append(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self._server.start()

    def _add_spans(self, request: Any) -> None:
        if self.keep_spans:
            got = otlp_spans(request)
            with self._lock:
                self.spans.extend(got)
                self.span_count += len(got)
        else:
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with self._lock:
                self.span_count += n

    def snapshot(self) -> list[SpanRecord]:
        with self._lock:
            return list(self.spans)

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, data point) of every exported point of metric `name`."""
        out: list[tuple[dict[str, Any], Any]] = []
        with self._lock:
            requests = list(self.metrics)
        for req in requests:
            for rm in req.resource_metrics:
                resource = _attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        kind = m.WhichOneof("data")
                        out.extend((resource, p) for p in getattr(m, kind).data_points)
        return out

    def stop(self) -> None:
        self._server.stop(grace=1.0)

    def __enter__(self) -> OTLPReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("request_id", help="the request id (GenerateResponse.request_id) or a trace id")
    p.add_argument(
        "--file",
        default=os.environ.get("PDSERVE_TRACE_FILE"),
        help="JSON-lines span file the services wrote (default: $PDSERVE_TRACE_FILE)",
    )
    p.add_argument(
        "--jaeger", default=None, help="Jaeger query URL instead of a file, e.g. http://127.0.0.1:16686"
    )
    p.add_argument("--width", type=int, default=40, help="timeline width in characters")
    p.add_argument("--no-details", action="store_true", help="omit the attribute column")


def run(a: argparse.Namespace) -> int:
    if a.jaeger:
        spans = load_jaeger(a.jaeger, a.request_id)
    elif a.file:
        spans = find_trace(load_file(a.file), a.request_id)
    else:
        print("pdserve trace: give --file (or set PDSERVE_TRACE_FILE) or --jaeger URL", file=sys.stderr)
        return 2
    if not spans:
        print(f"pdserve trace: no spans for request {a.request_id!r}", file=sys.stderr)
        return 1
    print(waterfall(spans, width=a.width, details=not a.no_details))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve trace", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
