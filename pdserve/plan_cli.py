"""Adapters around the planner core (coordinator/planner): `pdserve plan`, `pdserve topology`, `pdserve profile`.

All file reading, engine timing and printing is here; coordinator.planner only computes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from coordinator.planner.distserve import is_distserve, profile_from_distserve
from coordinator.planner.latency import (
    Layout,
    LayoutLatency,
    Profile,
    fit_decode_split,
    fit_prefill,
)
from coordinator.planner.model import ModelSpec, spec_from_config
from coordinator.planner.plan import Plan
from coordinator.planner.search import PlanError, SearchInput, search
from coordinator.planner.topology import Node, Topology
from pdserve.errors import PDServeError

N_SAMPLES = 1000  # length samples drawn from a named workload
MAX_KL = (
    0.01  # quality floor of lossy KV codecs (nats/token): the cluster's default --max-kl (coordinator.config)
)


# ---- inputs ----------------------------------------------------------------------------------------------
def load_model(path: str) -> tuple[ModelSpec, Path]:
    """A config.json, or the directory holding it -> (spec, directory)."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.exists():
        raise ValueError(f"no config.json at {path}")
    return spec_from_config(json.loads(cfg_path.read_text()), name=cfg_path.parent.name), cfg_path.parent


def load_profile(path: str, key: str | None, model_name: str = "") -> Profile:
    """A profile JSON of `pdserve profile`, or a DistServe `profiler-*.json` (`key` picks its model entry)."""
    data = json.loads(Path(path).read_text())
    if is_distserve(data):
        if key is None:
            if len(data) != 1:
                raise ValueError(
                    f"{path} holds several models; pick one with --profile-key (one of {sorted(data)})"
                )
            key = next(iter(data))
        return profile_from_distserve(data, key)
    return profile_from_json(data)


def profile_from_json(data: dict[str, Any]) -> Profile:
    try:
        return Profile(
            str(data["device"]),
            str(data["model"]),
            tuple(LayoutLatency.from_dict(d) for d in data["layouts"]),
            source=str(data.get("source", "pdserve profile")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"not a profile file (pdserve profile or DistServe profiler-*.json): {exc!r}"
        ) from exc


def workload_samples(spec: str) -> tuple[tuple[int, int], ...]:
    """`--workload`: a JSON file {"requests": [{"prompt_tokens": N, "output_tokens": M}, ...]}, or a bench
    workload name (bench.compare.modes: prefill_heavy, balanced (quick sizes); full-prefill_heavy,
    full-balanced), or sharegpt-approx (log-normal lengths standing in for ShareGPT, see docs)."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        reqs = json.loads(path.read_text())["requests"]
        out = tuple((int(r["prompt_tokens"]), int(r["output_tokens"])) for r in reqs)
        if not out or min(min(x) for x in out) < 1:
            raise ValueError(f"{spec}: need requests with prompt_tokens and output_tokens >= 1")
        return out
    import numpy as np

    from bench.compare.modes import FULL, SMALL_WORKLOADS
    from bench.workload import LogNormal

    dists = {w.name: (w.prompt, w.output) for w in SMALL_WORKLOADS}
    dists.update({f"full-{w.name}": (w.prompt, w.output) for w in FULL.workloads})
    dists["sharegpt-approx"] = (LogNormal(400, 1.0, 4, 1800), LogNormal(150, 1.0, 4, 1000))
    if spec not in dists:
        raise ValueError(f"unknown workload {spec!r}: a JSON file or one of {sorted(dists)}")
    prompt, output = dists[spec]
    rng = np.random.default_rng(0)
    ps, os_ = prompt.sample(rng, N_SAMPLES), output.sample(rng, N_SAMPLES)
    return tuple((int(p), int(o)) for p, o in zip(ps, os_, strict=True))


def load_topology(path: str) -> Topology:
    return Topology.from_dict(json.loads(Path(path).read_text()))


def prefill_batch_cap(profile_path: str) -> int:
    """A pdserve profile records the engine's prefill batch cap (tokens); DistServe batches whatever is
    queued (no cap)."""
    return int(json.loads(Path(profile_path).read_text()).get("prefill_max_batch_tokens", 1 << 30))


def search_input(
    model: ModelSpec,
    model_dir: Path,
    profile: Profile,
    profile_path: str,
    topology: Topology,
    samples: tuple[tuple[int, int], ...],
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    attainment: float,
    rate: float | None,
) -> SearchInput:
    """The planner's input from loaded parts: what `pdserve plan` and the Kubernetes operator's
    `planner: auto` both search. KV codecs: the model directory's codec profiles, else the defaults."""
    from kv_transfer.choice import DEFAULT_PROFILES, load_profiles

    codecs = load_profiles(model_dir) if model_dir.exists() else DEFAULT_PROFILES
    return SearchInput(
        model,
        profile,
        topology,
        slo_ttft_ms / 1e3,
        slo_tpot_ms / 1e3,
        samples,
        attainment=attainment,
        rate=rate,
        codecs=codecs,
        max_kl=MAX_KL,
        prefill_max_batch_tokens=prefill_batch_cap(profile_path),
    )


def plan_json(
    plan: Plan, inp: SearchInput, slo_ttft_ms: float, slo_tpot_ms: float, workload: str
) -> dict[str, Any]:
    """`pdserve plan`'s JSON: the plan and the inputs it was searched for (the operator's status.plan.planner)."""
    d = plan.to_dict()
    d["inputs"] = {
        "model": inp.model.to_dict(),
        "profile": {
            "device": inp.profile.device,
            "model": inp.profile.model,
            "source": inp.profile.source,
            "layouts": [lat.to_dict() for lat in inp.profile.layouts],  # what a replan searches on
        },
        "topology": inp.topology.to_dict(),
        "prefill_max_batch_tokens": inp.prefill_max_batch_tokens,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "attainment": inp.attainment,
        "workload": workload,
        "rate": inp.rate,
        "codecs": [c.name for c in inp.codecs],
    }
    return d


def cmd_plan(a: argparse.Namespace) -> int:
    try:
        model, model_dir = load_model(a.model)
        profile = load_profile(a.profile, a.profile_key, model.name)
        topo = load_topology(a.topology)
        samples = workload_samples(a.workload)
        inp = search_input(
            model,
            model_dir,
            profile,
            a.profile,
            topo,
            samples,
            a.slo_ttft_ms,
            a.slo_tpot_ms,
            a.attainment,
            a.rate,
        )
        plan = search(inp)
    except PlanError as exc:
        print(f"pdserve plan: no plan: {exc}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, OSError) as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan, inp, a.slo_ttft_ms, a.slo_tpot_ms, a.workload), indent=2))
    return 0


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face config.json or the directory holding it")
    p.add_argument(
        "--profile", required=True, help="profile JSON (pdserve profile, or DistServe profiler-*.json)"
    )
    p.add_argument("--profile-key", default=None, help="the model's entry in a DistServe profile file")
    p.add_argument("--topology", required=True, help="topology JSON (pdserve topology --local writes one)")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests meeting both SLOs")
    p.add_argument(
        "--workload",
        default="balanced",
        help="a bench workload name (balanced, prefill_heavy, full-..., sharegpt-approx) or a JSON file "
        '{"requests": [{"prompt_tokens": N, "output_tokens": M}, ...]}',
    )
    p.add_argument("--rate", type=float, default=None, help="plan instance counts for this rate (req/s)")


# ---- topology --------------------------------------------------------------------------------------------
def measure_copy_gbytes_per_s(nbytes: int = 256 * 2**20, tries: int = 3) -> float:
    """One core's memcpy bandwidth (GB/s, best of `tries`): the ceiling of the shared-memory KV transport
    between two instances on this host (which also pays framing and a second copy)."""
    src = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    dst = bytearray(len(src))
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        dst[:] = src
        best = min(best, time.perf_counter() - t0)
    return len(src) / best / 1e9


def local_topology() -> Topology:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bw = round(measure_copy_gbytes_per_s(), 2)
    node = Node(socket.gethostname() or "local", cores, round(mem_bytes / 2**30 / cores, 2), bw)
    return Topology((node,), bw, (), device_kind="cpu-core")


def local_node(name: str | None = None) -> Node:
    """This host as one topology node (its devices: CPU cores)."""
    node = local_topology().nodes[0]
    return replace(node, name=name) if name else node


def cmd_topology(a: argparse.Namespace) -> int:
    from pdserve import topology_probe

    if a.serve_probe:
        try:
            lst = topology_probe.listen(a.serve_probe)
        except (OSError, ValueError) as exc:
            print(f"pdserve topology: cannot listen at {a.serve_probe}: {exc}", file=sys.stderr)
            return 2
        with lst:
            # the first stdout line: where to point `pdserve topology --probe` (a wildcard host: use this
            # host's address instead)
            print(json.dumps({"probe_address": lst.address}), flush=True)
            topology_probe.serve(lst, local_node(a.name), once=a.once)
        return 0
    if a.probe:
        try:
            results = [topology_probe.probe(addr, min_round_s=a.probe_seconds) for addr in a.probe]
            topo = topology_probe.topology_from_probes(local_node(a.name), results, "cpu-core")
        except (OSError, ValueError, PDServeError) as exc:
            print(f"pdserve topology: probe failed: {exc}", file=sys.stderr)
            return 1
        d = topo.to_dict()
        d["probes"] = [
            {
                "address": r.address,
                "node": r.node.name,
                "gbytes_per_s": r.gbytes_per_s,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "round_gbytes_per_s": list(r.round_gbytes_per_s),
            }
            for r in results
        ]
        d["notes"] = [
            "links: measured from each probed node to this one over the KV transport (the direction KV moves "
            "when the probed node prefills); inter_node_gbytes_per_s: the slowest measured",
            "pairs of probed nodes were not measured: they get inter_node_gbytes_per_s",
        ]
    else:
        d = local_topology().to_dict()
        d["notes"] = [
            "devices are CPU cores (one instance per core, as `pdserve up --cpus` divides them)",
            "device_memory_gib is the host's memory divided by its cores",
            "intra_gbytes_per_s is one core's measured memcpy bandwidth: an upper bound on the shm KV transport",
        ]
    text = json.dumps(d, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


# ---- profile ---------------------------------------------------------------------------------------------
PREFILL_BATCHES = ((16,), (64,), (128,), (256,), (64, 64), (128, 128), (32, 32, 32, 32), (200, 56))
# (batch, prompt). Batches up to 64: past a cluster's knee the decode batch grows beyond 16 (the simulated
# batch reached 60 in the planner's fidelity run), and the step time per sequence falls with the batch, so
# the large batches get their own piece of the model (DECODE_SPLIT, latency.fit_decode_split).
DECODE_CASES = (
    (1, 32),
    (1, 256),
    (4, 64),
    (8, 128),
    (16, 32),
    (16, 128),
    (4, 384),
    (24, 96),
    (32, 64),
    (48, 64),
    (64, 64),
    (64, 128),
)
DECODE_SPLIT = 16  # decode_large from this batch size on


def run_profile(model_dir: str, threads: int, new_tokens: int, tries: int) -> dict[str, Any]:
    """Time this engine (one TP1/PP1 instance on `threads` CPU threads) on a grid of prefill batches and
    decode batches, fit the latency model, and return the profile JSON (coefficients in seconds)."""
    import torch

    from bench.engine import PdserveDecode, best_time, random_prompts
    from engine.block_manager import BlockManager
    from engine.params import SamplingParams
    from engine.runner import ModelRunner
    from engine.sequence import Sequence
    from pdserve.instance import CPU_BATCH_TOKENS

    torch.set_num_threads(threads)
    block = 16
    need = sum(-(-(p + 1) // block) for b in PREFILL_BATCHES for p in b)
    need += sum(b * -(-(p + new_tokens) // block) for b, p in DECODE_CASES)
    runner = ModelRunner(model_dir, num_kv_blocks=need, block_size=block)
    bm = BlockManager(runner.kv_cache.num_blocks, block)
    vocab = runner.config.vocab_size
    clock = "cpu" if threads == 1 else "wall"

    prefill_pts: list[tuple[list[int], float]] = []
    for i, lens in enumerate(PREFILL_BATCHES):
        prompts = [random_prompts(1, n, vocab, 100 * i + j)[0] for j, n in enumerate(lens)]
        seqs = [
            Sequence(f"p{i}-{j}", p, SamplingParams(max_tokens=1, ignore_eos=True))
            for j, p in enumerate(prompts)
        ]
        for s in seqs:
            s.blocks = bm.allocate(len(s.prompt_ids) + 1)

        def prefill(seqs: list[Sequence] = seqs) -> None:
            for s in seqs:
                s.num_cached, s.output_ids = 0, []
            runner.prefill(seqs)

        prefill_pts.append((list(lens), getattr(best_time(prefill, tries, clock), clock)))

    decode_pts: list[tuple[int, int, float]] = []
    for b, p in DECODE_CASES:
        pd = PdserveDecode(runner, bm, random_prompts(b, p, vocab, 7 * b + p), new_tokens)
        steps = [getattr(pd.run()[0], clock) for _ in range(tries)]
        mean_ctx = p + 1 + (new_tokens - 2) / 2  # context of the mean timed step
        decode_pts.append((b, round(b * mean_ctx), min(steps)))

    pc, perr = fit_prefill(prefill_pts)
    ds, dl, derr = fit_decode_split(decode_pts, DECODE_SPLIT)
    lat = LayoutLatency(Layout(1, 1), pc, ds, dl, DECODE_SPLIT, fit_error={"prefill": perr, "decode": derr})
    layout = lat.to_dict()
    layout["points"] = {
        "prefill": [{"prompt_lens": ls, "s": t} for ls, t in prefill_pts],
        "decode": [{"batch": b, "sum_ctx": c, "s": t} for b, c, t in decode_pts],
    }
    model_name = Path(model_dir).name
    return {
        "device": f"cpu-core ({os.uname().machine}, {threads} thread{'s' if threads > 1 else ''})",
        "model": model_name,
        "clock": clock,
        "source": "pdserve profile",
        "prefill_max_batch_tokens": CPU_BATCH_TOKENS,  # the prefill engine's batch cap on CPU (pdserve.instance)
        "layouts": [layout],
        "notes": [
            "TP1/PP1 only: `pdserve bench engine --tp/--pp` times the other layouts (latency_model per layout)"
        ],
    }


def cmd_profile(a: argparse.Namespace) -> int:
    if a.model is None:
        from engine.synth import default_model_dir

        a.model = str(default_model_dir())
    if a.from_distserve:
        data = json.loads(Path(a.from_distserve).read_text())
        key = a.profile_key or next(iter(data))
        prof = profile_from_distserve(data, key)
        out: dict[str, Any] = {
            "device": prof.device,
            "model": prof.model,
            "source": "distserve",
            "layouts": [lat.to_dict() for lat in prof.layouts],
        }
    else:
        out = run_profile(a.model, a.threads, a.new_tokens, a.tries)
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the shipped model)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the instance profiled")
    p.add_argument("--new-tokens", type=int, default=10, help="decode steps per decode case (+1)")
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the profile JSON here")
    p.add_argument("--from-distserve", default=None, help="convert this DistServe profiler-*.json instead")
    p.add_argument("--profile-key", default=None, help="with --from-distserve: the model entry")


def add_topology_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true", help="this machine (the default)")
    p.add_argument(
        "--probe",
        nargs="+",
        metavar="ADDRESS",
        default=None,
        help="measure the bandwidth from each probe server (tcp://HOST:PORT, started with --serve-probe on "
        "the other hosts) to this host over the KV transport, and write the topology of all of them",
    )
    p.add_argument(
        "--serve-probe",
        default=None,
        metavar="ADDRESS",
        help="answer probes at this address (tcp://HOST:PORT; port 0: a free one, printed on the first line)",
    )
    p.add_argument("--once", action="store_true", help="with --serve-probe: exit after the first probe")
    p.add_argument("--probe-seconds", type=float, default=0.5, help="the shortest timed round of a probe")
    p.add_argument("--name", default=None, help="this node's name in the topology (default: the hostname)")
    p.add_argument("--out", default=None, help="also write the topology JSON here")


# ---- status ----------------------------------------------------------------------------------------------
def status_json(cluster: str, instances: list[Any], planner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The running cluster as the plan describes one: per instance its role, layout, devices, node and load
    (from the registry's `InstanceInfo`s; `rank_devices`: each rank's device under TP/PP)."""
    rows = []
    for i in sorted(instances, key=lambda i: (i.role, i.instance_id)):
        rows.append(
            {
                "instance": i.instance_id,
                "role": i.role,
                "layout": {"tp": i.tp, "pp": i.pp},
                "devices": i.devices,
                "rank_devices": list(i.rank_devices) or [i.devices],
                "node": i.node,
                "grpc_address": i.grpc_address,
                "load": {
                    "queue_len": i.queue_len,
                    "running": i.running,
                    "kv_blocks_free": i.kv_blocks_free,
                    "kv_blocks_total": i.kv_blocks_total,
                    "leases": i.leases,
                },
            }
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["role"]] = counts.get(r["role"], 0) + 1
    return {"cluster": cluster, "instances": rows, "counts": counts, "planner": planner}


def cmd_status(a: argparse.Namespace) -> int:
    from coordinator.registry import Registry

    registry = Registry(a.redis_url, a.cluster)
    try:
        instances = registry.instances()
        planner = registry.planner()
    except Exception as exc:  # noqa: BLE001 - any Redis failure is one clear message
        print(f"pdserve status: cannot read the registry at {a.redis_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    print(json.dumps(status_json(a.cluster, instances, planner), indent=2))
    return 0


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=os.environ.get("PDSERVE_REDIS_URL", "redis://127.0.0.1:6379"),
        help="the cluster's Redis (pdserve up prints it; default: PDSERVE_REDIS_URL or the local default port)",
    )
    p.add_argument("--cluster", default="default", help="registry namespace")


# ---- up --plan -------------------------------------------------------------------------------------------
def up_overrides(plan: dict[str, Any], cpu: bool) -> dict[str, Any]:
    """ClusterConfig fields that start exactly `plan` (pdserve plan's JSON) on this host: instance counts,
    each instance's devices and name (placement order: prefill-0.., then decode-0..; `pdserve up` gives
    instance i the i-th device set), each phase's layout (`prefill_tp` ... `decode_pp`: cmd_up refuses
    layouts above 1 where `pdserve up` has no such flags), and the KV codec of a plan whose links all use one
    (the links themselves: the coordinator's --plan). What pdserve up cannot run is refused with a reason:
    more than one node, and on CUDA a device order other than 0, 1, ... (pdserve up gives instance i CUDA
    device i)."""
    try:
        layouts = {
            f"{phase}_{k}": int(plan[phase][k]) for phase in ("prefill", "decode") for k in ("tp", "pp")
        }
        placement = plan["placement"]
        order = sorted(
            placement, key=lambda p: (p["phase"] != "prefill", int(p["instance"].rsplit("-", 1)[1]))
        )
        nodes = {p["node"] for p in placement}
        codecs = {k["codec"] for k in plan.get("kv_links", [])}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"not a plan pdserve can start: {exc}") from exc
    if len(nodes) != 1:
        raise ValueError(f"the plan spans nodes {sorted(nodes)}; pdserve up starts one host")
    devices = tuple(d for p in order for d in p["devices"])
    if len(set(devices)) != len(devices):
        raise ValueError("the plan uses a device twice")
    if not cpu and devices != tuple(range(len(devices))):
        raise ValueError(
            "on CUDA pdserve up gives instance i device i: plan devices 0, 1, ... in order, or --cpu"
        )
    return {
        "prefill": sum(1 for p in placement if p["phase"] == "prefill"),
        "decode": sum(1 for p in placement if p["phase"] == "decode"),
        "cpus": devices,
        "codec": codecs.pop() if len(codecs) == 1 else "auto",
        "instance_ids": tuple(str(p["instance"]) for p in order),
        **layouts,
    }


LAYOUT_FLAGS = ("prefill_tp", "prefill_pp", "decode_tp", "decode_pp")  # pdserve up --prefill-tp ...


def apply_layouts(args: argparse.Namespace, planned: dict[str, Any]) -> None:
    """Set `pdserve up`'s --prefill-tp/--prefill-pp/--decode-tp/--decode-pp from the plan. A layout above 1
    on a `pdserve up` without those flags is an error, never a silent TP1/PP1."""
    for flag in LAYOUT_FLAGS:
        want = planned[flag]
        if hasattr(args, flag):
            setattr(args, flag, want)
        elif want != 1:
            option = "--" + flag.replace("_", "-")
            raise ValueError(
                f"the plan asks for {flag.replace('_', ' ').upper()}={want} but this pdserve up has no "
                f"{option}: it runs TP1/PP1 instances only"
            )
