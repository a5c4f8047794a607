"""The comparison's JSON per workload (goodput per device, ratios to the best colocated system, their spread
over seeds), its human summary and its plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.compare.slos import Plan
from bench.compare.systems import DISAGG, DISAGG_COND
from bench.goodput import goodput_per_device
from bench.metrics import SLO, RequestMetrics
from bench.probe import TARGET
from bench.report import plot_attainment_vs_rate, plot_goodput_bars, plot_latency_cdfs


def plot_all(
    result: dict[str, Any], metrics_at_fixed: dict[str, dict[str, list[RequestMetrics]]], plots_dir: str
) -> list[str | None]:
    """Per workload: attainment vs rate (headline k), TTFT/TBT CDFs at the fixed rate, goodput per device."""
    files: list[str | None] = []
    for wname, w in result["workloads"].items():
        k = "{:g}".format(w["headline_k"])
        slo = SLO(w["slos"][k]["ttft_s"], w["slos"][k]["tpot_s"])
        series = {
            name: [(run["rate"], run["attainment_by_k"][k]) for run in s["runs"]]
            for name, s in w["systems"].items()
        }
        files.append(
            plot_attainment_vs_rate(series, Path(plots_dir) / f"serving_{wname}_attainment.png", TARGET)
        )
        files.append(
            plot_latency_cdfs(metrics_at_fixed[wname], Path(plots_dir) / f"serving_{wname}_cdfs.png", slo)
        )
        files.append(
            plot_goodput_bars(w["goodput_per_device"], Path(plots_dir) / f"serving_{wname}_goodput.png")
        )
    return files


def slos_json(slos: dict[float, SLO]) -> dict[str, dict[str, float]]:
    return {f"{k:g}": {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for k, s in slos.items()}


def spread(values: list[float | None]) -> dict[str, Any]:
    """min, median, max of the defined values (a ratio is undefined when every colocated goodput is 0),
    and how many of them there were."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"min": None, "median": None, "max": None, "n": 0, "undefined": len(values)}
    return {
        "min": xs[0],
        "median": statistics.median(xs),
        "max": xs[-1],
        "n": len(xs),
        "undefined": len(values) - len(xs),
    }


def vs_best_colocated(
    per_device: dict[str, float], sysres: dict[str, dict[str, Any]], system: str = DISAGG
) -> tuple[str | None, float | None, float | None]:
    """(best colocated system, `system`'s goodput / its goodput, lower bound of that ratio when every
    colocated goodput is 0, i.e. below its lowest probed rate)."""
    colocated = {n: v for n, v in per_device.items() if n.startswith("colocated")}
    best = max(colocated, key=lambda n: colocated[n]) if colocated else None
    ratio = lower_bound = None
    if best is not None and system in per_device:
        if colocated[best] > 0:
            ratio = per_device[system] / colocated[best]
        elif per_device[system] > 0:
            floor = max(min(r["rate"] for r in sysres[n]["runs"]) / sysres[n]["devices"] for n in colocated)
            lower_bound = per_device[system] / floor
    return best, ratio, lower_bound


def workload_result(plan: Plan, sysres: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one workload: goodput per device at the headline k and at every k, the ratio of the
    disaggregated system to the best colocated one (pooled over the seeds, and per seed with its spread),
    the tightest k at the fixed rate, every run."""
    headline = f"{plan.spec.headline_k:g}"
    by_k = {
        k: {n: goodput_per_device(s["goodput"][k]["rate"], s["devices"]) for n, s in sysres.items()}
        for k in (f"{k:g}" for k in plan.slos)
    }
    per_device = by_k[headline]
    best, ratio, lower_bound = vs_best_colocated(per_device, sysres)
    cond_ratio = vs_best_colocated(per_device, sysres, DISAGG_COND)[1] if DISAGG_COND in per_device else None
    # the same at the headline k, each seed's requests alone (the runs are shared: one search, pooled)
    by_seed = {
        str(seed): {
            n: goodput_per_device(s["goodput"][headline]["by_seed"][str(seed)], s["devices"])
            for n, s in sysres.items()
        }
        for seed in plan.seeds
    }
    ratio_by_seed = {seed: vs_best_colocated(g, sysres)[1] for seed, g in by_seed.items()}
    cond_by_seed = {
        seed: vs_best_colocated(g, sysres, DISAGG_COND)[1] if DISAGG_COND in g else None
        for seed, g in by_seed.items()
    }
    ideal_pool = sysres[DISAGG].get("ideal_prefill_pool") if DISAGG in sysres else None
    ideal_rate = ideal_pool["goodput_by_k"][headline] if ideal_pool else None
    disagg_rate = sysres[DISAGG]["goodput"][headline]["rate"] if DISAGG in sysres else None
    share_of_ideal = disagg_rate / ideal_rate if ideal_rate else None
    ideal_median = ideal_pool["goodput_by_k_at_median"][headline] if ideal_pool else None
    split = sysres[DISAGG].get("ideal_split") if DISAGG in sysres else None
    split_rate = split["goodput_by_k"][headline] if split else None
    at_end = sysres[DISAGG].get("ideal_at_end") if DISAGG in sysres else None

    def share_at_end(ideal: str, key: str = "goodput_by_k") -> float | None:
        bound = at_end[ideal] if at_end else None
        rate = bound[key][headline] if bound else None
        return disagg_rate / rate if disagg_rate is not None and rate else None

    symmetric = None
    if plan.symmetric_slos:  # k x both isolated latencies: its own search in full mode, every k on all runs
        sym_by_k = {
            k: {n: goodput_per_device(s["goodput_symmetric"][k], s["devices"]) for n, s in sysres.items()}
            for k in (f"{k:g}" for k in plan.symmetric_slos)
        }
        sym_best, sym_ratio, sym_bound = vs_best_colocated(sym_by_k[headline], sysres)
        symmetric = {
            "slos": slos_json(plan.symmetric_slos),
            "goodput_per_device_by_k": sym_by_k,
            "best_colocated": sym_best,
            "goodput_ratio_vs_best_colocated": sym_ratio,
            "goodput_ratio_lower_bound": sym_bound,
        }
    return {
        "workload": plan.workload.to_dict(),
        "isolated": plan.isolated,
        "headline_k": plan.spec.headline_k,
        "ttft_tpot_ratio": plan.spec.ttft_tpot_ratio,
        "ttft_scale": plan.ttft_scale,
        "slos": slos_json(plan.slos),
        "fixed_rate": plan.start_rate,
        "request_timeout_s": plan.timeout_s,
        "goodput_per_device": per_device,
        "goodput_per_device_by_k": by_k,
        "tightest_k_at_fixed_rate": {n: s["tightest_k_at_fixed_rate"] for n, s in sysres.items()},
        "best_colocated": best,
        "goodput_ratio_vs_best_colocated": ratio,
        "goodput_ratio_lower_bound": lower_bound,  # set when every colocated goodput is below its lowest probe
        "goodput_per_device_by_seed": by_seed,
        "goodput_ratio_by_seed": ratio_by_seed,
        "goodput_ratio_spread": spread(list(ratio_by_seed.values())),
        "conditional_goodput_ratio_by_seed": cond_by_seed,
        # per system: the relative width of the bracket the headline goodput was fitted in (None: open)
        "bracket_rel_width": {n: s["goodput"][headline]["bracket"]["rel_width"] for n, s in sysres.items()},
        # the same ratio for the conditional-disaggregation system (the pure split's is the one above)
        "conditional_goodput_ratio_vs_best_colocated": cond_ratio,
        # the ideal prefill pool's goodput per device (TTFT only, bench.ideal) on the schedules the
        # disaggregated system's runs send, and the pure split's goodput over it
        "disagg_share_of_ideal_prefill_pool": share_of_ideal,
        "disagg_ideal_prefill_goodput_per_device": (
            goodput_per_device(ideal_rate, sysres[DISAGG]["devices"]) if ideal_rate is not None else None
        ),
        # the same pool priced at the isolated median prefill (the SLOs' reference), and the pure split over it
        "disagg_share_of_ideal_prefill_pool_at_median": disagg_rate / ideal_median if ideal_median else None,
        # the ideal split (bench.ideal.IdealSplit: the prefill pool and the decode instance at the isolated
        # medians, both SLOs), its goodput per device and the pure split's over it: the bound of a workload
        # whose decode side is the bottleneck
        "disagg_ideal_split_goodput_per_device": (
            goodput_per_device(split_rate, sysres[DISAGG]["devices"]) if split_rate is not None else None
        ),
        "disagg_share_of_ideal_split": disagg_rate / split_rate if split_rate else None,
        # the same shares with each ideal priced at the isolated latencies measured again after the runs (full
        # mode): how much the host's drift during the run moves them (None: not measured)
        "disagg_share_of_ideal_at_end": {
            "prefill_pool": share_at_end("ideal_prefill_pool"),
            "prefill_pool_at_median": share_at_end("ideal_prefill_pool", "goodput_by_k_at_median"),
            "split": share_at_end("ideal_split"),
        }
        if at_end
        else None,
        "symmetric_slos": symmetric,
        "systems": sysres,
    }


def human_summary(result: dict[str, Any]) -> str:
    lines = [f"bench compare ({result['mode']}) in {result['elapsed_s']:.0f}s"]
    for wname, w in result["workloads"].items():
        iso = w["isolated"]
        k = "{:g}".format(w["headline_k"])
        slo = w["slos"][k]
        lines.append(
            f"{wname}: k={k} -> TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.1f} ms "
            f"(TTFT scale {w['ttft_scale']:.2f}; isolated prefill {iso['slo_prefill_s'] * 1e3:.1f} ms, "
            f"decode step {iso['slo_decode_step_s'] * 1e3:.2f} ms, medians)"
        )
        for name, g in sorted(w["goodput_per_device"].items(), key=lambda kv: -kv[1]):
            tk = w["tightest_k_at_fixed_rate"][name]
            lines.append(
                f"  {name:28s} goodput/device {g:7.3f} req/s   tightest k @ {w['fixed_rate']:.3g} req/s: "
                + (f"{tk:.2f}" if tk is not None else "none")
            )
        r, bound = w["goodput_ratio_vs_best_colocated"], w["goodput_ratio_lower_bound"]
        shown = f"{r:.2f}x" if r is not None else (f"> {bound:.2f}x" if bound is not None else "n/a")
        lines.append(f"  disaggregated / best colocated ({w['best_colocated']}): {shown}")
        sp = w.get("goodput_ratio_spread")
        if sp and sp["n"]:
            per_seed = ", ".join(
                f"{v:.2f}x" if v is not None else "n/a" for v in w["goodput_ratio_by_seed"].values()
            )
            widths = [v for v in w["bracket_rel_width"].values() if v is not None]
            lines.append(
                f"  per seed: {per_seed} (median {sp['median']:.2f}x, {sp['min']:.2f}-{sp['max']:.2f}x); "
                + (f"brackets <= {100 * max(widths):.0f} %" if widths else "brackets open")
            )
        cond = w.get("conditional_goodput_ratio_vs_best_colocated")
        if cond is not None:
            lines.append(f"  conditional disaggregation ({DISAGG_COND}) / best colocated: {cond:.2f}x")
        ideal = w.get("disagg_ideal_prefill_goodput_per_device")
        if ideal is not None:
            share = w.get("disagg_share_of_ideal_prefill_pool")
            lines.append(
                f"  ideal prefill pool on the disaggregated runs' schedules (queueing only): goodput/device "
                f"{ideal:.3f} req/s"
                + (f"; {DISAGG} at {100 * share:.0f} % of it" if share is not None else "")
                + (
                    f" ({100 * w['disagg_share_of_ideal_prefill_pool_at_median']:.0f} % priced at the median)"
                    if w.get("disagg_share_of_ideal_prefill_pool_at_median") is not None
                    else ""
                )
            )
        split = w.get("disagg_ideal_split_goodput_per_device")
        if split is not None:
            lines.append(
                f"  ideal split (prefill pool + decode at the isolated medians, both SLOs): goodput/device "
                f"{split:.3f} req/s; {DISAGG} at {100 * w['disagg_share_of_ideal_split']:.0f} % of it"
            )
        end = w.get("disagg_share_of_ideal_at_end")
        if end:
            lines.append(
                "  the same shares priced at the isolated latencies measured after the runs: "
                + ", ".join(
                    f"{name} {100 * v:.0f} %" if v is not None else f"{name} n/a" for name, v in end.items()
                )
            )
        cpus = [run["cpu"] for sres in w["systems"].values() for run in sres["runs"] if run.get("cpu")]
        if cpus:
            reruns = sum(
                len(run["discarded_disturbed_runs"]) for sres in w["systems"].values() for run in sres["runs"]
            )
            lines.append(
                f"  foreign CPU during the runs: mean <= {max(c['foreign_cores'] for c in cpus):.2f} cores, "
                f"peak second <= {max(c['foreign_peak_cores'] for c in cpus):.2f}; {reruns} disturbed run(s) redone"
            )
        sym = w.get("symmetric_slos")
        if sym:
            g = sym["goodput_per_device_by_k"][k]
            r, bound = sym["goodput_ratio_vs_best_colocated"], sym["goodput_ratio_lower_bound"]
            shown = f"{r:.2f}x" if r is not None else (f"> {bound:.2f}x" if bound is not None else "n/a")
            lines.append(
                f"  symmetric SLOs (TTFT scale 1) at k={k}: "
                + ", ".join(f"{n} {v:.3f}" for n, v in sorted(g.items(), key=lambda kv: -kv[1]))
                + f"; disaggregated / best colocated: {shown}"
            )
    return "\n".join(lines)
