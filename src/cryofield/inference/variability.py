"""Linear 3-D variability analysis (probabilistic PCA of the volume) to start the latents.

With the poses of a consensus run fixed, each image is modelled at low resolution as

``X_i(k) = C_i(k) [W_0 + sum_j z_ij W_j](R_i^T [k, 0]) + n_i(k)``,  ``z_i ~ N(0, I)``,

complex white noise of variance ``s2_i`` per Fourier coefficient. ``W_0`` (the mean
volume) and the ``K`` variability volumes ``W_j`` are voxel grids of the 3-D transform
(nearest-neighbour lattice, spacing ``1 / D``); they are estimated by expectation
maximisation, as in probabilistic PCA (Tipping & Bishop 1999, J. R. Stat. Soc. B 61:611;
Roweis 1998, NIPS) and cryoSPARC's 3-D variability analysis (Punjani & Fleet 2021,
J. Struct. Biol. 213:107702):

* E-step, per image: ``Sigma_i = (Re(J_i^H J_i) / s2_i + I)^-1`` and
  ``z_i = Sigma_i Re(J_i^H r_i) / s2_i`` with ``J_i = [C_i W_j(v_ik)]_kj`` and residual
  ``r_i = X_i - C_i W_0``;
* M-step, per voxel ``v``: ``W_v = A_v^-1 b_v`` with
  ``A_v = sum_(i,k -> v) C_ik^2 / s2_i E[zz^T]_i`` and ``b_v = sum C_ik X_ik / s2_i E[z]_i``
  (``z`` extended by a constant 1 for the mean).

Nearest-neighbour assignment makes the M-step block-diagonal over voxels, so every
iteration is one pass over the images and an exact solve (not a small gradient step):
the codes organise in a few iterations, where an auto-decoder table moved by gradients
needs hundreds of epochs. The codes ``z_i`` start the latent table of a heterogeneous run.

With a soft mask ``M`` (``--mask``, focused heterogeneity) the variability volumes are
projected onto masked maps after every M-step, ``W_j <- F[M F^-1[W_j]]`` (``j >= 1``; the
mean ``W_0`` keeps the whole map), with ``M`` resampled to the lattice of ``W`` by Fourier
cropping: variation outside the mask has no basis vector to load on, so the codes describe
the variability inside it (as cryoSPARC's 3-D variability with a focus mask; Punjani &
Fleet 2021). The projection follows the unconstrained per-voxel solve, so the M-step is
approximate (a projected EM step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryofield.inference.data import BatchMaker
from cryofield.inference.pose_search import centre_images
from cryofield.logs import get_logger
from cryofield.physics.fourier import fft3_centered, ifft3_centered

log = get_logger("train")


@dataclass
class _Obs:
    """Low-resolution observations of a chunk of images (all ``(B, M)``)."""

    voxel: torch.Tensor  # int32, voxel index
    x: torch.Tensor  # complex, centred image transform
    c: torch.Tensor  # CTF
    inv_s2: torch.Tensor  # (B,) 1 / noise variance


class VariabilityPCA:
    """EM estimation of the mean and ``K`` variability volumes; codes of any images.

    Parameters
    ----------
    batches
        Image/CTF access of the run (normalised Fourier values).
    rotations, shifts_px
        ``(N, 3, 3)``, ``(N, 2)`` poses of all images.
    K
        Number of variability components (the latent dimension).
    radius_px
        Fourier radius (px) of the frequencies used.
    mask
        ``(D, D, D)`` soft mask in ``[0, 1]``: the variability volumes are kept inside it
        (module docstring); None: no mask.
    """

    def __init__(
        self,
        batches: BatchMaker,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor,
        K: int,
        radius_px: float,
        mask: torch.Tensor | None = None,
    ) -> None:
        self.batches = batches
        self.R = rotations
        self.t = shifts_px
        self.K = int(K)
        pts = batches.points
        self.n = pts.count(radius_px)
        self.freqs = pts.freqs[: self.n]
        self.Dv = 2 * (math.ceil(radius_px) + 1) + 1
        dev = self.freqs.device
        self.W = torch.zeros(self.Dv**3, self.K + 1, dtype=torch.complex64, device=dev)
        self.mask = None if mask is None else lattice_mask(mask.to(dev), self.Dv)

    def observe(self, idx: np.ndarray) -> _Obs:
        """Observations of images ``idx`` (noise variance from the residual to ``W_0``)."""
        b = self.batches
        ti = torch.as_tensor(idx, device=self.freqs.device)
        x = b.images_ft(idx)[:, : self.n]
        c = b.ctf(idx)[:, : self.n]
        x = centre_images(x, self.freqs, self.t[ti][:, None, :])[:, 0]
        coords = torch.einsum("mi,bij->bmj", self.freqs, self.R[ti][:, :2, :]) * b.points.D
        v = coords.round().long() + self.Dv // 2
        voxel = ((v[..., 2] * self.Dv + v[..., 1]) * self.Dv + v[..., 0]).int()
        o = _Obs(voxel, x, c, torch.empty(0))
        self.update_noise(o)
        return o

    def update_noise(self, o: _Obs) -> None:
        """Set ``o.inv_s2`` from the residual to the current mean volume ``W_0``."""
        r = o.x - o.c * self.W[o.voxel, 0]
        o.inv_s2 = 1.0 / (r.real**2 + r.imag**2).mean(-1).clamp_min(1e-8)

    def codes(self, o: _Obs) -> tuple[torch.Tensor, torch.Tensor]:
        """E-step: posterior means ``(B, K)`` and covariances ``(B, K, K)``."""
        Wg = self.W[o.voxel]  # (B, M, K + 1)
        J = o.c[..., None] * Wg[..., 1:]
        r = o.x - o.c * Wg[..., 0]
        s = o.inv_s2[:, None, None]
        # full-plane points count each independent (Friedel-paired) coefficient twice
        P = torch.einsum("bmj,bml->bjl", J.conj(), J).real * s / 2
        P = P + torch.eye(self.K, device=P.device)
        g = torch.einsum("bmj,bm->bj", J.conj(), r).real * s[:, :, 0] / 2
        cov = torch.linalg.inv(P)
        return (cov @ g[..., None])[..., 0], cov

    def m_step(self, obs: list[_Obs], z: list[torch.Tensor], cov: list[torch.Tensor]) -> None:
        """M-step: solve the ``(K + 1) x (K + 1)`` normal equations of every voxel."""
        K1 = self.K + 1
        dev = self.W.device
        A = torch.zeros(self.Dv**3, K1 * K1, device=dev)
        b = torch.zeros(self.Dv**3, K1, dtype=torch.complex64, device=dev)
        for o, zi, ci in zip(obs, z, cov, strict=True):
            ze = torch.cat([torch.ones_like(zi[:, :1]), zi], 1)  # (B, K + 1)
            E = ze[:, :, None] * ze[:, None, :]
            E[:, 1:, 1:] += ci
            w = o.c**2 * o.inv_s2[:, None]  # (B, M)
            A.index_add_(
                0,
                o.voxel.reshape(-1),
                (w[..., None] * E.reshape(-1, 1, K1 * K1)).reshape(-1, K1 * K1),
            )
            xb = o.c * o.x * o.inv_s2[:, None]
            b.index_add_(0, o.voxel.reshape(-1), (xb[..., None] * ze[:, None, :]).reshape(-1, K1))
        A = A.reshape(-1, K1, K1)
        seen = A[:, 0, 0] > 0
        As = A[seen]
        ridge = 1e-3 * As.diagonal(dim1=1, dim2=2).mean(-1)
        As = As + ridge[:, None, None] * torch.eye(K1, device=dev)
        rhs = torch.stack([b[seen].real, b[seen].imag], -1)  # (V, K + 1, 2)
        sol = torch.linalg.solve(As, rhs)
        self.W.zero_()
        self.W[seen] = torch.complex(sol[..., 0], sol[..., 1])
        if self.mask is not None:
            Dv = self.Dv
            w = self.W[:, 1:].T.reshape(self.K, Dv, Dv, Dv)
            w = fft3_centered(ifft3_centered(w) * self.mask)
            self.W[:, 1:] = w.reshape(self.K, -1).T


def lattice_mask(mask: torch.Tensor, Dv: int) -> torch.Tensor:
    """A ``(D, D, D)`` real-space mask resampled to the ``Dv^3`` real-space grid of a
    ``Dv^3`` Fourier lattice of spacing ``1 / D`` (``Dv`` odd or even; its samples are
    ``D / Dv`` px apart): the central ``Dv^3`` block of its transform (zero-padded when
    ``Dv > D``), transformed back, clipped to ``[0, 1]``."""
    D = mask.shape[-1]
    f = fft3_centered(mask.to(torch.float32))
    out = torch.zeros(Dv, Dv, Dv, dtype=f.dtype, device=f.device)
    n = min(D, Dv)
    a, b = D // 2 - n // 2, Dv // 2 - n // 2
    out[b : b + n, b : b + n, b : b + n] = f[a : a + n, a : a + n, a : a + n]
    return (ifft3_centered(out).real * (Dv / D) ** 3).clamp(0.0, 1.0)


def variability_latents(
    batches: BatchMaker,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    zdim: int,
    radius_px: float,
    iters: int = 20,
    max_images: int = 10000,
    chunk: int = 256,
    seed: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent codes ``(N, zdim)`` from linear variability analysis at fixed poses.

    EM runs on up to ``max_images`` images (a random subset, kept in memory at
    ``radius_px``); the codes of all images are then the E-step of the fitted model,
    rotated to principal axes (column 0 the largest variance).

    Parameters
    ----------
    batches
        Image/CTF access of the run.
    rotations, shifts_px
        ``(N, 3, 3)``, ``(N, 2)`` poses (training px).
    zdim
        Number of components.
    radius_px
        Fourier radius (px of the training box) of the frequencies used.
    mask
        ``(D, D, D)`` soft mask: the variability inside it only (module docstring).
    """
    N = rotations.shape[0]
    dev = rotations.device
    pca = VariabilityPCA(batches, rotations, shifts_px, zdim, radius_px, mask)
    gen = torch.Generator().manual_seed(seed)
    fit = torch.randperm(N, generator=gen)[: min(N, max_images)].sort().values.numpy()
    chunks = [fit[i : i + chunk] for i in range(0, len(fit), chunk)]
    obs = [pca.observe(c) for c in chunks]  # W = 0: noise variance of the raw images
    z = [torch.randn(len(c), zdim, generator=gen).to(dev) for c in chunks]
    cov = [torch.zeros(len(c), zdim, zdim, device=dev) for c in chunks]
    for it in range(iters):
        pca.m_step(obs, z, cov)
        if it == 0:  # noise variances of the residuals to the mean volume
            for o in obs:
                pca.update_noise(o)
        post = [pca.codes(o) for o in obs]
        z, cov = [p[0] for p in post], [p[1] for p in post]
    out = torch.empty(N, zdim, device=dev)
    for i in range(0, N, chunk):
        idx = np.arange(i, min(N, i + chunk))
        out[i : i + len(idx)] = pca.codes(pca.observe(idx))[0]
    zc = out - out.mean(0)
    _, s, vt = torch.linalg.svd(zc, full_matrices=False)
    var = (s**2 / max(N - 1, 1)).tolist()
    log.info(
        "variability analysis (%d images, radius %.1f px, %d iterations%s): code variances %s",
        len(fit), radius_px, iters, "" if mask is None else ", masked",
        ", ".join(f"{v:.3g}" for v in var),
    )  # fmt: skip
    return zc @ vt.T
