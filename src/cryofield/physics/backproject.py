"""Fourier-space gridding back-projection with CTF (Wiener-type) correction.

Each image ``I_i`` with pose ``R_i``, translation ``t_i`` and CTF ``c_i`` obeys, by the
Fourier slice theorem (see :mod:`cryofield.physics.slicing`),
``I_hat_i(k) = c_i(k) exp(-2 pi i k.t_i) V_hat(R_i^T [k, 0])``. After re-centring
(multiplying by ``exp(+2 pi i k.t_i)``) we splat ``c_i I_hat_i`` and ``c_i^2`` onto the
3-D lattice at ``[kx, ky, 0] @ R_i`` with trilinear weights and estimate

``V_hat = sum_i w c_i I_hat_i / (sum_i w c_i^2 + eps)``,

the least-squares (Wiener, for ``eps > 0``) solution of direct Fourier inversion
(e.g. Grigorieff 1998, FREALIGN; Penczek 2010, Methods Enzymol. 482:1). ``eps`` is
``wiener_eps`` times the mean weight of the occupied voxels. Only frequencies within
the Nyquist circle ``|k| < 1/2`` are inserted.

Gridding: images are zero-padded to ``P = pad_factor * D`` so the 3-D lattice samples
the transform twice as finely. The weight-normalised trilinear splat convolves the
transform with a normalised triangle kernel, which multiplies the real-space map by
``sinc^2(x / P) sinc^2(y / P) sinc^2(z / P)``; this factor is divided out before the map
is cropped back to ``D`` (the gridding correction of Jackson et al. 1991, IEEE TMI
10:473, in its dense-sampling limit).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fourier import fft2_centered, ifft3_centered
from cryofield.physics.lattice import coords_1d, freq_grid_2d
from cryofield.physics.shift import shift_phase
from cryofield.physics.slicing import _corner_offsets, _corner_weights, slice_coordinates

__all__ = ["FourierBackprojector", "reconstruct_fourier"]


class FourierBackprojector:
    """Accumulates CTF-weighted central slices; call :meth:`add` per chunk, then
    :meth:`volume`.

    Parameters
    ----------
    D
        Box size of the images (even).
    pad_factor
        Oversampling of the 3-D lattice (1 or 2; 2 is accurate, 1 uses 8x less memory).
    device
        Device of the accumulators.
    symmetry
        ``(G, 3, 3)`` point-group operators (:func:`cryofield.physics.symmetry.
        symmetry_operators`), or None: every image is inserted at the ``G`` equivalent
        poses ``R @ g`` (docs/dev/contracts.md), so the map has the symmetry.
    """

    def __init__(
        self,
        D: int,
        pad_factor: int = 2,
        device: torch.device | str | None = None,
        symmetry: torch.Tensor | None = None,
    ) -> None:
        if D % 2:
            raise ValueError(f"box size must be even, got D={D}")
        if pad_factor not in (1, 2):
            raise ValueError(f"pad_factor must be 1 or 2, got {pad_factor}")
        self.D = D
        self.P = P = pad_factor * D
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.symmetry = (
            None
            if symmetry is None or symmetry.shape[0] <= 1
            else symmetry.to(device=self.device, dtype=torch.float32)
        )
        # accumulator of (Re sum c I, Im sum c I, sum c^2) on a (P + 1)^3 lattice
        self._acc = torch.zeros((P + 1) ** 3, 3, dtype=torch.float32, device=self.device)
        freqs = freq_grid_2d(P, device=self.device).reshape(-1, 2)
        # Friedel symmetry (real images): insert only the half plane kx >= 0, with the
        # kx = 0 line (which holds both k and -k) at half weight; volume_ft() adds the
        # point-mirrored accumulator, which restores the other half exactly.
        self._inside = ((freqs * freqs).sum(-1) < 0.25) & (freqs[:, 0] >= 0)
        self._freqs = freqs[self._inside]  # (M, 2)
        self._half = torch.where(self._freqs[:, 0] == 0, 0.5, 1.0)  # (M,)
        self.n_images = 0
        #: ``(P, P, P)`` per-voxel Wiener term ``1 / tau^2`` of :meth:`volume_ft`
        #: (None: the relative ``wiener_eps``)
        self.prior: torch.Tensor | None = None

    def add(
        self,
        images: torch.Tensor,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
        ctf: torch.Tensor | None = None,
    ) -> None:
        """Insert a chunk of images.

        Parameters
        ----------
        images
            ``(N, D, D)`` real images.
        rotations
            ``(N, 3, 3)`` poses.
        shifts_px
            ``(N, 2)`` translations of the images (``I(x) = P(x - t)``), or None.
        ctf
            ``(N, P, P)`` CTF values on ``freq_grid_2d(P)`` (``P = pad_factor * D``), or
            None (no CTF). :meth:`ctf_freqs` gives that grid.
        """
        f = self._image_ft(images)  # (N, M)
        n = f.shape[0]
        c = None
        if ctf is not None:
            c = ctf.to(self.device, torch.float32).reshape(n, -1)[:, self._inside]
        self._insert(f, rotations, shifts_px, c)

    def _image_ft(self, images: torch.Tensor) -> torch.Tensor:
        """Transforms of zero-padded images at the inserted points, ``(N, M)`` complex."""
        D, P = self.D, self.P
        if images.dim() != 3 or images.shape[1:] != (D, D):
            raise ValueError(f"images must be (N, {D}, {D}), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        if P != D:
            images = torch.nn.functional.pad(images, [(P - D) // 2] * 4)
        return fft2_centered(images).reshape(images.shape[0], -1)[:, self._inside]

    def _insert(
        self,
        f: torch.Tensor,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None,
        c: torch.Tensor | None,
    ) -> None:
        """Insert ``(N, M)`` transforms at the half-plane points, CTF ``(N, M)`` or None."""
        P = self.P
        if shifts_px is not None:
            f = f * shift_phase(self._freqs, -shifts_px.to(self.device, torch.float32))
        if c is not None:
            f = f * c
            c2 = c * c * self._half
        else:
            c2 = self._half.expand(f.shape)
        f = f * self._half
        val, wgt = torch.view_as_real(f).reshape(-1, 2), c2.reshape(-1)
        rot = rotations.to(self.device, torch.float32)
        for g in [None] if self.symmetry is None else self.symmetry:
            r = rot if g is None else rot @ g  # the equivalent poses R g
            idx = slice_coordinates(r, self._freqs) * P + P // 2
            self._splat(idx.reshape(-1, 3), val, wgt)
        self.n_images += f.shape[0]

    def add_particles(
        self,
        images: torch.Tensor,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
        ctf: CTFParams | None = None,
        apix_A: torch.Tensor | float = 1.0,
    ) -> None:
        """:meth:`add` with the CTF given as parameters (evaluated on the padded grid).

        Parameters
        ----------
        images, rotations, shifts_px
            As in :meth:`add`.
        ctf
            ``CTFParams`` of the ``N`` images, or None.
        apix_A
            ``(N,)`` or scalar pixel size of ``images`` in A.
        """
        f = self._image_ft(images)  # (N, M)
        c = None
        if ctf is not None:
            apix = torch.as_tensor(apix_A, dtype=torch.float32, device=self.device)
            c = compute_ctf(self._freqs, apix, ctf.to(self.device))  # (N, M) inserted points
        self._insert(f, rotations, shifts_px, c)

    def merge(self, *others: FourierBackprojector) -> FourierBackprojector:
        """A new accumulator holding the insertions of this one and ``others`` (e.g. two
        half sets, or all folds but one); its ``prior`` is None."""
        if any((o.D, o.P) != (self.D, self.P) for o in others):
            raise ValueError("cannot merge back-projectors of different sizes")
        out = FourierBackprojector(self.D, self.P // self.D, self.device, self.symmetry)
        out._acc = self._acc.clone()
        for o in others:
            out._acc += o._acc.to(self.device)
        out.n_images = self.n_images + sum(o.n_images for o in others)
        return out

    def without(self, other: FourierBackprojector) -> FourierBackprojector:
        """A new accumulator holding this one's insertions less ``other``'s (``other``'s
        images must be among this one's: e.g. a half set without one of its folds, the
        leave-fold-out reference of :func:`cryofield.inference.refine.pose_floor`); its
        ``prior`` is None. Exact up to float rounding: the sums are linear in the images."""
        if (other.D, other.P) != (self.D, self.P):
            raise ValueError("cannot subtract back-projectors of different sizes")
        out = self.merge()
        out._acc -= other._acc.to(self.device)
        out.n_images = self.n_images - other.n_images
        return out

    def ctf_freqs(self) -> torch.Tensor:
        """``(P, P, 2)`` frequency grid on which :meth:`add` expects CTF values."""
        return freq_grid_2d(self.P, device=self.device)

    def _splat(self, idx: torch.Tensor, val: torch.Tensor, wgt: torch.Tensor) -> None:
        # Points satisfy |k| < 1/2, so 0 < idx < P and every corner lies in the
        # (P + 1)^3 accumulator: no bounds checks needed.
        G = self.P + 1
        base = idx.floor()
        i0 = base.long()
        lin = (i0[:, 2] * G + i0[:, 1]) * G + i0[:, 0]
        lin = (lin[:, None] + _corner_offsets(G, idx.device)).reshape(-1)  # (8K,)
        w = _corner_weights(idx - base)  # (K, 8)
        src = torch.cat([val, wgt[:, None]], dim=1)  # (K, 3): Re, Im, weight
        self._acc.index_add_(0, lin, (src[:, None, :] * w[:, :, None]).reshape(-1, 3))

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Friedel-completed sums on the padded lattice: ``num`` ``(P, P, P)`` complex64
        (``sum C X`` gridded) and ``den`` ``(P, P, P)`` float32 (``sum C^2`` gridded)."""
        P = self.P
        full = self._acc.reshape(P + 1, P + 1, P + 1, 3)
        mirror = full.flip(0, 1, 2)  # index i <-> P - i, i.e. k <-> -k
        mirror = mirror * torch.tensor([1.0, -1.0, 1.0], device=self.device)  # conjugate
        acc = (full + mirror)[:P, :P, :P]
        return torch.complex(acc[..., 0], acc[..., 1]), acc[..., 2]

    def volume_ft(self, wiener_eps: float = 1e-3) -> torch.Tensor:
        """Current estimate of the centred 3-D transform on the padded lattice:
        ``num / (den + eps)`` with ``eps = wiener_eps * mean(den)`` over the occupied
        voxels, or ``num / (den + prior)`` when :attr:`prior` (``(P, P, P)`` per-voxel
        ``1 / tau^2``, e.g. a per-shell signal prior) is set.

        Returns
        -------
        torch.Tensor
            ``(P, P, P)`` complex64 (no gridding correction).
        """
        num, den = self.sums()
        occupied = den > 0
        if self.prior is not None:
            return torch.where(occupied, num / (den + self.prior), 0)
        mean_w = den[occupied].mean() if bool(occupied.any()) else torch.tensor(1.0)
        eps = wiener_eps * mean_w
        return torch.where(occupied, num / (den + eps), 0)

    def volume(self, wiener_eps: float = 1e-3) -> torch.Tensor:
        """Gridding-corrected real-space reconstruction.

        Returns
        -------
        torch.Tensor
            ``(D, D, D)`` float32, origin at ``D // 2``.
        """
        D, P = self.D, self.P
        vol = ifft3_centered(self.volume_ft(wiener_eps)).real
        x = torch.sinc(coords_1d(P, device=self.device) / P) ** 2
        vol = vol / (x[:, None, None] * x[None, :, None] * x[None, None, :])
        lo = (P - D) // 2
        return vol[lo : lo + D, lo : lo + D, lo : lo + D].contiguous()


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def reconstruct_fourier(
    images: torch.Tensor,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None = None,
    ctf: CTFParams | torch.Tensor | None = None,
    apix_A: torch.Tensor | float = 1.0,
    *,
    wiener_eps: float = 1e-3,
    pad_factor: int = 2,
    chunk_size: int = 256,
    symmetry: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct a volume from images with known poses.

    Parameters
    ----------
    images
        ``(N, D, D)`` real images.
    rotations
        ``(N, 3, 3)`` poses (RELION matrix convention).
    shifts_px
        ``(N, 2)`` image translations in px (``I(x) = P(x - t)``), or None.
    ctf
        ``CTFParams`` of ``N`` particles, ``(N, D, D)`` CTF values, or None.
    apix_A
        ``(N,)`` or scalar pixel size (used to evaluate ``CTFParams``).
    wiener_eps
        Regulariser relative to the mean inserted weight.
    pad_factor
        Oversampling of the Fourier lattice (2: accurate; 1: 8x less memory).
    chunk_size
        Images inserted at once.
    symmetry
        ``(G, 3, 3)`` point-group operators: each image is inserted at its ``G``
        equivalent poses (:class:`FourierBackprojector`); None: no symmetry.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` float32 volume, same scale as the projected density.
    """
    n, D = images.shape[0], images.shape[-1]
    bp = FourierBackprojector(D, pad_factor=pad_factor, device=images.device, symmetry=symmetry)
    apix = torch.as_tensor(apix_A, dtype=torch.float32)
    for sl in _chunks(n, chunk_size):
        shifts = None if shifts_px is None else shifts_px[sl]
        if isinstance(ctf, CTFParams):
            a = apix if apix.dim() == 0 else apix[sl]
            bp.add_particles(images[sl], rotations[sl], shifts, ctf.subset(sl), a)
        else:
            if ctf is not None and ctf.shape[-1] != bp.P:
                raise ValueError(
                    f"CTF values must be on the padded ({bp.P}, {bp.P}) grid; pass CTFParams"
                )
            bp.add(images[sl], rotations[sl], shifts, None if ctf is None else ctf[sl])
    return bp.volume(wiener_eps)
