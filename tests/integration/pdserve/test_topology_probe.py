"""`pdserve topology --probe` between two emulated nodes: network namespaces joined by a veth pair whose
server-side end is shaped by tc tbf; the measured figure must be the shaped rate, within a tolerance."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.planner.topology import Node
from pdserve import topology_probe

ROOT = Path(__file__).resolve().parents[3]
RATE_MBIT = 200  # the shaped link: 200 Mbit/s = 0.025 GB/s
TOLERANCE = 0.15  # relative


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_unusable() -> str | None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"pdprobe-chk-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` is not permitted here: {getattr(exc, 'stderr', b'')!r}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[str, str, str]]:
    """Namespaces (server, client) joined by veth; the server's end shaped to RATE_MBIT. -> (ns_a, ns_b,
    the server's IP address)."""
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"pdprobe-a-{tag}", f"pdprobe-b-{tag}"
    dev_a, dev_b = f"pdpa{tag}", f"pdpb{tag}"  # interface names: at most 15 characters
    octet = os.getpid() % 250 + 1
    ip_a, ip_b = f"10.213.{octet}.1", f"10.213.{octet}.2"
    _ip("netns", "add", ns_a)
    try:
        _ip("netns", "add", ns_b)
        try:
            _ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
            for ns, dev, addr in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                ["ip", "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", dev_a, "root", "tbf",
                 "rate", f"{RATE_MBIT}mbit", "burst", "64kb", "latency", "50ms"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            yield ns_a, ns_b, ip_a
        finally:
            subprocess.run(["ip", "netns", "del", ns_b], capture_output=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True, timeout=30)


def _pdserve(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "pdserve", "topology", *args]


def test_probe_measures_a_tc_shaped_link_between_two_namespaces() -> None:
    why = _netns_unusable()
    if why is not None:
        pytest.skip(why)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with two_nodes() as (ns_a, ns_b, ip_a):
        server = subprocess.Popen(
            _pdserve(ns_a, "--serve-probe", f"tcp://{ip_a}:0", "--once", "--name", "node-a"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert server.stdout is not None
            address = json.loads(server.stdout.readline())["probe_address"]
            out = subprocess.run(
                _pdserve(ns_b, "--probe", address, "--name", "node-b"),
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert out.returncode == 0, out.stderr
            server.wait(timeout=30)  # --once: it exits after this probe
            assert server.returncode == 0, server.stderr.read() if server.stderr else ""
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)
    topo = json.loads(out.stdout)
    assert [n["name"] for n in topo["nodes"]] == ["node-b", "node-a"]
    (link,) = topo["links"]
    assert (link["a"], link["b"]) == ("node-b", "node-a")
    want = RATE_MBIT * 1e6 / 8 / 1e9
    assert link["gbytes_per_s"] == pytest.approx(want, rel=TOLERANCE), topo["probes"]
    assert topo["inter_node_gbytes_per_s"] == link["gbytes_per_s"]


def test_probe_on_loopback_reports_the_server_node_and_a_positive_rate() -> None:
    """The protocol without namespaces (runs everywhere): hello, timed rounds, quit; the server survives a
    client that leaves mid-conversation."""
    import threading

    node = Node("srv", 3, 1.5, 9.0)
    lst = topology_probe.listen("tcp://127.0.0.1:0")
    stop = threading.Event()
    t = threading.Thread(target=topology_probe.serve, args=(lst, node), kwargs={"stop": stop.is_set})
    t.start()
    try:
        from kv_transfer.transport import transport_for

        rude = transport_for(lst.address).connect(lst.address, timeout=10)
        rude.send(b"not json")
        rude.close()
        r = topology_probe.probe(lst.address, min_round_s=0.05)
        assert r.node == node and r.gbytes_per_s > 0 and r.seconds >= 0.05
        assert len(r.round_gbytes_per_s) == 3 and r.gbytes_per_s == max(r.round_gbytes_per_s)
        topo = topology_probe.topology_from_probes(Node("me", 2, 1.0, 5.0), [r], "cpu-core")
        assert topo.overrides == (("me", "srv", round(r.gbytes_per_s, 4)),)
        with pytest.raises(ValueError, match="names must differ"):
            topology_probe.topology_from_probes(Node("srv", 2, 1.0, 5.0), [r], "cpu-core")
    finally:
        stop.set()
        t.join(timeout=10)
        lst.close()
    assert not t.is_alive()
