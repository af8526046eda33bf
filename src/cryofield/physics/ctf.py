"""Contrast transfer function (RELION convention), vectorised over particles.

For a frequency ``s`` (1/A) at angle ``alpha`` in the image plane (following RELION's
``CTF::getCTF``, Scheres 2012, and cryoDRGN's ``compute_ctf``; the sign convention is in
docs/dev/contracts.md, "Contrast and CTF sign"):

- electron wavelength ``lambda = 12.2643247 / sqrt(V + 0.978466e-6 V^2)`` A (``V`` in
  volts; relativistically corrected de Broglie wavelength, e.g. Williams & Carter,
  *Transmission Electron Microscopy*, table 1.1);
- defocus ``df = 0.5 (dfU + dfV + (dfU - dfV) cos(2 (alpha - astig_angle)))`` (A,
  positive = underfocus);
- ``gamma = 2 pi (-0.5 df lambda s^2 + 0.25 Cs lambda^3 s^4) - phase_shift``
  with ``Cs`` converted from mm to A;
- ``CTF = sqrt(1 - w^2) sin(gamma) - w cos(gamma)``, times ``exp(-B s^2 / 4)`` when a
  B-factor ``B`` (A^2) is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

__all__ = ["CTFParams", "compute_ctf", "electron_wavelength_A"]


def electron_wavelength_A(voltage_kV: torch.Tensor | float) -> torch.Tensor:
    """Relativistic electron wavelength in A for an acceleration voltage in kV.

    Parameters
    ----------
    voltage_kV
        ``(...)`` voltage in kV (300 kV -> 0.019687 A).

    Returns
    -------
    torch.Tensor
        ``(...)`` wavelength in A.
    """
    v = torch.as_tensor(voltage_kV, dtype=torch.float64) * 1e3
    lam = 12.2643247 / torch.sqrt(v + 0.978466e-6 * v * v)
    if isinstance(voltage_kV, torch.Tensor) and voltage_kV.is_floating_point():
        lam = lam.to(voltage_kV.dtype)
    return lam


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters; every field is an ``(N,)`` tensor.

    Attributes
    ----------
    defocus_u_A, defocus_v_A
        Defocus along the major/minor astigmatism axes, A, positive = underfocus.
    astig_angle_rad
        Angle of the U axis from the image x axis, radians (counter-clockwise).
    voltage_kV
        Acceleration voltage, kV.
    cs_mm
        Spherical aberration, mm.
    amp_contrast
        Amplitude contrast fraction ``w`` in ``[0, 1)``.
    phase_shift_rad
        Phase-plate shift, radians.
    bfactor_A2
        Envelope B-factor, A^2 (0 = none).
    """

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    astig_angle_rad: torch.Tensor
    voltage_kV: torch.Tensor
    cs_mm: torch.Tensor
    amp_contrast: torch.Tensor
    phase_shift_rad: torch.Tensor
    bfactor_A2: torch.Tensor

    def __post_init__(self) -> None:
        n = {tuple(getattr(self, f.name).shape) for f in fields(self)}
        if len(n) != 1 or len(next(iter(n))) != 1:
            raise ValueError(f"CTFParams fields must all be (N,) tensors, got shapes {n}")

    def __len__(self) -> int:
        return int(self.defocus_u_A.shape[0])

    @classmethod
    def from_arrays(
        cls,
        *,
        defocus_u_A: Any,
        defocus_v_A: Any,
        astig_angle_deg: Any,
        voltage_kV: Any,
        cs_mm: Any,
        amp_contrast: Any,
        phase_shift_deg: Any = 0.0,
        bfactor_A2: Any = 0.0,
        n: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> CTFParams:
        """Build from file-boundary values (angles in degrees); scalars are broadcast."""
        raw = dict(
            defocus_u_A=defocus_u_A,
            defocus_v_A=defocus_v_A,
            astig_angle_rad=np.deg2rad(np.asarray(astig_angle_deg, dtype=np.float64)),
            voltage_kV=voltage_kV,
            cs_mm=cs_mm,
            amp_contrast=amp_contrast,
            phase_shift_rad=np.deg2rad(np.asarray(phase_shift_deg, dtype=np.float64)),
            bfactor_A2=bfactor_A2,
        )
        arrays = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in raw.items()}
        if n is None:
            n = max(a.shape[0] for a in arrays.values())
        out = {
            k: torch.as_tensor(np.broadcast_to(a, (n,)).copy(), dtype=dtype, device=device)
            for k, a in arrays.items()
        }
        return cls(**out)

    @classmethod
    def from_table(
        cls,
        table: Any,
        indices: Any = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> CTFParams:
        """Parameters of particles ``indices`` (all when None) of a ``ParticleTable``.

        ``table.ctf`` is the io layer's dict of ``(N,)`` numpy arrays with keys
        ``defocus_u_A, defocus_v_A, astig_angle_deg, voltage_kV, cs_mm, amp_contrast,
        phase_shift_deg, bfactor_A2`` (the last two optional, default 0).
        """
        if table.ctf is None:
            raise ValueError(f"{getattr(table, 'source_path', 'table')}: no CTF parameters")
        ctf = table.ctf
        sel = slice(None) if indices is None else np.asarray(indices)
        n = len(np.asarray(ctf["defocus_u_A"])[sel])
        return cls.from_arrays(
            defocus_u_A=np.asarray(ctf["defocus_u_A"])[sel],
            defocus_v_A=np.asarray(ctf["defocus_v_A"])[sel],
            astig_angle_deg=np.asarray(ctf["astig_angle_deg"])[sel],
            voltage_kV=np.asarray(ctf["voltage_kV"])[sel],
            cs_mm=np.asarray(ctf["cs_mm"])[sel],
            amp_contrast=np.asarray(ctf["amp_contrast"])[sel],
            phase_shift_deg=np.asarray(ctf.get("phase_shift_deg", 0.0))[sel]
            if np.ndim(ctf.get("phase_shift_deg", 0.0))
            else 0.0,
            bfactor_A2=np.asarray(ctf.get("bfactor_A2", 0.0))[sel]
            if np.ndim(ctf.get("bfactor_A2", 0.0))
            else 0.0,
            n=n,
            dtype=dtype,
            device=device,
        )

    def subset(self, indices: torch.Tensor | np.ndarray | slice) -> CTFParams:
        """Parameters of a subset of particles."""
        if isinstance(indices, np.ndarray):
            indices = torch.as_tensor(indices)
        return CTFParams(**{f.name: getattr(self, f.name)[indices] for f in fields(self)})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move/cast every field."""
        return CTFParams(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )


def compute_ctf(
    freqs: torch.Tensor, apix_A: torch.Tensor | float, params: CTFParams
) -> torch.Tensor:
    """Evaluate the CTF of each particle at frequency points.

    Parameters
    ----------
    freqs
        ``(..., 2)`` frequencies ``(kx, ky)`` in cycles/px (e.g. ``freq_grid_2d(D)``).
    apix_A
        ``(N,)`` or scalar pixel size in A/px; ``s = k / apix_A``.
    params
        ``N`` particles' parameters.

    Returns
    -------
    torch.Tensor
        ``(N, ...)`` CTF values, dtype of ``freqs``.
    """
    n = len(params)
    dtype = freqs.dtype
    batch = (n,) + (1,) * (freqs.dim() - 1)

    def col(t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=dtype, device=freqs.device)
        return t.expand(n).reshape(batch) if t.dim() == 0 else t.to(dtype).reshape(batch)

    apix = col(apix_A)
    kx, ky = freqs[..., 0], freqs[..., 1]
    s2 = (kx * kx + ky * ky)[None] / (apix * apix)
    alpha = torch.atan2(ky, kx)[None]
    dfu, dfv = col(params.defocus_u_A), col(params.defocus_v_A)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (alpha - col(params.astig_angle_rad))))
    lam = col(electron_wavelength_A(params.voltage_kV.double()))
    cs_A = col(params.cs_mm) * 1e7
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs_A * lam**3 * s2 * s2)
    gamma = gamma - col(params.phase_shift_rad)
    w = col(params.amp_contrast)
    ctf = torch.sqrt(1 - w * w) * torch.sin(gamma) - w * torch.cos(gamma)
    bfac = col(params.bfactor_A2)
    return ctf * torch.exp(-bfac / 4 * s2)
