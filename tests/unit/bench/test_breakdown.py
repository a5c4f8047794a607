"""The per-span TTFT/TPOT decomposition on a hand-built trace whose every component is known."""

from __future__ import annotations

import pytest

from bench.breakdown import breakdowns, pass_cpu_summary, request_breakdown, summarize, table
from engine.step_loop import PassCpu
from pdserve.trace_cli import SpanRecord

MS = 1_000_000  # ns


def _span(name: str, start_ms: float, end_ms: float, trace: str = "t1", **attrs: object) -> SpanRecord:
    return SpanRecord(
        trace,
        f"{name}-{start_ms}",
        None,
        name,
        "svc",
        int(start_ms * MS),
        int(end_ms * MS),
        attributes=dict(attrs),
    )


def _trace(trace: str = "t1") -> list[SpanRecord]:
    return [
        _span("pdserve.gateway.generate", 0, 100, trace, **{"pdserve.completion_tokens": 11}),
        _span("pdserve.gateway.receive", 0, 1, trace),
        _span("pdserve.route", 1, 1.5, trace),
        _span("pdserve.gateway.prefill", 2, 30, trace),
        _span("pdserve.prefill.request", 3, 28, trace),  # rpc = 28 - 25 = 3
        _span("pdserve.prefill.queue", 3, 7, trace),
        _span("pdserve.prefill.compute", 7, 25, trace),  # other = 25 - 4 - 18 = 3
        _span("pdserve.route", 30, 30.5, trace),
        _span("pdserve.gateway.decode", 31, 100, trace),
        _span("pdserve.decode.request", 33, 99, trace),
        _span("pdserve.decode.admission", 33, 34, trace),
        _span(
            "pdserve.kv.transfer",
            34,
            44,
            trace,
            **{"pdserve.kv.connect_s": 0.002, "pdserve.kv.server_wait_s": 0.003, "pdserve.kv.write_s": 0.001},
        ),
        _span("pdserve.kv.encode", 34, 36, trace, **{"pdserve.kv.seconds": 0.0015}),
        _span("pdserve.kv.decode", 42, 44, trace, **{"pdserve.kv.seconds": 0.0005}),
        _span("pdserve.decode.steps", 45, 95, trace, **{"pdserve.decode.steps": 10}),
    ]


def test_components_of_a_hand_built_trace() -> None:
    got = request_breakdown(_trace())
    assert got is not None
    want = {
        "ttft": 30,
        "gateway_receive": 1,
        "route_prefill": 0.5,
        "prefill_rpc": 3,
        "prefill_queue": 4,
        "prefill_compute": 18,
        "prefill_other": 3,
        "ttft_other": 0.5,
        "decode_dispatch": 2,
        "admission": 1,
        "kv_transfer": 10,
        "kv_connect": 2,
        "kv_server_wait": 3,
        "kv_encode": 1.5,
        "kv_decode": 0.5,
        "kv_write": 1,
        "kv_other": 2,  # 10 - 2 - 3 - 1.5 - 0.5 - 1
        "join_wait": 1,
        "step": 5,
        "tpot": 7,
    }
    assert got == pytest.approx(want)


def test_missing_spans_give_none_and_rootless_traces_are_skipped() -> None:
    partial = [s for s in _trace() if s.name != "pdserve.kv.transfer"]
    got = request_breakdown(partial)
    assert got is not None and got["kv_transfer"] is None and got["join_wait"] is None
    assert got["step"] == pytest.approx(5)
    health = [_span("pdserve.route", 0, 1, "t2")]
    assert breakdowns([*_trace("t1"), *health, *_trace("t3")]) == [request_breakdown(_trace())] * 2


def test_summary_quantiles_and_table() -> None:
    rows = [{"ttft": float(v)} for v in (10, 20, 30, 40, 50)]
    s = summarize(rows)  # type: ignore[arg-type]
    assert s["requests"] == 5
    assert s["components"]["ttft"] == {"n": 5, "mean_ms": 30.0, "p50_ms": 30.0, "p90_ms": 46.0}
    assert s["components"]["tpot"] is None
    text = table({"a": s})
    assert "30.00 / 46.00" in text and "tpot" in text


def test_pass_cpu_summary_per_token_and_per_step() -> None:
    # 2 prompt passes, 500 tokens, 1.0 s of CPU of which 0.9 s in the model: 2 / 1.8 ms a token; decode: 10
    # steps of 4 and 30 of 8 (mean batch 7) on 0.2 + 0.9 s, 0.18 + 0.81 s in the model: 27.5 / 24.75 ms a step
    counted = PassCpu({4: [10, 1000, 0.2, 0.18], 8: [30, 6000, 0.9, 0.81]}, [2, 500, 130_000, 1.0, 0.9])
    got = pass_cpu_summary(counted)
    assert got == pytest.approx(
        {
            "prompt_passes": 2,
            "prompt_tokens": 500,
            "prompt_cpu_ms_per_token": 2.0,
            "prompt_forward_ms_per_token": 1.8,
            "decode_steps": 40,
            "decode_mean_batch": 7.0,
            "decode_step_cpu_ms": 27.5,
            "decode_step_forward_ms": 24.75,
        }
    )
    none = pass_cpu_summary(PassCpu())
    assert none["prompt_cpu_ms_per_token"] is None and none["decode_mean_batch"] is None
    table_text = table({"sys": {**summarize([]), "pass_cpu": {"prefill": got}}})
    assert "prefill ms/token" in table_text and "2.000" in table_text
