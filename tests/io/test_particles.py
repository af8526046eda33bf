"""ParticleSource: lazy reads across stacks, Fourier cropping, contrast, bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofield.errors import InputFileError
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc
from cryofield.io.particles import ParticleSource, guess_contrast
from cryofield.physics.filters import fourier_crop


def _blobs(n: int, D: int, seed: int = 0, sign: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.arange(D) - D // 2
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    blob = np.exp(-r2 / (2 * (D / 8) ** 2))
    return (sign * blob[None] + 0.3 * rng.standard_normal((n, D, D))).astype(np.float32)


def _star(path, rows, extra_header="", apix=2.0, box=None):
    cols = "_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnVoltage\n"
    cols += "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n"
    body = "".join(f"{r} 10000 9000 10 300 2.7 0.1 {apix}\n" for r in rows)
    path.write_text(f"data_\nloop_\n{cols}{extra_header}{body}")
    return path


@pytest.fixture
def two_stacks(tmp_path):
    a, b = _blobs(5, 32, 1), _blobs(3, 32, 2)
    write_mrc(tmp_path / "a.mrcs", a, 2.0)
    write_mrc(tmp_path / "b.mrcs", b, 2.0)
    rows = ["2@a.mrcs", "1@b.mrcs", "5@a.mrcs", "3@b.mrcs", "1@a.mrcs"]
    expected = np.stack([a[1], b[0], a[4], b[2], a[0]])
    return _star(tmp_path / "p.star", rows), expected


def test_reads_across_stacks_in_order(two_stacks):
    star, expected = two_stacks
    src = ParticleSource(load_particle_table(star))
    assert len(src) == 5 and src.box_px == 32 and src.D == 32
    x = src[np.array([4, 0, 3, 1])]
    assert x.dtype == torch.float32 and x.shape == (4, 32, 32)
    np.testing.assert_array_equal(x.numpy(), expected[[4, 0, 3, 1]])
    np.testing.assert_array_equal(src[2].numpy(), expected[[2]])
    np.testing.assert_array_equal(src[1:3].numpy(), expected[1:3])
    eager = ParticleSource(load_particle_table(star), lazy=False)
    np.testing.assert_array_equal(eager[np.arange(5)].numpy(), expected)
    inv = ParticleSource(load_particle_table(star), invert_contrast=True)
    np.testing.assert_array_equal(inv[[0]].numpy(), -expected[[0]])
    mean, std = src.normalization
    assert mean == pytest.approx(float(expected.astype(np.float64).mean()), abs=1e-6)
    assert std == pytest.approx(float(expected.astype(np.float64).std(ddof=1)), rel=1e-5)


def test_fourier_crop_resamples_band_limited_images():
    D, Dn = 64, 32
    x = torch.arange(D, dtype=torch.float64) - D // 2
    xn = (torch.arange(Dn, dtype=torch.float64) - Dn // 2) * (D / Dn)

    def f(xx, yy):
        return (
            0.7
            + torch.cos(2 * torch.pi * 3 * xx / D)
            + 0.5 * torch.sin(2 * torch.pi * (5 * xx + 2 * yy) / D)
        )

    img = f(x[None, :], x[:, None])[None]
    out = fourier_crop(img, Dn)
    np.testing.assert_allclose(out[0].numpy(), f(xn[None, :], xn[:, None]).numpy(), atol=1e-10)
    # the mean pixel value is preserved for any image
    r = torch.randn(3, D, D, dtype=torch.float64)
    np.testing.assert_allclose(fourier_crop(r, Dn).mean((-1, -2)), r.mean((-1, -2)),
                               atol=1e-12)  # fmt: skip


def test_source_crops_and_scales_pixel_size(two_stacks):
    star, expected = two_stacks
    src = ParticleSource(load_particle_table(star), D=16)
    assert src[np.arange(5)].shape == (5, 16, 16)
    np.testing.assert_allclose(src.apix_A, 4.0)
    ref = fourier_crop(torch.from_numpy(expected), 16)
    np.testing.assert_allclose(src[np.arange(5)].numpy(), ref.numpy(), atol=1e-6)
    with pytest.raises(InputFileError, match="D must be even"):
        ParticleSource(load_particle_table(star), D=15)


def test_guess_contrast():
    assert guess_contrast(_blobs(20, 32, sign=1.0)) == "light-on-dark"
    assert guess_contrast(_blobs(20, 32, sign=-1.0)) == "dark-on-light"
    assert guess_contrast(_blobs(20, 32, sign=0.0)) == "unclear"


def test_interop_contrast(interop_data):
    empiar = ParticleSource(load_particle_table(interop_data / "empiar_10076_7.star"))
    assert empiar.contrast() == "dark-on-light"
    toy = ParticleSource(load_particle_table(interop_data / "toy_projections.star"))
    assert toy.contrast() == "light-on-dark"
    # star and cs name the same 7 images
    cs = ParticleSource(load_particle_table(interop_data / "empiar_10076_7.cs"))
    np.testing.assert_array_equal(cs[np.arange(7)].numpy(), empiar[np.arange(7)].numpy())


# ----------------------------------------------------------------------------- bad input
def test_row_past_end_of_stack(tmp_path):
    write_mrc(tmp_path / "a.mrcs", _blobs(3, 16), 2.0)
    star = _star(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs", "4@a.mrcs"])
    with pytest.raises(InputFileError, match=r"p\.star, row 3: image 4 of .*a\.mrcs does not "
                       r"exist \(the stack has 3 images\)"):  # fmt: skip
        ParticleSource(load_particle_table(star))


def test_nan_pixels_name_file_and_image(tmp_path):
    data = _blobs(4, 16)
    data[2, 5, 7] = np.nan
    write_mrc(tmp_path / "n.mrcs", data, 2.0)
    src = ParticleSource(load_particle_table(tmp_path / "n.mrcs"))
    src[np.array([0, 1, 3])]  # fine
    with pytest.raises(InputFileError, match=r"n\.mrcs: image 3 has NaN .*particle 2"):
        src[np.array([0, 2])]


def test_non_square_and_truncated_stacks(tmp_path):
    write_mrc(tmp_path / "r.mrcs", np.zeros((2, 16, 20), np.float32), 1.0)
    with pytest.raises(InputFileError, match=r"r\.mrcs: images are not square \(16 x 20"):
        load_particle_table(tmp_path / "r.mrcs")
    star = _star(tmp_path / "r.star", ["1@r.mrcs"])
    with pytest.raises(InputFileError, match=r"r\.mrcs: images are not square"):
        ParticleSource(load_particle_table(star))
    p = write_mrc(tmp_path / "t.mrcs", np.zeros((4, 16, 16), np.float32), 1.0)
    p.write_bytes(p.read_bytes()[:-300])
    star = _star(tmp_path / "t.star", ["1@t.mrcs"])
    with pytest.raises(InputFileError, match=r"t\.mrcs: truncated MRC file"):
        ParticleSource(load_particle_table(star))


def test_missing_stack_and_box_mismatch(tmp_path):
    star = _star(tmp_path / "m.star", ["1@gone.mrcs"])
    with pytest.raises(InputFileError, match=r"m\.star, row 1: image stack .*gone\.mrcs not found"):
        ParticleSource(load_particle_table(star))
    write_mrc(tmp_path / "a.mrcs", _blobs(2, 16), 2.0)
    star = tmp_path / "box.star"
    star.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n1 2.0 32\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n"
    )
    with pytest.raises(InputFileError, match=r"a\.mrcs: images are 16 px but .*box\.star says 32"):
        ParticleSource(load_particle_table(star))


def test_paths_relative_to_project_folder(tmp_path, monkeypatch):
    (tmp_path / "Extract" / "job2").mkdir(parents=True)
    (tmp_path / "Refine3D" / "job9").mkdir(parents=True)
    data = _blobs(2, 16)
    write_mrc(tmp_path / "Extract" / "job2" / "a.mrcs", data, 2.0)
    star = _star(tmp_path / "Refine3D" / "job9" / "run.star", ["2@Extract/job2/a.mrcs"])
    monkeypatch.chdir(tmp_path / "Refine3D")
    t = load_particle_table("job9/run.star")
    assert t.image_paths[0] == str(tmp_path / "Extract" / "job2" / "a.mrcs")
    np.testing.assert_array_equal(ParticleSource(t)[0].numpy(), data[[1]])
    assert star.exists()


def test_positioned_reads_of_runs_duplicates_other_dtypes_and_reopened_files(tmp_path):
    import pickle

    import mrcfile

    rng = np.random.default_rng(3)
    data = rng.integers(-300, 300, size=(12, 16, 16)).astype(np.int16)
    with mrcfile.new(tmp_path / "s.mrcs") as m:  # mode 1 (int16), read into float32
        m.set_data(data)
        m.header.ispg = 0
        m.voxel_size = 2.0
    src = ParticleSource(load_particle_table(tmp_path / "s.mrcs"))
    idx = np.array([11, 3, 4, 5, 5, 0, 10, 9, 3])  # runs, repeats, any order
    np.testing.assert_array_equal(src[idx].numpy(), data[idx].astype(np.float32))
    src.close()  # reading again reopens the file
    np.testing.assert_array_equal(src[[7]].numpy(), data[[7]].astype(np.float32))
    copy = pickle.loads(pickle.dumps(src))  # open files are not carried over
    np.testing.assert_array_equal(copy[idx].numpy(), src[idx].numpy())
    assert src.lazy
    assert not ParticleSource(load_particle_table(tmp_path / "s.mrcs"), lazy=False).lazy
