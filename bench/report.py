"""Benchmark output: the machine description, the one JSON object on stdout (or a file), and PNG plots.

Every benchmark ends with :func:`emit`, which prints exactly one JSON object (stdout, or ``--json PATH``) and a
short human summary on stderr.  Plot helpers use matplotlib's Agg backend and return None when matplotlib is
not installed; :func:`plots_status` records that in the JSON so a reader knows why no PNG exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.metrics import SLO, RequestMetrics

_REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """A benchmark that starts clusters: SIGTERM unwinds it as Ctrl-C does, so its `finally` blocks stop every
    process it started (Python's default for SIGTERM exits at once and leaves them running: a killed `bench
    planner` left its cluster and Redis behind). Main thread only (signal handlers live there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    """The first value of ``key`` in /proc/cpuinfo (None off Linux or when absent)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip().lower() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


# /proc/cpuinfo's vendor_id -> the vendor's name
_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}


def _cpu_vendor(model: str) -> str:
    """Intel, AMD, ... from /proc/cpuinfo's vendor_id, else guessed from the model name, else 'unknown'."""
    vendor_id = _cpuinfo("vendor_id")
    if vendor_id:
        return _VENDORS.get(vendor_id, vendor_id)
    for word in ("Intel", "AMD", "Apple", "Ampere", "Graviton"):
        if word.lower() in model.lower():
            return word
    return "ARM" if _cpuinfo("cpu implementer") else "unknown"


def _git(*args: str) -> str | None:
    """`git ARGS` in the repository's root: its stdout, or None when git is missing or fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def _git_dirty() -> bool | None:
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def machine_info() -> dict[str, Any]:
    """CPU model and vendor, logical cores, usable cores, torch version and device, Python version, git commit.

    The host matters to every serving figure (the same full comparison has given 1.00x on an Intel host and
    2.00x on an AMD one), so every benchmark's JSON carries it (``emit`` adds this object)."""
    model = _cpu_model()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_vendor": _cpu_vendor(model),
        "cpu_avx512": "avx512f" in (_cpuinfo("flags") or "").split(),  # x86: AVX-512 Foundation
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": None,
        "torch_threads": None,
        "device": "cpu",
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = f"cuda:{torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------------------------------
# JSON emission
# ---------------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays, tuples and paths to JSON types; NaN and inf become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def human_summary(result: Mapping[str, Any], max_lines: int = 40) -> str:
    """``key: value`` lines of the result's scalars, nested keys dotted (lists are shown by length)."""
    lines: list[str] = []

    def walk(prefix: str, v: Any) -> None:
        if len(lines) >= max_lines:
            return
        if isinstance(v, Mapping):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif isinstance(v, list):
            lines.append(f"{prefix}: [{len(v)} items]")
        elif isinstance(v, float):
            lines.append(f"{prefix}: {v:.6g}")
        else:
            lines.append(f"{prefix}: {v}")

    walk("", {k: v for k, v in result.items() if k != "machine"})
    return "\n".join(lines)


def emit(
    result: Mapping[str, Any],
    json_path: str | None = None,
    *,
    summary: str | None = None,
    add_machine: bool = True,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> dict[str, Any]:
    """Write ONE JSON object to ``json_path`` (or stdout) and a human summary to stderr; return the object.

    ``machine`` (from :func:`machine_info`) is added unless present or ``add_machine`` is False.  ``summary``
    replaces the automatic ``key: value`` summary.
    """
    out = to_jsonable(dict(result))
    if add_machine and "machine" not in out:
        out["machine"] = machine_info()
    text = json.dumps(out, indent=2, sort_keys=False, allow_nan=False)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    else:
        stream = stdout or sys.stdout
        stream.write(text + "\n")
        stream.flush()
    err = stderr or sys.stderr
    err.write((summary if summary is not None else human_summary(out)) + "\n")
    if json_path:
        err.write(f"wrote {json_path}\n")
    err.flush()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plots_status(files: Sequence[str | None] = ()) -> dict[str, Any]:
    """The ``plots`` entry of a result: whether matplotlib was available and which PNGs were written."""
    available = _pyplot() is not None
    return {
        "available": available,
        "files": [f for f in files if f],
        "reason": None if available else "matplotlib not installed; no plots written",
    }


def _save(plt: Any, fig: Any, path: str | Path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, target: float = 0.9
) -> str | None:
    """SLO attainment against request rate, one line per system (points = goodput probes or a rate sweep)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.0f}%")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_cdfs(
    samples: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, slo: float | None = None
) -> str | None:
    """Empirical CDF of one latency per system (e.g. TTFT or every TBT gap), with an optional SLO line."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in samples.items():
        x = np.sort(np.asarray(values, dtype=np.float64))
        if x.size:
            y = np.arange(0, x.size + 1) / x.size
            ax.step(np.concatenate(([x[0]], x)), y, where="post", label=name)
    if slo is not None:
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CDF")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_latency_cdfs(
    per_system: Mapping[str, Sequence[RequestMetrics]], path: str | Path, slo: SLO | None = None
) -> str | None:
    """Side-by-side CDFs of TTFT and of every TBT gap (successful requests), one line per system."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("TTFT (s)", lambda ms: [m.ttft_s for m in ms if m.ok and m.ttft_s is not None], slo and slo.ttft_s),
        ("TBT gap (s)", lambda ms: [g for m in ms if m.ok for g in m.tbt_s], slo and slo.tpot_s),
    )
    for ax, (label, pick, bound) in zip(axes, panels, strict=True):
        for name, metrics in per_system.items():
            x = np.sort(np.asarray(pick(metrics), dtype=np.float64))
            if x.size:
                y = np.arange(0, x.size + 1) / x.size
                ax.step(np.concatenate(([x[0]], x)), y, where="post", label=name)
        if bound:
            ax.axvline(bound, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def plot_goodput_bars(per_device: Mapping[str, float], path: str | Path) -> str | None:
    """Goodput per device, one bar per system."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(per_device)
    bars = ax.bar(names, [per_device[n] for n in names])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel("goodput per device (req/s)")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)
