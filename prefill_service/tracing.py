"""The prefill engine's spans, made on its step thread with explicit parents (the job's context) and
explicit times: queue wait, compute with one event per published layer, and the KV lease."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pdserve import telemetry

if TYPE_CHECKING:
    from prefill_service.engine import PrefillJob


def open_lease(job: PrefillJob, num_layers: int) -> None:
    """Start the job's lease span (ended by `end_lease` when the lease is released)."""
    if job.trace is not None:
        job.lease_span = telemetry.start_span(
            telemetry.KV_LEASE,
            job.trace,
            attributes={
                "pdserve.kv.transfer_id": job.transfer_id,
                "pdserve.kv.layers": num_layers,
                "pdserve.prompt_tokens": len(job.prompt_ids),
            },
        )


def end_lease(job: PrefillJob, reason: str) -> None:
    s, job.lease_span = job.lease_span, None
    if s is not None:
        s.set_attribute("pdserve.kv.release_reason", reason)
        telemetry.end_span(s)


class BatchSpans:
    """One batch's per-request spans: the queue wait (ended at once) and the compute span, which gets an
    event per layer whose KV is published and ends with the batch."""

    def __init__(self, batch: list[PrefillJob], started: float) -> None:
        self._spans = []
        traced = [job for job in batch if job.trace is not None]
        if not traced:
            return
        batch_tokens = sum(len(job.prompt_ids) for job in batch)
        for job in traced:
            queue = telemetry.start_span(
                telemetry.PREFILL_QUEUE,
                job.trace,
                start=job.arrived,
                attributes={"pdserve.prompt_tokens": len(job.prompt_ids)},
            )
            telemetry.end_span(queue, started)
            attrs = {
                "pdserve.prompt_tokens": len(job.prompt_ids),
                "pdserve.batch.size": len(batch),
                "pdserve.batch.tokens": batch_tokens,
                "pdserve.kv.transfer_id": job.transfer_id,
            }
            self._spans.append(
                telemetry.start_span(telemetry.PREFILL_COMPUTE, job.trace, start=started, attributes=attrs)
            )

    def layer_ready(self, layer: int) -> None:
        if self._spans:
            now = telemetry.wall_ns(time.monotonic())
            for s in self._spans:
                s.add_event(telemetry.EVENT_KV_PUBLISH, {"pdserve.kv.layer": layer}, timestamp=now)

    def end(self, error: BaseException | None = None) -> None:
        for s in self._spans:
            if error is not None:
                telemetry.record_error(s, error)
            telemetry.end_span(s)
        self._spans = []
