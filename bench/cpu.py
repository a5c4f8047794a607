"""Who used the machine's CPU during a load run: the system under test, the load generator, everything else.

A serving comparison on a shared 2-core machine is only as good as its quiet: CPU taken by anything but
the system under test (other systems' idle loops, stragglers, the hypervisor's steal, whatever else runs
on the host) lands on TTFT and TPOT and can fail a run that would pass. :class:`CpuMeter` measures it per
run from Linux's ``/proc`` counters, so a disturbed run is visible in the JSON and can be run again.

Units: every ``*_cores`` figure is CPU seconds per wall second (1.0 = one core busy the whole run).
``busy`` counts user + nice + system + irq + softirq time of the whole machine; ``steal`` is time the
hypervisor gave these vCPUs to someone else (not included in busy).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True)
class MachineTicks:
    busy: int  # user + nice + system + irq + softirq, all CPUs, in clock ticks
    steal: int


def machine_ticks(stat_path: str = "/proc/stat") -> MachineTicks | None:
    """The machine's cumulative CPU counters (None where /proc/stat is unavailable)."""
    try:
        with open(stat_path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]] + [0] * 8  # user nice system idle iowait irq softirq steal ...
    return MachineTicks(busy=v[0] + v[1] + v[2] + v[5] + v[6], steal=v[7])


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (proc(5)), None if the process is gone. The command name (field 2) may
    hold spaces and parentheses, so the split is after its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_ticks(pids: Iterable[int]) -> int:
    """utime + stime of these processes (all their threads), in clock ticks; vanished processes count 0."""
    total = 0
    for pid in pids:
        if (rest := _stat_fields(pid)) is not None:
            total += int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5): utime, stime
    return total


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process on the machine (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (rest := _stat_fields(entry)) is not None:
            children.setdefault(int(rest[1]), []).append(int(entry))  # field 4 of proc(5): ppid
    return children


def with_descendants(pids: Iterable[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """These processes and every process below them (a server's worker processes count as its own);
    `children`: a `_children()` scan to reuse."""
    children = _children() if children is None else children
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


@dataclass(frozen=True)
class CpuUsage:
    """CPU use during one run, in cores (CPU seconds per wall second)."""

    wall_s: float
    system_cores: float  # the system under test: its gateway, Redis and instances
    bench_cores: float  # this process: the load generator (and the harness's other threads)
    peers_cores: float  # the other systems of the comparison (idle, or finishing a previous run)
    outside_cores: float  # everything else on the machine
    steal_cores: float  # taken by the hypervisor
    foreign_peak_cores: float  # the most foreign CPU (peers + outside + steal) in any one sampling window
    # per named process of the system (`CpuMeter(named=...)`, schedstat): cores on a CPU, cores' worth of
    # runnable-but-waiting time, and its busiest thread's (the step loop's) stretch, (run + wait) / run
    processes: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def foreign_cores(self) -> float:
        """CPU the run competed with that neither the system under test nor its load generator used."""
        return self.peers_cores + self.outside_cores + self.steal_cores

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: round(v, 4) for k, v in asdict(self).items() if k != "processes"}
        out["foreign_cores"] = round(self.foreign_cores, 4)
        if self.processes:
            out["processes"] = {n: {k: round(v, 4) for k, v in p.items()} for n, p in self.processes.items()}
        return out


PidsFn = Callable[[], list[int]]
NamedPidsFn = Callable[[], dict[str, int]]


@dataclass(frozen=True)
class _Sample:
    t: float  # time.monotonic()
    machine: MachineTicks
    own: int  # clock ticks
    peers: int
    bench: int


class CpuMeter:
    """``with CpuMeter(own, peers) as m: ...`` then ``m.usage`` (None off Linux).

    ``own`` and ``peers`` return the pids of the system under test and of the other systems; they are
    asked once, at the start, with their descendants. A thread samples every ``interval_s`` to find the
    peak foreign load of any window (a burst that the run's mean would hide). ``named`` ({name: pid} of the
    system's processes) adds each one's CPU and wait to ``usage.processes``: which process ran slow.
    """

    def __init__(
        self,
        own: PidsFn,
        peers: PidsFn | None = None,
        interval_s: float = 1.0,
        named: NamedPidsFn | None = None,
    ) -> None:
        self._own_fn, self._peers_fn = own, peers or (lambda: [])
        self._named_fn = named
        self._named: dict[str, int] = {}
        self._sched0: dict[str, dict[int, tuple[int, int]]] = {}
        self.interval_s = interval_s
        self.usage: CpuUsage | None = None
        self._samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> _Sample | None:
        m = machine_ticks()
        if m is None:
            return None
        bench = process_ticks([os.getpid()])
        return _Sample(time.monotonic(), m, process_ticks(self._own), process_ticks(self._peers), bench)

    def _sampler(self) -> None:
        while not self._stop.wait(self.interval_s):
            if (s := self._sample()) is not None:
                self._samples.append(s)

    def __enter__(self) -> CpuMeter:
        children = _children()
        self._own = with_descendants(self._own_fn(), children)
        self._peers = [p for p in with_descendants(self._peers_fn(), children) if p not in self._own]
        self._named = self._named_fn() if self._named_fn else {}
        self._sched0 = {n: schedstat_ns(pid) for n, pid in self._named.items()}
        first = self._sample()
        if first is not None:
            self._samples = [first]
            self._thread = threading.Thread(target=self._sampler, name="cpu-meter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if (last := self._sample()) is not None:
            self._samples.append(last)
        self.usage = usage_between(self._samples, min_window_s=0.5 * self.interval_s)
        if self.usage is not None and self._named:
            after = {n: schedstat_ns(pid) for n, pid in self._named.items()}
            procs = {n: process_sched(self._sched0[n], after[n], self.usage.wall_s) for n in self._named}
            self.usage = replace(self.usage, processes=procs)


def _split(a: _Sample, b: _Sample) -> tuple[float, float, float, float, float, float]:
    """(wall s, own, bench, peers, outside, steal) CPU seconds between two samples."""
    own, peers, bench = max(0, b.own - a.own), max(0, b.peers - a.peers), max(0, b.bench - a.bench)
    outside = max(0, (b.machine.busy - a.machine.busy) - own - peers - bench)
    steal = max(0, b.machine.steal - a.machine.steal)
    return (b.t - a.t, own * _TICK_S, bench * _TICK_S, peers * _TICK_S, outside * _TICK_S, steal * _TICK_S)


def usage_between(samples: list[_Sample], min_window_s: float = 0.0) -> CpuUsage | None:
    """The usage over the first..last samples, with the peak foreign load over windows of consecutive
    samples at least `min_window_s` long (shorter ones are merged into the next: clock-tick accounting makes
    a window of a few ticks meaningless). A trailing short window counts in the mean only."""
    if len(samples) < 2 or samples[-1].t <= samples[0].t:
        return None
    wall, own, bench, peers, outside, steal = _split(samples[0], samples[-1])
    peak, start = 0.0, samples[0]
    for s in samples[1:]:
        if s.t - start.t >= max(min_window_s, 1e-9):
            w, _, _, p, o, st = _split(start, s)
            peak, start = max(peak, (p + o + st) / w), s
    if start is samples[0]:  # no window long enough: the whole run is the only one
        peak = (peers + outside + steal) / wall
    return CpuUsage(wall, own / wall, bench / wall, peers / wall, outside / wall, steal / wall, peak)


def memory_mib(pid: int) -> dict[str, float]:
    """A process's resident memory and the part of it in transparent huge pages, MiB ({} where
    /proc/PID/smaps_rollup is unavailable). Weights and KV outside huge pages make every step slower
    (TLB misses), so a system that ran slow for a whole run is checked for it first."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "AnonHugePages"):
                    out["rss_mib" if key == "Rss" else "huge_pages_mib"] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def schedstat_ns(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of `pid`: (ns on a CPU, ns runnable but waiting for a CPU) (Linux schedstat; {} where
    unavailable)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                on_cpu, waiting, _ = f.read().split()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(on_cpu), int(waiting))
    return out


def stretch(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """(run + wait) / run, between two schedstat readings, of the thread that ran most in between (an
    instance's step loop: its forward passes): how many times longer its work took than on a CPU of its
    own (1.0 when nothing ran). Idle helper threads are left out: their wake-up waits are not the work."""
    best_run, best_wait = 0, 0
    for tid, (run1, wait1) in after.items():
        run0, wait0 = before.get(tid, (0, 0))
        if run1 - run0 > best_run:
            best_run, best_wait = run1 - run0, wait1 - wait0
    return 1.0 + max(0, best_wait) / best_run if best_run > 0 else 1.0


def process_sched(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], wall_s: float
) -> dict[str, float]:
    """One process between two schedstat readings over `wall_s` seconds: `cores` (on a CPU), `wait_cores`
    (runnable, waiting for a CPU), `step_cores` and `step_stretch` of its busiest thread (`stretch`)."""
    run = sum(r1 - before.get(t, (0, 0))[0] for t, (r1, _) in after.items())
    wait = sum(w1 - before.get(t, (0, 0))[1] for t, (_, w1) in after.items())
    return {
        "cores": max(0, run) / 1e9 / wall_s,
        "wait_cores": max(0, wait) / 1e9 / wall_s,
        "step_cores": busiest_run_s(before, after) / wall_s,
        "step_stretch": stretch(before, after),
    }


def busiest_run_s(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """Seconds on a CPU, between two schedstat readings, of the thread that ran most in between (an
    instance's step loop), waits excluded."""
    return max((r1 - before.get(tid, (0, 0))[0] for tid, (r1, _) in after.items()), default=0) / 1e9


class SchedSampler:
    """``with SchedSampler({"decode": pid, ...}) as s: ...`` then ``s.samples``: every ``interval_s`` a
    reading (monotonic seconds, {name: schedstat_ns(pid)}) of each process's threads, for the stretch per
    time window (`window_stretches`) and each process's CPU per window, not one mean per run."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self.pids, self.interval_s = dict(pids), interval_s
        self.samples: list[tuple[float, dict[str, dict[int, tuple[int, int]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sched-sampler", daemon=True)

    def _read(self) -> None:
        self.samples.append((time.monotonic(), {k: schedstat_ns(p) for k, p in self.pids.items()}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> SchedSampler:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def window_stretches(
    samples: list[tuple[float, dict[str, dict[int, tuple[int, int]]]]], name: str, min_run_s: float = 0.0
) -> list[tuple[float, float, float]]:
    """Per window between samples: (start, seconds from the first sample; `name`'s stretch over the window,
    as `stretch`: its busiest thread's (run + wait) / run; the CPU of all its threads, in cores). A window
    in which that thread ran less than `min_run_s` is merged into the next (a thread that barely ran has a
    wake-up wait over its run time, not a slowed step); a trailing short window into the one before."""

    def busiest(i: int, j: int) -> float:
        a, b = samples[i][1][name], samples[j][1][name]
        return busiest_run_s(a, b)

    cuts = [0]  # sample indices where windows start (and the last where the last ends)
    for j in range(1, len(samples)):
        if busiest(cuts[-1], j) >= min_run_s:
            cuts.append(j)
    if len(samples) > 1 and cuts[-1] != len(samples) - 1:  # a trailing short window
        if len(cuts) > 1:
            cuts[-1] = len(samples) - 1
        else:
            cuts.append(len(samples) - 1)
    out = []
    t0 = samples[0][0] if samples else 0.0
    for i, j in zip(cuts, cuts[1:], strict=False):
        (ta, a), (tb, b) = samples[i], samples[j]
        run = sum(r1 - a[name].get(tid, (0, 0))[0] for tid, (r1, _) in b[name].items())
        out.append((ta - t0, stretch(a[name], b[name]), run / 1e9 / max(tb - ta, 1e-9)))
    return out
