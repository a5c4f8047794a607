"""DistServe's published latency profiles (`profiler-*.json`) as a planner Profile.

Source: github.com/LLMServe/DistServe, simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json
(A100-SXM 80GB), read by simdistserve/estimators/time_estimator.py. Format: model name -> TP (a string) ->
  "prefill": [a, b, c]            ms = a + b * sum(l) + c * sum(l^2)      (l = prompt lengths of the batch)
  "decoding_smallbs": [a, b, c]   ms = a + b * sum(ctx + 1) + c * batch   (batch < threshold)
  "decoding_largebs": [a, b, c]   the same form, batch >= threshold
  "decoding_large_small_bs_threshold": the batch size at which the large-batch coefficients take over.
Note the decode order: b multiplies the summed context, c the batch size.

Conversion: ms -> s (x 1e-3); the decode "+1" per sequence (the token being generated) is folded into c
(c += b); DistServe's simulator adds a framework ("Ray") overhead of 2 ms + 1e-4 ms per context token to
every prefill and decode step (worker.add_ray_overhead) - folded into a and b so that our simulator charges
the same. Pipeline parallelism: the same rule as their simulator (stage = t / pp, plus pp ms per prefill
stage). The shipped copy is coordinator/planner/data/profiler-a100-80g.distserve.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency, Profile

MS = 1e-3
RAY_OVERHEAD_MS = 2.0  # per step, DistServe simdistserve worker.add_ray_overhead
RAY_OVERHEAD_MS_PER_TOKEN = 1e-4

SHIPPED = Path(__file__).parent / "data" / "profiler-a100-80g.distserve.json"


def is_distserve(data: dict[str, Any]) -> bool:
    """A DistServe file maps model -> TP -> {prefill, decoding_smallbs, ...}."""
    try:
        entry = next(iter(next(iter(data.values())).values()))
    except (StopIteration, AttributeError):
        return False
    return isinstance(entry, dict) and "decoding_smallbs" in entry


def profile_from_distserve(data: dict[str, Any], key: str, device: str = "a100-80g") -> Profile:
    """The Profile of model `key` (e.g. "facebook/opt-13b") in a DistServe profile file's JSON."""
    if key not in data:
        raise KeyError(f"DistServe profile has no model {key!r} (has {sorted(data)})")
    layouts = []
    for tp, e in sorted(data[key].items(), key=lambda kv: int(kv[0])):
        pa, pb, pc = e["prefill"]
        prefill = Coeffs(
            (pa + RAY_OVERHEAD_MS) * MS,
            (pb + RAY_OVERHEAD_MS_PER_TOKEN) * MS,  # their overhead counts context tokens (= prompt here)
            pc * MS,
        )

        def dec(c: list[float]) -> Coeffs:
            a, b, cb = c
            return Coeffs((a + RAY_OVERHEAD_MS) * MS, (b + RAY_OVERHEAD_MS_PER_TOKEN) * MS, (cb + b) * MS)

        layouts.append(
            LayoutLatency(
                Layout(int(tp), 1),
                prefill,
                dec(e["decoding_smallbs"]),
                dec(e["decoding_largebs"]),
                int(e["decoding_large_small_bs_threshold"]),
                pp_hop_s=1.0 * MS,
            )
        )
    return Profile(device, key, tuple(layouts), source="distserve")
