"""``cryofield analyze`` end to end on a fake run (see tests/analysis/fakerun.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cryofield.cli.main import main


def _fakerun():
    path = Path(__file__).resolve().parents[1] / "analysis" / "fakerun.py"
    spec = importlib.util.spec_from_file_location("cryofield_test_fakerun", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hom_run(tmp_path_factory):
    return _fakerun().make_fake_run(tmp_path_factory.mktemp("cli_an"), zdim=0)


def test_analyze_homogeneous(hom_run, capsys) -> None:
    assert main(["analyze", str(hom_run.outdir)]) == 0
    page = hom_run.outdir / "analyze.2" / "report.html"
    assert str(page) in capsys.readouterr().out
    for name in ("fsc_halfmaps.png", "poses.png", "training.png", "final_map.mrc"):
        assert (page.parent / name).stat().st_size > 1000
    assert "report:" in (hom_run.outdir / "run.log").read_text()


def test_analyze_errors(hom_run, tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", str(hom_run.outdir), "--epoch", "7"]) == 2
    assert "epoch 7" in capsys.readouterr().err
    assert main(["analyze", str(hom_run.outdir), "--ksample", "0"]) == 2


def test_analyze_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "cryofield analyze out/" in out and "--ksample" in out
