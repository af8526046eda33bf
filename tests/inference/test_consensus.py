"""The consensus map of a homogeneous run: back-projection with the run's poses."""

from __future__ import annotations

import numpy as np
import torch

from cryofield.inference.consensus import write_consensus_map
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc
from cryofield.io.particles import ParticleSource
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc


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
