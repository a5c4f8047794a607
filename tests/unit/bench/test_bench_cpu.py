"""CPU accounting of a load run (bench.cpu): /proc parsing, the split between the system under test, the load
generator, the other systems and the rest of the machine, and the peak window; real processes on Linux."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import cpu
from bench.cpu import (
    CpuMeter,
    MachineTicks,
    _Sample,
    machine_ticks,
    process_ticks,
    usage_between,
    with_descendants,
)

linux_only = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")


def test_machine_ticks_sums_busy_fields_and_keeps_steal_apart(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 2 30 5000 7 4 5 60 0 0\ncpu0 50 1 15 2500 3 2 2 30 0 0\n")
    assert machine_ticks(str(stat)) == MachineTicks(busy=100 + 2 + 30 + 4 + 5, steal=60)
    stat.write_text("intr 1 2 3\n")
    assert machine_ticks(str(stat)) is None
    assert machine_ticks(str(tmp_path / "missing")) is None


def _sample(t: float, busy: int, steal: int, own: int, peers: int, bench: int) -> _Sample:
    return _Sample(t, MachineTicks(busy, steal), own, peers, bench)


def test_usage_splits_the_machine_and_finds_the_peak_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_TICK_S", 0.01)
    samples = [
        _sample(0.0, busy=0, steal=0, own=0, peers=0, bench=0),
        # second 1: own 120 ticks, bench 20, peers 5, 5 ticks of anything else, no steal: foreign 0.10 cores
        _sample(1.0, busy=150, steal=0, own=120, peers=5, bench=20),
        # second 2: own 100, bench 20, peers 5, outside 45, steal 20: foreign (5 + 45 + 20) / 100 = 0.70 cores
        _sample(2.0, busy=320, steal=20, own=220, peers=10, bench=40),
    ]
    u = usage_between(samples)
    assert u is not None
    assert u.wall_s == pytest.approx(2.0)
    assert u.system_cores == pytest.approx(1.10)  # 220 ticks in 2 s
    assert u.bench_cores == pytest.approx(0.20)
    assert u.peers_cores == pytest.approx(0.05)
    assert u.outside_cores == pytest.approx(0.25)  # (320 - 220 - 10 - 40) ticks in 2 s
    assert u.steal_cores == pytest.approx(0.10)
    assert u.foreign_cores == pytest.approx(0.40)
    assert u.foreign_peak_cores == pytest.approx(0.70)
    assert u.to_dict()["foreign_cores"] == pytest.approx(0.40)
    assert usage_between(samples[:1]) is None
    # a last sample 20 ms later, 2 ticks of outside load in it: 1.0 core over that sliver, noise of tick
    # accounting; windows shorter than min_window_s are not peaks of their own (the mean keeps the ticks)
    tail = [*samples, _sample(2.02, busy=322, steal=20, own=220, peers=10, bench=40)]
    tail_usage = usage_between(tail)
    assert tail_usage is not None and tail_usage.foreign_peak_cores == pytest.approx(1.0)
    short = usage_between(tail, min_window_s=0.5)
    assert short is not None and short.foreign_peak_cores == pytest.approx(0.70)
    assert short.outside_cores == pytest.approx(0.52 / 2.02)  # (322 - 220 - 10 - 40) ticks in 2.02 s
    # no window long enough: the run's mean is its peak
    only = usage_between(samples, min_window_s=5.0)
    assert only is not None and only.foreign_peak_cores == pytest.approx(only.foreign_cores)


@linux_only
def test_process_ticks_counts_cpu_time_and_ignores_vanished_pids() -> None:
    before = process_ticks([os.getpid()])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert process_ticks([os.getpid()]) - before >= 10  # >= 0.1 s at 100 ticks/s, after 0.3 s of CPU
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_ticks([dead.pid]) == 0


@linux_only
def test_descendants_and_a_busy_peer_are_seen() -> None:
    # a parent whose child spins on a core: the child is the parent's, and counts as a peer's load
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert set(with_descendants([parent.pid])) == {parent.pid, child}
        deadline = time.monotonic() + 10
        while process_ticks([child]) == 0:  # the child is spinning
            assert time.monotonic() < deadline, "the spinning child got no CPU within 10 s"
            time.sleep(0.01)
        ticks0, t0 = process_ticks([parent.pid, child]), time.monotonic()
        with CpuMeter(own=lambda: [], peers=lambda: [parent.pid], interval_s=0.2) as meter:
            time.sleep(1.0)  # the measured window
        spun = (process_ticks([parent.pid, child]) - ticks0) * cpu._TICK_S / (time.monotonic() - t0)
        u = meter.usage
        assert u is not None
        # whatever else loads the machine (benchmarks, other tests), the meter's peers share is the CPU
        # /proc gave the spinning child over the same second: tick rounding (10 ms) plus the few ms between
        # the meter's first and last samples and this test's own
        assert spun > 0.05, f"the spinning child got {spun:.2f} cores"
        assert u.peers_cores == pytest.approx(spun, abs=0.1)
        assert u.foreign_peak_cores >= u.peers_cores - 0.05  # a peer's load is foreign load
        assert u.system_cores == 0.0
    finally:
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_stretch_is_the_busiest_threads_wait_over_its_run() -> None:
    from bench.cpu import schedstat_ns, stretch

    before = {1: (1_000, 500), 2: (10, 0)}
    after = {1: (3_000, 1_500), 2: (20, 9_000), 3: (5, 5)}  # thread 2 woke once and waited: not the work
    assert stretch(before, after) == 1.5  # thread 1: ran 2000 ns, waited 1000 ns
    assert stretch(after, after) == 1.0  # nothing ran
    own = schedstat_ns(os.getpid())
    assert threading.get_native_id() in own and all(run >= 0 and wait >= 0 for run, wait in own.values())


def test_window_stretches_per_window_merging_windows_that_barely_ran() -> None:
    """Samples at 0, 1, 2, 3 s of thread 7 (run, wait in ns): window 0-1 ran 0.5 s and waited 0.5 s (x2);
    1-2 ran 0.01 s (below min_run 0.1: merged into the next); 1-3 ran 0.42 s, waited 0.042 s (x1.1); the
    thread that ran most in a window is the one measured."""
    from bench.cpu import window_stretches

    ns = 1_000_000_000
    runs = [
        (0, 0),
        (ns // 2, ns // 2),
        (ns // 2 + ns // 100, ns // 2),
        (ns // 2 + 42 * ns // 100, ns // 2 + 42 * ns // 1000),
    ]
    samples = [(float(t), {"decode": {7: r, 8: (0, 0)}}) for t, r in enumerate(runs)]
    w = window_stretches(samples, "decode", min_run_s=0.1)
    assert [x[0] for x in w] == [0.0, 1.0]
    assert [x[1] for x in w] == pytest.approx([2.0, 1.1])
    assert [x[2] for x in w] == pytest.approx([0.5, 0.21])  # cores: 0.5 s in 1 s, 0.42 s in 2 s
    # every window kept without a floor; a trailing short window is merged into the one before
    assert len(window_stretches(samples, "decode")) == 3
    short_tail = [*samples[:2], (1.5, {"decode": {7: (ns // 2 + 1, ns // 2)}})]
    assert [x[0] for x in window_stretches(short_tail, "decode", min_run_s=0.1)] == [0.0]


def test_sched_sampler_reads_each_process_until_it_stops() -> None:
    from bench.cpu import SchedSampler, window_stretches

    with SchedSampler({"me": os.getpid()}, interval_s=0.01) as s:
        deadline = time.monotonic() + 5.0
        while len(s.samples) < 4 and time.monotonic() < deadline:
            sum(i * i for i in range(20_000))  # run on a CPU while the sampler reads
    assert len(s.samples) >= 5  # the first reading, at least 3 by the thread, the last one
    assert all(threading.get_native_id() in m["me"] for _, m in s.samples)
    w = window_stretches(s.samples, "me")
    assert len(w) == len(s.samples) - 1 and all(k >= 1.0 for _, k, _ in w)


def test_process_sched_splits_run_wait_and_the_step_thread() -> None:
    from bench.cpu import process_sched

    before = {1: (1_000_000_000, 0), 2: (0, 0)}
    after = {1: (2_000_000_000, 500_000_000), 2: (500_000_000, 0), 3: (100_000_000, 100_000_000)}
    p = process_sched(before, after, wall_s=2.0)
    assert p["cores"] == pytest.approx(0.8)  # 1.6 s on a CPU over 2 s
    assert p["wait_cores"] == pytest.approx(0.3)  # 0.6 s runnable but waiting
    assert p["step_cores"] == pytest.approx(0.5)  # thread 1 ran 1 s
    assert p["step_stretch"] == pytest.approx(1.5)  # and waited 0.5 s


@linux_only
def test_meter_names_the_process_that_ran() -> None:
    # a spinning process among the named ones is the one whose cores the meter reports
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(
        [sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE
    )
    try:
        assert idle.stdout is not None and idle.stdout.readline() == b"\n"  # started: asleep from here on
        deadline = time.monotonic() + 10
        while process_ticks([spinner.pid]) == 0:
            assert time.monotonic() < deadline, "the spinning process got no CPU within 10 s"
            time.sleep(0.01)
        named = {"spinner": spinner.pid, "idle": idle.pid}
        with CpuMeter(own=lambda: list(named.values()), named=lambda: named, interval_s=0.2) as meter:
            time.sleep(0.5)  # the measured window
        u = meter.usage
        assert u is not None and set(u.processes) == {"spinner", "idle"}
        assert u.processes["spinner"]["cores"] > 0.05
        assert u.processes["idle"]["cores"] < 0.02
        assert u.to_dict()["processes"]["spinner"]["step_stretch"] >= 1.0
    finally:
        for p in (spinner, idle):
            p.kill()
            p.wait()


@linux_only
def test_memory_mib_reads_this_process_and_nothing_for_a_gone_one() -> None:
    from bench.cpu import memory_mib

    mine = memory_mib(os.getpid())
    assert mine["rss_mib"] > 1.0 and 0.0 <= mine["huge_pages_mib"] <= mine["rss_mib"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert memory_mib(gone.pid) == {}
