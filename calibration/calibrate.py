"""`pdserve calibrate MODEL_DIR`: everything a model's KV codecs need, written beside the model.

1. bit plans + static tables (format v1): `cachegen_tables.safetensors`, `cachegen_plan.json` (`plan`);
2. the transform and its per-level steps (format v5): `cachegen_transform.safetensors` (`transform`), and
   the rate control's measurements of size and quality by prompt length: `cachegen_rate.json` (`rate`);
3. the codec profiles the gateway's codec choice reads (`--codec auto`): `codec_profiles.json`, measured
   with the files of steps 1-2 by the codec benchmark (`bench.codec.measure`: size, speed on this machine,
   KL) for raw, int8, fp8 and cachegen.
Calibration reads the model's `heldout.txt` (its first 4096 tokens; the benchmark scores after them);
without one, steps 1-2 use seeded random token ids and step 3 is skipped. On the shipped model steps 1-2
take about a minute on an idle 2-core machine; step 3 runs the full benchmark (minutes). Steps 1-2 are
deterministic for a given torch build and thread count (fp32 sums depend on both); step 3 measures speeds,
which differ from run to run and machine to machine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kv_transfer.choice import PROFILE_FILE, CodecProfile, load_profiles, save_profiles


def calibrate(
    model_dir: str | Path, quick: bool = False, profiles: bool = True, log: Callable[[str], None] = print
) -> list[Path]:
    """Run the three steps on `model_dir`, writing beside it. `quick`: smaller calibration sets and the quick
    benchmark (for smoke tests; not what a shipped model gets); `profiles=False` skips step 3. -> the files
    written."""
    from calibration.plan import calibrate_plan
    from calibration.rate import calibrate_rate
    from calibration.transform import calibrate_transform

    model_dir = Path(model_dir)
    written = []
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    plan_kw = {"chunks": (128, 256), "candidates": (4, 8, 16), "prompt": 256, "windows": 2} if quick else {}
    written.append(calibrate_plan(model_dir, **plan_kw))  # on one thread (plan_model sets it)
    log(f"calibrate: wrote {written[-1]} ({time.perf_counter() - t0:.0f} s)")
    # the transform on the process's threads: fp32 sums depend on the thread count, and the shipped files were
    # made this way (the plan on one thread, the transform on all of a 2-vCPU machine's)
    torch.set_num_threads(threads)
    transform_kw = {"calib_tokens": 1024, "window": 512} if quick else {}
    written.append(calibrate_transform(model_dir, **transform_kw, log=log))
    log(f"calibrate: wrote {written[-1]} ({time.perf_counter() - t0:.0f} s)")
    torch.set_num_threads(1)
    rate_file = calibrate_rate(model_dir, quick, log=log)
    torch.set_num_threads(threads)
    if rate_file is not None:
        written.append(rate_file)
        log(f"calibrate: wrote {rate_file} ({time.perf_counter() - t0:.0f} s)")
    if not profiles:
        return written
    if not (model_dir / "heldout.txt").exists():
        log(f"calibrate: no heldout.txt in {model_dir}: {PROFILE_FILE} not written (the gateway uses raw)")
        return written
    written.append(measure_profiles(model_dir, quick))
    log(f"calibrate: wrote {written[-1]} ({time.perf_counter() - t0:.0f} s)")
    return written


def measure_profiles(model_dir: Path, quick: bool = False) -> Path:
    """Measure the serving codecs on the model with its calibration files and save their profiles. The per-layer
    costs around the codec (`encode_layer_s` / `decode_layer_s`, measured on a hand-off by
    `python -m bench.handoff_timeline --write-profile`) are kept from the file being replaced."""
    from bench.codec import Settings, measure

    result, _ = measure(str(model_dir), Settings.make(quick))
    old = {p.name: p for p in load_profiles(model_dir)}
    profiles = [
        dataclasses.replace(p, encode_layer_s=o.encode_layer_s, decode_layer_s=o.decode_layer_s)
        if (o := old.get(p.name)) is not None
        else p
        for p in profiles_from_result(result)
    ]
    return save_profiles(model_dir, profiles)


def profiles_from_result(result: dict[str, Any]) -> list[CodecProfile]:
    """The profiles `--codec auto` reads, from a `bench.codec` result (its JSON): each name's ratio and
    speeds in the serving dtype, measured on the codec a decode instance pulls under that name."""
    serving = result["settings"]["profiles_serving_dtype"]
    return [
        CodecProfile(
            name,
            serving[src]["ratio"],
            serving[src]["encode_mb_s"] * 1e6,
            serving[src]["decode_mb_s"] * 1e6,
            result["codecs"][src]["kl_mean"],
        )
        for name, src in result["settings"]["profile_sources"].items()
    ]
