"""Simulated datasets: reconstruction with the true poses, file round trips, SNR, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryofield.errors import CryofieldError, InputFileError
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.io.particles import ParticleSource
from cryofield.physics.backproject import reconstruct_fourier
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc
from cryofield.physics.handedness import flip_hand_volume
from cryofield.simulate.dataset import SimulationConfig, preset_config, simulate_dataset
from cryofield.simulate.volumes import protein_like, two_domain

D = 32
LOW_RES = slice(1, D // 4 + 1)  # shells 1..8 at D=32: resolution down to 4 px


@pytest.fixture(scope="module")
def homo(tmp_path_factory) -> Path:
    """1500 images of the chiral object at SNR 0.1 (also used for the round trips)."""
    out = tmp_path_factory.mktemp("homo")
    cfg = SimulationConfig(source="protein", n_particles=1500, D=D, apix_A=6.0, seed=3)
    return simulate_dataset(cfg, out)


def _truth(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "truth.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _truth_ctf(t: dict[str, np.ndarray], rows=slice(None)) -> CTFParams:
    keys = ("defocus_u_A", "defocus_v_A", "astig_angle_deg", "voltage_kV", "cs_mm")
    return CTFParams.from_arrays(
        **{k: t[k][rows] for k in keys},
        amp_contrast=t["amp_contrast"][rows],
        phase_shift_deg=t["phase_shift_deg"][rows],
        bfactor_A2=t["bfactor_A2"][rows],
    )


def _images(out: Path) -> torch.Tensor:
    """The stack as the physical images ``CTF * P V + noise`` (inversion undone)."""
    imgs = torch.as_tensor(np.array(read_mrc(out / "particles.mrcs")[0]))
    return -imgs if bool(_truth(out)["invert"]) else imgs


def _volume(out: Path, k: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.array(read_mrc(out / f"volumes/state_{k:02d}.mrc")[0]))


def test_outputs_and_truth_contract(homo: Path) -> None:
    for name in ("particles.mrcs", "particles.star", "particles.cs", "truth.npz",
                 "simulation.yaml", "volumes/state_00.mrc"):  # fmt: skip
        assert (homo / name).is_file(), name
    t = _truth(homo)
    n = 1500
    assert t["rotations"].shape == (n, 3, 3) and t["shifts_px"].shape == (n, 2)
    assert t["labels"].shape == (n,) and (t["labels"] == 0).all() and not t["is_junk"].any()
    assert np.isnan(t["coord"]).all() and t["defocus_u_A"].shape == (n,)
    assert float(t["snr"]) == 0.1 and int(t["seed"]) == 3 and int(t["D"]) == D
    assert float(t["apix_A"]) == 6.0 and list(t["volume_paths"]) == ["volumes/state_00.mrc"]
    assert str(t["contrast"]) == "light-on-dark" and bool(t["invert"])
    # rotations are proper and Haar-uniform: E[R] = 0
    R = t["rotations"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    assert np.abs(R.mean(0)).max() < 0.06
    # defocus in the requested range, shifts Gaussian with std 2 px
    mean_df = 0.5 * (t["defocus_u_A"] + t["defocus_v_A"])
    assert mean_df.min() >= 10000 and mean_df.max() <= 25000
    assert t["shifts_px"].std() == pytest.approx(2.0, rel=0.1)
    # the config written next to the data reproduces the request
    cfg = SimulationConfig.from_yaml(homo / "simulation.yaml")
    assert (cfg.n_particles, cfg.D, cfg.apix_A, cfg.seed) == (1500, D, 6.0, 3)


def test_backprojection_with_true_poses_and_handedness(homo: Path) -> None:
    t = _truth(homo)
    rec = reconstruct_fourier(
        _images(homo),
        torch.as_tensor(t["rotations"]),
        torch.as_tensor(t["shifts_px"]),
        _truth_ctf(t),
        float(t["apix_A"]),
    )
    vol = _volume(homo)
    curve = fsc(rec, vol)
    assert curve[LOW_RES].min() > 0.9
    # the mirror image of the chiral object scores far worse
    mirror = fsc(rec, flip_hand_volume(vol))
    assert float(mirror[LOW_RES].mean()) < float(curve[LOW_RES].mean()) - 0.3


@pytest.mark.parametrize("name", ["particles.star", "particles.cs"])
def test_written_metadata_reproduce_the_reconstruction(homo: Path, name: str) -> None:
    """Poses, shifts and CTF read back from the files are the ones used for the images."""
    table = load_particle_table(homo / name)
    assert len(table) == 1500 and table.box_px == D
    np.testing.assert_allclose(table.apix_A, 6.0)
    truth = _truth(homo)
    source = ParticleSource(table, invert_contrast=bool(truth["invert"]))
    images = source[np.arange(len(table))]
    rec = reconstruct_fourier(
        images,
        torch.as_tensor(table.rotations),
        torch.as_tensor(table.shifts_px),
        CTFParams.from_table(table),
        torch.as_tensor(source.apix_A, dtype=torch.float32),
    )
    assert fsc(rec, _volume(homo))[LOW_RES].min() > 0.9
    np.testing.assert_allclose(table.rotations, truth["rotations"], atol=1e-4)
    np.testing.assert_allclose(table.shifts_px, truth["shifts_px"], atol=1e-3)
    np.testing.assert_allclose(table.ctf["defocus_u_A"], truth["defocus_u_A"], rtol=1e-5)


def test_snr_and_seed_determinism(tmp_path: Path) -> None:
    kw = dict(source="protein", n_particles=300, D=D, apix_A=5.0, seed=11, chunk_size=128)
    noisy = simulate_dataset(SimulationConfig(**kw, snr=0.1), tmp_path / "noisy")
    again = simulate_dataset(SimulationConfig(**kw, snr=0.1), tmp_path / "again")
    clean = simulate_dataset(SimulationConfig(**kw, snr=None), tmp_path / "clean")
    other = simulate_dataset(SimulationConfig(**{**kw, "seed": 12}, snr=0.1), tmp_path / "other")
    a, b, c = _images(noisy), _images(again), _images(clean)
    assert torch.equal(a, b)
    ta, tb = _truth(noisy), _truth(again)
    for key in ("rotations", "shifts_px", "defocus_u_A", "labels"):
        np.testing.assert_array_equal(ta[key], tb[key])
    assert not np.allclose(_truth(other)["rotations"], ta["rotations"])
    # SNR = mean per-image signal variance / noise variance, measured on the output
    noise = (a - c).double()
    snr = float(c.double().var(dim=(1, 2)).mean() / noise.var())
    assert snr == pytest.approx(0.1, rel=0.1)
    assert float(noise.mean()) == pytest.approx(
        0.0, abs=3 * float(noise.std()) / noise.numel() ** 0.5
    )
    # 'particle' region: signal variance inside the object's disc (same clean images)
    disc_run = simulate_dataset(
        SimulationConfig(**kw, snr=0.5, snr_region="particle"), tmp_path / "disc"
    )
    radius = float(_truth(disc_run)["snr_radius_px"])
    assert 5 < radius < D // 2
    yy, xx = np.mgrid[:D, :D] - D // 2
    inside = torch.as_tensor(np.hypot(xx, yy) <= radius)
    noise = (_images(disc_run) - c).double()
    snr = float(c.double()[:, inside].var(dim=1).mean() / noise.var())
    assert snr == pytest.approx(0.5, rel=0.1)


def test_discrete_states_and_junk(tmp_path: Path) -> None:
    cfg = preset_config(
        "demo-hetero", n_particles=1200, D=D, weights=[0.5, 0.3, 0.2], junk_fraction=0.15, seed=5
    )
    out = simulate_dataset(cfg, tmp_path / "het")
    t = _truth(out)
    labels = t["labels"]
    assert (labels == -1).sum() == 180 and t["is_junk"].sum() == 180
    assert set(t["junk_kind"][labels == -1]) == {"noise", "fragment", "other"}
    frac = np.bincount(labels[labels >= 0], minlength=3) / (labels >= 0).sum()
    np.testing.assert_allclose(frac, [0.5, 0.3, 0.2], atol=0.05)
    assert len(t["volume_paths"]) == 3 and len(t["junk_volume_paths"]) == 5
    images = _images(out)
    # pure-noise junk carries no signal: its pixel variance is the noise variance
    noise_rows = np.flatnonzero(t["junk_kind"] == "noise")
    assert float(images[noise_rows].var()) == pytest.approx(float(t["noise_std"]) ** 2, rel=0.05)
    # each state reconstructed from its own particles matches its own volume best
    vols = [_volume(out, k) for k in range(3)]
    for k in (0, 2):
        rows = np.flatnonzero(labels == k)
        rec = reconstruct_fourier(
            images[rows],
            torch.as_tensor(t["rotations"][rows]),
            torch.as_tensor(t["shifts_px"][rows]),
            _truth_ctf(t, rows),
            float(t["apix_A"]),
        )
        scores = [float(fsc(rec, v)[LOW_RES].mean()) for v in vols]
        assert int(np.argmax(scores)) == k, scores


def test_continuous_truth(tmp_path: Path) -> None:
    cfg = preset_config("demo-continuous", n_particles=200, D=D, n_frames=5, seed=2)
    t = _truth(simulate_dataset(cfg, tmp_path / "cont"))
    np.testing.assert_allclose(t["frame_coords"], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(t["coord"], t["frame_coords"][t["labels"]])
    assert len(t["volume_paths"]) == 5 and len(set(t["labels"])) == 5


def test_motion_amplitude_scales_the_swing(tmp_path: Path) -> None:
    """The last frame of a 30% motion is the full motion's frame at c = 0.3."""
    cfg = preset_config("demo-continuous", n_particles=20, D=D, n_frames=2, seed=2,
                        motion_amplitude=0.3, snr=None)  # fmt: skip
    t = _truth(simulate_dataset(cfg, tmp_path / "c30"))
    last = read_mrc(tmp_path / "c30" / t["volume_paths"][-1], mmap=False)[0]
    np.testing.assert_allclose(last, two_domain(D, 0.3), atol=1e-5)
    np.testing.assert_allclose(t["frame_coords"], [0.0, 1.0])  # the coordinate keeps [0, 1]
    with pytest.raises(CryofieldError, match="motion_amplitude"):
        preset_config("demo-continuous", motion_amplitude=0.0).validate()


def test_volume_files_as_input(tmp_path: Path) -> None:
    a, b = protein_like(D), np.ascontiguousarray(protein_like(D)[::-1])
    write_mrc(tmp_path / "a.mrc", a, 4.0)
    write_mrc(tmp_path / "b.mrc", b, 4.0)
    cfg = SimulationConfig(
        source="volumes", volume_paths=[str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")],
        weights=[3.0, 1.0], D=None, apix_A=None, n_particles=200, seed=1,
    )  # fmt: skip
    t = _truth(simulate_dataset(cfg, tmp_path / "out"))
    assert int(t["D"]) == D and float(t["apix_A"]) == 4.0
    assert 0.65 < (t["labels"] == 0).mean() < 0.85
    np.testing.assert_array_equal(_volume(tmp_path / "out", 1).numpy(), b)


def test_images_match_the_training_forward_model(tmp_path: Path) -> None:
    """Noiseless images, read back like training reads them, equal ``C * slice(H)``.

    Training compares the Hartley transform of the re-centred image with the CTF times the
    central slice of the volume's Hartley transform on the D-grid (docs/dev/contracts.md);
    the simulator's oversampled projection must agree with that model.
    """
    from cryofield.physics.ctf import compute_ctf
    from cryofield.physics.fourier import fft2_centered, fft_to_hartley, ht3_centered
    from cryofield.physics.lattice import freq_grid_2d
    from cryofield.physics.shift import phase_shift_fourier
    from cryofield.physics.slicing import extract_slices

    cfg = SimulationConfig(n_particles=48, D=D, apix_A=6.0, snr=None, seed=5)
    out = simulate_dataset(cfg, tmp_path / "clean")
    table = load_particle_table(out / "particles.star")
    images = ParticleSource(table, invert_contrast=True)[np.arange(48)]
    centred = fft_to_hartley(
        phase_shift_fourier(fft2_centered(images), -torch.as_tensor(table.shifts_px))
    )
    ctf = compute_ctf(freq_grid_2d(D), 6.0, CTFParams.from_table(table))
    pred = extract_slices(ht3_centered(_volume(out)), torch.as_tensor(table.rotations)) * ctf
    k = freq_grid_2d(D)
    inside = (k * k).sum(-1) < 0.16  # up to 0.4 cycles/px
    for obs, model in zip(centred[:, inside], pred[:, inside], strict=True):
        assert np.corrcoef(obs.numpy(), model.numpy())[0, 1] > 0.98


def test_given_poses_are_used(tmp_path: Path) -> None:
    first = simulate_dataset(
        SimulationConfig(n_particles=40, D=D, seed=1, snr=None), tmp_path / "first"
    )
    R = _truth(first)["rotations"]
    for name in ("truth.npz", "particles.star"):
        cfg = SimulationConfig(
            n_particles=30, D=D, seed=2, snr=None, rotations_path=str(first / name)
        )
        again = simulate_dataset(cfg, tmp_path / name)
        np.testing.assert_allclose(_truth(again)["rotations"], R[:30], atol=1e-5)
    with pytest.raises(InputFileError, match="40 poses, 50 particles"):
        cfg = SimulationConfig(n_particles=50, D=D, rotations_path=str(first / "truth.npz"))
        simulate_dataset(cfg, tmp_path / "bad")


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CryofieldError, match="snr"):
        SimulationConfig(snr=-1.0).validate()
    with pytest.raises(CryofieldError, match="D must be even"):
        SimulationConfig(D=33).validate()
    with pytest.raises(CryofieldError, match="weights"):
        SimulationConfig(source="states", n_states=3, weights=[1.0, 2.0]).validate()
    bad = tmp_path / "sim.yaml"
    bad.write_text("n_particles: 10\nbogus: 1\n")
    with pytest.raises(InputFileError, match="bogus"):
        SimulationConfig.from_yaml(bad)
    with pytest.raises(CryofieldError, match="unknown preset"):
        preset_config("demo-nothing")
