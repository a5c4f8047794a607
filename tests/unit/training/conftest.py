import sys
from pathlib import Path

# `training/` is a top-level directory of the repository, not an installed package.
ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
