"""Per-image parameter tables: poses (rotation + translation) and latents.

Rotations use a residual axis-angle parameterisation, ``R_i = R0_i @ exp([w_i]_x)``
(``w`` initialised to zero; :func:`cryofield.physics.rotation.axis_angle_to_matrix`,
whose gradient is finite at ``w = 0``), which is smooth around the current estimate and has no
constraints, so plain (sparse) Adam steps apply. After a pose search ``R0`` is
overwritten and ``w`` reset. Translations are in px of the training box. All trainable
rows are ``nn.Embedding(sparse=True)`` so one optimiser step touches only the batch's rows
(``torch.optim.SparseAdam``).
"""

from __future__ import annotations

import torch
from torch import nn

from cryofield.physics.rotation import axis_angle_to_matrix


class PoseTable(nn.Module):
    """Poses of ``n`` images.

    Parameters
    ----------
    n
        Number of images.
    rotations
        ``(n, 3, 3)`` initial rotations (default identity).
    shifts_px
        ``(n, 2)`` initial translations in px (default zero).
    """

    def __init__(
        self, n: int, rotations: torch.Tensor | None = None, shifts_px: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        R0 = torch.eye(3).expand(n, 3, 3).clone() if rotations is None else rotations.float()
        self.register_buffer("R0", R0.clone())
        self.w = nn.Embedding(n, 3, sparse=True)
        self.t = nn.Embedding(n, 2, sparse=True)
        nn.init.zeros_(self.w.weight)
        with torch.no_grad():
            if shifts_px is None:
                self.t.weight.zero_()
            else:
                self.t.weight.copy_(shifts_px.float())

    def __len__(self) -> int:
        return self.R0.shape[0]

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations ``(B, 3, 3)`` and translations ``(B, 2)`` px of images ``idx (B,)``."""
        R = self.R0[idx] @ axis_angle_to_matrix(self.w(idx))
        return R, self.t(idx)

    @torch.no_grad()
    def set(self, idx: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor) -> None:
        """Overwrite the poses of ``idx`` (e.g. with a pose-search result)."""
        self.R0[idx] = rotations.to(self.R0)
        self.w.weight[idx] = 0.0
        self.t.weight[idx] = shifts_px.to(self.t.weight)

    @torch.no_grad()
    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All rotations ``(n, 3, 3)`` and translations ``(n, 2)`` px."""
        idx = torch.arange(len(self), device=self.R0.device)
        return self(idx)


class LatentTable(nn.Module):
    """Auto-decoded latents ``z_i`` of ``n`` images, initialised ``N(0, init_std^2)``.

    Parameters
    ----------
    n
        Number of images.
    zdim
        Latent dimension (>= 1).
    init_std
        Standard deviation of the initial values.
    generator
        RNG for the initial values (deterministic runs).
    """

    def __init__(
        self, n: int, zdim: int, init_std: float = 0.1, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.z = nn.Embedding(n, zdim, sparse=True)
        with torch.no_grad():
            self.z.weight.copy_(torch.randn(n, zdim, generator=generator) * init_std)

    def __len__(self) -> int:
        return self.z.weight.shape[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, zdim)`` of images ``idx (B,)``."""
        return self.z(idx)

    @torch.no_grad()
    def set(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Overwrite the latents of images ``idx (B,)`` with ``z (B, zdim)``."""
        self.z.weight[idx] = z.to(self.z.weight.dtype)

    @torch.no_grad()
    def all(self) -> torch.Tensor:
        """All latents ``(n, zdim)``."""
        return self.z.weight.detach().clone()
