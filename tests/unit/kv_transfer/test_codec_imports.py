"""The serving path never loads the offline calibration: the prefill and decode services (and the KV server,
puller and codecs they hold) import neither `calibration/` nor `training/` nor `bench/`."""

from __future__ import annotations

import os
import subprocess
import sys


def test_services_import_no_calibration_training_or_bench() -> None:
    code = (
        "import sys, prefill_service.server, decode_service.server, kv_transfer.codec.cachegen; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'calibration', 'training', 'bench'}); print(bad)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    assert out.stdout.strip() == "[]", out.stdout
