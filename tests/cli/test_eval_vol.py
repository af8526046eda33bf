"""``cryofield eval-vol``: maps at latent points with the right pixel size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.mrc import read_mrc
from cryofield.physics.handedness import flip_hand_volume


def test_eval_vol_z_and_zfile(het_run, tmp_path) -> None:
    field = RunDir(het_run.outdir).load_field()
    out_a = tmp_path / "a"
    argv = ["eval-vol", str(het_run.outdir), "--z", "0.5", "-1", "2", "0", "-o", str(out_a)]
    assert main(argv) == 0
    vol, info = read_mrc(out_a / "vol_001.mrc")
    assert info.apix_A == pytest.approx(3.0)
    np.testing.assert_allclose(
        vol, field.render_volume(torch.tensor([2.0, 0.0])).numpy(), atol=1e-5
    )
    zfile = tmp_path / "z.txt"
    zfile.write_text("# two points\n0.5 -1\n2, 0\n")
    assert (
        main(
            [
                "eval-vol",
                str(het_run.outdir),
                "--zfile",
                str(zfile),
                "--flip-hand",
                "-o",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    flipped, _ = read_mrc(tmp_path / "b" / "vol_001.mrc")
    np.testing.assert_allclose(flipped, flip_hand_volume(np.asarray(vol)), atol=1e-5)


def test_eval_vol_homogeneous_lowpass(hom_run, tmp_path) -> None:
    assert main(["eval-vol", str(hom_run.outdir), "--lowpass", "12", "-o", str(tmp_path)]) == 0
    vol, info = read_mrc(tmp_path / "vol_000.mrc")
    assert vol.shape == (16, 16, 16) and info.apix_A == pytest.approx(3.0)
    F = np.abs(np.fft.fftshift(np.fft.fftn(vol)))
    c = np.arange(16) - 8
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    assert F[r > 5.5].max() < 1e-4 * F.max()  # 16 * 3 / 12 = shell 4, edge to 5


def test_eval_vol_errors(het_run, hom_run, tmp_path, capsys) -> None:
    assert main(["eval-vol", str(het_run.outdir), "--z", "1", "2", "3"]) == 2
    assert "zdim=2" in capsys.readouterr().err
    bad = tmp_path / "z.txt"
    bad.write_text("1 2\n3\n")
    assert main(["eval-vol", str(het_run.outdir), "--zfile", str(bad)]) == 2
    assert "row 2" in capsys.readouterr().err
    assert main(["eval-vol", str(het_run.outdir)]) == 2
    assert main(["eval-vol", str(hom_run.outdir), "--z", "1"]) == 2


def test_eval_vol_never_writes_its_zfile(het_run, tmp_path, capsys) -> None:
    zfile = tmp_path / "vol_z.txt"  # the name eval-vol gives its own list of points
    zfile.write_text("0.5 -1\n")
    argv = ["eval-vol", str(het_run.outdir), "--zfile", str(zfile), "-o", str(tmp_path)]
    assert main(argv) == 2
    assert f"refusing to write {zfile}: it is an input" in capsys.readouterr().err
    assert zfile.read_text() == "0.5 -1\n" and not (tmp_path / "vol_000.mrc").exists()
