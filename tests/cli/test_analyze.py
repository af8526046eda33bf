"""``cryofield analyze`` end to end on a fake run (see tests/analysis/fakerun.py)."""

from __future__ import annotations

import pytest

from cryofield.cli.main import main


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


def test_analyze_twice_at_once_is_refused(hom_run, capsys) -> None:
    import json
    import os
    import platform

    lock = hom_run.outdir / ".analyze.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": platform.node(),
                                "started": "2024-05-01T10:00:00"}))  # fmt: skip
    try:
        assert main(["analyze", str(hom_run.outdir), "--no-volumes"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getppid()}" in err[0] and "in use" in err[0]
    finally:
        lock.unlink()
    # a training run's lock does not stop analyze (intermediate epochs may be analysed)
    (hom_run.outdir / ".lock").write_text(lock.name)
    try:
        assert main(["analyze", str(hom_run.outdir), "--no-volumes"]) == 0
    finally:
        (hom_run.outdir / ".lock").unlink()
    assert not lock.exists()
