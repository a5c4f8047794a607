"""Tracing across processes: a real cluster (coordinator, prefill and decode processes) exports over
OTLP/gRPC to a receiver started here. Every request must be one trace spanning the three services with
correct parent links, nested timings and KV hand-off attributes; errors carry a status; metrics arrive;
`pdserve trace` renders a request from the JSON-lines span file the services also wrote."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pdserve import telemetry as T
from pdserve import trace_cli
from pdserve.client import Client
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.trace_cli import OTLPReceiver, SpanRecord

OK_REQUESTS = {f"ok-{i}": ("def fibonacci(n):" * (1 + i % 3), 2 + 3 * i) for i in range(6)}
ONE_TOKEN = "one-token"  # max_tokens=1: prefill alone answers, no decode call
LOSSLESS = "lossless-floor"  # max_kv_kl=0: the request's quality floor replaces the cluster's lossy codec
BAD = "bad-request"  # max_tokens=0: INVALID_ARGUMENT at the gateway
CODEC = "int8"  # a lossy codec, so bytes in and bytes out of the encode differ
EPS_NS = 1_000_000  # clock tolerance between processes (1 ms)

PARENT = {
    T.GATEWAY_RECEIVE: T.GATEWAY_GENERATE,
    T.ROUTE: T.GATEWAY_GENERATE,
    T.GATEWAY_PREFILL: T.GATEWAY_GENERATE,
    T.GATEWAY_DECODE: T.GATEWAY_GENERATE,
    T.GATEWAY_STREAM: T.GATEWAY_GENERATE,
    T.PREFILL_REQUEST: T.GATEWAY_PREFILL,
    T.PREFILL_QUEUE: T.PREFILL_REQUEST,
    T.PREFILL_COMPUTE: T.PREFILL_REQUEST,
    T.KV_LEASE: T.PREFILL_REQUEST,
    T.DECODE_REQUEST: T.GATEWAY_DECODE,
    T.DECODE_ADMISSION: T.DECODE_REQUEST,
    T.KV_TRANSFER: T.DECODE_REQUEST,
    T.KV_ENCODE: T.KV_TRANSFER,
    T.KV_DECODE: T.KV_TRANSFER,
    T.DECODE_STEPS: T.DECODE_REQUEST,
}
SERVICE = {
    **{n: "pdserve-coordinator" for n in T.SPAN_NAMES if n.startswith(("pdserve.gateway.", "pdserve.route"))},
    **{n: "pdserve-prefill" for n in (T.PREFILL_REQUEST, T.PREFILL_QUEUE, T.PREFILL_COMPUTE, T.KV_LEASE)},
    **{
        n: "pdserve-decode"
        for n in (
            T.DECODE_REQUEST,
            T.DECODE_ADMISSION,
            T.KV_TRANSFER,
            T.KV_ENCODE,
            T.KV_DECODE,
            T.DECODE_STEPS,
        )
    },
}


@dataclass
class Traced:
    receiver: OTLPReceiver
    cluster: LocalCluster
    span_file: Path
    log_dir: Path
    num_layers: int

    def trace(self, request_id: str) -> dict[str, list[SpanRecord]]:
        """The request's spans by name (after checking it is one trace)."""
        spans = trace_cli.find_trace(self.receiver.snapshot(), request_id)
        assert len({s.trace_id for s in spans}) == 1, f"{request_id}: spans in several traces"
        by_name: dict[str, list[SpanRecord]] = {}
        for s in spans:
            by_name.setdefault(s.name, []).append(s)
        return by_name


def _complete(receiver: OTLPReceiver, request_id: str) -> bool:
    names = {s.name for s in trace_cli.find_trace(receiver.snapshot(), request_id)}
    want = {T.GATEWAY_GENERATE, T.DECODE_STEPS, T.KV_ENCODE, T.KV_LEASE, T.PREFILL_REQUEST, T.DECODE_REQUEST}
    return want <= names


@pytest.fixture(scope="module")
def traced(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("telemetry")
    receiver = OTLPReceiver()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "PDSERVE_TRACE_FILE": str(tmp / "spans.jsonl"),
        "PDSERVE_PROMETHEUS_PORT": "0",  # each process picks a free port and prints it
        "PDSERVE_PROMETHEUS_HOST": "127.0.0.1",
    }
    with pytest.MonkeyPatch.context() as mp:  # the children inherit it; this process stays untraced
        for k, v in env.items():
            mp.setenv(k, v)
        cfg = ClusterConfig(
            model_dir=str(tiny_model_dir),
            port=0,
            use_cuda=False,
            num_kv_blocks=256,
            codec=CODEC,
            local_prefill="off",  # every request's trace crosses the KV hand-off (none prefilled locally)
            log_dir=str(tmp / "logs"),
        )
        cluster = LocalCluster(cfg).start(timeout_s=120)
    try:
        with Client(cluster.gateway_address) as client:
            with ThreadPoolExecutor(len(OK_REQUESTS)) as pool:
                futures = [
                    pool.submit(client.generate, p, max_tokens=m, ignore_eos=True, request_id=rid, timeout=60)
                    for rid, (p, m) in OK_REQUESTS.items()
                ]
                for f in futures:
                    f.result()
            client.generate("x = 1", max_tokens=1, request_id=ONE_TOKEN, timeout=60)
            client.generate("import os", max_tokens=4, max_kv_kl=0.0, request_id=LOSSLESS, timeout=60)
            with pytest.raises(grpc.RpcError):
                client.generate("hi", max_tokens=0, request_id=BAD, timeout=60)
        deadline = time.monotonic() + 20
        while not all(_complete(receiver, rid) for rid in [*OK_REQUESTS, LOSSLESS]):
            assert time.monotonic() < deadline, "spans did not arrive at the OTLP receiver within 20 s"
            time.sleep(0.2)
        # the one-token request's lease span ends after its Release, later than the rest of its trace
        while T.KV_LEASE not in {s.name for s in trace_cli.find_trace(receiver.snapshot(), ONE_TOKEN)}:
            assert time.monotonic() < deadline, "the one-token request's lease span did not arrive"
            time.sleep(0.2)
        yield Traced(receiver, cluster, tmp / "spans.jsonl", tmp / "logs", num_layers=2)
    finally:
        cluster.stop()
        receiver.stop()


def test_every_request_is_exactly_one_trace_across_all_three_services(traced: Traced) -> None:
    spans = traced.receiver.snapshot()
    roots = [s for s in spans if s.name == T.GATEWAY_GENERATE]
    ids_of_roots = sorted(s.attributes.get("pdserve.request_id", "") for s in roots)
    # the bad request fails validation before it has an id attribute: its root has none
    assert ids_of_roots == sorted(["", ONE_TOKEN, LOSSLESS, *OK_REQUESTS]), ids_of_roots
    assert len({s.trace_id for s in spans}) == len(roots), "spans outside the requests' traces"
    for rid in OK_REQUESTS:
        by_name = traced.trace(rid)
        services = {s.service for group in by_name.values() for s in group}
        assert services == {"pdserve-coordinator", "pdserve-prefill", "pdserve-decode"}, (rid, services)
        assert set(by_name) == set(T.SPAN_NAMES), (rid, set(T.SPAN_NAMES) ^ set(by_name))
        tagged = [s for group in by_name.values() for s in group if "pdserve.request_id" in s.attributes]
        assert {s.attributes["pdserve.request_id"] for s in tagged} == {rid}
    one = traced.trace(ONE_TOKEN)
    assert T.DECODE_REQUEST not in one and T.PREFILL_COMPUTE in one


def test_parent_links_are_correct(traced: Traced) -> None:
    for rid in [*OK_REQUESTS, ONE_TOKEN]:
        by_name = traced.trace(rid)
        by_id = {s.span_id: s for group in by_name.values() for s in group}
        (root,) = by_name[T.GATEWAY_GENERATE]
        assert root.parent_span_id is None and root.kind == "SERVER"
        for name, group in by_name.items():
            for s in group:
                assert s.service == SERVICE[name], (rid, name, s.service)
                if name == T.GATEWAY_GENERATE:
                    continue
                parent = by_id.get(s.parent_span_id or "")
                assert parent is not None, f"{rid}: {name} has no parent in the trace"
                assert parent.name == PARENT[name], f"{rid}: {name}'s parent is {parent.name}"
        for server, _client in ((T.PREFILL_REQUEST, T.GATEWAY_PREFILL), (T.DECODE_REQUEST, T.GATEWAY_DECODE)):
            for s in by_name.get(server, []):
                assert s.kind == "SERVER" and by_id[s.parent_span_id or ""].kind == "CLIENT"


def _inside(inner: SpanRecord, outer: SpanRecord, eps: int = EPS_NS) -> bool:
    return inner.start_ns >= outer.start_ns - eps and inner.end_ns <= outer.end_ns + eps


def test_span_timings_nest(traced: Traced) -> None:
    for rid in OK_REQUESTS:
        by_name = traced.trace(rid)
        one = {name: group[0] for name, group in by_name.items()}
        root = one[T.GATEWAY_GENERATE]
        for group in by_name.values():
            for s in group:
                assert s.end_ns >= s.start_ns
                if s.service == "pdserve-coordinator":
                    assert _inside(s, root, eps=0), f"{rid}: {s.name} outside the gateway span"
        transfer, steps = one[T.KV_TRANSFER], one[T.DECODE_STEPS]
        compute, queue = one[T.PREFILL_COMPUTE], one[T.PREFILL_QUEUE]
        assert _inside(transfer, root), f"{rid}: the KV transfer is not inside the request"
        assert _inside(transfer, one[T.DECODE_REQUEST], eps=0)
        assert _inside(one[T.KV_ENCODE], transfer, eps=0) and _inside(one[T.KV_DECODE], transfer, eps=0)
        assert _inside(steps, root) and _inside(steps, one[T.DECODE_REQUEST], eps=0)
        # decode after the first token: it exists once prefill computed it and the KV arrived
        assert steps.start_ns >= compute.end_ns - EPS_NS, f"{rid}: decode began before the first token"
        assert steps.start_ns >= transfer.end_ns
        assert one[T.GATEWAY_STREAM].start_ns >= compute.end_ns - EPS_NS
        assert queue.end_ns <= compute.start_ns
        assert one[T.DECODE_ADMISSION].end_ns <= transfer.start_ns
        assert one[T.PREFILL_REQUEST].start_ns >= one[T.GATEWAY_PREFILL].start_ns - EPS_NS


def test_kv_attributes_carry_bytes_and_codec(traced: Traced) -> None:
    for rid, (_, max_tokens) in OK_REQUESTS.items():
        one = {name: group[0] for name, group in traced.trace(rid).items()}
        t = one[T.KV_TRANSFER].attributes
        assert t["pdserve.kv.codec"] == CODEC
        assert t["pdserve.kv.transport"] in ("ucx", "tcp", "shm")
        assert t["pdserve.kv.layers"] == traced.num_layers
        assert t["pdserve.kv.raw_bytes"] > t["pdserve.kv.payload_bytes"] > 0  # int8 compresses
        assert t["pdserve.kv.bytes_on_wire"] >= t["pdserve.kv.payload_bytes"]
        assert " -> " in t["pdserve.kv.link"] and t["pdserve.kv.seconds"] > 0
        enc, dec = one[T.KV_ENCODE].attributes, one[T.KV_DECODE].attributes
        assert enc["pdserve.kv.codec"] == dec["pdserve.kv.codec"] == CODEC
        assert (enc["pdserve.kv.bytes_in"], enc["pdserve.kv.bytes_out"]) == (
            t["pdserve.kv.raw_bytes"],
            t["pdserve.kv.payload_bytes"],
        )
        assert (dec["pdserve.kv.bytes_in"], dec["pdserve.kv.bytes_out"]) == (
            t["pdserve.kv.bytes_on_wire"],
            t["pdserve.kv.raw_bytes"],
        )
        compute = one[T.PREFILL_COMPUTE]
        layers = [
            e["attributes"]["pdserve.kv.layer"] for e in compute.events if e["name"] == T.EVENT_KV_PUBLISH
        ]
        assert layers == list(range(traced.num_layers))
        assert compute.attributes["pdserve.batch.size"] >= 1
        steps = one[T.DECODE_STEPS].attributes
        assert steps["pdserve.decode.steps"] == max_tokens - 1
        assert steps["pdserve.completion_tokens"] == max_tokens
        assert one[T.KV_LEASE].attributes["pdserve.kv.release_reason"] == "pulled"
        route = [s.attributes for s in traced.trace(rid)[T.ROUTE]]
        assert {r["pdserve.role"] for r in route} == {"prefill", "decode"}
        assert all(r["pdserve.route.reason"] and r["pdserve.instance.id"] for r in route)


def test_a_request_floor_of_zero_hands_off_losslessly(traced: Traced) -> None:
    one = {name: group[0] for name, group in traced.trace(LOSSLESS).items()}
    t = one[T.KV_TRANSFER].attributes
    assert t["pdserve.kv.codec"] == "raw" != CODEC  # the cluster runs int8; this request asked for exact KV
    assert t["pdserve.kv.payload_bytes"] >= t["pdserve.kv.raw_bytes"] > 0  # nothing was compressed away
    assert one[T.KV_ENCODE].attributes["pdserve.kv.codec"] == "raw"
    asked = one[T.GATEWAY_DECODE].attributes  # the gateway records the codec it asked for, and why
    assert asked["pdserve.kv.codec"] == "raw" and asked["pdserve.kv.max_kl"] == 0.0
    ok = traced.trace("ok-0")[T.GATEWAY_DECODE][0].attributes
    assert ok["pdserve.kv.codec"] == CODEC and "pdserve.kv.max_kl" not in ok


def test_errors_are_recorded_with_status(traced: Traced) -> None:
    roots = [
        s
        for s in traced.receiver.snapshot()
        if s.name == T.GATEWAY_GENERATE and "pdserve.request_id" not in s.attributes
    ]
    assert len(roots) == 1
    (root,) = roots
    assert root.status == "ERROR" and "INVALID_ARGUMENT" in root.status_description
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert any(e["name"] == "exception" for e in root.events)
    ok = traced.trace("ok-0")[T.GATEWAY_GENERATE][0]
    assert ok.status != "ERROR" and ok.attributes["pdserve.status_code"] == "OK"


def _points(receiver: OTLPReceiver, name: str, timeout_s: float = 10.0, count: int | None = None) -> list:
    """The metric's points received so far, once there are any (and, with `count`, once a cumulative point
    has counted that many: exports come every OTEL_METRIC_EXPORT_INTERVAL, so the newest may lag)."""

    def ready(points: list) -> bool:
        return bool(points) and (count is None or max(p.count for _, p in points) >= count)

    deadline = time.monotonic() + timeout_s
    while not ready(points := receiver.metric_points(name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return points


def test_metrics_are_exported(traced: Traced) -> None:
    n_ok = len(OK_REQUESTS) + 2  # and the one-token and lossless-floor requests
    ttft = _points(traced.receiver, "pdserve.request.ttft", count=n_ok)
    assert ttft and max(p.count for _, p in ttft) == n_ok
    for name in ("pdserve.request.tbt", "pdserve.request.tpot"):
        assert _points(traced.receiver, name), name
    want = {CODEC: len(OK_REQUESTS), "raw": 1}  # raw: the lossless-floor request

    def by_codec() -> dict[str, int]:
        """Hand-offs per codec so far (points are cumulative: the largest count of each)."""
        out: dict[str, int] = {}
        for _, p in traced.receiver.metric_points("pdserve.kv.handoff.bytes"):
            attrs = {kv.key: kv.value.string_value for kv in p.attributes}
            assert attrs["pdserve.kv.transport"]
            out[attrs["pdserve.kv.codec"]] = max(out.get(attrs["pdserve.kv.codec"], 0), p.count)
        return out

    deadline = time.monotonic() + 10.0  # exports come every OTEL_METRIC_EXPORT_INTERVAL: the newest may lag
    while by_codec() != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert by_codec() == want
    assert _points(traced.receiver, "pdserve.kv.handoff.duration")

    def by_status() -> dict[tuple, int]:
        """Requests per attribute set so far (a cumulative sum: the newest export may lag)."""
        return {
            tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes)): p.as_int
            for _, p in traced.receiver.metric_points("pdserve.requests")
        }

    def ok_count() -> int:
        return max((v for k, v in by_status().items() if ("pdserve.status_code", "OK") in k), default=0)

    deadline = time.monotonic() + 10.0
    while ok_count() < n_ok and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ok_count() == n_ok
    assert any(("pdserve.status_code", "INVALID_ARGUMENT") in k for k in by_status())
    blocks = _points(traced.receiver, "pdserve.kv.blocks")
    roles = {r["service.name"] for r, _ in blocks}
    assert roles == {"pdserve-prefill", "pdserve-decode"}
    assert _points(traced.receiver, "pdserve.queue.depth")


def test_trace_command_prints_the_waterfall(traced: Traced, capsys: pytest.CaptureFixture[str]) -> None:
    deadline = time.monotonic() + 10
    while not _file_complete(traced.span_file, "ok-3"):
        assert time.monotonic() < deadline, "spans did not reach the PDSERVE_TRACE_FILE"
        time.sleep(0.2)
    assert trace_cli.main(["ok-3", "--file", str(traced.span_file)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "coordinator" in lines[0] and "decode" in lines[0] and "prefill" in lines[0]
    body = "\n".join(lines[2:])
    for name in T.SPAN_NAMES:
        assert name in body, f"{name} missing from the waterfall"
    starts = [float(line.split()[0]) for line in lines[2:]]
    assert starts[0] == 0.0 and lines[2].split()[3] == T.GATEWAY_GENERATE
    assert f"codec={CODEC}" in body
    assert trace_cli.main(["no-such-request", "--file", str(traced.span_file)]) == 1


def _file_complete(path: Path, request_id: str) -> bool:
    if not path.exists():
        return False
    names = {s.name for s in trace_cli.find_trace(trace_cli.load_file(str(path)), request_id)}
    return set(T.SPAN_NAMES) <= names


def test_every_service_serves_prometheus_metrics(traced: Traced) -> None:
    ports = {}
    for log in traced.log_dir.glob("*.log"):
        m = re.search(r"^PROMETHEUS :(\d+)$", log.read_text(), re.MULTILINE)
        assert m, f"{log.name}: no Prometheus endpoint announced"
        ports[log.name.split("-")[0]] = int(m.group(1))
    assert set(ports) == {"coordinator", "prefill", "decode"}
    pages = {
        role: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for role, port in ports.items()
    }
    assert "pdserve_request_ttft" in pages["coordinator"] and "pdserve_requests" in pages["coordinator"]
    assert "pdserve_kv_handoff_bytes" in pages["decode"]
    for role in ("prefill", "decode"):
        assert re.search(r'pdserve_kv_blocks\{[^}]*pdserve_kv_state="free"', pages[role]), role
        assert "pdserve_queue_depth" in pages[role]


def test_local_prefill_is_traced_on_the_decode_instance(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Conditional disaggregation: the decode instance's own prefill pass is a span under its Decode RPC, and
    the trace has no prefill-instance or KV hand-off spans."""
    span_file = tmp_path / "spans.jsonl"
    with pytest.MonkeyPatch.context() as mp:  # the children inherit it; this process stays untraced
        mp.setenv("PDSERVE_TRACE_FILE", str(span_file))
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        cfg = ClusterConfig(
            model_dir=str(tiny_model_dir),
            port=0,
            use_cuda=False,
            num_kv_blocks=256,
            local_prefill="always",
            local_prefill_max_tokens=4096,
            log_dir=str(tmp_path / "logs"),
        )
        cluster = LocalCluster(cfg).start(timeout_s=120)
    try:
        with Client(cluster.gateway_address) as client:
            client.generate(
                "def fibonacci(n):", max_tokens=4, ignore_eos=True, request_id="local", timeout=60
            )
        deadline = time.monotonic() + 20
        while True:
            spans = (
                trace_cli.find_trace(trace_cli.load_file(str(span_file)), "local")
                if span_file.exists()
                else []
            )
            names = {s.name for s in spans}
            if {T.DECODE_LOCAL_PREFILL, T.DECODE_STEPS, T.GATEWAY_GENERATE} <= names:
                break
            assert time.monotonic() < deadline, f"spans did not arrive within 20 s: {sorted(names)}"
            time.sleep(0.2)
    finally:
        cluster.stop()
    by_id = {s.span_id: s for s in spans}
    (local,) = [s for s in spans if s.name == T.DECODE_LOCAL_PREFILL]
    assert local.parent_span_id is not None and by_id[local.parent_span_id].name == T.DECODE_REQUEST
    assert local.service == "pdserve-decode" and local.attributes["pdserve.prompt_tokens"] > 0
    assert not names & {T.GATEWAY_PREFILL, T.PREFILL_REQUEST, T.PREFILL_COMPUTE, T.KV_LEASE, T.KV_TRANSFER}
    (steps,) = [s for s in spans if s.name == T.DECODE_STEPS]
    assert local.end_ns <= steps.start_ns + EPS_NS  # it joined the running batch after its prefill pass
