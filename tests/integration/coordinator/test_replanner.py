"""The coordinator's replanner against a real Redis: the live window, the published record `pdserve status`
prints, the gauges' source, and autoplan's switch of the router's links."""

from __future__ import annotations

import asyncio
import time

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency, Profile
from coordinator.planner.model import ModelSpec
from coordinator.planner.search import SearchInput, search
from coordinator.planner.topology import Node, Topology
from coordinator.registry import Registry
from coordinator.replanner import Replanner
from coordinator.router import Router
from pdserve.plan_cli import plan_json, status_json
from pdserve.redis_server import RedisServer

# prefill: 100 ms a request (10 req/s per instance); decode: 4 ms a step
LAT = LayoutLatency(Layout(1, 1), Coeffs(0.1, 0, 0), Coeffs(0.004, 0, 0), Coeffs(0.004, 0, 0))
INP = SearchInput(
    ModelSpec("m", 2, 64, 4, 2, 16, 1000, 2),
    Profile("cpu", "m", (LAT,)),
    Topology((Node("n0", 8, 1.0, 10.0),), 10.0),
    0.5,
    0.05,
    ((32, 8),),
    rate=4.0,
    fixed_unit=(Layout(1, 1), Layout(1, 1), 1, 1),  # units of 1 prefill + 1 decode; at 4 req/s one unit
    prefill_max_batch_tokens=32,  # one request a pass: 10 req/s per prefill instance
)


def replanner(redis_server: RedisServer, cluster: str, autoplan: bool) -> tuple[Replanner, Registry, Router]:
    plan = plan_json(search(INP), INP, 500.0, 50.0, "test")
    assert (plan["prefill"]["instances"], plan["decode"]["instances"]) == (1, 1)
    reg = Registry(redis_server.url, cluster)
    router = Router(reg, fingerprint=1, kv_links=[("prefill-0", "decode-0", "raw")])
    # a 4 s window; each feed() below replaces what it holds
    return Replanner(plan, router, reg, 1.0, 4.0, min_requests=10, autoplan=autoplan), reg, router


def feed(rp: Replanner, rate: float, seconds: float) -> None:
    """Requests that finished well, arriving at `rate` over the last `seconds` (monotonic clock), in place of
    whatever the window held (as if the window had moved on: the result does not depend on how long the
    assessment before took)."""
    now = time.monotonic()
    rp.window.prune(now + rp.window.span_s + 1.0)  # drops every sample
    n = int(rate * seconds)
    for i in range(n):
        rp.record(now - seconds + i / rate, 32, 8, 0.15, 0.004)


def test_replanner_reports_a_plan_predicted_to_miss_and_autoplan_takes_the_bigger_one(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> tuple[dict, dict, dict]:
        rp, reg, router = replanner(redis_server, "replan-auto", autoplan=True)
        try:
            waiting = await rp.step()  # nothing in the window yet
            feed(rp, 25.0, 4.0)  # 25 req/s on a prefill instance that serves 10
            missed = await rp.step()
            feed(rp, 25.0, 4.0)
            after = await rp.step()  # the recommended plan is now the one judged
            return waiting, missed, {"after": after, "links": router.kv_links, "status": reg.planner()}
        finally:
            await rp.stop()
            reg.close()

    waiting, missed, rest = asyncio.run(scenario())
    assert waiting["state"] == "waiting" and waiting["in_force"] == {"prefill": 1, "decode": 1}
    assert missed["state"] == "assessed" and missed["meets_slo"] is False
    assert missed["predicted_attainment"] < 0.9 and missed["measured_attainment"] == 1.0
    assert missed["rate_rps"] > 20 and missed["applied"] is True
    bigger = missed["recommended"]
    assert (
        bigger["prefill"]["instances"] >= 3
        and missed["in_force"]["prefill"] == bigger["prefill"]["instances"]
    )
    # the router now pairs by the new plan's links
    assert set(rest["links"]) == {k["prefill"] for k in bigger["kv_links"]}
    assert rest["after"]["meets_slo"] is True and rest["after"]["recommended"] is None
    # pdserve status shows the record
    st = status_json("replan-auto", [], rest["status"])
    assert st["planner"]["in_force"] == missed["in_force"] and st["planner"]["autoplan"] is True


def test_without_autoplan_the_recommendation_is_reported_not_taken(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[dict, dict, dict[str, float]]:
        rp, reg, router = replanner(redis_server, "replan-report", autoplan=False)
        try:
            feed(rp, 25.0, 4.0)
            first = await rp.step()
            feed(rp, 25.0, 4.0)
            second = await rp.step()
            return first, {"second": second, "links": router.kv_links}, rp._gauges()
        finally:
            await rp.stop()
            reg.close()

    first, rest, gauges = asyncio.run(scenario())
    assert first["meets_slo"] is False and first["recommended"] is not None and "applied" not in first
    assert rest["second"]["in_force"] == {"prefill": 1, "decode": 1}  # still the started plan
    assert rest["second"]["recommended"] is not None  # still reported
    assert rest["links"] == {"prefill-0": {"decode-0": "raw"}}
    assert gauges["meets_slo"] == 0.0 and gauges["predicted_attainment"] < 0.9
