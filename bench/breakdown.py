"""Where a disaggregated request's TTFT and TPOT go, span by span (`pdserve bench breakdown`).

Two uses:

- `pdserve bench breakdown --spans FILE`: read a span file (what the services write with PDSERVE_TRACE_FILE)
  and print the per-component table of every traced request in it.
- `pdserve bench breakdown [--quick] [--systems ...] [--workload W] [--rate R]`: start each system of
  `bench compare` with tracing on, drive the workload's first seed at a fixed rate (by default the compare plan's
  start rate, the same for every system), and report the table per system, side by side, in one JSON.

The decomposition (milliseconds, one row per request; a component whose spans are missing is None):

    TTFT (gateway receive -> first token known at the gateway = end of the gateway's prefill call)
      gateway_receive   pdserve.gateway.receive
      route_prefill     the first pdserve.route span (the prefill pick)
      prefill_rpc       gateway.prefill minus prefill.request: gRPC both ways, serialization
      prefill_queue     pdserve.prefill.queue
      prefill_compute   pdserve.prefill.compute
      prefill_other     prefill.request minus queue and compute: lease, export, reply
      ttft_other        the TTFT not covered above (gaps between the spans)
    decode (after the first token)
      decode_dispatch   gateway.decode start -> decode.request start (route + gRPC)
      admission         pdserve.decode.admission (waiting for KV blocks)
      kv_transfer       pdserve.kv.transfer (connect, server wait, wire, decode, write)
      kv_connect        its connect_s attribute (part of kv_transfer; so are the four below)
      kv_server_wait    its server_wait_s: the KV server waiting for the prefill pass to publish layers
      kv_encode         its encode_s (server: read the blocks, codec encode, frame assembly)
      kv_decode         the puller's frame checks and codec decode
      kv_write          the puller's writes into the decode instance's KV blocks
      kv_other          kv_transfer minus the five above: the wire, and the KV threads' waits for a core and
                        the GIL (the server's encode overlaps its sends, so this is a lower bound)
      join_wait         kv.transfer end -> decode.steps start (waiting for the step loop to take it in)
      step              decode.steps duration / its step count (the steady per-token time)
      tpot              (root end - first token) / (tokens - 1): what the SLO checks

Pure functions (`request_breakdown`, `summarize`) over `pdserve.trace_cli.SpanRecord`s; I/O in `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from bench.metrics import stats
from pdserve.trace_cli import SpanRecord, load_file

log = logging.getLogger("bench.breakdown")

TTFT_PARTS = (
    "gateway_receive",
    "route_prefill",
    "prefill_rpc",
    "prefill_queue",
    "prefill_compute",
    "prefill_other",
    "ttft_other",
)
DECODE_PARTS = (
    "decode_dispatch",
    "admission",
    "kv_transfer",
    "kv_connect",
    "kv_server_wait",
    "kv_encode",
    "kv_decode",
    "kv_write",
    "kv_other",
    "join_wait",
    "step",
)
KV_TRANSFER = "pdserve.kv.transfer"
# kv_transfer's parts: (component, span attribute in seconds, on pdserve.kv.transfer or a child span)
KV_PARTS = (
    ("kv_connect", "pdserve.kv.connect_s", KV_TRANSFER),
    ("kv_server_wait", "pdserve.kv.server_wait_s", KV_TRANSFER),
    ("kv_encode", "pdserve.kv.seconds", "pdserve.kv.encode"),
    ("kv_decode", "pdserve.kv.seconds", "pdserve.kv.decode"),
    ("kv_write", "pdserve.kv.write_s", KV_TRANSFER),
)
COMPONENTS = ("ttft", *TTFT_PARTS, *DECODE_PARTS, "tpot")
ROOT = "pdserve.gateway.generate"


def _ms(ns: int) -> float:
    return ns / 1e6


def request_breakdown(spans: list[SpanRecord]) -> dict[str, float | None] | None:
    """The components (ms) of one request's trace, or None when the trace has no gateway root span."""
    by_name: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_name[s.name].append(s)

    def first(name: str) -> SpanRecord | None:
        return by_name[name][0] if by_name[name] else None

    def last(name: str) -> SpanRecord | None:  # a failed-over request retries: the attempt that served it
        return by_name[name][-1] if by_name[name] else None

    def dur(s: SpanRecord | None) -> float | None:
        return s.duration_ms if s is not None else None

    root = first(ROOT)
    if root is None:
        return None
    out: dict[str, float | None] = dict.fromkeys(COMPONENTS)
    g_prefill, p_req = last("pdserve.gateway.prefill"), last("pdserve.prefill.request")
    p_queue, p_compute = last("pdserve.prefill.queue"), last("pdserve.prefill.compute")
    out["gateway_receive"] = dur(first("pdserve.gateway.receive"))
    out["route_prefill"] = dur(first("pdserve.route"))
    if g_prefill is not None and p_req is not None:
        out["prefill_rpc"] = g_prefill.duration_ms - p_req.duration_ms
    out["prefill_queue"], out["prefill_compute"] = dur(p_queue), dur(p_compute)
    if p_req is not None and p_queue is not None and p_compute is not None:
        out["prefill_other"] = p_req.duration_ms - p_queue.duration_ms - p_compute.duration_ms
    first_token_ns = g_prefill.end_ns if g_prefill is not None else None
    if first_token_ns is not None:
        ttft = out["ttft"] = _ms(first_token_ns - root.start_ns)
        known = [v for k in TTFT_PARTS[:-1] if (v := out[k]) is not None]
        if len(known) == len(TTFT_PARTS) - 1:
            out["ttft_other"] = ttft - sum(known)

    g_decode, d_req = last("pdserve.gateway.decode"), last("pdserve.decode.request")
    transfer, steps = last(KV_TRANSFER), last("pdserve.decode.steps")
    if g_decode is not None and d_req is not None:
        out["decode_dispatch"] = _ms(d_req.start_ns - g_decode.start_ns)
    out["admission"] = dur(last("pdserve.decode.admission"))
    if transfer is not None:
        out["kv_transfer"] = transfer.duration_ms
        for comp, attr, name in KV_PARTS:
            holder = transfer if name == KV_TRANSFER else last(name)
            value = holder.attributes.get(attr) if holder is not None else None
            out[comp] = 1e3 * float(value) if value is not None else None
        parts = [out[comp] for comp, _, _ in KV_PARTS]
        if all(v is not None for v in parts):
            out["kv_other"] = transfer.duration_ms - sum(v for v in parts if v is not None)
        if steps is not None:
            out["join_wait"] = _ms(steps.start_ns - transfer.end_ns)
    if steps is not None:
        n = int(steps.attributes.get("pdserve.decode.steps", 0))
        out["step"] = steps.duration_ms / n if n > 0 else None
    tokens = int(root.attributes.get("pdserve.completion_tokens", 0) or 0)
    if first_token_ns is not None and tokens > 1:
        out["tpot"] = _ms(root.end_ns - first_token_ns) / (tokens - 1)
    return out


def breakdowns(spans: Iterable[SpanRecord]) -> list[dict[str, float | None]]:
    """One row per traced request (traces without a gateway root, e.g. health checks, are skipped)."""
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        traces[s.trace_id].append(s)
    rows = [request_breakdown(t) for t in traces.values()]
    return [r for r in rows if r is not None]


def summarize(rows: list[dict[str, float | None]]) -> dict[str, Any]:
    """{"requests": n, "components": {name: {"n", "mean_ms", "p50_ms", "p90_ms"} or None}}."""
    comps: dict[str, dict[str, Any] | None] = {}
    for name in COMPONENTS:
        st = stats((v for r in rows if (v := r.get(name)) is not None), (50, 90))
        comps[name] = (
            {"n": st["n"], "mean_ms": st["mean"], "p50_ms": st["p50"], "p90_ms": st["p90"]}
            if st["n"]
            else None
        )
    return {"requests": len(rows), "components": comps}


def pass_cpu_summary(counted: Any) -> dict[str, float | None]:
    """What a run's step-thread CPU counters (engine.step_loop.PassCpu, the run's delta) say per pass:
    prompt passes' CPU and model-call CPU per prompt token (ms), decode steps' mean batch and CPU and
    model-call CPU per step (ms); None where the run had none of that kind."""
    passes, tokens, _, cpu_s, fwd_s = counted.prefill
    steps = sum(row[0] for row in counted.decode.values())
    seqs = sum(b * row[0] for b, row in counted.decode.items())
    return {
        "prompt_passes": passes,
        "prompt_tokens": tokens,
        "prompt_cpu_ms_per_token": 1e3 * cpu_s / tokens if tokens else None,
        "prompt_forward_ms_per_token": 1e3 * fwd_s / tokens if tokens else None,
        "decode_steps": steps,
        "decode_mean_batch": seqs / steps if steps else None,
        "decode_step_cpu_ms": 1e3 * sum(row[2] for row in counted.decode.values()) / steps if steps else None,
        "decode_step_forward_ms": 1e3 * sum(row[3] for row in counted.decode.values()) / steps
        if steps
        else None,
    }


def table(per_system: dict[str, dict[str, Any]]) -> str:
    """Side-by-side p50 / p90 (ms) per component, one column pair per system."""
    names = list(per_system)
    head = f"{'component':<20}" + "".join(f"{n[:22]:>24}" for n in names)
    lines = [head, f"{'':<20}" + "".join(f"{'p50 / p90 ms':>24}" for _ in names)]
    for comp in COMPONENTS:
        cells = []
        for n in names:
            c = per_system[n]["components"].get(comp)
            cells.append(f"{c['p50_ms']:>11.2f} / {c['p90_ms']:<10.2f}" if c else f"{'-':>24}")
        lines.append(f"{comp:<20}" + "".join(cells))
    lines.append(f"{'requests':<20}" + "".join(f"{per_system[n]['requests']:>24}" for n in names))
    roles = sorted({role for n in names for role in per_system[n].get("pass_cpu", {})})
    for role in roles:  # the step threads' CPU as the instances counted it (ms)
        for key, label in (
            ("prompt_cpu_ms_per_token", "ms/token"),
            ("decode_step_cpu_ms", "ms/step"),
        ):
            cells = []
            for n in names:
                v = per_system[n].get("pass_cpu", {}).get(role, {}).get(key)
                cells.append(f"{v:>24.3f}" if v is not None else f"{'-':>24}")
            lines.append(f"{role + ' ' + label:<20}" + "".join(cells))
    return "\n".join(lines)


def _trace_system(
    system: Any,
    model_dir: str,
    cpus: tuple[int, ...],
    workload: Any,
    source: list[int],
    tmp: str,
    timeout_s: float,
    keep_dir: str | None = None,
) -> dict[str, Any]:
    """Start one system with tracing to a file, warm it, run the workload once, stop it; its summary.
    `keep_dir`: also write the run's spans (not the warm-up's) to keep_dir/SYSTEM.jsonl."""
    from bench.compare.systems import start_system, warm_up
    from bench.serving import run_load
    from bench.workload import make_requests

    span_file = os.path.join(tmp, f"{system.name}.jsonl")
    saved = {k: os.environ.get(k) for k in ("PDSERVE_TRACE_FILE", "OTEL_BSP_SCHEDULE_DELAY")}
    os.environ["PDSERVE_TRACE_FILE"], os.environ["OTEL_BSP_SCHEDULE_DELAY"] = span_file, "200"
    try:  # the children inherit the environment at spawn time; this process stays untraced
        cluster = start_system(system, model_dir, cpus, tmp)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    roles = ("colocated",) if system.colocated else ("prefill", "decode")
    try:
        warm_up(cluster.gateway_address, source)
        before = {role: cluster.pass_cpu(role) for role in roles}
        began = time.time_ns()
        records = asyncio.run(
            run_load(
                cluster.gateway_address,
                make_requests(workload, source),
                request_timeout_s=timeout_s,
                drain_s=timeout_s,
            )
        )
        after = {role: cluster.pass_cpu(role) for role in roles}
    finally:
        cluster.stop()  # flushes every service's span exporter
    spans = [s for s in load_file(span_file) if s.start_ns >= began]  # not the warm-up's
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
        with open(os.path.join(keep_dir, f"{system.name}.jsonl"), "w", encoding="utf-8") as dst:
            dst.writelines(json.dumps(dataclasses.asdict(s)) + "\n" for s in spans)
    out = summarize(breakdowns(spans))
    # the run's step-thread CPU per pass, as the instances counted it (summed over a role's instances)
    out["pass_cpu"] = {role: pass_cpu_summary(_delta(after[role], before[role])) for role in roles}
    out["served"] = sum(1 for r in records if r.ok)
    out["sent"] = len(records)
    return out


def _delta(after: dict[str, Any], before: dict[str, Any]) -> Any:
    """The PassCpu counted between two readings of a role's instances (by instance id), summed over them."""
    from engine.step_loop import PassCpu

    total = PassCpu()
    for iid, counted in after.items():
        total = total.plus(counted.minus(before[iid]) if iid in before else counted)
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--spans", help="only analyse this span file (JSON lines from PDSERVE_TRACE_FILE)")
    p.add_argument("--quick", action="store_true", help="bench compare's quick model and request count")
    p.add_argument(
        "--systems", default="disagg-1P1D,disagg-1P1D-cond", help="comma-separated compare systems"
    )
    p.add_argument("--workload", default="prefill_heavy", help="a compare workload name")
    p.add_argument("--rate", type=float, help="req/s (default: the compare plan's start rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", help="two cores, e.g. 0,1 (default: the first two usable)")
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--keep-spans", metavar="DIR", help="keep each system's span file (SYSTEM.jsonl) in DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    from bench.report import emit, machine_info

    a = parse_args(argv)
    if a.spans:
        result: dict[str, Any] = {"benchmark": "breakdown", "spans": a.spans}
        result["systems"] = {"file": summarize(breakdowns(load_file(a.spans)))}
        emit(result, a.json, summary=table(result["systems"]))
        return 0

    from bench.compare import FULL, QUICK, systems
    from bench.compare.slos import bench_model, plan_workload, prompt_source
    from engine.device import parse_cpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    mode = QUICK if a.quick else FULL
    cpus = parse_cpus(a.cpus) if a.cpus else tuple(sorted(os.sched_getaffinity(0)))[:2]
    wanted = a.systems.split(",")
    chosen = [s for s in systems(mode.budgets) if s.name in wanted]
    missing = set(wanted) - {s.name for s in chosen}
    if missing:
        raise SystemExit(
            f"unknown system(s) {sorted(missing)}; known: {[s.name for s in systems(mode.budgets)]}"
        )
    specs = [w for w in mode.workloads if w.name == a.workload]
    if not specs:
        raise SystemExit(f"unknown workload {a.workload!r}; known: {[w.name for w in mode.workloads]}")
    model_dir, shipped_tok = bench_model(mode.model)
    source, _ = prompt_source(model_dir, shipped_tok)
    plan = plan_workload(specs[0], mode, model_dir, cpus[0], source, a.seed)
    rate = a.rate or plan.start_rate
    workload = dataclasses.replace(plan.workload, rate=rate)
    per_system: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-breakdown-") as tmp:
        for system in chosen:  # one at a time: no system's load disturbs another's
            per_system[system.name] = _trace_system(
                system, model_dir, cpus, workload, source, tmp, plan.timeout_s, a.keep_spans
            )
    result = {
        "benchmark": "breakdown",
        "mode": mode.name,
        "machine": machine_info(),
        "workload": a.workload,
        "rate": rate,
        "requests": workload.n_requests,
        "isolated": plan.isolated,
        "systems": per_system,
    }
    emit(result, a.json, summary=table(per_system))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
