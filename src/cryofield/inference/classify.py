"""Maximum-likelihood 3-D classification at fixed poses, and a latent start made from it.

With the poses of a consensus run fixed, image ``i`` is modelled as a CTF-modulated
projection of one of ``K`` class maps plus white Gaussian noise of its own variance:

``X_i(k) = C_i(k) V_{c_i}(R_i^T [k, 0]) + n_i(k)``,  ``P(c_i = j) = pi_j``,
``E|n_i(k)|^2 = sigma_i^2`` per complex Fourier coefficient,

on the frequencies ``|k| <= r`` (half plane: each independent coefficient once). The
class maps, class priors and noise variances are estimated by expectation maximisation,
as RELION's 3-D classification does at fixed orientations (Scheres 2012, J. Mol. Biol.
415:406, "A Bayesian view on cryo-EM structure determination"; Scheres 2012, J. Struct.
Biol. 180:519; Dempster, Laird & Rubin 1977):

* E-step, per image ``i`` and class ``j``: ``E_ij = sum_k w_k |X_ik - C_ik S_ij(k)|^2``
  with ``S_ij`` the central slice of class ``j`` at ``R_i``
  (:func:`~cryofield.inference.refine.reference_grid` and
  :func:`~cryofield.inference.pose_search.slice_grid`, the projections of pose search and
  gold-standard refinement; ``w`` the Friedel weights of
  :meth:`~cryofield.inference.pose_search.FrequencyPoints.half_index`), log-likelihood
  ``L_ij = -E_ij / (2 sigma_i^2) - (W / 2) log(pi sigma_i^2)`` (``W = sum w``),
  responsibilities ``r_ij = softmax_j(log pi_j + L_ij)``;
* M-step: ``pi_j = mean_i r_ij``; every class map is the Wiener-regularised weighted
  Fourier back-projection ``V_j = sum_i a_ij C_i X_i / (sum_i a_ij C_i^2 + 1 / tau^2)``
  with ``a_ij = r_ij / sigma_i^2``
  (:class:`~cryofield.physics.backproject.FourierBackprojector`; the weight enters as
  ``sqrt(a_ij)`` on both image and CTF); ``sigma_i^2 = sum_j r_ij E_ij / W`` is updated
  with the new maps before the next E-step (a conditional-maximisation step of ECM,
  Meng & Rubin 1993, Biometrika 80:267, so the log-likelihood still cannot fall except
  through the approximations of gridding).

The prior ``tau^2`` (signal power per shell, RELION's ``tau2``) comes from the half maps
of all images (:func:`~cryofield.inference.refine.backproject_halves_batched`): their FSC
gives the full map's spectral SNR ``SSNR = 2 FSC / (1 - FSC)``, and on the back-projection
lattice ``SSNR = tau^2 * den`` with ``den`` the shell-mean weight of all images, so
``1 / tau^2 = mean(den_all) / SSNR`` needs no knowledge of the lattice's oversampling. A
class holding a fraction ``f`` of the images is then shrunk towards zero where
``f * SSNR < 1``: classes with few images do not blow up at high frequency. The same FSC
sets the scoring radius (0.143 shell plus a margin, at most Nyquist).

Scored against maps it contributed to, an image finds its own noise in its class: at
``D = 64`` a class of a few hundred images holds a given Fourier voxel from only ~10 of
them, so the self-match is worth tens to hundreds of nats per image, more than a small
domain, and the EM freezes at its starting partition (measured on het_domain: 0 of 6000
images changed class in 20 iterations). By default the images are therefore split into
``folds`` sets (image index modulo ``folds``; 2 is the even / odd split of
:mod:`cryofield.inference.refine`) and every image is scored against class maps
back-projected from the other folds only (cross-validation: the back-projection sums are
kept per fold, so the leave-one-fold-out maps cost one Wiener division each), Wiener
filtered with the SSNR of that fraction ``q = (folds - 1) / folds`` of the data
(``2 q FSC / (1 - FSC)``). More folds give less noisy maps (``q`` = 1/2, 3/4, 7/8 ...)
for ``folds`` times the accumulator memory. With two folds the maps of the halves share
no image, so classes the data cannot tell apart chase each other's noise and can come
out permuted between the halves: after every M-step the second half's classes are
matched to the first's (Hungarian method on the maps' squared differences); with three
or more the maps of any two folds share most of their images and stay matched. The
objective is a cross-validated likelihood, which is not bound to rise at every iteration
(``folds = 1``: the plain EM, whose log-likelihood cannot fall).

Class differences: every map is shrunk towards zero with the SSNR of its own share of
the images, but what tells the classes apart is their difference from the mean map,
whose SSNR is far lower (a domain of a few percent of the mass, in a class of 10% of the
images). Unfiltered, that difference is noise past a few shells, and the noise of a
small class's map decides its images' assignments (measured at the true poses on
bench_het dom0.93_pop10: the 10% state got 8.1% of the images, ARI 0.895). With several
folds, once the EM has ended, each class's difference ``D_j = V_j - sum_k pi_k V_k`` is
therefore Wiener filtered per shell, ``h_j = SSNR_j / (1 + SSNR_j)`` (the maps of every
fold and the full maps), and the images are assigned by one more E-step against the
filtered maps: the noise power of ``D_j`` is the jackknife variance of the
leave-one-fold-out differences, ``(F - 1) / F sum_f |D_fj - mean_f D_fj|^2`` (Efron &
Stein 1981, Ann. Stat. 9:586), its signal power ``|mean_f D_fj|^2`` minus that, both
shell means (:func:`_difference_filter`; ``filter_differences``). It needs no resolution
limit and adapts to every class: a class whose difference is signal to Nyquist keeps it.
Measured (bench_het, known poses, the k-means ARI of the trainer's codes): dom0.93_pop10
0.899 -> 0.991 (ceiling 1.000), dom0.97 0.894 -> 0.931 (ceiling 0.971). Not inside the
EM: there it makes classes that split one state identical (their difference is noise,
filtered away), so they never empty and share its images by their priors (measured on a
two-state test set with 8 classes: hard-label ARI 1.0 -> 0.75). On a small test set
(D = 24, 1000 images, a 10 % state) it moved the hard-label ARI from 0.937 to 0.902 and
0.805 to 0.764 (two seeds; more majority images taken as the minority).
Not with a mask (not measured there).

The classes start from a partition: k-means (k-means++) of the linear variability codes
(:func:`~cryofield.inference.variability.variability_latents`), or a random one. A class
whose prior falls below ``min_class_fraction / K`` can be reseeded with a random part of
the largest class; by default it is not (measured: reseeding keeps splitting one state
into interchangeable classes and lowered the ARI on het_domain at SNR 0.05 from 0.91 to
0.85): a class that empties is the data saying that fewer classes are distinguishable.

Focused classification (``--mask``, a soft mask ``M`` in ``[0, 1]``): the images are
scored against ``V_j' = M V_j + (1 - M) V_all``, ``V_all`` the consensus of the same images
(per fold: the back-projection sums of all classes, with the same prior), so the classes
differ only inside the mask and density outside it cannot separate them. Scoring ``X_i``
against ``V_j'`` is scoring the signal-subtracted image ``X_i - C_i P_i[(1 - M) V_all]``
against ``M V_j`` (RELION's focused classification with partial signal subtraction, Bai
et al. 2015, eLife 4:e11182; Nakane et al. 2018, eLife 7:e36861, whose multi-body
refinement subtracts the other bodies the same way), without writing subtracted images:
the residual of the variation outside the mask is common to all classes and enters only
as extra noise. The class maps are still back-projected from the whole images (only
``M V_j`` is ever used), the starting partition is that of the variability analysis
restricted to the mask (:mod:`cryofield.inference.variability`), and
:func:`classification_latents` embeds the masked maps ``M V_j``.

:func:`class_embedding` turns the responsibilities into latent codes for an auto-decoder:
``z_i = sum_j r_ij e_j`` with ``e_j`` the coordinates of class map ``j`` on the first
principal axes of the class maps (population-weighted PCA of their transforms inside the
scoring radius). Images of similar classes get close codes, and classes that tile a
continuous motion come out ordered along the first axes.

Within-class codes (:func:`within_class_codes`): a code made of responsibilities alone
says which class an image belongs to, not where inside it. Along a continuous motion the
data populate only a few classes (on a 22 deg hinge swing at D=64, 3 of 16), so every
image of a class gets the same code up to its residual uncertainty. Ordering the images
by how much more likely one class is than another does not fix it: the log-likelihood
ratio of image ``i`` scales with ``|C_i P_i (V_1 - V_0)|^2``, which depends on its view
and defocus, so ratios of different images are on different scales. Each image is
therefore also placed inside its class by a regression of its residual
``X_i - C_i P_i V_j`` on the projected class axes, shrunk by the class's own spread along
them (fitted by EM): discrete states, whose images scatter along the axes only by noise,
get a spread near zero and stay tight clusters, while a continuous motion gets the
spread it has and its images come out ordered within every class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cryofield.inference.data import BatchMaker
from cryofield.inference.pose_search import centre_images, cross_terms, slice_grid
from cryofield.inference.refine import backproject_halves_batched, reference_grid
from cryofield.logs import get_logger
from cryofield.physics.backproject import FourierBackprojector
from cryofield.physics.ctf import compute_ctf
from cryofield.physics.fourier import fft3_centered, ifft2_centered, ifft3_centered
from cryofield.physics.fsc import fsc, resolution_at
from cryofield.physics.lattice import radial_index_3d

__all__ = [
    "ClassifyResult",
    "ClassifySettings",
    "class_embedding",
    "classification_latents",
    "classify_3d",
    "default_n_classes",
]

log = get_logger("train")

INITS = ("pca", "random")


@dataclass
class ClassifySettings:
    """Settings of :func:`classify_3d` (radii in Fourier px of the training box).

    Attributes
    ----------
    n_classes
        ``K``.
    iters
        Most EM iterations.
    tol
        Stop early once at most this fraction of the images changed class in two
        iterations in a row (0: run all ``iters``).
    patience
        With several folds: stop once the cross-validated log-likelihood has not risen
        for this many iterations; the result is the iteration where it was highest.
    radius_px
        Scoring radius; None: the half maps' FSC 0.143 shell plus ``margin_px``.
    margin_px
        Added to the FSC radius.
    init
        ``"pca"``: k-means of the variability codes; ``"random"``: a random partition.
    init_radius_px
        Radius of the variability analysis of ``init="pca"`` (None: ``D / 4``, the
        trainer's default).
    init_zdim
        Components of that analysis.
    pad_factor
        Oversampling of the back-projection lattice (1: 8x less memory and work; 2:
        accurate gridding).
    oversample
        Oversampling of the sliced reference grids (2: accurate trilinear slices).
    tau_fudge
        Multiplies ``tau^2`` (RELION's ``--tau2_fudge``: above 1 trusts the data more).
    min_weight
        Responsibilities below this are not back-projected.
    min_class_fraction
        A class whose prior falls below ``min_class_fraction / K`` is reseeded (0: never).
    folds
        Cross-validation folds: every image is scored against class maps made from the
        other folds (see the module docstring); 1: the plain EM.
    max_images
        EM runs on at most this many images (a seeded random subset, kept in memory);
        the responsibilities of the others come from a final E-step.
    chunk
        Images per block.
    seed
        Random seed (subset, initial partition, reseeding).
    within_class
        :func:`classification_latents` places every image inside its class
        (:func:`within_class_codes`); False: the class coordinates only
        (:func:`class_embedding`).
    filter_differences
        With several folds and no mask: after the EM, every class's difference from the
        mean map is Wiener-filtered per shell by its own SSNR, from the spread of the
        leave-one-fold-out maps, and the images are assigned again against the filtered
        maps (module docstring, "Class differences"); False: the maps of the EM.
    """

    n_classes: int = 16
    iters: int = 20
    tol: float = 0.002
    patience: int = 4
    radius_px: float | None = None
    margin_px: float = 2.0
    init: str = "pca"
    init_radius_px: float | None = None
    init_zdim: int = 8
    pad_factor: int = 1
    oversample: int = 2
    tau_fudge: float = 1.0
    min_weight: float = 1e-3
    min_class_fraction: float = 0.0
    folds: int = 4
    max_images: int = 20000
    chunk: int = 256
    seed: int = 0
    within_class: bool = True
    filter_differences: bool = True


@dataclass
class ClassifyResult:
    """Output of :func:`classify_3d`.

    Attributes
    ----------
    resp
        ``(N, K)`` responsibilities (rows sum to 1).
    maps
        ``(K, D, D, D)`` class maps (normalised image units, origin at ``D // 2``).
    priors
        ``(K,)`` class priors.
    sigma2
        ``(N,)`` noise variance per complex Fourier coefficient of every image.
    radius_px
        Scoring radius used.
    fsc0143_px
        Half-map FSC 0.143 shell of all images (nan when ``radius_px`` was given).
    loglik
        Mean log-likelihood per image of the fitted images at every iteration's E-step
        (cross-validated with several folds; with one fold non-decreasing up to gridding
        error). ``resp``, ``maps`` and ``priors`` are those of its highest value.
    history
        Per iteration: ``loglik``, ``changed`` (fraction of images whose most likely
        class changed), ``reseeded``, ``max_prior``, ``min_prior``, ``seconds``.
    fold_maps
        ``(F, K, D, D, D)`` the maps that scored the fitted images of fold ``f`` (made
        without them; ``F = 1``: the full maps), of the kept iteration.
    rows
        ``(n,)`` the fitted images (their fold is ``rows % F``); the others were scored
        against ``maps``.
    """

    resp: torch.Tensor
    maps: torch.Tensor
    priors: torch.Tensor
    sigma2: torch.Tensor
    radius_px: float
    fsc0143_px: float
    loglik: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    fold_maps: torch.Tensor | None = None
    rows: np.ndarray | None = None


def default_n_classes(zdim: int) -> int:
    """Classes for a latent start of ``zdim`` dims: ``clip(2 zdim, 4, 16)``.

    At least ``zdim + 1`` classes are needed for ``zdim`` non-trivial axes; twice as many
    let a continuous motion be tiled finely enough to come out ordered and leave room to
    over-split discrete states rather than merge them. Classes the data cannot tell
    apart empty out (no reseeding), so a generous ``K`` costs time, not accuracy: on the
    built-in hinge motion (D=64, N=6000, SNR 0.1, true poses) 16 classes ended in 5
    populated ones and |Spearman| 0.98 with the motion, 8 classes in 7 and 0.95. Each
    class costs one slice per image per iteration, and more than 16 leave too few images
    per class at the usual ``N ~ 10^4``.
    """
    return int(min(16, max(4, 2 * int(zdim))))


@dataclass
class _Fit:
    """The fitted images kept in memory (``n`` images, ``M`` half-plane points)."""

    rows: np.ndarray  # (n,) image indices
    fold: torch.Tensor  # (n,) long, the cross-validation fold (0 with one fold)
    R: torch.Tensor  # (n, 3, 3)
    t: torch.Tensor  # (n, 2)
    x: torch.Tensor  # (n, M) complex, centred transforms at the half-plane points
    c: torch.Tensor  # (n, M) CTF there
    x2: torch.Tensor  # (n,) sum_k w |X|^2
    img: torch.Tensor  # (n, D, D) real training images (for back-projection)


class _Scorer:
    """Half-plane points inside the scoring radius and the E-step errors."""

    def __init__(self, batches: BatchMaker, radius_px: float, oversample: int) -> None:
        self.batches = batches
        self.radius = float(radius_px)
        self.oversample = int(oversample)
        self.idx, self.w = batches.points.half_index(radius_px)
        self.freqs = batches.points.freqs[self.idx]
        self.W = float(self.w.sum())
        self._ones = torch.ones(batches.points.D // 2 + 1)

    def observe(
        self, idx: np.ndarray, R: torch.Tensor, t: torch.Tensor, fold: torch.Tensor,
        keep_images: bool,
    ) -> _Fit:  # fmt: skip
        """Centred transforms, CTFs (and real images) of images ``idx`` at poses ``R, t``."""
        b = self.batches
        D = b.points.D
        x2s, xs, cs, imgs = [], [], [], []
        for a in range(0, len(idx), 256):
            part = idx[a : a + 256]
            f = b.images_ft(part)
            x = centre_images(f[:, self.idx], self.freqs, t[a : a + 256, None, :])[:, 0]
            xs.append(x)
            cs.append(b.ctf(part)[:, self.idx])
            x2s.append((self.w * (x.real**2 + x.imag**2)).sum(-1))
            if keep_images:  # inverse of images_ft's crop (as backproject_halves_batched)
                full = torch.zeros(len(part), D * D, dtype=torch.complex64, device=b.device)
                full[:, b.points.flat_index] = f
                imgs.append(ifft2_centered(full.reshape(-1, D, D)).real)
        img = torch.cat(imgs) if keep_images else torch.empty(0)
        return _Fit(np.asarray(idx), fold, R, t, torch.cat(xs), torch.cat(cs), torch.cat(x2s),
                    img)  # fmt: skip

    def errors(self, maps: torch.Tensor, o: _Fit, pos: torch.Tensor, chunk: int) -> torch.Tensor:
        """``(len(pos), K)`` squared residuals ``sum_k w |X - C S_j|^2`` of the images at
        positions ``pos`` of ``o`` against the ``(K, D, D, D)`` maps (one reference grid
        in memory at a time)."""
        E = torch.empty(len(pos), maps.shape[0], device=o.x.device)
        for j, m in enumerate(maps):
            if not bool(m.any()):  # an empty class: its map is zero, its slices too
                E[:, j] = o.x2[pos]
                continue
            grid, Dg = reference_grid(m, self._ones, self.radius, self.oversample)
            for a in range(0, len(pos), chunk):
                p = pos[a : a + chunk]
                sl = slice_grid(grid, Dg, o.R[p], self.freqs)  # (B, M)
                e = cross_terms(o.x[p][:, None], o.c[p], self.w, sl[:, None])[:, 0, 0]
                E[a : a + chunk, j] = e + o.x2[p]
        return E.clamp_min(0.0)

    def loglik(self, E: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` log-likelihoods of errors ``E`` at noise variances ``sigma2 (B,)``."""
        s = sigma2[:, None]
        return -E / (2 * s) - 0.5 * self.W * torch.log(math.pi * s)


def _all_errors(scorer: _Scorer, maps: torch.Tensor, o: _Fit, chunk: int) -> torch.Tensor:
    """``(n, K)`` errors of every image of ``o`` against the maps of its fold
    (``maps (F, K, D, D, D)``, ``maps[f]`` made without fold ``f``)."""
    E = torch.empty(len(o.rows), maps.shape[1], device=o.x.device)
    for f in range(maps.shape[0]):
        pos = torch.nonzero(o.fold == f).squeeze(1)
        if pos.numel():
            E[pos] = scorer.errors(maps[f], o, pos, chunk)
    return E


def _initial_partition(
    batches: BatchMaker,
    R: torch.Tensor,
    t: torch.Tensor,
    rows: np.ndarray,
    K: int,
    s: ClassifySettings,
    mask: torch.Tensor | None = None,
) -> np.ndarray:
    """``(n,)`` initial class of each fitted image (with a ``mask``: of the variability
    analysis restricted to it)."""
    rng = np.random.default_rng(s.seed)
    if s.init == "random":
        return rng.integers(0, K, len(rows))
    from sklearn.cluster import KMeans

    from cryofield.inference.variability import variability_latents

    D = batches.points.D
    r0 = s.init_radius_px if s.init_radius_px is not None else D / 4
    r0 = min(float(r0), D / 2 - 1)
    ti = torch.as_tensor(rows, device=R.device)
    sub = _RowSubset(batches, rows)
    z = variability_latents(sub, R[ti], t[ti], min(s.init_zdim, K), r0, seed=s.seed,  # type: ignore[arg-type]
                            mask=mask)  # fmt: skip
    km = KMeans(K, n_init=4, random_state=s.seed).fit(z.cpu().double().numpy())
    return km.labels_.astype(np.int64)


class _RowSubset:
    """A :class:`BatchMaker` view of some of its rows (index ``i`` -> ``rows[i]``)."""

    def __init__(self, batches: BatchMaker, rows: np.ndarray) -> None:
        self._b, self._rows = batches, np.asarray(rows)
        self.points, self.device = batches.points, batches.device

    def images_ft(self, idx: np.ndarray) -> torch.Tensor:
        return self._b.images_ft(self._rows[np.asarray(idx)])

    def ctf(self, idx: np.ndarray) -> torch.Tensor:
        return self._b.ctf(self._rows[np.asarray(idx)])


def _shell_prior(
    bps: list[FourierBackprojector], ssnr: torch.Tensor, tau_fudge: float
) -> torch.Tensor:
    """``(P, P, P)`` ``1 / tau^2 = mean(den) / (tau_fudge SSNR)`` per shell, ``den`` the
    summed weights of ``bps`` (all images of one half set, or all), ``ssnr`` ``(S,)`` the
    spectral SNR of a map made of them (the module docstring); infinite past shell ``S``."""
    P, D = bps[0].P, bps[0].D
    den = sum(bp.sums()[1] for bp in bps)
    assert isinstance(den, torch.Tensor)
    shell = (radial_index_3d(P, device=den.device) * D / P).round().long()
    S = ssnr.shape[0]
    inside = shell < S
    sh = shell[inside]
    d = den[inside]
    occ = d > 0
    tot = torch.zeros(S, device=den.device).index_add_(0, sh[occ], d[occ])
    cnt = torch.zeros(S, device=den.device).index_add_(0, sh[occ], torch.ones_like(d[occ]))
    inv_tau2 = (tot / cnt.clamp_min(1)) / (tau_fudge * ssnr.to(den.device))
    out = torch.full((P, P, P), float("inf"), device=den.device)
    out[inside] = inv_tau2[sh]
    return out


def _ssnr(curve: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(S,)`` spectral SNR of a map of a ``fraction`` of the images from their half-map
    FSC: ``2 fraction FSC / (1 - FSC)`` (a half map: ``FSC / (1 - FSC)``); DC: the largest."""
    f = curve.float().clamp(1e-3, 0.999)
    ssnr = 2.0 * fraction * f / (1 - f)
    if ssnr.shape[0] > 1:
        ssnr[0] = ssnr[1:].max()
    return ssnr


def _combined(bps: list[FourierBackprojector]) -> FourierBackprojector:
    """One back-projector holding the insertions of all of ``bps``."""
    return bps[0].merge(*bps[1:])


def _difference_filter(
    cv: torch.Tensor, pri: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wiener filter of each class's difference from the mean map, from the jackknife of
    the leave-one-fold-out maps (module docstring, "Class differences").

    Parameters
    ----------
    cv
        ``(F, K, D, D, D)`` class maps made without fold ``f`` (``F >= 2``), real space.
    pri
        ``(K,)`` class priors (weights of the mean map).

    Returns
    -------
    h, ssnr, noise
        ``(K, D // 2 + 1)`` per class and shell: the filter ``SSNR / (1 + SSNR)`` in
        ``[0, 1]`` (0 past the last shell), the SSNR of the difference, and its noise
        power ``(F - 1) / F sum_f |D_fj - mean_f D_fj|^2`` (jackknife variance of the
        full-data difference, shell mean per voxel). ``SSNR = max(|mean_f D_fj|^2 -
        noise, 0) / noise``.
    """
    F, K, D = cv.shape[0], cv.shape[1], cv.shape[-1]
    S = D // 2 + 1
    dev = cv.device
    w = (pri.double() / pri.double().sum().clamp_min(1e-30)).to(dev)
    shell = radial_index_3d(D, device=dev).round().long()
    inside = shell < S
    sh = shell[inside]
    cnt = (
        torch.zeros(S, dtype=torch.float64, device=dev)
        .index_add_(0, sh, torch.ones(sh.shape, dtype=torch.float64, device=dev))
        .clamp_min(1)
    )
    mean = torch.einsum("k,fkxyz->fxyz", w.float(), cv)  # (F, D, D, D)
    noise = torch.zeros(K, S, dtype=torch.float64, device=dev)
    power = torch.zeros(K, S, dtype=torch.float64, device=dev)
    for j in range(K):
        dj = fft3_centered(cv[:, j] - mean)[:, inside]  # (F, V)
        dbar = dj.mean(0)
        nv = (F - 1) / F * (dj - dbar).abs().double().pow(2).sum(0)
        noise[j].index_add_(0, sh, nv)
        power[j].index_add_(0, sh, dbar.abs().double().pow(2))
    noise, power = noise / cnt, power / cnt
    sig = (power - noise).clamp_min(0)
    ssnr = sig / noise.clamp_min(1e-30)
    h = torch.where(sig + noise > 0, sig / (sig + noise).clamp_min(1e-300), 1.0)
    return h, ssnr, noise


def _filtered(maps: torch.Tensor, pri: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(K, D, D, D)`` ``mean + ifft(h_j fft(V_j - mean))``, ``mean`` the ``pri``-weighted
    mean of ``maps`` and ``h (K, D // 2 + 1)`` per shell (:func:`_difference_filter`)."""
    D = maps.shape[-1]
    w = (pri.double() / pri.double().sum().clamp_min(1e-30)).float().to(maps.device)
    mean = torch.einsum("k,kxyz->xyz", w, maps)
    shell = radial_index_3d(D, device=maps.device).round().long()
    inside = shell < h.shape[1]
    out = torch.empty_like(maps)
    for j in range(maps.shape[0]):
        hv = torch.zeros(D, D, D, device=maps.device)
        hv[inside] = h[j].float().to(maps.device)[shell[inside]]
        out[j] = mean + ifft3_centered(fft3_centered(maps[j] - mean) * hv).real
    return out


def _m_step(
    scorer: _Scorer,
    fit: _Fit,
    resp: torch.Tensor,
    sigma2: torch.Tensor,
    curve: torch.Tensor,
    F: int,
    s: ClassifySettings,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wiener-regularised weighted back-projections: ``(F, K, D, D, D)`` the maps that
    score every fold (made without it; with ``F = 1`` the full maps), ``(K, D, D, D)`` the
    full maps, and ``resp`` (with two folds, the classes of fold 0 relabelled to match).
    With a ``mask`` ``M`` every map is ``M V_j + (1 - M) V_all``, ``V_all`` the consensus
    of the same images (the sum over the classes' insertions; module docstring)."""
    b = scorer.batches
    K = resp.shape[1]
    D = b.points.D
    bps = [[FourierBackprojector(D, s.pad_factor, b.device) for _ in range(K)] for _ in range(F)]
    freqs = bps[0][0].ctf_freqs()
    a_all = resp / sigma2[:, None]  # (n, K)
    for f in range(F):
        pos_f = torch.nonzero(fit.fold == f).squeeze(1)
        for a0 in range(0, len(pos_f), s.chunk):
            pos = pos_f[a0 : a0 + s.chunk]
            rows = fit.rows[pos.cpu().numpy()]
            if b.ctf_params is not None:
                p = b.ctf_params.subset(torch.as_tensor(rows)).to(b.device)
                ctf = compute_ctf(freqs, b.apix_A, p).float()  # (B, P, P)
            else:
                ctf = torch.ones(len(rows), *freqs.shape[:2], device=b.device)
            img, R, t, r, a = fit.img[pos], fit.R[pos], fit.t[pos], resp[pos], a_all[pos]
            for j, bp in enumerate(bps[f]):
                sel = torch.nonzero(r[:, j] >= s.min_weight).squeeze(1)
                if sel.numel() == 0:
                    continue
                g = a[sel, j].sqrt()[:, None, None]
                bp.add(img[sel] * g, R[sel], t[sel], ctf[sel] * g)

    def volumes(sets: list[FourierBackprojector], fraction: float) -> torch.Tensor:
        prior = _shell_prior(sets, _ssnr(curve, fraction), s.tau_fudge)
        for bp in sets:
            bp.prior = prior
        return torch.stack([bp.volume() for bp in sets])

    def focused(maps: torch.Tensor, sets: list[FourierBackprojector], fraction: float):
        if mask is None:
            return maps
        cons = volumes([_combined(sets)], fraction)[0]
        return mask * maps + (1 - mask) * cons

    if F == 1:
        full_maps = focused(volumes(bps[0], 1.0), bps[0], 1.0)
        return full_maps[None], full_maps, resp
    q = (F - 1) / F
    cv = []
    for f in range(F):
        rest = [bps[g] for g in range(F) if g != f]  # the other folds' sets of K classes
        maps_f = volumes([_combined([r[j] for r in rest]) for j in range(K)], q)
        cv.append(focused(maps_f, [bp for r in rest for bp in r], q))
    if F == 2:
        # the halves share no image: classes the data cannot tell apart chase each
        # other's noise and can come out permuted; relabel fold 0's classes (its maps
        # score fold 1, cv[1]) to match fold 1's (cv[0]), in its images too (with a
        # mask the maps differ inside it only)
        a, b = (cv[0], cv[1]) if mask is None else (cv[0] * mask, cv[1] * mask)
        perm = _matching(a, b)
        if not np.array_equal(perm, np.arange(K)):
            bps[0] = [bps[0][j] for j in perm]
            cv[1] = cv[1][torch.as_tensor(perm, device=cv[1].device)]
            resp = resp.clone()
            rows = fit.fold == 0
            resp[rows] = resp[rows][:, torch.as_tensor(perm, device=resp.device)]
    full_maps = volumes([_combined([bps[f][j] for f in range(F)]) for j in range(K)], 1.0)
    full_maps = focused(full_maps, [bp for f in range(F) for bp in bps[f]], 1.0)
    return torch.stack(cv), full_maps, resp


def _matching(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``(K,)`` permutation ``perm`` pairing map ``a[j]`` with ``b[perm[j]]`` (least total
    squared difference, Hungarian method) of two ``(K, D, D, D)`` sets."""
    from scipy.optimize import linear_sum_assignment

    K = a.shape[0]
    cost = torch.cdist(a.reshape(K, -1).double(), b.reshape(K, -1).double()) ** 2
    return np.asarray(linear_sum_assignment(cost.cpu().numpy())[1])


@torch.no_grad()
def classify_3d(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    settings: ClassifySettings | None = None,
    init_labels: np.ndarray | None = None,
    mask: torch.Tensor | None = None,
) -> ClassifyResult:
    """Maximum-likelihood 3-D classification of all images at fixed poses (module docstring).

    Parameters
    ----------
    batches
        Training images and CTFs of the ``N`` particles (normalised units).
    rotations, shifts_px
        ``(N, 3, 3)`` poses and ``(N, 2)`` shifts in training px.
    settings
        :class:`ClassifySettings`.
    init_labels
        ``(N,)`` starting class of every image (in ``[0, K)``; e.g. k-means labels of the
        current latents); None: ``settings.init``.
    mask
        ``(D, D, D)`` soft mask in ``[0, 1]`` (:func:`cryofield.io.mask.read_mask`): the
        classes differ inside it only (focused classification, module docstring); None:
        everywhere.

    Returns
    -------
    ClassifyResult
        With a mask, ``maps`` are the maps the images were scored against,
        ``M V_j + (1 - M) V_all``.
    """
    s = settings or ClassifySettings()
    if s.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {s.init!r}")
    K = int(s.n_classes)
    if K < 2:
        raise ValueError(f"n_classes must be >= 2, got {K}")
    dev = batches.device
    D = batches.points.D
    nyq = D / 2 - 1
    if mask is not None:
        mask = mask.to(dev, torch.float32)
        if mask.shape != (D, D, D):
            raise ValueError(f"mask must be ({D}, {D}, {D}), got {tuple(mask.shape)}")
    R = rotations.float().to(dev)
    t = shifts_px.float().to(dev)
    N = R.shape[0]
    F = int(s.folds)
    if F < 1:
        raise ValueError(f"folds must be >= 1, got {F}")
    gen = np.random.default_rng(s.seed)
    rows = np.sort(gen.permutation(N)[: min(N, s.max_images)])
    ti = torch.as_tensor(rows, device=dev)

    # half maps of the fitted images: FSC (radius, prior) and the noise start
    h1, h2 = backproject_halves_batched(batches, R[ti], t[ti], s.chunk, rows=rows)
    curve = fsc(h1, h2)
    res_px = float(resolution_at(curve, 0.143, batches.apix_A)[0])
    radius = s.radius_px if s.radius_px is not None else res_px + s.margin_px
    # reference_grid's crop (2 (ceil(r os) + 2) voxels) must fit the os * D lattice
    radius = float(min(radius, nyq, D / 2 - 2 / max(int(s.oversample), 1)))
    scorer = _Scorer(batches, radius, s.oversample)
    fold = torch.as_tensor(rows % F, device=dev)
    fit = scorer.observe(rows, R[ti], t[ti], fold, keep_images=True)
    n = len(rows)
    cons = ((h1 + h2) / 2)[None]
    E0 = scorer.errors(cons, fit, torch.arange(n, device=dev), s.chunk)[:, 0]
    sigma2 = (E0 / scorer.W).clamp_min(1e-12)  # residual to the consensus

    if init_labels is not None:
        labels = np.asarray(init_labels, np.int64)[rows]
        if labels.min() < 0 or labels.max() >= K:
            raise ValueError(f"init_labels must lie in [0, {K})")
    else:
        labels = _initial_partition(batches, R, t, rows, K, s, mask)
    resp = torch.nn.functional.one_hot(torch.as_tensor(labels), K).float().to(dev)
    log.info(
        "3-D classification: %d classes, %d images, radius %.1f px (half-map FSC 0.143 at "
        "%.1f px), init %s%s%s", K, n, radius, res_px,
        "given" if init_labels is not None else s.init,
        f", {F}-fold cross-validated" if F > 1 else "",
        "" if mask is None else f", focused on a mask ({float(mask.mean()):.1%} of the box)",
    )  # fmt: skip
    history: list[dict[str, float]] = []
    loglik: list[float] = []
    maps, full_maps, resp = _m_step(scorer, fit, resp, sigma2, curve, F, s, mask)
    priors = resp.mean(0)
    best = resp.argmax(1)
    kept: tuple = (-math.inf,)
    for it in range(1, s.iters + 1):
        t0 = time.perf_counter()
        E = _all_errors(scorer, maps, fit, s.chunk)  # (n, K)
        # CM step of the noise variances with the new maps and the last responsibilities
        sigma2 = ((resp * E).sum(1) / scorer.W).clamp_min(1e-12)
        logp = scorer.loglik(E, sigma2) + torch.log(priors.clamp_min(1e-30))[None]
        loglik.append(float(torch.logsumexp(logp, 1).mean()))
        resp = torch.softmax(logp, 1)
        new_best = resp.argmax(1)
        changed = float((new_best != best).float().mean())
        best = new_best
        priors = resp.mean(0)
        if loglik[-1] > kept[0]:  # the maps and what they say of the fitted images
            kept = (loglik[-1], it, resp.clone(), sigma2.clone(), maps, full_maps, priors)
        reseeded = 0
        for j in torch.nonzero(priors < s.min_class_fraction / K).squeeze(1).tolist():
            big = int(priors.argmax())
            members = torch.nonzero(resp.argmax(1) == big).squeeze(1)
            take = members[torch.as_tensor(gen.random(len(members)) < 0.5, device=dev)]
            resp[take] = torch.nn.functional.one_hot(torch.tensor(j), K).float().to(dev)
            priors = resp.mean(0)
            reseeded += 1
        maps, full_maps, resp = _m_step(scorer, fit, resp, sigma2, curve, F, s, mask)
        best, priors = resp.argmax(1), resp.mean(0)
        rec = dict(
            iteration=float(it), loglik=loglik[-1], changed=changed, reseeded=float(reseeded),
            max_prior=float(priors.max()), min_prior=float(priors.min()),
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
        history.append(rec)
        log.info(
            "classify %d: log-lik %.6g, %.1f%% changed class, priors %.3f-%.3f%s (%.0f s)",
            it, loglik[-1], 100 * changed, rec["min_prior"], rec["max_prior"],
            f", {reseeded} reseeded" if reseeded else "", rec["seconds"],
        )  # fmt: skip
        settled = len(history) >= 2 and max(h["changed"] for h in history[-2:]) <= s.tol
        worse = F > 1 and len(kept) > 1 and it - kept[1] >= s.patience
        if reseeded == 0 and (settled or worse):
            break

    # the iteration of the highest (cross-validated) log-likelihood: its responsibilities
    # of the fitted images; the full maps for the rest
    if len(kept) > 1:
        _, it_best, resp, sigma2, maps, full_maps, priors = kept
        if it_best < len(history):
            log.info("classify: keeping iteration %d (highest log-likelihood)", it_best)
    filt = s.filter_differences and F > 1 and mask is None
    before = resp.argmax(1)
    if filt:  # the class differences Wiener-filtered (module docstring), for a last E-step
        h = _difference_filter(maps, priors)[0]
        maps = torch.stack([_filtered(m, priors, h) for m in maps])
        full_maps = _filtered(full_maps, priors, h)
    if filt or len(kept) == 1:  # (no iteration: the E-step of the starting maps)
        E = _all_errors(scorer, maps, fit, s.chunk)
        logp = scorer.loglik(E, sigma2) + torch.log(priors.clamp_min(1e-30))[None]
        resp = torch.softmax(logp, 1)
    if filt:
        moved = float((resp.argmax(1) != before).float().mean())
        big = torch.nonzero(priors > 0.01).squeeze(1).tolist()
        priors = resp.mean(0)
        log.info(
            "classify: class differences filtered by their SSNR (shells above 0.5 of the "
            "classes above 1%%: %s); %.1f%% of the images changed class",
            ", ".join(str(int((h[j] > 0.5).sum())) for j in big), 100 * moved,
        )  # fmt: skip
    logpi = torch.log(priors.clamp_min(1e-30))[None]
    full_resp = torch.empty(N, K, device=dev)
    full_s2 = torch.empty(N, device=dev)
    full_resp[ti], full_s2[ti] = resp, sigma2
    rest = np.setdiff1d(np.arange(N), rows)
    for a in range(0, len(rest), s.chunk):
        idx = rest[a : a + s.chunk]
        tj = torch.as_tensor(idx, device=dev)
        o = scorer.observe(idx, R[tj], t[tj], torch.zeros_like(tj), keep_images=False)
        E = scorer.errors(full_maps, o, torch.arange(len(idx), device=dev), s.chunk)
        s2 = (E.min(1).values / scorer.W).clamp_min(1e-12)
        for _ in range(3):  # fixed point of the noise variance and the responsibilities
            r = torch.softmax(scorer.loglik(E, s2) + logpi, 1)
            s2 = ((r * E).sum(1) / scorer.W).clamp_min(1e-12)
        full_resp[tj] = torch.softmax(scorer.loglik(E, s2) + logpi, 1)
        full_s2[tj] = s2
    fsc_px = res_px if s.radius_px is None else float("nan")
    return ClassifyResult(full_resp, full_maps, priors, full_s2, radius, fsc_px, loglik, history,
                          maps, rows)  # fmt: skip


def _class_axes(
    maps: torch.Tensor, pri: torch.Tensor, zdim: int, radius_px: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal axes of the class maps (prior-weighted PCA of their 3-D transforms inside
    ``radius_px``; None: Nyquist).

    Returns ``e (K, q)``, the coordinates of the maps on the first ``q <= zdim`` axes
    (unit vectors of the transforms), and ``coef (K, q)``: axis ``a`` is the map
    ``sum_j coef[j, a] V_j`` (inside the ball; the columns of ``coef`` sum to 0, so the
    axis is the same for maps offset by a common map), float64.
    """
    D = maps.shape[-1]
    dev = pri.device
    pri = pri.double()
    r = D / 2 - 1 if radius_px is None else float(radius_px)
    ball = radial_index_3d(D, device=maps.device) <= r
    feats = torch.stack([torch.view_as_real(fft3_centered(m.float())[ball]).reshape(-1)
                         for m in maps]).to(dev, torch.float64)  # (K, F)  # fmt: skip
    mean = (pri[:, None] * feats).sum(0) / pri.sum().clamp_min(1e-30)
    Y = (feats - mean) * pri.sqrt()[:, None]
    U, sv, Vt = torch.linalg.svd(Y, full_matrices=False)  # Vt (min(K, F), F)
    q = min(zdim, int((sv > 1e-6 * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0)
    e = (feats - mean) @ Vt[:q].T  # (K, q)
    # Vt[a] = sum_j U[j, a] sqrt(pri_j) (f_j - mean) / sv[a]; U[:, a] is orthogonal to
    # sqrt(pri), so the mean drops out
    coef = U[:, :q] * pri.sqrt()[:, None] / sv[:q].clamp_min(1e-30)
    return e, coef


def _scaled(z: torch.Tensor, zdim: int) -> torch.Tensor:
    """``(N, zdim)`` float32 codes from ``(N, q)``: centred, the first component at unit
    variance (the others keep their ratios), zeros beyond ``q``."""
    z = z - z.mean(0)
    q = z.shape[1]
    if q > 0 and z.shape[0] > 1 and float(z[:, 0].std()) > 0:
        z = z / z[:, 0].std()
    out = torch.zeros(z.shape[0], zdim, dtype=torch.float32, device=z.device)
    out[:, :q] = z.float()
    return out


def class_embedding(
    resp: torch.Tensor,
    maps: torch.Tensor,
    zdim: int,
    radius_px: float | None = None,
    priors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent codes ``(N, zdim)`` from a classification.

    ``z_i = sum_j r_ij e_j``: ``e_j`` are the coordinates of class map ``j`` on the
    first ``zdim`` principal axes of the class maps (PCA of their centred 3-D transforms
    inside ``radius_px``, each class weighted by its prior, centred on the
    prior-weighted mean map). The codes are centred and scaled so that the first
    component has unit variance (the others keep their ratios, so the ordering of the
    axes by variance is kept); axes beyond ``K - 1`` are zero.

    Parameters
    ----------
    resp
        ``(N, K)`` responsibilities.
    maps
        ``(K, D, D, D)`` class maps.
    zdim
        Latent dimension.
    radius_px
        Fourier radius (px) of the comparison; None: Nyquist.
    priors
        ``(K,)`` class weights of the PCA; None: ``resp.mean(0)``.
    """
    pri = resp.mean(0) if priors is None else priors.to(resp.device)
    e, _ = _class_axes(maps, pri, zdim, radius_px)
    return _scaled(resp.double() @ e, zdim)


@torch.no_grad()
def within_class_codes(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    res: ClassifyResult,
    zdim: int,
    min_prior: float = 2e-3,
    iters: int = 50,
    chunk: int = 256,
    radius_px: float | None = None,
    min_weight: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Latent codes ``(N, zdim)`` from a classification, placed inside their classes
    by every image's own data (module docstring, "Within-class codes").

    ``z_i = sum_j r_ij (e_j + d_ij)``, ``e_j`` the class coordinates of
    :func:`class_embedding` and ``d_ij`` the image's offset from class ``j`` along the
    same axes ``A_a`` (maps): the posterior mean of the linear model
    ``X_i = C_i P_i (V_j + sum_a d_a A_a) + n_i``, ``d ~ N(mu_j, Lambda_j)``:
    ``d_ij = (G_i / s_i + Lambda_j^-1)^-1 (h_ij / s_i + Lambda_j^-1 mu_j)`` with
    ``G_i,ab = Re<C P_i A_a, C P_i A_b>_w``, ``h_ij,a = Re<C P_i A_a, X_i - C P_i V_j>_w``,
    ``s_i`` the noise variance, and ``mu_j, Lambda_j`` fitted by EM over the images of
    each class (empirical Bayes, the mixture of factor analysers of Ghahramani & Hinton
    1996, with the loadings fixed to the class axes). Each fitted image is compared with
    the maps made without its fold (``res.fold_maps``), so its own noise is not in them.
    Classes with a prior below ``min_prior`` are left out (their responsibilities go to
    the others), and so are the pairs with ``r_ij < min_weight`` (memory: one ``(q, q)``
    matrix per image and one ``q``-vector per pair kept, about ``N`` of them). The
    regression uses the frequencies inside ``radius_px`` (None: ``res.radius_px``).

    Returns the codes and ``info``: ``within_sd`` (mean over classes of the
    responsibility-weighted within-class sd along axis 1, from ``Lambda_j``) and
    ``between_sd`` (sd of the class coordinates along axis 1).
    """
    dev = batches.device
    pri_all = res.priors.to(dev).double()
    keep = torch.nonzero(pri_all >= min_prior).squeeze(1)
    if keep.numel() < 2:
        z = class_embedding(res.resp, res.maps, zdim, res.radius_px, res.priors)
        return z, {"within_sd": 0.0, "between_sd": 0.0}
    pri = pri_all[keep]
    r = res.resp.to(dev).double()[:, keep]
    r = r / r.sum(1, keepdim=True).clamp_min(1e-30)
    rad = res.radius_px if radius_px is None else float(radius_px)
    e, coef = _class_axes(res.maps[keep.to(res.maps.device)], pri, zdim, rad)
    q, Kp, N = e.shape[1], keep.numel(), r.shape[0]
    if q == 0:
        return _scaled(r @ e, zdim), {"within_sd": 0.0, "between_sd": 0.0}
    scorer = _Scorer(batches, rad, 2)
    R = rotations.float().to(dev)
    t = shifts_px.float().to(dev)
    cf = coef.to(dev, torch.float32)  # (Kp, q)
    # per image G (q, q); per (image, class) with r_ij >= min_weight the projections h
    G = torch.empty(N, q, q, dtype=torch.float32, device=dev)
    h_parts: list[list[torch.Tensor]] = [[] for _ in range(Kp)]
    i_parts: list[list[torch.Tensor]] = [[] for _ in range(Kp)]
    groups: list[tuple[torch.Tensor, np.ndarray]] = []
    fitted = np.zeros(N, bool)
    if res.fold_maps is not None and res.rows is not None:
        F = res.fold_maps.shape[0]
        fitted[res.rows] = True
        for f in range(F):
            groups.append((res.fold_maps[f], res.rows[res.rows % F == f]))
    groups.append((res.maps, np.flatnonzero(~fitted)))
    w = scorer.w
    for maps, idx in groups:
        if len(idx) == 0:
            continue
        grids = [reference_grid(maps[int(j)], scorer._ones, scorer.radius, scorer.oversample)
                 for j in keep.tolist()]  # fmt: skip
        for a in range(0, len(idx), chunk):
            part = idx[a : a + chunk]
            tj = torch.as_tensor(part, device=dev)
            o = scorer.observe(part, R[tj], t[tj], torch.zeros_like(tj), keep_images=False)
            sl = torch.stack([slice_grid(g, Dg, o.R, scorer.freqs) for g, Dg in grids], 1)
            cs = o.c[:, None] * sl  # (B, Kp, M)
            ca = torch.einsum("bjm,ja->bam", cs, cf.to(cs.dtype))  # (B, q, M)
            caw = ca.conj() * w
            G[tj] = torch.einsum("bam,bcm->bac", caw, ca).real
            H = torch.einsum("bam,bjm->bja", caw, o.x[:, None] - cs).real  # (B, Kp, q)
            for j in range(Kp):
                sel = torch.nonzero(r[tj, j] >= min_weight).squeeze(1)
                h_parts[j].append(H[sel, j])
                i_parts[j].append(tj[sel])
    s2 = res.sigma2.to(dev).double().clamp_min(1e-12)
    eye = torch.eye(q, dtype=torch.float64, device=dev)
    ec = e - (pri[:, None] * e).sum(0) / pri.sum()
    between = (pri[:, None, None] * ec[:, :, None] * ec[:, None, :]).sum(0) / pri.sum()
    lam = between + 1e-6 * between.diagonal().max() * eye  # every class's EM starts here
    z = torch.zeros(N, q, dtype=torch.float64, device=dev)
    rsum = torch.zeros(N, dtype=torch.float64, device=dev)
    lam_sd = torch.zeros(Kp, dtype=torch.float64, device=dev)
    for j in range(Kp):
        idx_j = torch.cat(i_parts[j])
        if idx_j.numel() == 0:
            continue
        h_j = torch.cat(h_parts[j]).double() / s2[idx_j, None]  # (n_j, q)
        A_j = G[idx_j].double() / s2[idx_j, None, None]  # (n_j, q, q)
        r_j = r[idx_j, j]
        n_j = r_j.sum().clamp_min(1e-30)
        lam_j, mu_j = lam.clone(), torch.zeros(q, dtype=torch.float64, device=dev)
        for _ in range(iters):  # EM of the class's offset distribution N(mu_j, lam_j)
            lam_inv = torch.linalg.inv(lam_j)
            P = A_j + lam_inv
            d_j = torch.linalg.solve(P, h_j + lam_inv @ mu_j)
            mu_j = (r_j[:, None] * d_j).sum(0) / n_j
            dv = d_j - mu_j
            S = r_j[:, None, None] * (dv[:, :, None] * dv[:, None, :] + torch.linalg.inv(P))
            lam_j = S.sum(0) / n_j + 1e-9 * eye
        lam_inv = torch.linalg.inv(lam_j)
        d_j = torch.linalg.solve(A_j + lam_inv, h_j + lam_inv @ mu_j)
        z.index_add_(0, idx_j, r_j[:, None] * (e[j] + d_j))
        rsum.index_add_(0, idx_j, r_j)
        lam_sd[j] = lam_j[0, 0].clamp_min(0).sqrt()
    z = z / rsum.clamp_min(1e-30)[:, None]
    info = {
        "within_sd": float((pri * lam_sd).sum() / pri.sum()),
        "between_sd": float(between[0, 0].clamp_min(0).sqrt()),
    }
    return _scaled(z, zdim), info


def classification_latents(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    zdim: int,
    settings: ClassifySettings | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent codes ``(N, zdim)`` from 3-D classification at fixed poses: a drop-in
    alternative to :func:`~cryofield.inference.variability.variability_latents`.

    ``settings.n_classes`` is replaced by :func:`default_n_classes` ``(zdim)`` when
    ``settings`` is None. The codes are :func:`within_class_codes` (``settings.within_class``,
    the default) or :func:`class_embedding`. With a ``mask`` the classification is focused
    on it and the codes are :func:`class_embedding`'s of the masked class maps ``M V_j``
    (the axes of ``z`` are the variability inside the mask).
    """
    s = settings or ClassifySettings(n_classes=default_n_classes(zdim))
    res = classify_3d(batches, rotations, shifts_px, s, mask=mask)
    # with a mask, the embedding of the masked maps and no within-class codes: the
    # residual to a class holds the variation outside the mask, which the regression on
    # the projected axes would pick up where the projections overlap
    if s.within_class and mask is None:
        z, info = within_class_codes(batches, rotations, shifts_px, res, zdim)
        log.info("within-class codes: class spread %.3g, between classes %.3g (axis 1)",
                 info["within_sd"], info["between_sd"])  # fmt: skip
    else:
        maps = res.maps if mask is None else res.maps * mask.to(res.maps.device, res.maps.dtype)
        z = class_embedding(res.resp, maps, zdim, res.radius_px, res.priors)
    var = z.var(0).tolist()
    log.info("class embedding: code variances %s", ", ".join(f"{v:.3g}" for v in var))
    return z
