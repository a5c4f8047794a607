"""Property-based fuzzing (hypothesis) of the public GenerateRequest against a running 1P1D cluster: any
request is either served (a whole stream ending with a finish reason) or refused with a typed status
(INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for one that can never fit), never INTERNAL / UNKNOWN or a reset;
afterwards no KV block or lease is leaked and the cluster still serves. PDSERVE_FUZZ_EXAMPLES sets the
number of requests (the long run: `PDSERVE_FUZZ_EXAMPLES=5000 pytest tests/e2e/test_request_fuzz.py`)."""

from __future__ import annotations

import os

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.launcher import LocalCluster
from pdserve.v1 import generation_pb2, generation_pb2_grpc
from tests.cluster import assert_no_leaks

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "150"))
TYPED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

f32 = st.floats(width=32)  # NaN, infinities and extremes included
i32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(
        max_tokens=draw(st.one_of(st.integers(-3, 12), i32)),
        temperature=draw(st.one_of(st.just(0.0), f32)),
        top_k=draw(st.one_of(st.integers(-2, 50), i32)),
        stop=draw(st.lists(st.text(max_size=4), max_size=3)),
        ignore_eos=draw(st.booleans()),
    )
    which = draw(st.sampled_from(["text", "ids", "both", "none"]))
    if which in ("text", "both"):
        req.prompt = draw(st.text(max_size=60))
    if which in ("ids", "both"):
        req.prompt_token_ids.extend(draw(st.lists(st.one_of(st.integers(0, 2100), i32), max_size=40)))
    if draw(st.booleans()):
        req.top_p = draw(f32)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        req.repetition_penalty = draw(f32)
    if draw(st.booleans()):
        req.max_kv_kl = draw(st.floats())
    if draw(st.booleans()):
        req.request_id = draw(st.text(max_size=20))
    return req


def test_any_request_is_served_or_refused_with_a_typed_status(cluster: LocalCluster) -> None:
    with cluster.gateway_channel() as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(requests())
        def check(req: generation_pb2.GenerateRequest) -> None:
            try:
                msgs = list(stub.Generate(req, timeout=60))
            except grpc.RpcError as exc:
                assert exc.code() in TYPED, f"{exc.code()}: {exc.details()} for {req}"
                return
            assert msgs and msgs[-1].finish_reason in ("stop", "length"), msgs[-1:]
            assert sum(len(m.token_ids) for m in msgs) <= req.max_tokens

        check()
        ok = list(stub.Generate(generation_pb2.GenerateRequest(prompt="x", max_tokens=3), timeout=60))
        assert ok[-1].finish_reason
    assert_no_leaks(cluster)
