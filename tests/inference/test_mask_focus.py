"""Focused heterogeneity (``--mask``): classification, variability analysis and the latent
start follow the variation inside the mask, not a larger one outside it."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from synth import blob_volume, make_dataset

from cryofield.analysis.metrics import adjusted_rand_index
from cryofield.errors import CryofieldError, InputFileError
from cryofield.inference.classify import ClassifySettings, classification_latents, classify_3d
from cryofield.inference.config import TrainConfig
from cryofield.inference.data import ArraySource, BatchMaker
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.variability import lattice_mask, variability_latents

D = 24


def _grid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = torch.arange(D, dtype=torch.float32) - D // 2
    return torch.meshgrid(c, c, c, indexing="ij")


def _blob(x: float, y: float, z: float, w: float, amp: float) -> torch.Tensor:
    zz, yy, xx = _grid()
    return amp * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * w**2))


@pytest.fixture(scope="module")
def two_variations():
    """Four maps: a small blob inside the mask moves 3 px (``a``), a larger blob outside
    it moves 4 px (``b``), independently; the mask is a soft sphere about the small one."""
    torch.set_num_threads(1)
    base = blob_volume(D, 6, seed=4)
    vols = [base + _blob(-5, -1.5 + 3 * a, 5, 1.8, 2.0) + _blob(5, 2 + 4 * b, -4, 2.5, 2.5)
            for a in range(2) for b in range(2)]  # fmt: skip
    data = make_dataset(vols, 300, snr=1.0, shift_px=1.0, seed=2)
    batches = BatchMaker(ArraySource(data.images, data.apix_A), data.ctf, FrequencyPoints.build(D))
    batches.estimate_scale(200, torch.Generator().manual_seed(0))
    zz, yy, xx = _grid()
    r = torch.sqrt((xx + 5) ** 2 + yy**2 + (zz - 5) ** 2)
    mask = ((5.5 - r) / 2).clamp(0, 1)
    return data, batches, mask, data.labels // 2, data.labels % 2


def test_classes_follow_the_variation_inside_the_mask(two_variations):
    data, batches, mask, a, b = two_variations
    s = ClassifySettings(n_classes=2, iters=8, init="pca", init_zdim=2)
    free = classify_3d(batches, data.rotations, data.shifts_px, s).resp.argmax(1).numpy()
    # without the mask the classes follow the larger variation, outside the mask
    assert adjusted_rand_index(b, free) > 0.8 and abs(adjusted_rand_index(a, free)) < 0.1
    res = classify_3d(batches, data.rotations, data.shifts_px, s, mask=mask)
    focused = res.resp.argmax(1).numpy()
    assert adjusted_rand_index(a, focused) > 0.7 and abs(adjusted_rand_index(b, focused)) < 0.1
    # the maps scored against are the consensus outside the mask: they agree there
    out = (mask < 1e-3).float()
    diff_out = float(((res.maps[0] - res.maps[1]) * out).abs().max())
    diff_in = float(((res.maps[0] - res.maps[1]) * mask).abs().max())
    assert diff_out < 1e-4 * diff_in


def test_latent_start_with_a_mask_describes_the_inside(two_variations):
    data, batches, mask, a, b = two_variations
    s = ClassifySettings(n_classes=4, iters=6, init="pca", init_zdim=2)
    z = classification_latents(batches, data.rotations, data.shifts_px, 2, s, mask=mask).numpy()
    # Spearman of a continuous code with a balanced binary label is at most sqrt(3)/2
    assert abs(spearmanr(z[:, 0], a)[0]) > 0.75 and abs(spearmanr(z[:, 0], b)[0]) < 0.2
    assert max(abs(spearmanr(z[:, k], b)[0]) for k in range(2)) < 0.3
    z0 = classification_latents(batches, data.rotations, data.shifts_px, 2, s).numpy()
    assert abs(spearmanr(z0[:, 0], b)[0]) > 0.75  # without it: the larger variation first


def test_variability_analysis_with_a_mask_describes_the_inside(two_variations):
    data, batches, mask, a, b = two_variations
    z = variability_latents(batches, data.rotations, data.shifts_px, 2, D / 4, mask=mask)
    assert abs(spearmanr(z[:, 0], a)[0]) > 0.6 and abs(spearmanr(z[:, 0], b)[0]) < 0.2
    z0 = variability_latents(batches, data.rotations, data.shifts_px, 2, D / 4)
    assert abs(spearmanr(z0[:, 0], b)[0]) > 0.6 and abs(spearmanr(z0[:, 0], a)[0]) < 0.3


@pytest.mark.parametrize("Dv", [9, 13, 16, 25])
def test_lattice_mask_resamples_the_mask_to_the_variability_grid(Dv):
    zz, yy, xx = _grid()
    r = torch.sqrt((xx - 4) ** 2 + yy**2 + zz**2)
    mask = ((6 - r) / 3).clamp(0, 1)
    m = lattice_mask(mask, Dv)
    assert m.shape == (Dv, Dv, Dv) and float(m.min()) >= 0 and float(m.max()) <= 1
    # the same region on a grid D / Dv px apart: same volume fraction, same centre
    assert float(m.mean()) == pytest.approx(float(mask.mean()), rel=0.15)
    c = (torch.arange(Dv) - Dv // 2).float() * D / Dv
    assert float((m.sum((0, 1)) * c).sum() / m.sum()) == pytest.approx(4.0, abs=0.3)


def test_config_refuses_a_mask_without_latents():
    with pytest.raises(CryofieldError, match="needs --zdim"):
        TrainConfig(mask="m.mrc").validate()
    with pytest.raises(CryofieldError, match="latent-init"):
        TrainConfig(mask="m.mrc", zdim=2, latent_init="random").validate()
    c = TrainConfig(mask="m.mrc", zdim=2).resolved(16)
    assert c.mask is not None and c.mask.startswith("/") and c.mask.endswith("m.mrc")


def test_trainer_reads_the_mask_before_any_work(tmp_path, two_variations):
    from cryofield.inference.trainer import Trainer
    from cryofield.io.mrc import write_mrc

    data, _, mask, _, _ = two_variations
    src = ArraySource(data.images[:64], data.apix_A)
    good = write_mrc(tmp_path / "mask.mrc", mask.numpy(), data.apix_A)
    cfg = TrainConfig(zdim=2, mask=str(good), device="cpu", epochs=1).resolved(D, 64, data.apix_A)
    tr = Trainer(cfg, src, None, tmp_path / "run")
    assert tr.mask is not None and torch.allclose(tr.mask, mask)
    # ab initio: the latent refreshes of the search epochs (the search's references) see
    # all the variability; the start once the poses have settled is focused
    cfg = TrainConfig(zdim=2, mask=str(good), device="cpu").resolved(D, 64, data.apix_A)
    tr = Trainer(cfg, src, None, tmp_path / "run3")
    first = tr.schedule.hps_epochs + 1
    assert not tr._masked_init(1) and not tr._masked_init(first - 1) and tr._masked_init(first)
    bad = write_mrc(tmp_path / "map.mrc", (5 * mask).numpy(), data.apix_A)
    cfg = TrainConfig(zdim=2, mask=str(bad), device="cpu", epochs=1).resolved(D, 64, data.apix_A)
    with pytest.raises(InputFileError, match=r"map\.mrc: mask values must lie in \[0, 1\]"):
        Trainer(cfg, src, None, tmp_path / "run2")
