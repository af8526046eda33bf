"""``cryofield evaluate``: JSON and table against exact truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryofield.cli.main import main


def test_evaluate_writes_json_and_table(het_run, tmp_path, capsys) -> None:
    out = tmp_path / "m.json"
    rc = main(
        [
            "evaluate",
            str(het_run.outdir),
            "--truth",
            str(het_run.truth_path),
            "--volume",
            str(het_run.volume_path),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["poses"]["rot_median_deg"] < 0.01
    np.testing.assert_allclose(res["poses"]["R_global"], het_run.G, atol=1e-4)
    assert res["clustering"]["ari"] == pytest.approx(1.0)
    assert len(res["maps"]) == 1 and 0 <= res["maps"][0]["fsc_auc"] <= 0.5
    table = capsys.readouterr().out
    assert "rotation error" in table and "ARI" in table and str(out) in table


def test_evaluate_default_output_and_errors(het_run, tmp_path, capsys) -> None:
    assert main(["evaluate", str(het_run.outdir), "--truth", str(tmp_path / "no.npz")]) == 2
    assert "no.npz" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, labels=np.zeros(4))
    assert main(["evaluate", str(het_run.outdir), "--truth", str(bad)]) == 2
    assert "'rotations'" in capsys.readouterr().err
