"""Image formation for simulation: oversampled Fourier-slice projection, CTF, shift.

The simulator uses the same operators as training (``physics.slicing.extract_slices``,
``physics.ctf.compute_ctf``, ``physics.shift.shift_phase``), but on a finer Fourier grid so
that the images are close to the continuous forward model rather than to its D-grid
approximation:

1. the volume ``(D, D, D)`` is zero-padded in real space to ``(pD, pD, pD)``
   (``p = oversample``, default 2; origin stays at the centre voxel), then
   ``V_hat = fft3_centered(padded)``;
2. for a pose ``R`` the central slice ``V_hat(R^T [kx, ky, 0])`` is read by trilinear
   interpolation on the ``pD x pD`` frequency grid of the padded box (Fourier slice
   theorem, docs/dev/contracts.md) inside the Nyquist circle ``|k| < 1/2`` (zero
   outside), giving the transform of the projection ``P_R V(x, y) = sum_z V(R^T [x, y, z])``
   on a ``pD x pD`` field of view; the volume is first divided by the real-space
   transform of the trilinear kernel, ``sinc^2(x/pD) sinc^2(y/pD) sinc^2(z/pD)``, so that
   interpolation does not shade the image towards its edges (gridding correction);
3. the CTF and the translation phase ramp ``exp(-2 pi i k.t)`` are applied on that same
   fine grid (so CTF delocalisation leaves the box instead of wrapping around it);
4. ``ifft2_centered`` and a crop of the central ``D x D`` pixels give the image.

Zero-padding by ``p`` makes the Fourier samples ``p`` times denser, which reduces the
interpolation error of step 2 (the usual gridding argument; e.g. Penczek et al. 2004,
Ultramicroscopy 100:77, on oversampling before Fourier-space interpolation). The test
suite compares the result with the real-space reference ``project_real_space``.
"""

from __future__ import annotations

import torch

from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fourier import fft3_centered, ifft2_centered
from cryofield.physics.lattice import coords_1d, freq_grid_2d
from cryofield.physics.shift import shift_phase
from cryofield.physics.slicing import extract_slices

__all__ = ["OversampledProjector"]


class OversampledProjector:
    """Project one volume under many poses with the oversampled Fourier slice.

    Parameters
    ----------
    volume
        ``(D, D, D)`` real volume (numpy or torch), indexed ``[z, y, x]``, D even.
    oversample
        Integer padding factor ``p >= 1`` (``p = 1``: no padding).
    max_points
        Fourier samples computed at once (poses are processed in groups of
        ``max_points // (pD)^2``), which bounds the memory of :meth:`project`.

    Examples
    --------
    >>> proj = OversampledProjector(vol, oversample=2)  # doctest: +SKIP
    >>> imgs = proj.project(R, shifts_px=t, ctf=params, apix_A=2.0)  # (B, D, D)
    """

    def __init__(self, volume: object, oversample: int = 2, max_points: int = 2**21) -> None:
        vol = torch.as_tensor(volume, dtype=torch.float32)
        if vol.dim() != 3 or len(set(vol.shape)) != 1 or vol.shape[0] % 2:
            raise ValueError(f"volume must be (D, D, D) with D even, got {tuple(vol.shape)}")
        if int(oversample) != oversample or oversample < 1:
            raise ValueError(f"oversample must be a positive integer, got {oversample}")
        self.D = int(vol.shape[0])
        self.Dp = int(oversample) * self.D
        self.pad = (self.Dp - self.D) // 2
        # gridding pre-correction: trilinear interpolation of the transform multiplies the
        # real-space object by sinc^2(x / Dp) per axis; divide it out beforehand
        x = torch.sinc(coords_1d(self.D) / self.Dp) ** 2  # (D,)
        vol = vol / (x[:, None, None] * x[None, :, None] * x[None, None, :])
        padded = torch.nn.functional.pad(vol, (self.pad,) * 6)  # (Dp, Dp, Dp)
        self.volume_ft = fft3_centered(padded)  # (Dp, Dp, Dp) complex64
        self.freqs = freq_grid_2d(self.Dp)  # (Dp, Dp, 2) cycles/px
        # Nyquist circle: the image is band-limited; zero outside
        self._inside = (self.freqs.reshape(-1, 2) ** 2).sum(-1) < 0.25  # (Dp*Dp,)
        self.max_points = int(max_points)

    def project(
        self,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
        ctf: CTFParams | None = None,
        apix_A: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Images ``CTF * shift(P_R V)`` of ``B`` poses.

        Parameters
        ----------
        rotations
            ``(B, 3, 3)`` poses (RELION's matrix ``A``).
        shifts_px
            ``(B, 2)`` translations ``(tx, ty)`` in px (``I(x) = P(x - t)``), or None.
        ctf
            ``B`` particles' CTF parameters, or None for no CTF.
        apix_A
            Pixel size (A) used by the CTF.

        Returns
        -------
        torch.Tensor
            ``(B, D, D)`` float32 images (projection values are sums of voxels along z).
        """
        R = torch.as_tensor(rotations, dtype=torch.float32)
        B = R.shape[0]
        t = None if shifts_px is None else torch.as_tensor(shifts_px, dtype=torch.float32)
        step = max(1, self.max_points // (self.Dp * self.Dp))  # bounds the peak memory
        out = torch.empty(B, self.D, self.D)
        for start in range(0, B, step):
            sl = slice(start, min(start + step, B))
            out[sl] = self._project(
                R[sl],
                None if t is None else t[sl].reshape(-1, 2),
                None if ctf is None else ctf.subset(sl),
                apix_A if not torch.is_tensor(apix_A) or apix_A.dim() == 0 else apix_A[sl],
            )
        return out

    def _project(
        self,
        R: torch.Tensor,
        t: torch.Tensor | None,
        ctf: CTFParams | None,
        apix_A: float | torch.Tensor,
    ) -> torch.Tensor:
        B = R.shape[0]
        flat = self.freqs.reshape(-1, 2)  # (Dp*Dp, 2)
        slices = torch.zeros(B, self.Dp * self.Dp, dtype=self.volume_ft.dtype)
        slices[:, self._inside] = extract_slices(self.volume_ft, R, flat[self._inside])  # (B, M)
        slices = slices.reshape(B, self.Dp, self.Dp)
        if ctf is not None:
            slices = slices * compute_ctf(self.freqs, apix_A, ctf)  # (B, Dp, Dp)
        if t is not None:
            slices = slices * shift_phase(self.freqs, t)
        images = ifft2_centered(slices).real  # (B, Dp, Dp)
        p, D = self.pad, self.D
        return images[:, p : p + D, p : p + D]
