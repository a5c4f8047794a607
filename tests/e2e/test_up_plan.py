"""`pdserve up --plan`: a plan from the planner, started on this host, is what `pdserve status` shows."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency, Profile
from coordinator.planner.model import spec_from_config
from coordinator.planner.search import SearchInput, search
from coordinator.planner.topology import Node, Topology
from coordinator.registry import Registry
from pdserve.launcher import LocalCluster
from pdserve.plan_cli import LAYOUT_FLAGS, apply_layouts, plan_json, status_json, up_overrides


def test_up_plan_runs_what_the_plan_says(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("needs two CPU cores (one per instance)")
    host = socket.gethostname()  # the node instances report
    topo = Topology((Node(host, 2, 4.0, 5.0),), 5.0)
    lat = LayoutLatency(
        Layout(1, 1), Coeffs(0.01, 1e-4, 0), Coeffs(0.004, 1e-6, 1e-4), Coeffs(0.004, 1e-6, 1e-4)
    )
    model = spec_from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    inp = SearchInput(model, Profile("cpu", "tiny", (lat,)), topo, 0.5, 0.05, ((64, 16),), pp_choices=(1,))
    plan = search(inp)
    d = plan.to_dict()
    # the planner's devices are indexes on the node; this host's usable cores may be numbered otherwise
    for p in d["placement"]:
        p["devices"] = [cores[i] for i in p["devices"]]
    over = up_overrides(d, cpu=True)
    assert (over["prefill"], over["decode"]) == (d["prefill"]["instances"], d["decode"]["instances"])
    assert sorted(over["instance_ids"]) == sorted(p["instance"] for p in d["placement"])
    path = tmp_path / "plan.json"  # as pdserve plan writes it: with the inputs a replan searches on
    path.write_text(json.dumps(plan_json(plan, inp, 500.0, 50.0, "test")))
    cluster = start_cluster(
        tiny_model_dir,
        **{k: v for k, v in over.items() if k not in LAYOUT_FLAGS},
        plan_path=str(path),
        replan_interval_s=0.5,
    )
    reg = Registry(cluster.redis_url, cluster.cfg.cluster)
    try:
        deadline = time.monotonic() + 30
        while True:  # instances register on their first heartbeat: wait for all of them
            st = status_json(cluster.cfg.cluster, reg.instances(), reg.planner())
            done = len(st["instances"]) == len(d["placement"]) and st["planner"] is not None
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        reg.close()
    assert st["counts"] == {"prefill": d["prefill"]["instances"], "decode": d["decode"]["instances"]}
    planned = sorted((p["phase"], tuple(p["devices"])) for p in d["placement"])
    running = sorted(
        (i["role"], tuple(int(c) for c in i["devices"].split(":")[1].split(","))) for i in st["instances"]
    )
    assert running == planned
    assert sorted(i["instance"] for i in st["instances"]) == sorted(p["instance"] for p in d["placement"])
    assert {i["node"] for i in st["instances"]} == {p["node"] for p in d["placement"]} == {host}
    # the coordinator replans on the plan's inputs: no traffic yet, so it waits, with the plan in force
    assert st["planner"]["state"] == "waiting" and st["planner"]["autoplan"] is False
    assert st["planner"]["in_force"] == st["counts"]


def test_up_plan_refuses_what_it_cannot_run() -> None:
    base: dict[str, Any] = {
        "prefill": {"tp": 1, "pp": 1, "instances": 1},
        "decode": {"tp": 1, "pp": 1, "instances": 1},
        "placement": [
            {"instance": "prefill-0", "phase": "prefill", "node": "n0", "devices": [0]},
            {"instance": "decode-0", "phase": "decode", "node": "n0", "devices": [1]},
        ],
        "kv_links": [{"prefill": "prefill-0", "decode": "decode-0", "gbytes_per_s": 5, "codec": "int8"}],
    }
    assert up_overrides(base, cpu=True) == {
        "prefill": 1,
        "decode": 1,
        "cpus": (0, 1),
        "codec": "int8",
        "instance_ids": ("prefill-0", "decode-0"),
        "prefill_tp": 1,
        "prefill_pp": 1,
        "decode_tp": 1,
        "decode_pp": 1,
    }
    tp2 = up_overrides({**base, "decode": {"tp": 2, "pp": 1, "instances": 1}}, cpu=True)
    assert tp2["decode_tp"] == 2
    args = argparse.Namespace(prefill=1)  # a pdserve up without --decode-tp: refused, not run as TP1
    with pytest.raises(ValueError, match="DECODE TP=2 .* no --decode-tp"):
        apply_layouts(args, tp2)
    args = argparse.Namespace(prefill_tp=1, prefill_pp=1, decode_tp=1, decode_pp=1)  # one with the flags
    apply_layouts(args, tp2)
    assert (args.prefill_tp, args.decode_tp, args.decode_pp) == (1, 2, 1)
    two_nodes = [{**base["placement"][0]}, {**base["placement"][1], "node": "n1"}]
    with pytest.raises(ValueError, match="spans nodes"):
        up_overrides({**base, "placement": two_nodes}, cpu=True)
    swapped = [{**base["placement"][0], "devices": [1]}, {**base["placement"][1], "devices": [0]}]
    with pytest.raises(ValueError, match="device i"):
        up_overrides({**base, "placement": swapped}, cpu=False)
    with pytest.raises(ValueError, match="not a plan"):
        up_overrides({"prefill": {}}, cpu=True)


def test_up_plan_routes_kv_only_over_the_plans_links(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """1 prefill + 2 decode instances (on this host's cores, shared), a plan linking prefill-0 to decode-1
    only: every request's KV goes to decode-1 (the decode instances' measured links, in the registry, show
    who pulled from whom), with the link's codec."""
    from pdserve.client import Client

    plan = {
        "prefill": {"tp": 1, "pp": 1, "instances": 1},
        "decode": {"tp": 1, "pp": 1, "instances": 2},
        "placement": [
            {"instance": "prefill-0", "phase": "prefill", "node": "n0", "devices": [0]},
            {"instance": "decode-0", "phase": "decode", "node": "n0", "devices": [1]},
            {"instance": "decode-1", "phase": "decode", "node": "n0", "devices": [2]},
        ],
        "kv_links": [{"prefill": "prefill-0", "decode": "decode-1", "gbytes_per_s": 5, "codec": "int8"}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    over = up_overrides(plan, cpu=True)
    cluster = start_cluster(
        tiny_model_dir,
        prefill=over["prefill"],
        decode=over["decode"],
        instance_ids=over["instance_ids"],
        plan_path=str(path),
        cpus=tuple(sorted(os.sched_getaffinity(0))[:2]),  # three instances share this host's cores
    )
    reg = Registry(cluster.redis_url, cluster.cfg.cluster)
    try:
        with Client(cluster.gateway_address) as client:
            for i in range(4):
                client.generate(f"def f{i}(x):", max_tokens=4, ignore_eos=True, timeout=60)
        deadline = time.monotonic() + 20
        while True:  # a decode instance publishes its measured links with its next heartbeat
            by_id = {i.instance_id: i for i in reg.instances()}
            if by_id.get("decode-1") and by_id["decode-1"].links or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        reg.close()
    assert sorted(by_id) == ["decode-0", "decode-1", "prefill-0"]
    assert list(by_id["decode-1"].links) == [by_id["prefill-0"].kv_address]
    assert by_id["decode-0"].links == {}


def test_autoplan_starts_and_drains_instances_to_the_plan_in_force(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    """The launcher side of `pdserve up --autoplan`: the coordinator's planner record (published here as
    the replanner publishes it) says 1 prefill + 2 decode, then 1 + 1; the launcher follows."""
    from pdserve.launcher import Autoplanner

    cluster = start_cluster(
        tiny_model_dir,
        instance_ids=("prefill-0", "decode-0"),
        cpus=tuple(sorted(os.sched_getaffinity(0))[:2]),
    )
    reg = Registry(cluster.redis_url, cluster.cfg.cluster)
    lines: list[str] = []
    auto = Autoplanner(cluster, lines.append, period_s=0.0)

    def converge(want: dict[str, int]) -> set[str]:
        reg.publish_planner({"state": "assessed", "in_force": want, "reason": "test"}, ttl_s=60)
        names = {f"{role}-{k}" for role, n in want.items() for k in range(n)}
        deadline = time.monotonic() + 60
        while True:  # wait for the registry (new instances register on start, drained ones withdraw)
            auto.check()
            ids = {i.instance_id for i in reg.instances()}
            if (ids == names and not cluster.retiring) or time.monotonic() > deadline:
                return ids
            time.sleep(0.1)

    try:
        assert converge({"prefill": 1, "decode": 2}) == {"prefill-0", "decode-0", "decode-1"}
        assert any("started decode decode-1" in line for line in lines)
        assert converge({"prefill": 1, "decode": 1}) == {"prefill-0", "decode-0"}
        assert any("draining decode decode-1" in line for line in lines)
        assert cluster.counts() == {"coordinator": 1, "prefill": 1, "decode": 1}
    finally:
        auto.close()
        reg.close()
