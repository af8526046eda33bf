"""Point-group symmetry in training: the setting, the search's asymmetric unit, the field
learning the symmetric map from the images of one asymmetric unit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from synth import make_dataset

from cryofield.errors import CryofieldError
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import ArraySource
from cryofield.inference.epoch_metrics import symmetric_views
from cryofield.inference.references import search_settings
from cryofield.inference.schedule import Schedule
from cryofield.inference.trainer import Trainer
from cryofield.physics.fsc import fsc
from cryofield.physics.lattice import coords_1d
from cryofield.physics.symmetry import asymmetric_unit_mask, symmetry_operators


def test_symmetry_setting_has_a_flag_is_validated_and_reaches_the_search() -> None:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}["symmetry"]
    assert f.default == "C1" and f.metadata["flag"] == "--symmetry"
    TrainConfig(symmetry="d7").validate()
    TrainConfig(symmetry="I").validate()
    with pytest.raises(CryofieldError, match=r"--symmetry: unknown symmetry 'C4v'.*C<n>"):
        TrainConfig(symmetry="C4v").validate()
    cfg = TrainConfig(symmetry="O").resolved(32)
    cfg.resolve_schedule(100)
    plan = Schedule(cfg, 100).plan(1, 0)
    assert search_settings(cfg, plan).symmetry == "O"


def test_view_coverage_of_a_symmetric_run_counts_the_equivalent_views() -> None:
    R = torch.eye(3).expand(10, 3, 3)
    assert symmetric_views(R, "C1") is R
    v = symmetric_views(R, "D2")
    assert v.shape == (40, 3, 3)
    assert symmetric_views(R, "I", max_views=600).shape == (600, 3, 3)


def _o_volume(D: int) -> torch.Tensor:
    """An octahedral map: anisotropic Gaussians at ``g c`` for the 24 rotations ``g``."""
    ops = symmetry_operators("O", torch.float64)
    c = coords_1d(D, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1)
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for cen, sig in (((4.0, -2.0, 1.5), (1.8, 1.2, 1.0)), ((-1.0, 3.0, 5.0), (1.1, 1.9, 1.3))):
        P0 = torch.diag(1.0 / torch.tensor(sig, dtype=torch.float64) ** 2)
        for g in ops:
            d = pts - g @ torch.tensor(cen, dtype=torch.float64)
            vol += torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, g @ P0 @ g.T, d))
    return vol.float()


def test_field_learns_the_symmetric_map_from_views_of_one_asymmetric_unit(tmp_path, one_thread):
    """Known poses, all with viewing directions in one asymmetric unit of O (1/24 of the
    sphere, a 4% patch): without the symmetry most of Fourier space is never seen; with
    it every image also teaches the field its 23 equivalent views."""
    D, N = 24, 80
    vol = _o_volume(D)
    ops = symmetry_operators("O")
    data = make_dataset([vol], 2400, snr=None, seed=3)
    keep = torch.nonzero(asymmetric_unit_mask(data.rotations[:, 2, :], ops)).squeeze(1)[:N]
    assert keep.numel() == N
    images, R, t = data.images[keep], data.rotations[keep], data.shifts_px[keep]
    ctf = data.ctf.subset(keep)
    scores = {}
    for sym in ("C1", "O"):
        cfg = TrainConfig(outdir=str(tmp_path / sym), hidden=64, n_freqs=32, batch_size=8,
                          epochs=1, poses_from_file=True, refine_poses=False, symmetry=sym,
                          deterministic=True).resolved(D)  # fmt: skip
        tr = Trainer(cfg, ArraySource(images, data.apix_A), ctf, tmp_path / sym, (R, t))
        tr.fit()
        with torch.no_grad():
            rec = tr.field.render_volume().cpu()
        scores[sym] = fsc(rec, vol)[1:4]
    # measured (one field-fit epoch): O 0.999, 0.999, 1.000; C1 0.94, 0.86, 0.76
    assert float(scores["O"].min()) > 0.98, scores
    assert float(scores["O"].mean()) > float(scores["C1"].mean()) + 0.1, scores


def test_field_frame_rotates_the_map_exactly_and_survives_a_checkpoint() -> None:
    from cryofield.model.field import HartleyField
    from cryofield.physics.rotation import random_rotations

    torch.manual_seed(0)
    field = HartleyField(16, hidden=16, layers=1, n_freqs=8)
    k = (torch.rand(50, 3) - 0.5) * 0.8
    A = random_rotations(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = field(k @ A[1].T @ A[0].T)  # H(A0 A1 k)
        field.set_frame(A[0])
        field.set_frame(A[1])  # H_new(k) = H(A0 A1 k): V_new(x) = V(A0 A1 x)
        assert torch.allclose(field(k), before, atol=1e-5)
    clone = HartleyField(16, hidden=16, layers=1, n_freqs=8)
    clone.load_state_dict(field.state_dict())
    with torch.no_grad():
        assert torch.allclose(clone(k), before, atol=1e-5)
    old = {n: v for n, v in field.state_dict().items() if n != "frame"}  # older checkpoints
    clone.load_state_dict(old)
    assert torch.equal(clone.frame, torch.eye(3)) and not clone._framed


def test_train_searches_without_symmetry_then_imposes_it(tmp_path, one_thread) -> None:
    """``cryofield train --symmetry C2``: the search epoch runs in C1, the next epoch
    aligns the axes and imposes C2 (logged, kept in state.pt), the consensus map is C2
    symmetric, and ``--resume`` continues in C2."""
    from cryofield.cli.main import main
    from cryofield.inference.rundir import RunDir
    from cryofield.io.mrc import read_mrc
    from cryofield.physics.symmetry import symmetrize_volume
    from cryofield.simulate.config import preset_config
    from cryofield.simulate.dataset import simulate_dataset

    sim = simulate_dataset(preset_config("demo-homo", n_particles=48, D=32, snr=1.0, seed=5),
                           tmp_path / "sim")  # fmt: skip
    out = tmp_path / "run"
    fast = ["--hps-images", "48", "-b", "16", "--hidden", "32", "--n-freqs", "8",
            "--base-nside", "1", "--base-psi", "6", "--search-levels", "2", "--threads", "1",
            "--deterministic", "--refine-iters", "1", "--symmetry", "c2"]  # fmt: skip
    assert main(["train", str(sim / "particles.star"), "-o", str(out), "--epochs", "2", *fast]) == 0
    run = RunDir(out)
    assert run.config()["symmetry"] == "C2"  # canonical form
    assert "symmetry C2 imposed" in (out / "run.log").read_text()
    # the search epoch counted moves modulo C2 in the map's own frame (issue #23)
    pc = run.metrics()[0]["pose_change"]
    assert pc["modulo"] == "C2" and 0 < pc["frame_score"] <= 1 and "frac_moved_c1" in pc
    assert "modulo C2 in the map's frame" in (out / "run.log").read_text()
    st = torch.load(out / "epoch_002" / "state.pt", weights_only=True)
    assert st["symmetry_aligned"] is True and not torch.equal(st["field"]["frame"], torch.eye(3))
    vol = torch.as_tensor(np.asarray(read_mrc(out / "consensus.mrc", mmap=False)[0]))
    sym = symmetrize_volume(vol, symmetry_operators("C2"))
    assert float((sym - vol).norm() / vol.norm()) < 0.1  # inserted at both equivalent poses
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    st = torch.load(out / "epoch_003" / "state.pt", weights_only=True)
    assert st["symmetry_aligned"] is True
