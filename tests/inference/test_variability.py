"""Linear variability analysis (PPCA by EM) recovers discrete and continuous heterogeneity
from noisy CTF-modulated projections at known poses."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from synth import blob_volume, make_dataset

from cryofield.analysis.metrics import adjusted_rand_index
from cryofield.inference.data import ArraySource, BatchMaker
from cryofield.inference.pose_search import FrequencyPoints
from cryofield.inference.variability import variability_latents

D = 24


def _blob(D: int, centre: tuple[float, float, float], width: float = 2.5) -> torch.Tensor:
    c = torch.arange(D, dtype=torch.float32) - D // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    d2 = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2
    return torch.exp(-d2 / (2 * width**2))


def _codes(data, zdim: int) -> np.ndarray:
    src = ArraySource(data.images, data.apix_A)
    batches = BatchMaker(src, data.ctf, FrequencyPoints.build(D))
    batches.estimate_scale(200, torch.Generator().manual_seed(0))
    z = variability_latents(batches, data.rotations, data.shifts_px, zdim, D / 4, iters=15)
    assert z.shape == (len(data.images), zdim) and torch.isfinite(z).all()
    return z.numpy()


def test_discrete_states_separate(one_thread):
    base = blob_volume(D, 6, seed=4)
    vols = [base, base + 1.5 * _blob(D, (5.0, 0.0, 2.0)), base + 1.5 * _blob(D, (-3.0, 5.0, -4.0))]
    data = make_dataset(vols, 600, snr=0.5, shift_px=1.0, seed=5)
    z = _codes(data, 4)
    pred = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_index(data.labels, pred) > 0.9
    # the codes are on principal axes: variances in decreasing order
    var = z.var(0)
    assert np.all(np.diff(var) <= 1e-6), var


def test_continuous_coordinate_is_the_first_component(one_thread):
    base = blob_volume(D, 6, seed=4)
    arm = _blob(D, (5.0, 0.0, 2.0))
    levels = np.linspace(0.0, 2.0, 12)
    data = make_dataset([base + float(a) * arm for a in levels], 600, snr=0.5, seed=6)
    z = _codes(data, 3)
    rho = abs(spearmanr(z[:, 0], levels[data.labels]).statistic)
    assert rho > 0.9, rho


def test_no_heterogeneity_gives_codes_unrelated_to_pose_or_defocus(one_thread):
    data = make_dataset([blob_volume(D, 6, seed=4)], 400, snr=0.5, seed=7)
    z = _codes(data, 2)
    # a homogeneous set has nothing to explain: the codes must not pick up the nuisance
    # variables (defocus, viewing direction) that a wrong model would turn into "states"
    nuisance = {
        "defocus": data.ctf.defocus_u_A.numpy(),
        "view_z": data.rotations[:, 2, 2].abs().numpy(),
    }
    for name, v in nuisance.items():
        for j in range(z.shape[1]):
            rho = abs(spearmanr(z[:, j], v).statistic)
            assert rho < 0.2, (name, j, rho)
