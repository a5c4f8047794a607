"""The coordinator's replanner (the adapter around coordinator/planner/replan.py): keeps the live window of
finished requests, re-runs the search every `interval_s` in a worker thread, and reports what it finds:
a log line (WARNING while the running plan is predicted to miss the SLOs), the `pdserve.planner.*` gauges,
and the registry's planner record (`pdserve status` prints it, `pdserve up --autoplan` applies its
recommended instance counts). The search runs in a child process (one, spawned on first use): a
pure-Python simulation in a thread would hold the GIL the gateway's event loop needs. Under autoplan the recommended plan is taken as the one in force: the
router routes by its kv_links from then on (links to instances not started yet are skipped until they
register) and later assessments judge it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from coordinator.planner.plan import kv_links_of
from coordinator.planner.replan import Assessment, Finished, Running, Window, assess, inputs_from_plan
from coordinator.registry import Registry
from coordinator.router import Router
from pdserve import telemetry

log = logging.getLogger(__name__)


class Replanner:
    def __init__(
        self,
        plan: dict[str, Any],
        router: Router,
        registry: Registry,
        interval_s: float = 10.0,
        window_s: float = 60.0,
        min_requests: int = 20,
        autoplan: bool = False,
    ) -> None:
        self.inputs = inputs_from_plan(plan)  # ValueError: a plan without replan inputs
        self.running = Running.from_plan(plan)
        self.router = router
        self.registry = registry
        self.interval_s = interval_s
        self.window = Window(window_s)
        self.min_requests = min_requests
        self.autoplan = autoplan
        self.last: Assessment | None = None
        self.assessments = 0
        self._task: asyncio.Task | None = None
        self._pool: ProcessPoolExecutor | None = None
        telemetry.instruments().observe_planner(self._gauges)

    def record(self, received: float, prompt: int, output: int, ttft_s: float, tpot_s: float | None) -> None:
        """Gateway.on_finished: one request served to its end (times on time.monotonic())."""
        self.window.add(Finished(received, prompt, output, ttft_s, tpot_s))

    def _gauges(self) -> dict[str, float]:
        a = self.last
        if a is None:
            return {}
        return {
            "predicted_attainment": a.predicted_attainment,
            "measured_attainment": a.measured_attainment,
            "meets_slo": 1.0 if a.meets else 0.0,
            "rate_rps": a.rate_rps,
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # waits for a search in flight (seconds at most): its process must not outlive the coordinator
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - a failed assessment must not stop serving
                log.warning("replan failed: %s", exc)

    async def step(self) -> dict[str, Any]:
        """One assessment (or a 'waiting' record while the window is too small); returns what it published."""
        now = time.monotonic()
        self.window.prune(now)
        if len(self.window) < self.min_requests:
            status: dict[str, Any] = {
                "state": "waiting",
                "reason": f"{len(self.window)} requests in the window, replanning from {self.min_requests}",
                "running": self.running.counts,
            }
        else:
            snapshot = Window(self.window.span_s)
            for f in self.window.samples_with_times():
                snapshot.add(f)
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            loop = asyncio.get_running_loop()
            a = await loop.run_in_executor(self._pool, assess, self.inputs, self.running, snapshot, now)
            self.last = a
            self.assessments += 1
            status = {"state": "assessed", **a.to_dict(), "window_means": snapshot.means()}
            (log.info if a.meets else log.warning)(
                "replan: %d requests at %.3g req/s, measured attainment %.3f, running plan predicted %.3f "
                "(target %.2f): %s",
                a.requests,
                a.rate_rps,
                a.measured_attainment,
                a.predicted_attainment,
                self.inputs.attainment,
                a.reason,
            )
            if self.autoplan and a.recommended is not None:
                self.running = Running.from_plan(a.recommended)
                self.router.set_kv_links(kv_links_of(a.recommended))
                status["applied"] = True
        status["autoplan"] = self.autoplan
        status["in_force"] = self.running.counts  # the instance counts pdserve up --autoplan converges to
        await asyncio.to_thread(self.registry.publish_planner, status, 3 * self.interval_s + 5)
        return status
