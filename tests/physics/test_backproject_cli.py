"""``cryofield backproject`` end to end: RELION star written here, and the interop toy set."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryofield.cli.main import main
from cryofield.io.mrc import write_mrc
from cryofield.physics import fourier as fo
from cryofield.physics import lattice
from cryofield.physics import rotation as rot
from cryofield.physics import shift as sh
from cryofield.physics import slicing as sl
from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fsc import fsc

D = 32
APIX_A = 3.0


def _relion_dataset(tmp_path: Path, vol: torch.Tensor, n: int = 600) -> Path:
    """A RELION 3.1 star + stack of noiseless light-on-dark images of ``vol``.

    Images follow RELION: ``I = CTF_RELION * P`` shifted by ``t`` with
    ``CTF_RELION = -CTF_ours`` and ``rlnOriginXAngst = -t * apix``.
    """
    g = torch.Generator().manual_seed(5)
    R = rot.random_rotations(n, g, dtype=torch.float64)
    euler_deg = np.rad2deg(rot.matrix_to_euler_relion(R).numpy())
    P = 2 * D
    vol_ft = fo.fft3_centered(torch.nn.functional.pad(vol.double(), [(P - D) // 2] * 6))
    freqs = lattice.freq_grid_2d(D, dtype=torch.float64)
    proj_ft = sl.extract_slices(vol_ft, R, freqs.reshape(-1, 2)).reshape(n, D, D)
    dfu = 8000 + 12000 * torch.rand(n, generator=g, dtype=torch.float64)
    ang = 180 * torch.rand(n, generator=g, dtype=torch.float64)
    params = CTFParams.from_arrays(
        defocus_u_A=dfu.numpy(), defocus_v_A=(dfu - 500).numpy(), astig_angle_deg=ang.numpy(),
        voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1, dtype=torch.float64,
    )  # fmt: skip
    ctf = compute_ctf(freqs, APIX_A, params)
    t = 2.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    images = fo.ifft2_centered(sh.phase_shift_fourier(-ctf * proj_ft, t)).real
    write_mrc(tmp_path / "stack.mrcs", images.float().numpy(), APIX_A)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnAngleRot": euler_deg[:, 0], "rlnAngleTilt": euler_deg[:, 1],
        "rlnAnglePsi": euler_deg[:, 2],
        "rlnOriginXAngst": -t[:, 0].numpy() * APIX_A,
        "rlnOriginYAngst": -t[:, 1].numpy() * APIX_A,
        "rlnDefocusU": dfu.numpy(), "rlnDefocusV": (dfu - 500).numpy(),
        "rlnDefocusAngle": ang.numpy(), "rlnOpticsGroup": np.ones(n, dtype=int),
    })  # fmt: skip
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [APIX_A], "rlnImageSize": [D],
        "rlnImageDimensionality": [2],
    })  # fmt: skip
    star = tmp_path / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, star)
    return star


def test_relion_star_reconstructs_positive_sharp_map(tmp_path: Path, blobs32, capsys) -> None:
    star = _relion_dataset(tmp_path, blobs32)
    out = tmp_path / "map.mrc"
    assert main(["backproject", str(star), "-o", str(out), "--half-maps", "--pad", "1"]) == 0
    text = capsys.readouterr().out
    assert "contrast: light-on-dark -> images inverted" in text
    with mrcfile.open(out) as m:
        vol = torch.from_numpy(m.data.copy())
        assert float(m.voxel_size.x) == pytest.approx(APIX_A)
    curve = fsc(vol, blobs32)
    assert curve[1 : D // 2].min() > 0.9, curve
    # Positive density, right scale: poses, origins, CTF sign and contrast all agree.
    dot = float((vol * blobs32).sum() / (blobs32 * blobs32).sum())
    assert 0.8 < dot < 1.15, dot
    for half in ("map_half1.mrc", "map_half2.mrc"):
        assert (tmp_path / half).is_file()
    assert "half-map FSC = 0.143" in text
    # -D crops the images (and scales the shifts): still a faithful map at 2x pixel size.
    out16 = tmp_path / "map16.mrc"
    assert main(["backproject", str(star), "-o", str(out16), "-D", "16", "--pad", "1"]) == 0
    with mrcfile.open(out16) as m:
        v16 = torch.from_numpy(m.data.copy())
        assert float(m.voxel_size.x) == pytest.approx(2 * APIX_A)
    from cryofield.physics.filters import fourier_crop_3d

    assert fsc(v16, fourier_crop_3d(blobs32, 16))[1:7].min() > 0.9


def test_missing_poses_and_bad_output_are_one_line_errors(tmp_path: Path, capsys) -> None:
    write_mrc(tmp_path / "s.mrcs", np.zeros((3, 8, 8), dtype=np.float32), 1.0)
    assert main(["backproject", str(tmp_path / "s.mrcs"), "-o", str(tmp_path / "m.mrc")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no poses" in err and "s.mrcs" in err and len(err.splitlines()) == 1
    assert main(["backproject", str(tmp_path / "s.mrcs"), "-o", str(tmp_path / "m.txt")]) == 2
    assert "must end in .mrc" in capsys.readouterr().err
    bad = tmp_path / "poses.npz"
    np.savez(bad, rotations=np.zeros((5, 3, 3)))
    args = ["backproject", str(tmp_path / "s.mrcs"), "--poses", str(bad), "-o", "x.mrc"]
    assert main(args) == 2
    assert "mismatched particle counts" in capsys.readouterr().err


def _half_map_fsc(star: Path, poses: Path, out: Path) -> torch.Tensor:
    assert main(["backproject", str(star), "--poses", str(poses), "-o", str(out),
                 "--half-maps", "--pad", "1"]) == 0  # fmt: skip
    h1 = torch.from_numpy(mrcfile.read(out.with_name(out.stem + "_half1.mrc")).copy())
    h2 = torch.from_numpy(mrcfile.read(out.with_name(out.stem + "_half2.mrc")).copy())
    return fsc(h1, h2)


def test_interop_toy_projections_give_a_sharp_map(interop_data: Path, tmp_path: Path) -> None:
    star = interop_data / "toy_projections.star"
    pkl = interop_data / "toy_angles.pkl"
    curve = _half_map_fsc(star, pkl, tmp_path / "toy.mrc")
    # Box 30: shells 1..14. Noiseless data with the file's poses: half maps agree.
    assert curve[1:11].min() > 0.8, curve
    vol = mrcfile.read(tmp_path / "toy.mrc")
    assert vol.max() > 5 * abs(vol.min())  # positive density after the contrast decision
    # The transposed poses (wrong convention) give inconsistent half maps.
    from cryofield.io.legacy import load_pickle

    R = np.asarray(load_pickle(pkl))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, rotations=R.transpose(0, 2, 1))
    bad = _half_map_fsc(star, wrong, tmp_path / "wrong.mrc")
    assert float(bad[4:11].mean()) < float(curve[4:11].mean()) - 0.2, (bad, curve)


def test_contrast_takes_the_vocabulary_of_train(tmp_path: Path, blobs32) -> None:
    """--contrast light-on-dark / dark-on-light name the images as in 'cryofield train' and
    the one rule decides: with a CTF, light-on-dark is inverted (the same map as 'invert'),
    dark-on-light is not (the negative map here, as 'as-is')."""
    star = _relion_dataset(tmp_path, blobs32)
    maps = {}
    for c in ("light-on-dark", "invert", "dark-on-light", "as-is"):
        out = tmp_path / f"{c}.mrc"
        assert main(["backproject", str(star), "-o", str(out), "--pad", "1", "--contrast", c]) == 0
        with mrcfile.open(out) as m:
            maps[c] = torch.from_numpy(m.data.copy())
    assert torch.equal(maps["light-on-dark"], maps["invert"])
    assert torch.equal(maps["dark-on-light"], maps["as-is"])
    assert (
        float((maps["light-on-dark"] * blobs32).sum()) > 0 > float((maps["as-is"] * blobs32).sum())
    )


def test_symmetry_inserts_every_image_at_its_equivalent_poses(tmp_path: Path, blobs32, capsys):
    """--symmetry C4 on a C4-symmetric map from few images: 4x the insertions, a better
    map than without; an unknown group is a one-line error naming the accepted forms."""
    from cryofield.physics.symmetry import symmetrize_volume, symmetry_operators

    vol = symmetrize_volume(blobs32, symmetry_operators("C4"))
    star = _relion_dataset(tmp_path, vol, n=60)
    maps = {}
    for sym in ("C1", "c4"):
        out = tmp_path / f"{sym}.mrc"
        args = ["backproject", str(star), "-o", str(out), "--pad", "1", "--symmetry", sym]
        assert main(args) == 0
        maps[sym] = torch.from_numpy(mrcfile.read(out).copy())
    assert "symmetry C4" in capsys.readouterr().out
    c1, c4 = fsc(maps["C1"], vol)[1 : D // 2], fsc(maps["c4"], vol)[1 : D // 2]
    assert float(c4.mean()) > float(c1.mean()) + 0.03, (c1, c4)
    assert float(c4.min()) > 0.85, c4
    assert main(["backproject", str(star), "-o", str(tmp_path / "x.mrc"), "--symmetry", "C4v"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--symmetry" in err and "C<n>" in err and len(err.splitlines()) == 1
