"""The consensus map of a homogeneous run: back-projection with the run's poses."""

from __future__ import annotations

import numpy as np
import torch
from synth import blob_volume

from cryofield.inference.consensus import backproject_sets, write_consensus_map
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc
from cryofield.io.particles import ParticleSource
from cryofield.physics.backproject import reconstruct_fourier
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc
from cryofield.physics.rotation import random_rotations
from cryofield.physics.slicing import project_real_space


def test_consensus_map_with_true_poses_matches_the_volume(simulated, tmp_path) -> None:
    folder, truth = simulated(300, 32, 6.0, 0)
    table = load_particle_table(folder / "particles.star")
    source = ParticleSource(table)
    true_vol = torch.as_tensor(np.array(read_mrc(folder / "volumes" / "state_00.mrc")[0]))
    sign = -1.0 if bool(truth["invert"]) else 1.0
    args = (source, torch.as_tensor(truth["rotations"]), CTFParams.from_table(table), 6.0)

    res = write_consensus_map(tmp_path, args[0], args[1], torch.as_tensor(truth["shifts_px"]),
                              *args[2:], sign=sign)  # fmt: skip
    vol = torch.as_tensor(np.array(read_mrc(tmp_path / "consensus.mrc")[0]))
    assert fsc(vol, true_vol)[1:8].min() > 0.9
    assert res["fsc0143_A"] < 4 * 6.0  # noiseless halves agree to near Nyquist
    assert (tmp_path / "consensus_half1.mrc").is_file()
    assert np.loadtxt(tmp_path / "consensus_fsc.txt").shape == (16, 3)

    # wrong shifts (sign flipped) must make the map clearly worse: the test can fail
    write_consensus_map(tmp_path, args[0], args[1], -torch.as_tensor(truth["shifts_px"]),
                        *args[2:], sign=sign)  # fmt: skip
    bad = torch.as_tensor(np.array(read_mrc(tmp_path / "consensus.mrc")[0]))
    assert fsc(bad, true_vol)[4:8].mean() < fsc(vol, true_vol)[4:8].mean() - 0.1


def _projections(n: int = 30, D: int = 16):
    R = random_rotations(n, torch.Generator().manual_seed(4))
    images = project_real_space(blob_volume(D, 6, width_px=1.5), R)
    t = 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    ctf = CTFParams.from_arrays(
        defocus_u_A=np.linspace(8000, 15000, n), defocus_v_A=np.linspace(7800, 14800, n),
        astig_angle_deg=np.zeros(n), voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1,
    )  # fmt: skip
    return images, R, t, ctf


def test_backproject_sets_is_reconstruct_fourier_of_each_set() -> None:
    """Streaming in chunks, subsets of rows and per-image pixel sizes give the maps that
    one back-projection of each set's images gives."""
    images, R, t, ctf = _projections()
    rows = np.array([0, 2, 3, 5, 8, 9, 12, 13, 20, 21, 27, 29])
    sets = np.array([0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    apix = np.linspace(3.0, 3.2, len(rows))
    bps = backproject_sets(images, R[rows], t[rows], ctf.subset(rows), apix, rows=rows,
                           sets=sets, chunk=5, sign=-1.0)  # fmt: skip
    for h, bp in enumerate(bps):
        m = sets == h
        ref = reconstruct_fourier(-images[rows[m]], R[rows[m]], t[rows[m]],
                                  ctf.subset(rows[m]), torch.as_tensor(apix[m]))  # fmt: skip
        torch.testing.assert_close(bp.volume(), ref, rtol=1e-4, atol=1e-5)
    # defaults: even / odd image index; one set: every image
    even, odd = backproject_sets(images, R, t, None, 3.0, chunk=7)
    torch.testing.assert_close(even.volume(), reconstruct_fourier(images[::2], R[::2], t[::2]),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    (every,) = backproject_sets(images, R, t, None, 3.0, n_sets=1, chunk=7)
    torch.testing.assert_close(every.volume(), even.merge(odd).volume(), rtol=1e-5, atol=1e-6)
