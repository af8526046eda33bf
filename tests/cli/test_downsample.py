"""`cryofield downsample`: chunked Fourier crop, new pixel size, star file linked to originals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import starfile
import torch

from cryofield.cli.main import main
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.io.particles import ParticleSource
from cryofield.io.star import original_table
from cryofield.physics.filters import fourier_crop


def test_downsample_star(interop_data, tmp_path, capsys):
    out = tmp_path / "d64.mrcs"
    src = interop_data / "empiar_10076_7.star"
    assert main(["downsample", str(src), "-D", "64", "-o", str(out), "--chunk", "3"]) == 0
    arr, info = read_mrc(out)
    assert info.shape == (7, 64, 64) and info.is_stack
    apix0 = 5 * 1e4 / 38168
    np.testing.assert_allclose(info.apix_A, apix0 * 5, rtol=1e-6)
    orig, _ = read_mrc(interop_data / "empiar_10076_7.mrc", mmap=False)
    ref = fourier_crop(torch.from_numpy(orig), 64).numpy()
    np.testing.assert_allclose(np.asarray(arr), ref, atol=1e-5)
    # mean pixel value kept per image
    np.testing.assert_allclose(np.asarray(arr).mean((1, 2)), orig.mean((1, 2)), atol=1e-5)

    star = load_particle_table(tmp_path / "d64.star")
    full = load_particle_table(src)
    assert star.box_px == 64 and len(star) == 7
    np.testing.assert_allclose(star.apix_A, apix0 * 5, rtol=1e-9)
    for k in full.ctf:
        np.testing.assert_array_equal(star.ctf[k], full.ctf[k])
    assert set(star.image_paths) == {str(out)}
    np.testing.assert_array_equal(ParticleSource(star)[np.arange(7)].numpy(), np.asarray(arr))
    # chunk size does not change the result
    out2 = tmp_path / "e64.mrcs"
    assert main(["downsample", str(src), "-D", "64", "-o", str(out2), "--chunk", "1000"]) == 0
    np.testing.assert_array_equal(np.asarray(read_mrc(out2)[0]), np.asarray(arr))


def test_downsample_rescales_px_origins_and_keeps_poses(tmp_path):
    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "s.mrcs", rng.standard_normal((3, 32, 32)).astype(np.float32), 1.5)
    rows = "".join(
        f"{i + 1}@s.mrcs 10000 9000 5 300 2.7 0.1 {r:.3f} {t:.3f} {p:.3f} {ox} {oy}\n"
        for i, (r, t, p, ox, oy) in enumerate([(10, 20, 30, 2.0, -4.0), (40, 50, 60, 1.0, 0.5),
                                                (-70, 80, 90, 0.0, 6.0)])
    )  # fmt: skip
    (tmp_path / "p.star").write_text(
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnVoltage\n"
        "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnAngleRot\n_rlnAngleTilt\n"
        "_rlnAnglePsi\n_rlnOriginX\n_rlnOriginY\n" + rows
    )
    assert main(["downsample", str(tmp_path / "p.star"), "-D", "16",
                 "-o", str(tmp_path / "out" / "s16.mrcs")]) == 0  # fmt: skip
    a = load_particle_table(tmp_path / "p.star")
    b = load_particle_table(tmp_path / "out" / "s16.star")
    np.testing.assert_allclose(b.apix_A, 3.0)
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-7)
    np.testing.assert_allclose(b.shifts_px, a.shifts_px / 2, atol=1e-6)
    assert ParticleSource(b)[np.arange(3)].shape == (3, 16, 16)


def test_downsample_cs_and_mrcs(interop_data, tmp_path):
    assert main(["downsample", str(interop_data / "empiar_10076_7.cs"), "-D", "32",
                 "-o", str(tmp_path / "c.mrcs")]) == 0  # fmt: skip
    c = load_particle_table(tmp_path / "c.star")
    cs = load_particle_table(interop_data / "empiar_10076_7.cs")
    np.testing.assert_allclose(c.apix_A, cs.apix_A * 10, rtol=1e-6)
    np.testing.assert_allclose(c.ctf["defocus_u_A"], cs.ctf["defocus_u_A"], rtol=1e-7)
    assert main(["downsample", str(interop_data / "toy_projections.mrcs"), "-D", "16",
                 "-o", str(tmp_path / "t.mrcs")]) == 0  # fmt: skip
    assert read_mrc(tmp_path / "t.mrcs")[1].shape == (1000, 16, 16)
    assert not (tmp_path / "t.star").exists()
    assert main(["downsample", str(interop_data / "toy_projections.mrcs"), "-D", "64",
                 "-o", str(tmp_path / "u.mrcs")]) == 2  # fmt: skip
    assert not (tmp_path / "u.mrcs").exists()


def test_downsample_links_each_particle_to_its_original(interop_data, tmp_path):
    # RELION 3.1 input that has its own rlnImageOriginalName; --ind subset; stack elsewhere
    np.save(tmp_path / "ind.npy", np.array([3, 1]))
    out = tmp_path / "d64.mrcs"
    assert main(["downsample", str(interop_data / "relion31.star"), "-D", "64", "-o", str(out),
                 "--ind", str(tmp_path / "ind.npy")]) == 0  # fmt: skip
    df = starfile.read(tmp_path / "d64.star", always_dict=True)["particles"]
    stack = interop_data / "relion31.mrcs"  # not below the star's folder: absolute
    assert df["rlnImageOriginalName"].tolist() == [f"000004@{stack}", f"000002@{stack}"]
    assert df["rlnCryofieldOriginalImageSize"].tolist() == [256, 256]
    assert df["rlnCryofieldOriginalPixelSize"].tolist() == [2.806, 2.806]
    relion = starfile.read(interop_data / "relion31.star", always_dict=True)["particles"]
    assert (df["rlnCryofieldPriorOriginalName"].tolist()
            == relion["rlnImageOriginalName"].to_numpy()[[3, 1]].tolist())  # fmt: skip
    # cryoSPARC input inside a project folder: relative names; then downsample again
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("empiar_10076_7.cs", "empiar_10076_7.mrc"):
        shutil.copy(interop_data / name, proj / name)
    argv = ["downsample", str(proj / "empiar_10076_7.cs"), "-D", "64",
            "-o", str(proj / "small" / "c64.mrcs"), "--star", str(proj / "c64.star")]  # fmt: skip
    assert main(argv) == 0
    df = starfile.read(proj / "c64.star", always_dict=True)["particles"]
    assert df["rlnImageOriginalName"].tolist()[:2] == ["000001@empiar_10076_7.mrc",
                                                       "000002@empiar_10076_7.mrc"]  # fmt: skip
    assert main(["downsample", str(proj / "c64.star"), "-D", "32",
                 "-o", str(tmp_path / "again" / "c32.mrcs")]) == 0  # fmt: skip
    cs = load_particle_table(proj / "empiar_10076_7.cs")
    for star in (proj / "c64.star", tmp_path / "again" / "c32.star"):
        orig = original_table(load_particle_table(star))
        assert orig.box_px == 320
        np.testing.assert_array_equal(orig.image_paths, cs.image_paths)
        np.testing.assert_array_equal(orig.image_index, cs.image_index)
        np.testing.assert_allclose(orig.apix_A, cs.apix_A, rtol=1e-12)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["downsample", "--help"])
    out = capsys.readouterr().out
    assert "cryofield downsample particles.star -D 128" in out and "rlnImageOriginalName" in out


def test_downsample_never_writes_its_input_stack(tmp_path, capsys):
    stack = write_mrc(tmp_path / "p.mrcs", np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8),
                      2.0)  # fmt: skip
    before = stack.read_bytes()
    assert main(["downsample", str(stack), "-D", "4", "-o", str(stack)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"refusing to write {stack}: it is an input" in err[0]
    assert stack.read_bytes() == before
