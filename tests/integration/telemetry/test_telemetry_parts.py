"""The telemetry pieces in one process: nothing recorded by default, W3C context through gRPC metadata,
the JSON-lines span file, and the `pdserve trace` waterfall from files and from Jaeger's JSON."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve import telemetry as T
from pdserve import trace_cli
from pdserve.errors import InvalidRequest
from pdserve.trace_cli import SpanRecord

_TELEMETRY_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "PDSERVE_OTEL_CONSOLE",
    "PDSERVE_TRACE_FILE",
    "PDSERVE_PROMETHEUS_PORT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for k in _TELEMETRY_ENV:
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    T.shutdown()


def test_nothing_is_recorded_by_default(clean_env: pytest.MonkeyPatch) -> None:
    assert T.setup("prefill") is False
    assert not T.enabled()
    s = T.start_span(T.PREFILL_QUEUE, None)
    assert not s.is_recording()
    assert T.outgoing_metadata(s) is None
    assert T.incoming_context((("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),)) is None
    assert T.parent_of(s) is None
    T.instruments().ttft.record(0.1)  # a no-op instrument


def test_context_travels_in_grpc_metadata_and_spans_reach_the_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "spans.jsonl"
    clean_env.setenv("PDSERVE_TRACE_FILE", str(path))
    assert T.setup("coordinator") is True and T.enabled()
    start = time.monotonic()
    client = T.start_span(T.GATEWAY_PREFILL, None, kind=T.SpanKind.CLIENT, start=start)
    metadata = T.outgoing_metadata(client)
    assert metadata is not None and dict(metadata)["traceparent"].startswith("00-")
    server = T.start_span(T.PREFILL_REQUEST, T.incoming_context(metadata), kind=T.SpanKind.SERVER)
    child = T.start_span(T.PREFILL_QUEUE, T.parent_of(server), start=start + 0.001)
    T.end_span(child, start + 0.002)
    T.record_error(server, InvalidRequest("prompt is empty"))
    T.end_span(server)
    T.end_span(client)
    T.shutdown()  # flushes the batch processor
    spans = {s.name: s for s in trace_cli.load_file(str(path))}
    assert set(spans) == {T.GATEWAY_PREFILL, T.PREFILL_REQUEST, T.PREFILL_QUEUE}
    assert len({s.trace_id for s in spans.values()}) == 1
    assert spans[T.PREFILL_REQUEST].parent_span_id == spans[T.GATEWAY_PREFILL].span_id
    assert spans[T.PREFILL_QUEUE].parent_span_id == spans[T.PREFILL_REQUEST].span_id
    assert spans[T.PREFILL_QUEUE].duration_ms == pytest.approx(1.0, abs=1e-3)
    err = spans[T.PREFILL_REQUEST]
    assert err.status == "ERROR" and err.attributes["pdserve.status_code"] == "INVALID_ARGUMENT"
    assert spans[T.GATEWAY_PREFILL].service == "pdserve-coordinator"


def test_prometheus_endpoint(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PDSERVE_PROMETHEUS_PORT", "0")
    clean_env.setenv("PDSERVE_PROMETHEUS_HOST", "127.0.0.1")
    assert T.setup("decode")
    attrs = {"pdserve.kv.codec": "int8", "pdserve.kv.transport": "tcp"}
    T.instruments().handoff_bytes.record(4096, attrs)
    page = urllib.request.urlopen(f"http://127.0.0.1:{T.prometheus_port()}/metrics", timeout=5).read()
    assert re.search(rb'pdserve_kv_handoff_bytes\w*_count\{[^}]*pdserve_kv_codec="int8"', page), page[:2000]


def _span(
    name: str, span_id: str, parent: str | None, start_ms: float, dur_ms: float, service: str
) -> SpanRecord:
    t0 = 1_700_000_000_000_000_000
    return SpanRecord(
        trace_id="a" * 32,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        service=service,
        start_ns=t0 + int(start_ms * 1e6),
        end_ns=t0 + int((start_ms + dur_ms) * 1e6),
        attributes={"pdserve.request_id": "r1"} if parent is None else {},
    )


def test_waterfall_orders_by_tree_then_start() -> None:
    spans = [
        _span(T.DECODE_REQUEST, "3", "2", 5.0, 14.0, "pdserve-decode"),
        _span(T.GATEWAY_GENERATE, "1", None, 0.0, 20.0, "pdserve-coordinator"),
        _span(T.GATEWAY_DECODE, "2", "1", 4.0, 15.0, "pdserve-coordinator"),
        _span(T.GATEWAY_RECEIVE, "4", "1", 0.0, 1.0, "pdserve-coordinator"),
    ]
    assert trace_cli.find_trace(spans, "r1") == spans
    assert trace_cli.find_trace(spans, "a" * 32) == spans
    text = trace_cli.waterfall(spans, width=20).splitlines()
    assert "20.00 ms" in text[0] and "4 spans" in text[0]
    rows = [line.split() for line in text[2:]]
    assert [r[3] for r in rows] == [T.GATEWAY_GENERATE, T.GATEWAY_RECEIVE, T.GATEWAY_DECODE, T.DECODE_REQUEST]
    assert [float(r[0]) for r in rows] == [0.0, 0.0, 4.0, 5.0]
    assert text[2].endswith("|" + "#" * 20 + "|")
    assert "    " + T.DECODE_REQUEST in text[5]  # depth 2


def test_jaeger_json_becomes_span_records() -> None:
    trace = {
        "traceID": "abc",
        "processes": {"p1": {"serviceName": "pdserve-coordinator"}, "p2": {"serviceName": "pdserve-decode"}},
        "spans": [
            {
                "traceID": "abc",
                "spanID": "1",
                "operationName": T.GATEWAY_GENERATE,
                "references": [],
                "startTime": 1000,
                "duration": 500,
                "tags": [
                    {"key": "pdserve.request_id", "value": "r1"},
                    {"key": "span.kind", "value": "server"},
                ],
                "processID": "p1",
            },
            {
                "traceID": "abc",
                "spanID": "2",
                "operationName": T.KV_TRANSFER,
                "references": [{"refType": "CHILD_OF", "traceID": "abc", "spanID": "1"}],
                "startTime": 1100,
                "duration": 200,
                "tags": [{"key": "error", "value": True}],
                "logs": [{"timestamp": 1150, "fields": [{"key": "event", "value": "exception"}]}],
                "processID": "p2",
            },
        ],
    }
    root, transfer = trace_cli.jaeger_spans(trace)
    assert root.service == "pdserve-coordinator" and root.kind == "SERVER" and root.parent_span_id is None
    assert transfer.parent_span_id == root.span_id and transfer.service == "pdserve-decode"
    assert (transfer.start_ns, transfer.end_ns) == (1_100_000, 1_300_000)
    assert transfer.status == "ERROR" and transfer.events[0]["name"] == "exception"
    assert "pdserve.kv.transfer" in trace_cli.waterfall([root, transfer])
