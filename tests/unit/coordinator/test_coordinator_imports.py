"""The coordinator never loads torch: it starts in a fraction of a second and its image needs no weights."""

from __future__ import annotations

import subprocess
import sys


def test_coordinator_process_imports_no_torch() -> None:
    code = (
        "import sys, coordinator.server; heavy = {'torch', 'numpy'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
