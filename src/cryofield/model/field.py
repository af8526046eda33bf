"""The neural field ``V_theta(k, z)``: the volume's Hartley transform as an MLP.

``H(k) = Re F(k) - Im F(k)`` with ``F`` the centred 3-D DFT of the volume
(``docs/dev/contracts.md``). The MLP follows the DRGN-AI / cryoDRGN decoder (Zhong et al.,
Nat. Methods 2021; Levy et al., 2024): Gaussian random Fourier features of ``k``, the
latent ``z`` concatenated, residual hidden layers, one Hartley output. The first layer is
split (``W [gamma(k), z] = W_k gamma(k) + W_z z``) so a grid shared by many images is
encoded once.

For a real volume ``F(-k) = conj F(k)``, so ``Re F = (H(k) + H(-k)) / 2`` and
``Im F = (H(-k) - H(k)) / 2`` (Bracewell 1986); :func:`hartley_grid_to_fourier` uses this
to turn a Hartley grid into the complex grid that slicing and the loss use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cryofield.model.encoding import GaussianFourierFeatures
from cryofield.physics.fourier import iht3_centered, negate_frequency


class _ResidualLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


def ball_coords(D: int, radius_px: float, oversample: int = 1) -> tuple[torch.Tensor, int]:
    """Voxel coordinates of a cropped cube holding the ball of ``radius_px``.

    Parameters
    ----------
    D
        Full box size (px, even).
    radius_px
        Ball radius in Fourier px (clipped to ``D / 2 - 1``).
    oversample
        Lattice refinement: voxel spacing ``1 / (oversample D)`` cycles/px.

    Returns
    -------
    coords : torch.Tensor
        ``(Dc, Dc, Dc, 3)`` frequencies ``(kx, ky, kz)`` in cycles/px of the full box,
        on the cropped cube of even size ``Dc`` centred on DC (index ``Dc // 2``).
    Dc : int
        Cropped box size (at most ``oversample * D``); slice with frequencies scaled by
        ``oversample * D / Dc``.
    """
    r = min(float(radius_px), D / 2 - 1)
    Dg = int(oversample) * D
    Dc = min(Dg, 2 * (math.ceil(r * oversample) + 2))
    idx = (torch.arange(Dc, dtype=torch.float32) - Dc // 2) / Dg
    kz, ky, kx = torch.meshgrid(idx, idx, idx, indexing="ij")
    return torch.stack([kx, ky, kz], dim=-1), Dc


def hartley_grid_to_fourier(h: torch.Tensor) -> torch.Tensor:
    """Complex centred Fourier grid from a Hartley grid of a real volume.

    Parameters
    ----------
    h
        ``(..., Dc, Dc, Dc)`` centred Hartley values (DC at ``Dc // 2``); index 0 of each
        axis (the unpaired Nyquist plane) must be zero.

    Returns
    -------
    torch.Tensor
        ``(..., Dc, Dc, Dc)`` complex ``F = (H(k) + H(-k)) / 2 + i (H(-k) - H(k)) / 2``.
    """
    h_neg = negate_frequency(h, 3)  # index i -> Dc - i
    return torch.complex(0.5 * (h + h_neg), 0.5 * (h_neg - h))


class HartleyField(nn.Module):
    """MLP ``(k, z) -> H(k; z)`` in normalised units (times ``output_scale`` = data units).

    Parameters
    ----------
    D
        Training box size (px).
    apix_A
        Pixel size (A) at the training box size (stored for rendering).
    zdim
        Latent dimension (0: homogeneous).
    hidden
        Hidden width.
    layers
        Number of residual hidden layers.
    n_freqs, sigma, seed
        Gaussian Fourier feature parameters (see :class:`GaussianFourierFeatures`).
    """

    def __init__(
        self,
        D: int,
        apix_A: float = 1.0,
        zdim: int = 0,
        hidden: int = 256,
        layers: int = 3,
        n_freqs: int = 64,
        sigma: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(
            D=int(D),
            apix_A=float(apix_A),
            zdim=int(zdim),
            hidden=int(hidden),
            layers=int(layers),
            n_freqs=int(n_freqs),
            sigma=float(sigma),
            seed=int(seed),
        )
        self.D = int(D)
        self.apix_A = float(apix_A)
        self.zdim = int(zdim)
        self.encoding = GaussianFourierFeatures(D, n_freqs, sigma, seed)
        self.input_k = nn.Linear(self.encoding.out_dim, hidden)
        self.input_z = nn.Linear(zdim, hidden, bias=False) if zdim > 0 else None
        self.hidden = nn.Sequential(*[_ResidualLayer(hidden) for _ in range(layers)])
        self.output = nn.Linear(hidden, 1)
        self.register_buffer("output_scale", torch.ones(()))
        # radial amplitude envelope (normalised units) per Fourier shell 0..D/2; the MLP
        # output is multiplied by it so the network only learns O(1) values
        self.register_buffer("envelope", torch.ones(self.D // 2 + 2))
        # frame of the map: the field at k is the MLP at k @ frame (row vectors); the
        # identity unless the map was rotated (set_frame, e.g. onto its symmetry axes)
        self.register_buffer("frame", torch.eye(3))
        self._framed = False

    def set_frame(self, A: torch.Tensor) -> None:
        """Rotate the map: the field becomes ``V_new(x) = V(A x)``, exactly.

        In Fourier space ``H_new(k) = H(A k)`` (a rotation keeps the Hartley transform's
        form), so the MLP is evaluated at ``A k``: row vectors ``k @ A^T`` times the current
        frame. The poses ``R A`` give against ``V_new`` the images ``R`` gave against ``V``
        (docs/dev/contracts.md). ``A``: ``(3, 3)`` rotation.
        """
        self.frame.copy_(A.to(self.frame).T @ self.frame)
        self._framed = not torch.equal(self.frame, torch.eye(3, device=self.frame.device))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:  # fmt: skip
        # checkpoints written before the frame existed hold an unrotated map
        state_dict.setdefault(prefix + "frame", torch.eye(3))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._framed = not torch.equal(self.frame, torch.eye(3, device=self.frame.device))

    def set_envelope(self, envelope: torch.Tensor) -> None:
        """Set the radial amplitude envelope ``(D // 2 + 2,)`` (value per integer shell)."""
        self.envelope.copy_(envelope.to(self.envelope))

    def _envelope_at(self, coords: torch.Tensor) -> torch.Tensor:
        r = coords.norm(dim=-1) * self.D
        r0 = r.floor().clamp(max=self.envelope.shape[0] - 2)
        f = (r - r0).clamp(0, 1)
        i0 = r0.long()
        return self.envelope[i0] * (1 - f) + self.envelope[i0 + 1] * f

    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate the field.

        Parameters
        ----------
        coords
            ``(..., 3)`` frequencies in cycles/px, in ``[-0.5, 0.5]``. With ``z`` given, the
            leading dims are ``(M,)`` (shared by all images) or ``(B, M)``.
        z
            ``(B, zdim)`` latents, or ``None`` for a homogeneous field.

        Returns
        -------
        torch.Tensor
            ``coords.shape[:-1]`` (homogeneous) or ``(B, M)`` Hartley values, normalised
            units.
        """
        if self._framed:  # k @ frame, elementwise: autocast would run a matmul in bf16
            coords = (coords.unsqueeze(-1) * self.frame.to(coords.dtype)).sum(-2)
        env = self._envelope_at(coords)
        x = self.input_k(self.encoding(coords))
        if self.zdim > 0:
            if z is None:
                raise ValueError("this field has zdim > 0: pass z (B, zdim)")
            zt = self.input_z(z)  # (B, hidden)
            if x.dim() == 2:
                x = x.unsqueeze(0) + zt[:, None, :]
            else:
                x = x + zt[:, None, :]
        x = self.hidden(torch.relu(x))
        return self.output(x).squeeze(-1) * env

    def grid_ht(
        self,
        radius_px: float,
        z: torch.Tensor | None = None,
        chunk: int = 65536,
        oversample: int = 1,
    ) -> tuple[torch.Tensor, int]:
        """Hartley values on the band-limited voxel ball of ``radius_px``.

        Only voxels inside the ball are evaluated; the rest are zero.

        Parameters
        ----------
        radius_px
            Ball radius in Fourier px of the training box.
        z
            ``(B, zdim)`` or ``None``.
        chunk
            Points per MLP call (bounds memory; gradients flow through all chunks).
        oversample
            Lattice refinement (voxel spacing ``1 / (oversample D)``, see
            :func:`ball_coords`).

        Returns
        -------
        grid : torch.Tensor
            ``(Dc, Dc, Dc)`` (homogeneous) or ``(B, Dc, Dc, Dc)`` normalised Hartley values
            on a cube of size ``Dc`` centred on DC (see :func:`ball_coords`).
        Dc : int
        """
        coords, Dc = ball_coords(self.D, radius_px, oversample)
        dev = self.output.weight.device
        coords = coords.to(dev)
        r = min(float(radius_px), self.D / 2 - 1)
        inside = (coords.norm(dim=-1) * self.D) <= r
        pts = coords[inside]  # (P, 3)
        outs = [self(pts[i : i + chunk], z) for i in range(0, pts.shape[0], chunk)]
        vals = torch.cat(outs, dim=-1).float()
        if z is None or self.zdim == 0:
            grid = torch.zeros(Dc, Dc, Dc, device=dev, dtype=vals.dtype)
            grid = grid.masked_scatter(inside, vals)
        else:
            grid = torch.zeros(z.shape[0], Dc, Dc, Dc, device=dev, dtype=vals.dtype)
            grid = grid.masked_scatter(inside.expand_as(grid), vals)
        return grid, Dc

    @torch.no_grad()
    def render_volume(self, z: torch.Tensor | None = None, D: int | None = None) -> torch.Tensor:
        """Real-space map ``(D, D, D)`` in data units (iht3 of the field on the full ball).

        Parameters
        ----------
        z
            ``(zdim,)`` or ``(1, zdim)`` latent, or ``None`` (homogeneous).
        D
            Output box (default: training box). Must equal the training box: the field's
            frequencies are defined in cycles/px of the training box.
        """
        D = self.D if D is None else int(D)
        if D != self.D:
            raise ValueError(f"render at the training box D={self.D} (got {D}); resample after")
        if z is not None:
            z = z.reshape(1, -1).to(self.output.weight.device)
        grid, Dc = self.grid_ht(D / 2 - 1, z)
        grid = grid.reshape(Dc, Dc, Dc) * self.output_scale
        full = torch.zeros(D, D, D, device=grid.device)
        o = D // 2 - Dc // 2
        full[o : o + Dc, o : o + Dc, o : o + Dc] = grid
        return iht3_centered(full).float().cpu()


@torch.no_grad()
def fourier_grid(
    field: HartleyField,
    radius_px: float,
    z: torch.Tensor | None = None,
    oversample: int = 2,
    chunk: int = 65536,
) -> tuple[torch.Tensor, int]:
    """Complex centred Fourier grid of the field on an ``oversample``-times finer lattice.

    :meth:`HartleyField.grid_ht` followed by :func:`hartley_grid_to_fourier`.

    Parameters
    ----------
    field
        The neural field (box ``field.D``).
    radius_px
        Ball radius in Fourier px of the training box (clipped to ``D / 2 - 1``).
    z
        ``(G, zdim)`` or ``None``.
    oversample
        Lattice refinement: voxel spacing ``1 / (oversample D)`` cycles/px. A 2x finer
        lattice makes trilinear slicing accurate at high frequency (the transform of a
        volume inside the box varies on the scale ``1 / D``).
    chunk
        Points per MLP call.

    Returns
    -------
    grid : torch.Tensor
        ``(Dc, Dc, Dc)`` or ``(G, Dc, Dc, Dc)`` complex, zero outside the ball.
    D_grid : int
        ``oversample * D``: the box size the voxel spacing refers to (for ``slice_grid``).
    """
    grid, _ = field.grid_ht(radius_px, z, chunk, oversample)
    return hartley_grid_to_fourier(grid), int(oversample) * field.D
