"""The report as a person sees it: a headless-browser screenshot opens with the verdict.

Skipped where no Chromium is installed (``apt-get install chromium``); the command is
``benchmarks/screenshot_report.sh``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fakerun import FakeRun

from cryofield.analysis.report import analyze_run

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "screenshot_report.sh"
BANNER_RGB = {"ok": (0xE6, 0xF4, 0xEA), "bad": (0xFC, 0xE8, 0xE6)}  # report.py's CSS

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium")


@pytest.mark.parametrize("converged", [True, False])
def test_screenshot_opens_with_the_verdict_colour(fake_hom_run: FakeRun, tmp_path, converged):
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(fake_hom_run.outdir, run, ignore=shutil.ignore_patterns("analyze.*"))
    verdict = {"converged": converged, "headline": "x", "reasons": [] if converged else ["y"],
               "advice": "" if converged else "z", "checks": []}  # fmt: skip
    (run / "verdict.json").write_text(json.dumps(verdict))
    report = analyze_run(run)
    shot = tmp_path / "shot.png"
    subprocess.run(["bash", str(SCRIPT), str(report), str(shot), "1000x700"], check=True,
                   timeout=120)  # fmt: skip
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    top = img[: img.shape[0] // 3]  # the banner sits at the top of the page
    want = np.array(BANNER_RGB["ok" if converged else "bad"])
    other = np.array(BANNER_RGB["bad" if converged else "ok"])
    near = lambda c: (np.abs(top - c).sum(-1) <= 6).mean()  # noqa: E731
    assert near(want) > 0.02 and near(other) < 0.001
    # figures are shown (some non-white, non-banner pixels below the banner)
    assert (np.abs(img - 255).sum(-1) > 60).mean() > 0.01
