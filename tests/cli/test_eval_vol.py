"""``cryofield eval-vol``: maps at latent points with the right pixel size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.mrc import read_mrc
from cryofield.physics.handedness import flip_hand_volume


def _fakerun():
    path = Path(__file__).resolve().parents[1] / "analysis" / "fakerun.py"
    spec = importlib.util.spec_from_file_location("cryofield_test_fakerun", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    mk = _fakerun().make_fake_run
    folder = tmp_path_factory.mktemp("cli_evol")
    return mk(folder / "het", zdim=2), mk(folder / "hom", zdim=0)


def test_eval_vol_z_and_zfile(runs, tmp_path) -> None:
    het, _ = runs
    field = RunDir(het.outdir).load_field()
    assert (
        main(["eval-vol", str(het.outdir), "--z", "0.5", "-1", "2", "0", "-o", str(tmp_path / "a")])
        == 0
    )
    vol, info = read_mrc(tmp_path / "a" / "vol_001.mrc")
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
                str(het.outdir),
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


def test_eval_vol_homogeneous_lowpass(runs, tmp_path) -> None:
    _, hom = runs
    assert main(["eval-vol", str(hom.outdir), "--lowpass", "12", "-o", str(tmp_path)]) == 0
    vol, info = read_mrc(tmp_path / "vol_000.mrc")
    assert vol.shape == (16, 16, 16) and info.apix_A == pytest.approx(3.0)
    F = np.abs(np.fft.fftshift(np.fft.fftn(vol)))
    c = np.arange(16) - 8
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    assert F[r > 5.5].max() < 1e-4 * F.max()  # 16 * 3 / 12 = shell 4, edge to 5


def test_eval_vol_errors(runs, tmp_path, capsys) -> None:
    het, hom = runs
    assert main(["eval-vol", str(het.outdir), "--z", "1", "2", "3"]) == 2
    assert "zdim=2" in capsys.readouterr().err
    bad = tmp_path / "z.txt"
    bad.write_text("1 2\n3\n")
    assert main(["eval-vol", str(het.outdir), "--zfile", str(bad)]) == 2
    assert "row 2" in capsys.readouterr().err
    assert main(["eval-vol", str(het.outdir)]) == 2
    assert main(["eval-vol", str(hom.outdir), "--z", "1"]) == 2
