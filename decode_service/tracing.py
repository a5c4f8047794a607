"""The decode engine's spans and hand-off metrics, made on its pull and step threads with explicit
parents (the job's context) and explicit times: admission wait, the KV transfer with its encode and
decode work, and the decode steps.

The KV encode runs on the prefill instance's KV server, which does not see the trace; its time and
sizes come back in the pull's trailer. So `pdserve.kv.encode` and `pdserve.kv.decode` are aggregate
child spans of `pdserve.kv.transfer`: their duration is the sum over layers (encode placed at the
transfer's start, decode at its end), not a per-layer timeline.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from pdserve import telemetry

if TYPE_CHECKING:
    from decode_service.engine import DecodeJob

_NODE = socket.gethostname()


def transport_of(kv_address: str) -> str:
    return kv_address.split("://", 1)[0] if "://" in kv_address else "unknown"


def record_pull(
    job: DecodeJob, started: float, ended: float, trailer: Any, error: BaseException | None
) -> None:
    """After one pull (on its pull thread): hand-off metrics, and the admission and transfer spans."""
    transport = transport_of(job.kv_address)
    if trailer is not None:
        stats = trailer.stats
        attrs = {"pdserve.kv.codec": job.codec, "pdserve.kv.transport": transport}
        m = telemetry.instruments()
        m.handoff_bytes.record(stats.bytes_on_wire, attrs)
        m.handoff_seconds.record(ended - started, attrs)
    if job.trace is None:
        return
    _admission_span(job)
    transfer = telemetry.start_span(
        telemetry.KV_TRANSFER,
        job.trace,
        kind=telemetry.SpanKind.CLIENT,
        start=started,
        attributes={
            "pdserve.kv.transfer_id": job.transfer_id,
            "pdserve.kv.codec": job.codec,
            "pdserve.kv.transport": transport,
            "pdserve.kv.link": f"{job.kv_address} -> {_NODE}",
            "server.address": job.kv_address,
        },
    )
    if error is not None:
        telemetry.record_error(transfer, error)
    if trailer is not None:
        _transfer_details(transfer, job.codec, trailer, started, ended)
    telemetry.end_span(transfer, ended)


def _transfer_details(
    transfer: telemetry.Span, codec: str, trailer: Any, started: float, ended: float
) -> None:
    s = trailer.stats
    transfer.set_attributes(
        {
            "pdserve.kv.layers": trailer.num_layers,
            "pdserve.kv.tokens": trailer.num_tokens,
            "pdserve.kv.bytes_on_wire": s.bytes_on_wire,
            "pdserve.kv.raw_bytes": s.raw_bytes,
            "pdserve.kv.payload_bytes": s.payload_bytes,
            "pdserve.kv.compression_ratio": s.compression_ratio,
            "pdserve.kv.seconds": ended - started,
            "pdserve.kv.connect_s": s.connect_s,
            "pdserve.kv.server_wait_s": s.server_wait_s,
            "pdserve.kv.server_read_s": s.server_read_s,
            "pdserve.kv.server_send_s": s.server_send_s,
            "pdserve.kv.write_s": s.write_s,
        }
    )
    parent = telemetry.context_of(transfer)
    encode = telemetry.start_span(
        telemetry.KV_ENCODE,
        parent,
        start=started,
        attributes={
            "pdserve.kv.codec": codec,
            "pdserve.kv.bytes_in": s.raw_bytes,
            "pdserve.kv.bytes_out": s.payload_bytes,
            "pdserve.kv.seconds": s.encode_s,
            "pdserve.kv.aggregate": True,
        },
    )
    telemetry.end_span(encode, started + min(s.encode_s, ended - started))
    decode = telemetry.start_span(
        telemetry.KV_DECODE,
        parent,
        start=ended - min(s.decode_s, ended - started),
        attributes={
            "pdserve.kv.codec": codec,
            "pdserve.kv.bytes_in": s.bytes_on_wire,
            "pdserve.kv.bytes_out": s.raw_bytes,
            "pdserve.kv.seconds": s.decode_s,
            "pdserve.kv.aggregate": True,
        },
    )
    telemetry.end_span(decode, ended)


def record_local_prefill(job: DecodeJob, started: float, ended: float, batch_tokens: int) -> None:
    """After a local prefill pass (conditional disaggregation): the admission and local prefill spans."""
    if job.trace is None:
        return
    _admission_span(job)
    s = telemetry.start_span(
        telemetry.DECODE_LOCAL_PREFILL,
        job.trace,
        start=started,
        attributes={"pdserve.prompt_tokens": len(job.prompt_ids), "pdserve.batch.tokens": batch_tokens},
    )
    telemetry.end_span(s, ended)


def _admission_span(job: DecodeJob) -> None:
    """submitted -> KV blocks reserved (job.arrived -> job.admitted)."""
    admission = telemetry.start_span(
        telemetry.DECODE_ADMISSION,
        job.trace,
        start=job.arrived,
        attributes={
            "pdserve.kv.blocks_reserved": len(job.seq.blocks),
            "pdserve.tokens_reserved": len(job.prompt_ids) + job.params.max_tokens,
        },
    )
    telemetry.end_span(admission, job.admitted)


def start_steps(job: DecodeJob) -> None:
    """The sequence joins the running batch (its first token is known)."""
    if job.trace is not None:
        job.steps_span = telemetry.start_span(telemetry.DECODE_STEPS, job.trace, start=time.monotonic())


def end_steps(job: DecodeJob, reason: str | None) -> None:
    """The sequence left the batch (finished with `reason`, or failed / cancelled with None)."""
    s, job.steps_span = job.steps_span, None
    if s is None:
        return
    s.set_attributes(
        {
            "pdserve.decode.steps": job.steps,
            "pdserve.completion_tokens": len(job.seq.output_ids),
            "pdserve.finish_reason": reason or "none",
        }
    )
    telemetry.end_span(s)
