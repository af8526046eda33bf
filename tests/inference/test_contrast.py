"""One contrast rule (``inference.data.decide_inversion``) for ``train`` and ``backproject``.

With a CTF, light-on-dark images are inverted (the CTF model makes dark-on-light ones);
without one the model is the projection itself, so dark-on-light images are inverted.
The two commands used to disagree on CTF-less light-on-dark stacks (train inverted them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synth import blob_volume

from cryofield.cli.main import main
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import decide_inversion
from cryofield.inference.runner import build_trainer
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.io.particles import ParticleSource
from cryofield.physics.rotation import random_rotations
from cryofield.physics.slicing import project_real_space


class _Guess:
    """A source whose contrast guess is fixed; counts the guesses."""

    def __init__(self, guess: str) -> None:
        self.guess, self.calls = guess, 0

    def contrast(self) -> str:
        self.calls += 1
        return self.guess


@pytest.mark.parametrize(
    ("contrast", "guess", "use_ctf", "invert"),
    [
        ("auto", "light-on-dark", True, True),
        ("auto", "dark-on-light", True, False),
        ("auto", "unclear", True, True),  # the usual RELION/cryoSPARC sign
        ("auto", "light-on-dark", False, False),
        ("auto", "dark-on-light", False, True),
        ("auto", "unclear", False, False),
        ("light-on-dark", None, True, True),
        ("light-on-dark", None, False, False),
        ("dark-on-light", None, True, False),
        ("dark-on-light", None, False, True),
        ("invert", None, False, True),
        ("as-is", None, True, False),
    ],
)
def test_the_rule(contrast: str, guess: str | None, use_ctf: bool, invert: bool) -> None:
    source = _Guess(guess or "never asked")
    d = decide_inversion(contrast, use_ctf, source)
    assert d.invert is invert
    assert source.calls == (1 if contrast == "auto" else 0)
    assert d.guessed is (contrast == "auto")
    assert d.message.endswith("images inverted" if invert else "images used as they are")
    with pytest.raises(ValueError, match="contrast must be one of"):
        decide_inversion("negative", use_ctf, source)


@pytest.fixture
def ctf_less_stack(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """24 noiseless light-on-dark projections (16 px, no CTF) and their poses .npz."""
    D, n = 16, 24
    vol = blob_volume(D, 6, width_px=1.5)
    R = random_rotations(n, torch.Generator().manual_seed(3))
    images = project_real_space(vol, R)
    stack = tmp_path / "stack.mrcs"
    write_mrc(stack, images.numpy().astype(np.float32), 4.0)
    poses = tmp_path / "poses.npz"
    np.savez(poses, rotations=R.numpy())
    return stack, poses, vol


def test_train_and_backproject_decide_the_same_without_ctf(
    ctf_less_stack, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stack, poses, vol = ctf_less_stack
    table = load_particle_table(stack)
    assert table.ctf is None
    source = ParticleSource(table)
    assert source.contrast() == "light-on-dark"
    cfg = TrainConfig(particles=str(stack), outdir=str(tmp_path / "run"), hidden=16, n_freqs=4)
    trainer = build_trainer(cfg, table, source)
    assert trainer.cfg.invert is False and trainer.batches.invert is False
    out = tmp_path / "map.mrc"
    assert main(["backproject", str(stack), "--poses", str(poses), "-o", str(out)]) == 0
    assert "contrast: light-on-dark -> images used as they are" in capsys.readouterr().out
    # both keep the sign: the map of the images as they are has positive density
    back, _ = read_mrc(out, mmap=False)
    assert float((np.asarray(back) * vol.numpy()).sum()) > 0
    # and a dark-on-light CTF-less stack is inverted by both
    dark = tmp_path / "dark.mrcs"
    write_mrc(dark, -np.asarray(read_mrc(stack, mmap=False)[0]), 4.0)
    dark_table = load_particle_table(dark)
    trainer = build_trainer(cfg, dark_table, ParticleSource(dark_table))
    assert trainer.cfg.invert is True
    out2 = tmp_path / "map2.mrc"
    assert main(["backproject", str(dark), "--poses", str(poses), "-o", str(out2)]) == 0
    assert "contrast: dark-on-light -> images inverted" in capsys.readouterr().out
    np.testing.assert_allclose(read_mrc(out2, mmap=False)[0], back, rtol=1e-5, atol=1e-6)
