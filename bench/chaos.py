"""Chaos: a supervised 1P2D cluster under load while prefill instances, decode instances and Redis are killed
(SIGKILL) at random, seeded (a kill only while every instance is registered and answers, so the cluster
makes progress between kills); the supervisor (`pdserve.launcher.Supervisor`, as under `pdserve up`) restarts
them. Every request is streamed to its end and compared with the single-process reference
(`engine.local.LocalEngine`, what `pdserve generate --local` prints); half are greedy, half seeded sampling.

Outcomes per request: `exact` (the whole stream equals the reference), `inexact` (finished, but differs),
`failed_clear` (a gRPC status with a message: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, by code),
`lost` (anything else: a stream ending without a finish reason, INTERNAL / UNKNOWN, a repeated or missing
token; must be 0). After the load, once every instance is back and idle: `leaked_blocks` and
`leaked_leases` over all instances (must be 0).

    python -m bench.chaos --quick          # 40 requests, 1P2D, a kill every ~2 s; prints one JSON object
    python -m bench.chaos --requests 200 --seed 7
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import grpc
import redis

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams, generation_defaults
from pdserve.client import Client
from pdserve.launcher import ClusterConfig, LocalCluster, RestartPolicy, Supervisor
from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

log = logging.getLogger(__name__)

CLEAR = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
TEXTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n    print(i)\n",
    "# Licensed under the Apache License\n",
    "with open(path) as f:\n",
]


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    params: SamplingParams


def make_jobs(engine: LocalEngine, n: int, rng: random.Random, repetition_penalty: float) -> list[Job]:
    jobs = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)] * rng.randint(1, 4)
        sampled = i % 2 == 1
        params = SamplingParams(
            max_tokens=rng.randint(32, 160),
            temperature=0.8 if sampled else 0.0,
            top_k=40 if sampled else 0,
            seed=rng.randrange(2**32) if sampled else None,
            ignore_eos=True,
            repetition_penalty=repetition_penalty,
        )
        jobs.append(Job(engine.tokenizer.encode(text), params))
    return jobs


def run_one(address: str, job: Job, timeout_s: float) -> tuple[str, list[int], str]:
    """(outcome kind, tokens, detail): kind is done | clear | lost."""
    p = job.params
    tokens: list[int] = []
    finish = ""
    try:
        with Client(address) as client:
            for msg in client.stream(
                job.prompt_ids,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_k=p.top_k,
                seed=p.seed,
                repetition_penalty=p.repetition_penalty,
                ignore_eos=True,
                timeout=timeout_s,
            ):
                tokens.extend(msg.token_ids)
                finish = msg.finish_reason or finish
    except grpc.RpcError as exc:
        code = exc.code()
        if code in CLEAR and exc.details():
            return "clear", tokens, code.name
        return "lost", tokens, f"{code.name}: {exc.details()}"
    if not finish:
        return "lost", tokens, "stream ended without a finish reason"
    return "done", tokens, finish


def answering(cluster: LocalCluster) -> dict[str, common_pb2.InstanceStats]:
    """Instance id -> Stats of every registered instance that answers. A killed instance stays registered
    until its TTL runs out but answers nothing; a new instance that reuses a dead one's address answers for
    both records, once per id. Raises redis.RedisError while Redis is down."""
    registry = Registry(cluster.redis_url)
    try:
        records = registry.instances()
    finally:
        registry.close()
    stats: dict[str, common_pb2.InstanceStats] = {}
    for inst in records:
        stub = prefill_pb2_grpc.PrefillStub if inst.role == "prefill" else decode_pb2_grpc.DecodeStub
        with grpc.insecure_channel(inst.grpc_address) as ch:
            try:
                s = stub(ch).Stats(common_pb2.InstanceStatsRequest(), timeout=2)
            except grpc.RpcError:
                continue
        stats[s.instance_id] = s
    return stats


def settle(cluster: LocalCluster, supervisor: Supervisor, timeout_s: float) -> tuple[int, int, bool]:
    """After the last kill: keep supervising (the last kills' restarts, Redis's too, are still due) until
    every instance is back and idle, or the timeout; returns (leaked blocks, leaked leases, every
    expected instance back)."""
    want = len(cluster.cfg.roles)
    deadline = time.monotonic() + timeout_s
    while True:
        supervisor.check()
        try:
            stats = list(answering(cluster).values())
        except redis.RedisError:
            stats = []
        blocks = sum(s.kv_blocks_total - s.kv_blocks_free for s in stats)
        leases = sum(s.leases for s in stats)
        back = len(stats) == want
        if (back and blocks == 0 and leases == 0) or time.monotonic() > deadline:
            return blocks, leases, back
        time.sleep(0.5)


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--quick", action="store_true", help="40 requests, 4 at a time, a kill every ~2 s")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills (exponential)")
    ap.add_argument("--timeout", type=float, default=180.0, help="each request's deadline (s)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.quick:
        a.requests, a.concurrency, a.kill_every = 40, 4, 2.0
    if a.model is None:
        from engine.synth import default_model_dir

        a.model = str(default_model_dir())
    rng = random.Random(a.seed)
    reference = LocalEngine.from_model_dir(a.model)
    penalty = generation_defaults(a.model).get("repetition_penalty", 1.0)  # what the gateway applies
    jobs = make_jobs(reference, a.requests, rng, penalty)
    expected = [reference.generate([j.prompt_ids], [j.params])[0] for j in jobs]
    logs = tempfile.mkdtemp(prefix="pdserve-chaos-")
    cfg = ClusterConfig(
        model_dir=a.model,
        port=0,
        prefill=1,
        decode=2,
        use_cuda=False,
        num_kv_blocks=512,
        heartbeat_ttl_s=1.5,
        log_dir=logs,
        failover_wait_s=60.0,
        codec="raw",  # lossless hand-offs: "exact" compares with the reference (a lossy codec shifts draws)
    )
    cluster = LocalCluster(cfg).start()
    supervisor = Supervisor(cluster, RestartPolicy(max_restarts=10_000, backoff_s=0.2), log.warning)
    stop = threading.Event()
    kills: Counter[str] = Counter()
    lock = threading.Lock()  # the supervisor (main thread) and the killer both touch the processes
    want = len(cfg.roles)

    def all_up() -> bool:
        """Every instance registered and answering (a registry record alone may be a dead one's)."""
        try:
            return len(answering(cluster)) == want
        except redis.RedisError:  # Redis down (killed): not up
            return False

    first_done = threading.Event()

    def chaos() -> None:
        first_done.wait()  # the first kill lands mid-load (once a request finished), the rest at random
        delay = 0.0
        while not stop.wait(delay):
            delay = rng.expovariate(1.0 / a.kill_every)
            while not all_up():
                if stop.wait(0.2):
                    return
            target = rng.choice(["prefill", "decode", "decode", "redis"])
            with lock:
                if stop.is_set():  # the load ended while we waited: no kill the final check misses
                    return
                # Each kill waits until the process is gone (reaped): the supervisor, which takes the lock
                # next, then sees it dead. A kill only signalled could still look alive to a last check.
                if target == "redis":
                    if cluster.redis is not None and cluster.redis.alive():
                        cluster.redis.kill()
                        kills[target] += 1
                    continue
                live = [c for c in cluster.children if c.role == target and c.proc.poll() is None]
                if live:
                    victim = rng.choice(live).proc
                    victim.kill()
                    victim.wait()
                    kills[target] += 1

    killer = threading.Thread(target=chaos, name="chaos")
    started = time.monotonic()
    try:
        killer.start()
        with ThreadPoolExecutor(a.concurrency) as pool:
            futures = [pool.submit(run_one, cluster.gateway_address, j, a.timeout) for j in jobs]
            for f in futures:
                f.add_done_callback(lambda _: first_done.set())
            while wait(futures, timeout=0.1).not_done:
                with lock:
                    supervisor.check()
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - started
        stop.set()
        first_done.set()
        killer.join()
        leaked_blocks, leaked_leases, back = settle(cluster, supervisor, timeout_s=90)
    finally:
        stop.set()
        first_done.set()
        cluster.stop()
    exact = sum(
        1 for (kind, toks, _), want in zip(results, expected, strict=True) if kind == "done" and toks == want
    )
    inexact = sum(
        1 for (kind, toks, _), want in zip(results, expected, strict=True) if kind == "done" and toks != want
    )
    report = {
        "bench": "chaos",
        "seed": a.seed,
        "sent": len(jobs),
        "completed_exact": exact,
        "completed_inexact": inexact,
        "failed_clear": dict(Counter(d for kind, _, d in results if kind == "clear")),
        "inexact_first_diff": [  # (request, greedy?, first differing output index, tokens, expected)
            (i, jobs[i].params.greedy, _first_diff(toks, want), len(toks), len(want))
            for i, ((kind, toks, _), want) in enumerate(zip(results, expected, strict=True))
            if kind == "done" and toks != want
        ][:10],
        "lost": sum(1 for kind, _, _ in results if kind == "lost"),
        "lost_details": [d for kind, _, d in results if kind == "lost"][:5],
        "exact_share": round(exact / len(jobs), 3) if jobs else None,
        "leaked_blocks": leaked_blocks,
        "leaked_leases": leaked_leases,
        "all_instances_back": back,
        "kills": dict(kills),
        "restarts": supervisor.restarts,
        "elapsed_s": round(elapsed, 1),
        "logs": logs,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
