"""Makes the synthetic-data helper of the inference tests importable as ``synth``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
