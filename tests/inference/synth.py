"""Small synthetic datasets for the model/inference tests (independent of simulate/)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fourier import fft2_centered, ifft2_centered
from cryofield.physics.lattice import freq_grid_2d
from cryofield.physics.rotation import random_rotations
from cryofield.physics.shift import phase_shift_fourier
from cryofield.physics.slicing import project_real_space


def blob_volume(D: int, n_blobs: int = 8, seed: int = 0, width_px: float = 2.0) -> torch.Tensor:
    """``(D, D, D)`` asymmetric sum of Gaussian blobs inside radius ``0.3 D``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(D, dtype=torch.float32) - D // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for _ in range(n_blobs):
        cen = (torch.rand(3, generator=g) - 0.5) * D * 0.45
        amp = 0.5 + torch.rand((), generator=g)
        d2 = (xx - cen[0]) ** 2 + (yy - cen[1]) ** 2 + (zz - cen[2]) ** 2
        vol += amp * torch.exp(-d2 / (2 * width_px**2))
    return vol


@dataclass
class SynthData:
    images: torch.Tensor  # (N, D, D)
    rotations: torch.Tensor  # (N, 3, 3)
    shifts_px: torch.Tensor  # (N, 2)
    ctf: CTFParams | None
    apix_A: float
    volumes: list[torch.Tensor]
    labels: np.ndarray


def make_dataset(
    volumes: list[torch.Tensor],
    n: int,
    snr: float | None = None,
    shift_px: float = 0.0,
    use_ctf: bool = True,
    apix_A: float = 3.0,
    seed: int = 0,
) -> SynthData:
    """Projections of ``volumes`` (label i uniform) with CTF, shifts and white noise."""
    D = volumes[0].shape[-1]
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, generator=g)
    labels = torch.randint(len(volumes), (n,), generator=g)
    proj = torch.empty(n, D, D)
    for i, v in enumerate(volumes):
        m = labels == i
        if m.any():
            proj[m] = project_real_space(v, R[m], chunk_size=32)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift_px
    f = phase_shift_fourier(fft2_centered(proj), t)
    ctf = None
    if use_ctf:
        dfu = 10000 + 15000 * torch.rand(n, generator=g).double()
        ctf = CTFParams.from_arrays(
            defocus_u_A=dfu.numpy(), defocus_v_A=(dfu - 300).numpy(), astig_angle_deg=30.0,
            voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1, n=n,
        )  # fmt: skip
        f = f * compute_ctf(freq_grid_2d(D), apix_A, ctf)
    img = ifft2_centered(f).real.float()
    if snr is not None:
        sig = img.std(dim=(-2, -1)).mean()
        img = img + torch.randn(img.shape, generator=g) * (sig / math.sqrt(snr))
    return SynthData(img, R, t, ctf, apix_A, volumes, labels.numpy())


def field_images(field, R: torch.Tensor, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``(B, M)`` exact transforms of shifted projections of a field at ``freqs``.

    ``F = (H(k) + H(-k)) / 2 + i (H(-k) - H(k)) / 2`` from the field's Hartley values on
    the central slices ``[kx, ky, 0] R``, then moved by ``t`` (``I(x) = P(x - t)``).
    """
    from cryofield.inference.pose_search import centre_images

    with torch.no_grad():
        k3 = torch.einsum("mi,bij->bmj", freqs, R[:, :2, :])
        h_pos, h_neg = field(k3), field(-k3)
    F = torch.complex(0.5 * (h_pos + h_neg), 0.5 * (h_neg - h_pos))
    return centre_images(F, freqs, -t[:, None, :])[:, 0]
