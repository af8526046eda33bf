"""Hierarchical pose search (HPS) on a band-limited voxel grid of the neural field.

The field is evaluated once (homogeneous) on the voxel ball of the current search radius
(:meth:`HartleyField.grid_ht`), turned into a complex Fourier grid and sliced by
trilinear interpolation for every candidate rotation (Fourier slice theorem, contract
form: the 2-D transform at ``k`` is the 3-D transform at ``[kx, ky, 0] @ R``). Candidate
translations are phase ramps applied to the images. The error

``E(R, t) = sum_k w_k |X_k exp(2 pi i k.t) - C_k S_R(k)|^2``

is expanded as ``|X|^2 - 2 Re<C X_t, S_R> + <C^2, |S_R|^2>``: the cross term is one matrix
product over all (image, translation) x (rotation) pairs. Only the half plane is used
(``w = 2`` off DC, Friedel symmetry of real images). The search keeps the best ``n_keep``
rotations per image (each with its best translation), subdivides them
(:mod:`cryofield.physics.so3_grid`, without its pole offset) and halves the translation
step at every level, as in cryoDRGN / DRGN-AI's HPS (Zhong et al. 2021; Levy et al. 2024).

The translation grid is centred on the particle, not on the box: an ab initio map sits
wherever its first epochs put it (3-5 px off centre at D=64 in the robustness cells), and
a grid centred on the box then spends that offset of its range (an image's particle is at
``t + P_R c`` from the box centre of a map off by ``c``). With ``settings.centre`` every
reference is moved so its density's centre of mass is at the origin
(:func:`reference_centres_px`, :func:`shift_grid`) and the translations found against it
are put back into the reference's own frame, ``t = t_c - (R c)_xy`` (the projection of a
volume moved by ``c`` is moved by ``(R c)_xy``, docs/dev/contracts.md): the poses
returned are those of the map as it is. The grid about the box centre is what anchors a
map that is still forming: training searches about the centre of mass only once an
epoch has placed the map (``Trainer._search``); centred from the first batch, the
centre of the untrained field's low-pass blob led the map 14.5 px off centre within the
first epoch (shift8 cell, 4% of the poses within 10 deg after 6 epochs instead of 83%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cryofield.physics import so3_grid
from cryofield.physics.fourier import ifft3_centered
from cryofield.physics.rotation import axis_angle_to_matrix
from cryofield.physics.symmetry import symmetry_operators


@dataclass(frozen=True)
class FrequencyPoints:
    """Frequency points of a ``D x D`` image inside radius ``D/2 - 1``, sorted by radius.

    Attributes
    ----------
    D : int
    freqs : torch.Tensor
        ``(M, 2)`` ``(kx, ky)`` cycles/px.
    radius_px : torch.Tensor
        ``(M,)`` ascending.
    flat_index : torch.Tensor
        ``(M,)`` index into a flattened ``(D, D)`` image.
    half : torch.Tensor
        ``(M,)`` bool, the half plane (``ky > 0`` or ``ky == 0, kx >= 0``).
    """

    D: int
    freqs: torch.Tensor
    radius_px: torch.Tensor
    flat_index: torch.Tensor
    half: torch.Tensor

    @classmethod
    def build(cls, D: int, device: torch.device | str = "cpu") -> FrequencyPoints:
        """Points of box ``D`` (even)."""
        c = torch.arange(D) - D // 2
        ky, kx = torch.meshgrid(c, c, indexing="ij")
        r = torch.sqrt((kx * kx + ky * ky).double())
        keep = (r <= D / 2 - 1).flatten()
        flat = torch.nonzero(keep).squeeze(1)
        r = r.flatten()[flat]
        order = torch.argsort(r, stable=True)
        flat = flat[order]
        kxf, kyf = kx.flatten()[flat], ky.flatten()[flat]
        half = (kyf > 0) | ((kyf == 0) & (kxf >= 0))
        freqs = torch.stack([kxf, kyf], -1).float() / D
        return cls(D, freqs.to(device), r[order].float().to(device), flat.to(device),
                   half.to(device))  # fmt: skip

    def count(self, radius_px: float) -> int:
        """Number of points with radius <= ``radius_px`` (a prefix)."""
        return int(torch.searchsorted(self.radius_px, float(radius_px) + 1e-4, right=True))

    def half_index(self, radius_px: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of half-plane points within ``radius_px`` and their weights (1 DC, 2 else)."""
        n = self.count(radius_px)
        idx = torch.nonzero(self.half[:n]).squeeze(1)
        w = torch.where(self.radius_px[idx] == 0, 1.0, 2.0)
        return idx, w


def slice_grid(
    grid: torch.Tensor, D: int, rotations: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """Trilinear central slices of a (cropped) centred Fourier/Hartley grid.

    Differentiable with respect to ``grid`` and ``rotations``.

    Parameters
    ----------
    grid
        ``(Dc, Dc, Dc)`` (shared) or ``(B, Dc, Dc, Dc)`` real or complex, DC at ``Dc // 2``,
        voxel spacing ``1 / D`` cycles/px.
    D
        Box size the frequencies refer to.
    rotations
        ``(B, Q, 3, 3)`` or ``(Q, 3, 3)`` (shared grid only).
    freqs
        ``(M, 2)`` cycles/px.

    Returns
    -------
    torch.Tensor
        ``(B, Q, M)`` or ``(Q, M)``, zero outside the grid.
    """
    Dc = grid.shape[-1]
    shared_rot = rotations.dim() == 3
    if grid.dim() == 3:
        grid = grid[None]
    if grid.is_complex():
        chans = torch.stack([grid.real, grid.imag], dim=1)  # (G, 2, Dc, Dc, Dc)
    else:
        chans = grid[:, None]
    rots = rotations[None] if shared_rot else rotations  # (Bq, Q, 3, 3)
    # [kx, ky, 0] @ R = kx R[0] + ky R[1]
    pts = torch.einsum("mi,bqij->bqmj", freqs, rots[..., :2, :])  # (Bq, Q, M, 3)
    scale = 2.0 * D / (Dc - 1)
    offset = 2.0 * (Dc // 2) / (Dc - 1) - 1.0
    g = pts * scale + offset  # x, y, z order matches grid_sample's (W, H, D)
    if chans.shape[0] == 1 and g.shape[0] > 1:
        g = g.reshape(1, 1, -1, g.shape[-2], 3)
        out = F.grid_sample(chans, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out.reshape(chans.shape[1], rots.shape[0], rots.shape[1], -1).movedim(0, -1)
    else:
        g = g[:, None]  # (G, 1, Q, M, 3)
        out = F.grid_sample(chans, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out[:, :, 0].movedim(1, -1)  # (G, Q, M, C)
    out = torch.complex(out[..., 0], out[..., 1]) if grid.is_complex() else out[..., 0]
    return out[0] if shared_rot else out


def translation_grid(extent_px: float, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n*n, 2)`` translations on a square grid spanning ``[-extent, extent]`` px."""
    if n <= 1:
        return torch.zeros(1, 2, device=device)
    v = torch.linspace(-extent_px, extent_px, n, device=device)
    ty, tx = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([tx.flatten(), ty.flatten()], -1)


#: share of a search epoch's images found beyond the translation grid above which the
#: grid grows by one step on each side (:func:`widened_translation_grid`)
BEYOND_GRID_LIMIT = 0.02
#: the translation grid grows to at most this fraction of the box on each side
T_EXTENT_MAX_FRACTION = 0.2


def beyond_grid(offsets_px: torch.Tensor, extent_px: float, n: int) -> torch.Tensor:
    """``(B,)`` bool: the images whose translation ``offsets_px (B, 2)`` (px, from the
    centre of the grid they were searched on, :attr:`SearchResult.grid_offsets_px`) lies
    beyond the level-0 grid of ``n x n`` points on ``[-extent_px, extent_px]^2`` by more
    than a quarter of its step in x or y.

    The finer levels move a translation by half the step, then a quarter, ... (up to
    ~one step beyond the edge in all), so an image whose particle lies outside the grid
    ends on its border or past it; one inside it ends past the border by more than a
    quarter step only through noise."""
    if n <= 1 or extent_px <= 0:
        return torch.zeros(offsets_px.shape[0], dtype=torch.bool, device=offsets_px.device)
    step = 2.0 * extent_px / (n - 1)
    return offsets_px.abs().amax(dim=-1) > extent_px + 0.25 * step


def widened_translation_grid(
    extent_px: float, n: int, frac_beyond: float, D: int
) -> tuple[float, int] | None:
    """The translation grid one step wider on each side, ``(extent_px + step, n + 2)``
    (the same step, so the same precision at 1.5-2x the level-0 translations), when more
    than :data:`BEYOND_GRID_LIMIT` of the images were found :func:`beyond_grid`;
    ``None`` when the share is below it, there is no translation search, or the wider
    grid would reach past :data:`T_EXTENT_MAX_FRACTION` of the box ``D`` (px).

    Why: the default extent (``D / 10``, 32 A whatever the pixel) holds the shifts of
    particles picked to a few percent of the box, but a box cropped tight, or a stack
    downsampled less than its picking error (D=32 with shifts of sd 2 px), has particles
    beyond it, and an image whose particle the grid cannot reach takes a wrong pose
    (box32 robustness cell: 85% of the images with a shift over 4 px ended > 10 deg off,
    benchmarks/README.md)."""
    if n <= 1 or extent_px <= 0 or frac_beyond <= BEYOND_GRID_LIMIT:
        return None
    step = 2.0 * extent_px / (n - 1)
    if extent_px + step > T_EXTENT_MAX_FRACTION * D + 1e-6:
        return None
    return extent_px + step, n + 2


def centre_images(x: torch.Tensor, freqs: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Undo translations: ``X(k) exp(+2 pi i k.t)``.

    Parameters
    ----------
    x
        ``(B, M)`` complex image transforms at ``freqs``.
    freqs
        ``(M, 2)`` cycles/px.
    shifts_px
        ``(B, ..., 2)`` translations (any number of candidate dims).

    Returns
    -------
    torch.Tensor
        ``(B, ..., M)`` complex.
    """
    phase = 2 * math.pi * (shifts_px @ freqs.T)  # (B, ..., M)
    xb = x.reshape(x.shape[0], *([1] * (shifts_px.dim() - 2)), x.shape[-1])
    return xb * torch.polar(torch.ones_like(phase), phase)


@dataclass(frozen=True)
class SearchSettings:
    """Hierarchical search parameters.

    Attributes
    ----------
    base_nside, base_psi
        Level-0 grid: ``12 base_nside^2`` directions x ``base_psi`` in-plane angles.
    levels
        Number of subdivisions after level 0.
    n_keep
        Candidates kept per image between levels.
    t_extent_px, t_ngrid
        Level-0 translation grid (``t_ngrid^2`` points on ``[-t_extent, t_extent]^2``);
        ``t_extent_px = 0`` disables the translation search.
    centre
        Centre the translation grid on the references' centre of mass (module
        docstring); ``False``, or no translation search: on the box centre.
    radius_lo_px, radius_hi_px
        Search radius at level 0 and at the last level (linear in between).
    symmetry
        Point group of the map (:mod:`cryofield.physics.symmetry`, e.g. ``"C4"``): level 0
        holds only the points of one asymmetric unit
        (:func:`cryofield.physics.so3_grid.asymmetric_level_points`), the poses found are
        one of the ``|G|`` equivalent ones ``R g``; ``"C1"``: the whole grid.
    """

    base_nside: int = 4
    base_psi: int = 24
    levels: int = 4
    n_keep: int = 8
    t_extent_px: float = 5.0
    t_ngrid: int = 7
    radius_lo_px: float = 6.0
    radius_hi_px: float = 12.0
    symmetry: str = "C1"
    centre: bool = True

    @property
    def centres_grid(self) -> bool:
        """Whether the translation grid is centred on the references (``centre`` and a
        translation search to centre)."""
        return self.centre and self.t_extent_px > 0 and self.t_ngrid > 1


#: quantile of ``|v - median|`` above which a voxel counts in a reference's centre of mass
CENTRE_QUANTILE = 0.95
#: the centre a search moves its references by is at most this fraction of the box
CENTRE_MAX_FRACTION = 1.0 / 8.0


@torch.no_grad()
def reference_centres_px(grid_ft: torch.Tensor, D: int, symmetry: str = "C1") -> torch.Tensor:
    """Centre of mass of each reference's density, ``(G, 3)`` ``(x, y, z)`` px from the
    box centre.

    The grid is brought to real space (``Dc^3`` voxels of ``D / Dc`` px: the map low-passed
    to the grid's radius); the voxels weigh ``max(|v - median| - q, 0)`` with ``q`` the
    :data:`CENTRE_QUANTILE` of ``|v - median|`` (the strongest few percent: the particle,
    of either contrast). A point group other than ``C1`` fixes the origin on its axes: the
    centre keeps only its component along the ``Cn`` axis (z), none for the others.

    Parameters
    ----------
    grid_ft
        ``(Dc, Dc, Dc)`` or ``(G, Dc, Dc, Dc)`` complex centred Fourier grid of box ``D``
        (frequency ``(i - Dc // 2) / D`` cycles/px).
    D
        Box size of the map, px.
    symmetry
        Point group of the maps.
    """
    refs = grid_ft[None] if grid_ft.dim() == 3 else grid_ft
    G, Dc = refs.shape[0], refs.shape[-1]
    v = ifft3_centered(refs.to(torch.complex64)).real.reshape(G, -1)
    a = (v - v.median(dim=1, keepdim=True).values).abs()
    w = (a - torch.quantile(a, CENTRE_QUANTILE, dim=1, keepdim=True)).clamp_min(0)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    g = (torch.arange(Dc, device=refs.device, dtype=v.dtype) - Dc // 2) * (D / Dc)
    gz, gy, gx = torch.meshgrid(g, g, g, indexing="ij")
    xyz = torch.stack([gx.flatten(), gy.flatten(), gz.flatten()], -1)  # (Dc^3, 3)
    c = w @ xyz  # (G, 3)
    sym = symmetry.upper()
    if sym != "C1":
        keep = torch.tensor([0.0, 0.0, 1.0 if sym.startswith("C") else 0.0], device=c.device)
        c = c * keep
    return c


def shift_grid(grid_ft: torch.Tensor, D: int, shift_px: torch.Tensor) -> torch.Tensor:
    """Move maps given by their centred Fourier grids by ``shift_px``: ``V'(x) = V(x - s)``,
    ``V'_hat(k) = V_hat(k) exp(-2 pi i k.s)`` (shift theorem).

    ``grid_ft`` ``(G, Dc, Dc, Dc)`` complex of box ``D`` (frequency ``(i - Dc // 2) / D``),
    ``shift_px`` ``(G, 3)`` ``(x, y, z)`` px. Returns ``(G, Dc, Dc, Dc)``.
    """
    Dc = grid_ft.shape[-1]
    k = (torch.arange(Dc, device=grid_ft.device, dtype=torch.float32) - Dc // 2) / D
    s = shift_px.to(grid_ft.device, torch.float32)
    phi = (
        2
        * math.pi
        * (
            s[:, 0, None, None, None] * k[None, None, None, :]
            + s[:, 1, None, None, None] * k[None, None, :, None]
            + s[:, 2, None, None, None] * k[None, :, None, None]
        )
    )
    return grid_ft * torch.polar(torch.ones_like(phi), -phi).to(grid_ft.dtype)


def centre_references(
    grid_ft: torch.Tensor, D: int, symmetry: str = "C1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The references moved by ``-c`` so that the mean of their centres of mass
    (:func:`reference_centres_px`, at most :data:`CENTRE_MAX_FRACTION` ``D`` from the box
    centre) is at the origin, ``(G, Dc, Dc, Dc)``, and ``c``
    ``(G, 3)`` px (the same row for every map: one frame, so that a translation means
    the same against every reference, as the multi-reference search compares them). A
    pose ``(R, t_c)`` against a moved map is ``(R, t_c - (R c)_xy)`` against the map."""
    refs = grid_ft[None] if grid_ft.dim() == 3 else grid_ft
    c = reference_centres_px(refs, D, symmetry).mean(0, keepdim=True)
    c = c * (CENTRE_MAX_FRACTION * D / c.norm().clamp_min(1e-12)).clamp(max=1.0)
    c = c.expand(refs.shape[0], 3).contiguous()
    return shift_grid(refs, D, -c), c


def uncentre_shifts(
    rotations: torch.Tensor, shifts_px: torch.Tensor, centres_px: torch.Tensor
) -> torch.Tensor:
    """Translations against maps moved by ``-c`` (centred) put back into the maps' own
    frame: ``t = t_c - (R c)_xy``. ``rotations (B, 3, 3)``, ``shifts_px (B, 2)``,
    ``centres_px (B, 3)`` (each image's reference's centre). Returns ``(B, 2)``."""
    proj = torch.einsum("bij,bj->bi", rotations[:, :2, :].float(), centres_px.float())
    return shifts_px - proj.to(shifts_px.dtype)


def cross_terms(
    x_c: torch.Tensor, ctf: torch.Tensor, w: torch.Tensor, slices: torch.Tensor
) -> torch.Tensor:
    """``-2 Re<C X_t, S> + <C^2, |S|^2>`` (weighted); lower is better.

    ``x_c (B, T, M)`` centred images, ``ctf (B, M)``, ``w (M,)``, ``slices (Q, M)`` shared or
    ``(B, Q, M)``. Returns ``(B, T, Q)``.
    """
    cw = ctf * w  # (B, M)
    y = x_c * cw[:, None, :]  # (B, T, M)
    yr = torch.cat([y.real, y.imag], -1)  # (B, T, 2M)
    sr = torch.cat([slices.real, slices.imag], -1)  # (Q, 2M) or (B, Q, 2M)
    s2 = slices.real**2 + slices.imag**2
    c2 = ctf * cw  # (B, M)
    if slices.dim() == 2:
        cross = yr @ sr.T  # (B, T, Q)
        norm = c2 @ s2.T  # (B, Q)
    else:
        cross = torch.einsum("btm,bqm->btq", yr, sr)
        norm = torch.einsum("bm,bqm->bq", c2, s2)
    return norm[:, None, :] - 2.0 * cross


class SearchResult(NamedTuple):
    """Output of :func:`search_poses`.

    Attributes
    ----------
    rotations : torch.Tensor
        ``(B, 3, 3)``.
    shifts_px : torch.Tensor
        ``(B, 2)``.
    error : torch.Tensor
        ``(B,)`` the minimised error up to the image-dependent constant ``|X|^2``.
    reference : torch.Tensor
        ``(B,)`` long, the reference each image was aligned to (0 with one volume).
    grid_offsets_px : torch.Tensor or None
        ``(B, 2)`` each image's translation from the centre of the translation grid it
        was searched on (``t_center_px``, in the centred frame with ``settings.centre``):
        what :func:`beyond_grid` compares with the grid's reach.
    """

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    error: torch.Tensor
    reference: torch.Tensor
    grid_offsets_px: torch.Tensor | None = None


@torch.no_grad()
def search_poses(
    grid_ft: torch.Tensor,
    D: int,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    points: FrequencyPoints,
    settings: SearchSettings,
    t_center_px: torch.Tensor | None = None,
    chunk: int = 64,
    hint: torch.Tensor | None = None,
    slices0: torch.Tensor | None = None,
    penalty0: torch.Tensor | None = None,
    centres_px: torch.Tensor | None = None,
) -> SearchResult:
    """Best pose of every image by hierarchical search, against one or several volumes.

    With several reference volumes (heterogeneous runs: the field at several ``z``) and no
    ``hint`` (exhaustive), every image is scored against every reference on the level-0
    grid and keeps the reference with the lowest error at its best pose; the refinement
    levels use that reference. This is the maximum of the expectation step of
    multi-reference alignment (Scheres et al. 2007, J. Mol. Biol. 348:139, "Disentangling
    conformational states of macromolecules in 3D-EM through likelihood optimization");
    the error has no per-reference offset, so a heavier reference does not win by default.

    With a ``hint`` (assigned), every image searches level 0 (rotations x translations)
    against its hinted reference; every other reference is scored on the level-0
    rotations at the translation of the image's best pose, and the best of them searches
    level 0 again at the 3 x 3 translations within one step of it; the image takes
    whichever of the two references has the lower error (the ``n_keep`` candidates of
    that search). The refinement levels use the chosen reference. Level 0 costs
    ``1 + (G + 9) / T`` of a one-reference level 0 (``T = t_ngrid^2`` translations;
    ``1 + 9 / T`` with two references) instead of ``G``. Cheaper checks fall short when
    the hint is wrong (measured in tests/inference/test_pose_search.py, every hint wrong):
    scoring the other references only at the hinted map's kept poses keeps most images on
    the wrong map (the poses where it fits best), and at the best translation alone the
    other map loses where that translation is off. With one reference, or without a
    translation search (``T = 1``: nothing to save), ``hint`` changes nothing.

    Parameters
    ----------
    grid_ft
        ``(Dc, Dc, Dc)`` complex centred Fourier grid of the current volume, or
        ``(G, Dc, Dc, Dc)`` one per reference; zero beyond the search radius.
    D
        Training box size.
    images_ft
        ``(B, M_all)`` complex image transforms at ``points.freqs`` (normalised units).
    ctf
        ``(B, M_all)`` CTF at ``points.freqs``.
    points
        The frequency points of box ``D``.
    settings
        Grid, translation and radius settings.
    t_center_px
        ``(B, 2)`` centre of the translation grid (default zero).
    chunk
        Images per level-0 block (bounds memory).
    hint
        ``(B,)`` long: the reference each image searches level 0 against (assigned
        search, see above); ``None``: every reference (exhaustive).
    slices0
        ``(G, Q, M)`` the level-0 slices of the references
        (:func:`level0_slices`, at a radius of at least the level-0 radius: the first
        points are used), computed here when ``None``.
    penalty0
        ``(Q,)`` a negative log prior (nats, >= 0) of each level-0 rotation
        (:func:`level0_points`), or ``None`` (a flat prior). Candidates are ranked, at
        every level, by their error plus ``sigma2 * penalty0`` of their level-0
        ancestor, where ``sigma2`` is the image's power per Fourier point within the
        level-0 radius (its noise power at low SNR; the error is ``sigma2`` times a
        negative log likelihood under white Gaussian noise, so the sum is ``sigma2``
        times a negative log posterior). The error returned is the error alone.
    centres_px
        ``(G, 3)``: the references (and ``slices0``) are already centred
        (:func:`centre_references`) and these were their centres; the translations are
        put back into the frame of the maps before centring. ``None`` with
        ``settings.centre``: the references are centred here (``slices0`` must then be
        ``None``).

    Returns
    -------
    SearchResult
    """
    s = settings
    refs = grid_ft[None] if grid_ft.dim() == 3 else grid_ft  # (G, Dc, Dc, Dc)
    if centres_px is None and s.centres_grid:
        if slices0 is not None:
            raise ValueError("slices0 of references not centred: pass their centres_px, "
                             "or search with settings.centre False")  # fmt: skip
        refs, centres_px = centre_references(refs, D, s.symmetry)
    res = _search_poses(refs, D, images_ft, ctf, points, s, t_center_px, chunk, hint, slices0,
                        penalty0)  # fmt: skip
    off = res.shifts_px if t_center_px is None else res.shifts_px - t_center_px
    res = res._replace(grid_offsets_px=off)
    if centres_px is None:
        return res
    c = centres_px.to(res.shifts_px.device)[res.reference.to(res.shifts_px.device)]
    return res._replace(shifts_px=uncentre_shifts(res.rotations, res.shifts_px, c))


def _search_poses(
    refs: torch.Tensor,
    D: int,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    points: FrequencyPoints,
    s: SearchSettings,
    t_center_px: torch.Tensor | None,
    chunk: int,
    hint: torch.Tensor | None,
    slices0: torch.Tensor | None,
    penalty0: torch.Tensor | None,
) -> SearchResult:
    """:func:`search_poses` against the references ``refs (G, Dc, Dc, Dc)`` as given."""
    B = images_ft.shape[0]
    dev = images_ft.device
    radii = [
        s.radius_lo_px + (s.radius_hi_px - s.radius_lo_px) * (lv / max(s.levels, 1))
        for lv in range(s.levels + 1)
    ]
    t0 = translation_grid(s.t_extent_px, s.t_ngrid, dev)  # (T, 2)
    if t_center_px is None:
        t_center_px = torch.zeros(B, 2, device=dev)
    step = 2 * s.t_extent_px / (s.t_ngrid - 1) if s.t_ngrid > 1 else 0.0

    # ---- level 0: every base rotation for every image
    rots0, pix0, psi0 = level0_points(s, dev)
    idx, w = points.half_index(radii[0])
    fr = points.freqs[idx]
    K = min(s.n_keep, rots0.shape[0])
    if slices0 is None:
        slices0 = torch.stack([slice_grid(g, D, rots0, fr) for g in refs])  # (G, Q, M)
    elif slices0.shape[:2] != (refs.shape[0], rots0.shape[0]) or slices0.shape[2] < len(idx):
        raise ValueError(f"slices0 {tuple(slices0.shape)} do not hold the level-0 slices of "
                         f"{refs.shape[0]} references at {len(idx)} points")  # fmt: skip
    else:
        slices0 = slices0[..., : len(idx)]
    pen = None
    if penalty0 is not None:
        if penalty0.shape != (rots0.shape[0],):
            raise ValueError(f"penalty0 {tuple(penalty0.shape)} is not one value per level-0 "
                             f"rotation ({rots0.shape[0]})")  # fmt: skip
        sigma2 = (images_ft[:, idx].abs() ** 2 * w).sum(1) / w.sum()  # (B,)
        pen = sigma2[:, None] * penalty0.to(dev, sigma2.dtype)[None, :]  # (B, Q)
    if hint is not None and refs.shape[0] > 1 and t0.shape[0] > 1:
        q, tk, best_err, reference, pen_k = _assigned_level0(
            images_ft[:, idx], ctf[:, idx], w, fr, slices0, hint.to(dev), t_center_px, t0,
            translation_grid(step, 3, dev), K, chunk, pen,
        )  # fmt: skip
        return _refine_levels(refs, D, images_ft, ctf, points, s, radii, step,
                              pix0.to(dev)[q], psi0.to(dev)[q], rots0[q], tk, best_err,
                              reference, pen_k)  # fmt: skip
    keep_e, keep_q, keep_t, keep_ref, keep_p = [], [], [], [], []
    for b0 in range(0, B, chunk):
        sl = slice(b0, b0 + chunk)
        shifts = t_center_px[sl, None, :] + t0[None]  # (b, T, 2)
        xc = centre_images(images_ft[sl][:, idx], fr, shifts)  # (b, T, M)
        per_ref = [cross_terms(xc, ctf[sl][:, idx], w, sg).min(dim=1) for sg in slices0]
        err_g = torch.stack([e for e, _ in per_ref])  # (G, b, Q)
        ref = err_g.amin(dim=2).argmin(dim=0)  # (b,)
        cols = torch.arange(len(ref), device=dev)
        best_err = err_g[ref, cols]  # (b, Q)
        best_t = torch.stack([t for _, t in per_ref])[ref, cols]
        e, q, p = _top_candidates(best_err, None if pen is None else pen[sl], K)  # (b, K)
        keep_e.append(e)
        keep_q.append(q)
        keep_p.append(p)
        keep_ref.append(ref)
        keep_t.append(
            torch.gather(shifts, 1, torch.gather(best_t, 1, q)[..., None].expand(-1, -1, 2))
        )
    q = torch.cat(keep_q)
    reference = torch.cat(keep_ref)
    pix, psi = pix0.to(dev)[q], psi0.to(dev)[q]  # (B, K)
    tk = torch.cat(keep_t)  # (B, K, 2)
    best_err = torch.cat(keep_e)  # (B, K) ascending (with the penalty)
    pen_k = None if pen is None else torch.cat(keep_p)
    rots = rots0[q]
    return _refine_levels(refs, D, images_ft, ctf, points, s, radii, step, pix, psi, rots,
                          tk, best_err, reference, pen_k)  # fmt: skip


def _top_candidates(
    err: torch.Tensor, pen: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ``k`` candidates of lowest ``err + pen`` (``(b, n)`` each; ``pen`` ``None``:
    zero): their errors ``(b, k)`` (without the penalty), indices ``(b, k)`` and
    penalties ``(b, k)`` (``None`` without one), ascending in ``err + pen``."""
    if pen is None:
        e, q = torch.topk(err, k, dim=1, largest=False)
        return e, q, None
    q = torch.topk(err + pen, k, dim=1, largest=False)[1]
    return torch.gather(err, 1, q), q, torch.gather(pen, 1, q)


def level0_points(
    settings: SearchSettings, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The level-0 grid of the search: ``(rotations (Q, 3, 3), pix (Q,), psi (Q,))``,
    restricted to one asymmetric unit of ``settings.symmetry``."""
    s = settings
    rots0, pix0, psi0 = so3_grid.asymmetric_level_points(
        symmetry_operators(s.symmetry), 0, base_nside=s.base_nside, base_psi=s.base_psi,
        pole_offset=False,
    )  # fmt: skip
    return rots0.to(device), pix0, psi0


@torch.no_grad()
def level0_slices(
    grid_ft: torch.Tensor,
    D: int,
    points: FrequencyPoints,
    settings: SearchSettings,
    radius_px: float | None = None,
) -> torch.Tensor:
    """``(G, Q, M)`` central slices of the references at the level-0 rotations
    (:func:`level0_points`), at the half-plane points within ``radius_px`` (default the
    level-0 radius ``settings.radius_lo_px``): the ``slices0`` of :func:`search_poses`,
    computed once for several searches against the same maps."""
    refs = grid_ft[None] if grid_ft.dim() == 3 else grid_ft
    rots0 = level0_points(settings, refs.device)[0]
    r = settings.radius_lo_px if radius_px is None else radius_px
    fr = points.freqs[points.half_index(r)[0]]
    return torch.stack([slice_grid(g, D, rots0, fr) for g in refs])


def _real_slices(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 2M)`` real and imaginary parts interleaved (a view, no copy) and ``(..., M)``
    ``|S|^2`` of complex slices ``(..., M)``: what :func:`cross_terms` makes of them on
    every call, once."""
    sr = torch.view_as_real(slices).flatten(-2)
    return sr, slices.real**2 + slices.imag**2


def _cross_real(
    x_c: torch.Tensor, ctf: torch.Tensor, w: torch.Tensor, sr: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """:func:`cross_terms` of the slices in :func:`_real_slices` form: ``x_c (b, T, M)``,
    ``sr (Q, 2M)``, ``s2 (Q, M)`` (shared) or ``(G, Q, 2M)``, ``(G, Q, M)`` (every
    reference). Returns ``(b, T, Q)`` or ``(G, b, T, Q)``."""
    cw = ctf * w
    y = x_c * cw[:, None, :]
    yr = torch.view_as_real(y).flatten(-2)  # (b, T, 2M) interleaved as sr
    if sr.dim() == 2:
        return ((ctf * cw) @ s2.T)[:, None, :] - 2.0 * (yr @ sr.T)
    cross = torch.matmul(yr.reshape(1, -1, yr.shape[-1]), sr.transpose(1, 2))  # (G, b T, Q)
    norm = torch.matmul(ctf * cw, s2.transpose(1, 2))  # (G, b, Q)
    return norm[:, :, None, :] - 2.0 * cross.reshape(sr.shape[0], *yr.shape[:2], -1)


def _level0_against(
    x: torch.Tensor,
    ctf: torch.Tensor,
    w: torch.Tensor,
    fr: torch.Tensor,
    real: tuple[torch.Tensor, torch.Tensor],
    ref: torch.Tensor,
    t_center_px: torch.Tensor,
    t0: torch.Tensor,
    K: int,
    chunk: int,
    pen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Level 0 of every image against one reference each (``ref (B,)``): its ``K`` best
    rotations ``q (B, K)``, their best translations ``(B, K, 2)``, errors ``(B, K)`` and
    penalties ``(B, K)`` (``None`` without ``pen (B, Q)``), ascending in error plus
    penalty. ``x``, ``ctf`` at the level-0 points ``fr``; ``real``: the level-0 slices
    (:func:`_real_slices`)."""
    sr, s2 = real
    Q = sr.shape[1]
    keep_e, keep_q, keep_t, keep_p = [], [], [], []
    for b0 in range(0, x.shape[0], chunk):
        sl = slice(b0, b0 + chunk)
        shifts = t_center_px[sl, None, :] + t0[None]  # (b, T, 2)
        xc = centre_images(x[sl], fr, shifts)  # (b, T, M)
        r = ref[sl]
        err = torch.empty(xc.shape[0], Q, device=x.device)
        t_best = torch.empty(xc.shape[0], Q, dtype=torch.long, device=x.device)
        for g in torch.unique(r).tolist():
            m = torch.nonzero(r == g).squeeze(1)
            err[m], t_best[m] = _cross_real(xc[m], ctf[sl][m], w, sr[g], s2[g]).min(dim=1)
        e, q, p = _top_candidates(err, None if pen is None else pen[sl], K)  # (b, K)
        keep_e.append(e)
        keep_q.append(q)
        keep_p.append(p)
        keep_t.append(
            torch.gather(shifts, 1, torch.gather(t_best, 1, q)[..., None].expand(-1, -1, 2))
        )
    pen_k = None if pen is None else torch.cat(keep_p)
    return torch.cat(keep_q), torch.cat(keep_t), torch.cat(keep_e), pen_k


def _assigned_level0(
    x: torch.Tensor,
    ctf: torch.Tensor,
    w: torch.Tensor,
    fr: torch.Tensor,
    slices0: torch.Tensor,
    hint: torch.Tensor,
    t_center_px: torch.Tensor,
    t0: torch.Tensor,
    t_near: torch.Tensor,
    K: int,
    chunk: int,
    pen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Level 0 of the assigned search (:func:`search_poses` with ``hint``): ``q (B, K)``,
    translations ``(B, K, 2)``, errors ``(B, K)`` ascending (with the penalty), the
    reference ``(B,)``, the penalties ``(B, K)`` (``None`` without ``pen (B, Q)``).
    ``t0``: the translation grid about ``t_center_px``; ``t_near``: the 3 x 3 offsets of
    the second reference's search about the best translation."""
    real = _real_slices(slices0)
    q, tk, err, pk = _level0_against(x, ctf, w, fr, real, hint, t_center_px, t0, K, chunk, pen)
    t_best = tk[:, 0]  # (B, 2) the translation of each image's best pose
    G = slices0.shape[0]
    if G == 2:
        other = 1 - hint
    else:  # the best other reference on the level-0 rotations at t_best
        other = torch.empty_like(hint)
        for b0 in range(0, x.shape[0], chunk):
            sl = slice(b0, b0 + chunk)
            xc = centre_images(x[sl], fr, t_best[sl, None, :])  # (b, 1, M)
            e = _cross_real(xc, ctf[sl], w, *real)[:, :, 0].amin(dim=2)  # (G, b)
            e[hint[sl], torch.arange(e.shape[1], device=e.device)] = float("inf")
            other[sl] = e.argmin(dim=0)
    q2, t2, e2, pk2 = _level0_against(x, ctf, w, fr, real, other, t_best, t_near, K, chunk, pen)
    if pk is None or pk2 is None:
        better = e2[:, 0] < err[:, 0]
    else:
        better = e2[:, 0] + pk2[:, 0] < err[:, 0] + pk[:, 0]
        pk = torch.where(better[:, None], pk2, pk)
    reference = torch.where(better, other, hint)
    q = torch.where(better[:, None], q2, q)
    tk = torch.where(better[:, None, None], t2, tk)
    err = torch.where(better[:, None], e2, err)
    return q, tk, err, reference, pk


def _refine_levels(
    refs: torch.Tensor,
    D: int,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    points: FrequencyPoints,
    s: SearchSettings,
    radii: list[float],
    step: float,
    pix: torch.Tensor,
    psi: torch.Tensor,
    rots: torch.Tensor,
    tk: torch.Tensor,
    best_err: torch.Tensor,
    reference: torch.Tensor,
    pen_k: torch.Tensor | None = None,
) -> SearchResult:
    """The refinement levels of :func:`search_poses` from the level-0 candidates
    ``(B, K)``, each image against its ``reference`` of ``refs (G, Dc, Dc, Dc)``;
    ``pen_k (B, K)``: the candidates' penalties (inherited by their children)."""
    B = images_ft.shape[0]
    dev = images_ft.device
    grid_def = dict(base_nside=s.base_nside, base_psi=s.base_psi, pole_offset=False)
    local = translation_grid(1.0, 3, dev)  # (9, 2) unit offsets
    for lv in range(1, s.levels + 1):
        step = step / 2
        cpix, cpsi = so3_grid.child_pairs(pix, psi)  # (B, K, 8)
        crot = so3_grid.pair_rotations(cpix, cpsi, lv, **grid_def).to(dev)
        idx, w = points.half_index(radii[lv])
        fr = points.freqs[idx]
        nK = cpix.shape[1]
        shifts = tk[:, :, None, :] + step * local  # (B, K, 9, 2)
        xc = centre_images(images_ft[:, idx], fr, shifts.reshape(B, nK * 9, 2))  # (B, K*9, M)
        sli = _slices_of(refs, reference, D, crot.reshape(B, nK * 8, 3, 3), fr)  # (B, K*8, M)
        sli = sli.reshape(B, nK, 8, -1)
        xc = xc.reshape(B, nK, 9, -1)
        ctf_l = ctf[:, idx] * w
        y = xc * ctf_l[:, None, None, :]
        cross = torch.einsum("bktm,bkcm->bktc", y.real, sli.real) + torch.einsum(
            "bktm,bkcm->bktc", y.imag, sli.imag
        )
        norm = torch.einsum("bm,bkcm->bkc", ctf[:, idx] * ctf_l, sli.real**2 + sli.imag**2)
        err = norm[:, :, None, :] - 2 * cross  # (B, K, 9, 8)
        e_rot, t_best = err.min(dim=2)  # (B, K, 8)
        e_rot = e_rot.reshape(B, nK * 8)
        Kl = 1 if lv == s.levels else min(s.n_keep, nK * 8)
        pen_c = None if pen_k is None else pen_k.repeat_interleave(8, dim=1)  # (B, K*8)
        best_err, sel, pen_k = _top_candidates(e_rot, pen_c, Kl)  # (B, Kl)
        k_par = torch.div(sel, 8, rounding_mode="floor")
        t_sel = torch.gather(t_best.reshape(B, nK * 8), 1, sel)  # (B, Kl)
        shifts_flat = shifts.reshape(B, nK * 9, 2)
        tk = torch.gather(shifts_flat, 1, (k_par * 9 + t_sel)[..., None].expand(-1, -1, 2))
        pix = torch.gather(cpix.reshape(B, -1), 1, sel)
        psi = torch.gather(cpsi.reshape(B, -1), 1, sel)
        rots = torch.gather(crot.reshape(B, -1, 9), 1, sel[..., None].expand(-1, -1, 9))
        rots = rots.reshape(B, Kl, 3, 3)
    if s.levels == 0:
        rots = rots[:, :1]
        tk = tk[:, :1]
    return SearchResult(rots[:, 0], tk[:, 0], best_err[:, 0], reference)


def _slices_of(
    refs: torch.Tensor,
    reference: torch.Tensor,
    D: int,
    rotations: torch.Tensor,
    freqs: torch.Tensor,
) -> torch.Tensor:
    """``(B, P, M)`` slices of every image's reference ``refs[reference] (B,)`` at its
    rotations ``(B, P, 3, 3)``: one shared-grid slicing per reference in use (a copy of
    the grid per image is slower)."""
    if refs.shape[0] == 1:
        return slice_grid(refs[0], D, rotations, freqs)
    B, P = rotations.shape[:2]
    out = torch.empty(B, P, freqs.shape[0], dtype=refs.dtype, device=refs.device)
    for g in torch.unique(reference).tolist():
        m = torch.nonzero(reference == g).squeeze(1)
        rots = rotations[m].reshape(-1, 3, 3)
        out[m] = slice_grid(refs[g], D, rots, freqs).reshape(len(m), P, -1)
    return out


def local_perturbations(step_rad: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(27, 3, 3)`` rotations ``exp([w]_x)`` with ``w`` on the grid ``{-1, 0, 1}^3 step``.

    Index 13 is the identity (``w = 0``).
    """
    v = torch.tensor([-1.0, 0.0, 1.0], device=device) * step_rad
    wz, wy, wx = torch.meshgrid(v, v, v, indexing="ij")
    return axis_angle_to_matrix(torch.stack([wx.flatten(), wy.flatten(), wz.flatten()], -1))


@torch.no_grad()
def local_refine_poses(
    grid_ft: torch.Tensor,
    D_grid: int,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    points: FrequencyPoints,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    radius_px: float,
    step_deg: float = 2.0,
    t_step_px: float = 0.5,
    levels: int = 4,
    iters_per_level: int = 2,
    soft: bool = False,
    prior_deg: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local pose search around the current poses at a high radius (pattern search).

    At every iteration each image tries the 27 rotations ``dR R`` (``dR`` from
    :func:`local_perturbations`, a cube of axis-angle steps about the image axes, so
    in-plane and out-of-plane together) times the 9 translations ``t + {-1, 0, 1}^2 dt``
    and keeps the best pair (the current pose is a candidate, so the error never rises).
    After ``iters_per_level`` iterations both steps are halved; ``levels`` levels end at
    ``step_deg / 2^(levels-1)``. This is the local ("children of the current pose")
    stage of hierarchical search (cryoDRGN / DRGN-AI HPS, Zhong et al. 2021; Levy et al.
    2024) run without the global levels, at the full radius where sub-degree changes
    are visible.

    Parameters
    ----------
    grid_ft
        ``(Dc, Dc, Dc)`` complex centred Fourier grid (shared) or ``(B, Dc, Dc, Dc)``;
        voxel spacing ``1 / D_grid`` cycles/px (``D_grid = 2 D`` for a 2x oversampled
        grid, which makes trilinear slicing accurate).
    D_grid
        Grid box size the voxel spacing refers to.
    images_ft, ctf
        ``(B, M_all)`` as in :func:`search_poses`.
    points
        Frequency points of the training box.
    rotations, shifts_px
        ``(B, 3, 3)``, ``(B, 2)`` the starting poses.
    radius_px
        Scoring radius (Fourier px of the training box).
    step_deg, t_step_px
        First-level rotation and translation steps.
    levels, iters_per_level
        Schedule (see above).
    soft
        Move to the posterior mean of the 243 candidates instead of the best one. With
        white Gaussian noise of variance ``sigma^2`` per complex Fourier component, the
        log-likelihood of a candidate is ``-E / (2 sigma^2)`` (``E`` the half-plane error
        with Friedel weight 2; ``sigma^2`` estimated per image as the smallest ``E`` over the
        summed weights, the noise dominating the residual at low SNR). The rotation moves
        by the probability-weighted mean axis-angle step, the shift to the weighted mean
        shift. Where an image's likelihood is flat (low SNR, high frequency) the mean stays
        near the current pose instead of following the noise to a grid point: the
        expectation step of maximum-likelihood refinement (Sigworth 1998, JSB 122:328;
        Scheres 2012, JMB 415:406) restricted to a local grid.
    prior_deg
        With ``soft``: a Gaussian prior of this width (deg) on the rotation's distance
        from the starting pose, and of ``prior_deg / step_deg * t_step_px`` px on the
        shift's (RELION's local searches use such a prior centred on the previous pose).
        ``None``: flat.

    Returns
    -------
    rotations : torch.Tensor
        ``(B, 3, 3)``.
    shifts_px : torch.Tensor
        ``(B, 2)``.
    error : torch.Tensor
        ``(B,)`` final error up to the constant ``|X|^2``.
    """
    B = images_ft.shape[0]
    dev = images_ft.device
    idx, w = points.half_index(radius_px)
    fr = points.freqs[idx]
    xb, cb = images_ft[:, idx], ctf[:, idx]
    R = rotations.float().to(dev)
    t = shifts_px.float().to(dev)
    local_t = translation_grid(1.0, 3, dev)  # (9, 2), index 4 = 0
    err = torch.zeros(B, device=dev)
    step, tstep = math.radians(step_deg), float(t_step_px)
    if soft:
        x2 = (w * (xb.real**2 + xb.imag**2)).sum(-1)  # (B,) |X|^2, the constant of E
        R_start, t_start = R.clone(), t.clone()
        unit = torch.tensor([-1.0, 0.0, 1.0], device=dev)
        wz, wy, wx = torch.meshgrid(unit, unit, unit, indexing="ij")
        omega = torch.stack([wx.flatten(), wy.flatten(), wz.flatten()], -1)  # (27, 3)
    for _ in range(max(levels, 0)):
        dR = local_perturbations(step, dev)  # (27, 3, 3)
        for _ in range(max(iters_per_level, 1)):
            cand = dR[None] @ R[:, None]  # (B, 27, 3, 3)
            shifts = t[:, None, :] + tstep * local_t  # (B, 9, 2)
            xc = centre_images(xb, fr, shifts)  # (B, 9, M)
            sli = slice_grid(grid_ft, D_grid, cand, fr)  # (B, 27, M)
            e = cross_terms(xc, cb, w, sli).reshape(B, -1)  # (B, 9 * 27)
            err, best = e.min(dim=1)
            if soft:
                sigma2 = ((err + x2) / w.sum()).clamp_min(1e-12)  # (B,)
                logp = (-(e - err[:, None]) / (2 * sigma2[:, None])).reshape(B, 9, 27)
                if prior_deg is not None:
                    from cryofield.physics.rotation import geodesic_distance_rad

                    ang = geodesic_distance_rad(cand, R_start[:, None])  # (B, 27)
                    s_r = math.radians(prior_deg)
                    s_t = prior_deg / step_deg * t_step_px
                    dt2 = ((shifts - t_start[:, None]) ** 2).sum(-1)  # (B, 9)
                    logp = logp - (ang**2 / (2 * s_r**2))[:, None, :]
                    logp = logp - (dt2 / (2 * s_t**2))[:, :, None]
                p = torch.softmax(logp.reshape(B, -1), dim=1).reshape(B, 9, 27)
                step_mean = (p.sum(1) @ omega) * step  # (B, 3) axis-angle, image axes
                R = axis_angle_to_matrix(step_mean) @ R
                t = t + tstep * (p.sum(2) @ local_t)
                continue
            ti = torch.div(best, 27, rounding_mode="floor")
            qi = best % 27
            R = cand[torch.arange(B, device=dev), qi]
            t = shifts[torch.arange(B, device=dev), ti]
        step, tstep = step / 2, tstep / 2
    return R, t, err
