"""Point-group symmetry: the groups' rotation matrices, the asymmetric unit of viewing
directions, symmetrised maps.

Names (``--symmetry``, case-insensitive): ``C<n>``, ``D<n>`` (``n >= 1``), ``T``, ``O``,
``I`` (= ``I2``), ``I1``, ``I2``, ``I3``, ``I4``; ``C1`` is no symmetry. Only the proper
rotation groups: a map of a chiral molecule has no mirror symmetry.

Orientation of the axes: RELION's, from the generators of ``SymList::fill_symmetry_class``
(RELION ``src/symmetries.cpp``, 3dem/relion; the same as Xmipp's):

============  =====================================================================
``Cn``        ``n``-fold about z
``Dn``        ``n``-fold about z, 2-fold about x
``T``         3-fold about z, 2-fold about ``(0, 0.816496, 0.577350)``
``O``         3-fold about ``(1, 1, 1) / sqrt(3)``, 4-fold about z (4-folds on x, y, z)
``I``, ``I2`` 2-fold about z, 5-fold about ``(0.525731, 0, 0.850651)``, 3-fold about
              ``(0, 0.356822, 0.934172)``: 2-folds on x, y and z, 5-folds in the xz plane
``I1``        2-fold about x, 5-fold about ``(0.850651, 0, -0.525731)``, 3-fold about
              ``(0.934172, 0.356822, 0)``: 2-folds on x, y, z, 5-folds in the xy plane
``I3``        2-fold about ``(-0.525731, 0, 0.850651)``, 5-fold about z, 3-fold about
              ``(-0.491123, 0.356822, 0.794654)``
``I4``        2-fold about ``(0.525731, 0, 0.850651)``, 5-fold about
              ``(0.894427, 0, 0.447214)``, 3-fold about ``(0.491123, 0.356822, 0.794654)``
============  =====================================================================

As RELION (``SymList::read_sym_file`` then ``compute_subgroup``), the group is the
closure of the rotations by ``k 360 / fold`` about these axes; as a set it does not depend
on the sense of the rotations. cryoSPARC puts the 2-fold of ``Dn`` on y instead of x
(Scipion distinguishes the two as "Dxn" and "Dyn", I2PC/scipion pull request 2008):
:func:`relion_to_cryosparc_dihedral` gives the rotation between the two.

Poses (docs/dev/contracts.md): an image under pose ``R`` is the projection of
``V(R^T x)``. A map with the symmetry satisfies ``V(g x) = V(x)`` for every operator
``g``, so ``V(R^T x) = V((R g)^T x)``: the poses ``R g`` (``g`` in the group) all give the
same image. Symmetry-equivalent poses are ``R @ g``, the product RELION's
``relion_particle_symmetry_expand`` forms (``Euler_apply_transf(L, R, ...)``, new matrix
``L A R`` with ``L = I``; ``src/euler.cpp``, ``src/apps/particle_symmetry_expand.cpp``).
Their viewing directions ``(R g)^T e_z = g^T d`` form the orbit of ``d = R^T e_z`` under
the group, which is why restricting the search to one asymmetric unit of *directions*
restricts it to one pose per class (:func:`asymmetric_unit_mask`).

All functions are pure; rotations are ``(..., 3, 3)`` acting on column vectors
``(x, y, z)``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "SYMMETRY_FORMS",
    "SymmetryError",
    "SymmetryFrame",
    "apply_symmetry_frame",
    "asymmetric_unit_mask",
    "canonical_symmetry",
    "equivalent_poses",
    "nearest_equivalent",
    "relion_to_cryosparc_dihedral",
    "symmetrize_volume",
    "symmetry_alignment",
    "symmetry_frame",
    "symmetry_operators",
    "symmetry_order",
]

#: the accepted forms, for messages and help texts
SYMMETRY_FORMS = "C<n> or D<n> (n >= 1, e.g. C4, D7), T, O, I (= I2), I1, I2, I3 or I4"

_PHI = (1.0 + math.sqrt(5.0)) / 2.0

#: generators ``(fold, axis)`` of RELION's ``SymList::fill_symmetry_class`` (the axes are
#: normalised below; RELION writes them to 6-10 digits, here they are exact)
_GENERATORS: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": ((3, (0.0, 0.0, 1.0)), (2, (0.0, math.sqrt(2.0 / 3.0), math.sqrt(1.0 / 3.0)))),
    "O": ((3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))),
    # I2: 5-fold (1, 0, phi) / |.| = (0.525731, 0, 0.850651); 3-fold (0, 1, phi^2) / |.|
    # = (0, 0.356822, 0.934172)
    "I2": ((2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, _PHI)), (3, (0.0, 1.0, _PHI**2))),
    # I1: 5-fold (phi, 0, -1) / |.| = (0.850651, 0, -0.525731); 3-fold (phi^2, 1, 0) / |.|
    "I1": ((2, (1.0, 0.0, 0.0)), (5, (_PHI, 0.0, -1.0)), (3, (_PHI**2, 1.0, 0.0))),
    # I3: 2-fold (-1, 0, phi) / |.|; 5-fold z; 3-fold (-0.491123, 0.356822, 0.794654)
    "I3": (
        (2, (-1.0, 0.0, _PHI)),
        (5, (0.0, 0.0, 1.0)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ),
    # I4: 2-fold (1, 0, phi) / |.|; 5-fold (2, 0, 1) / sqrt(5); 3-fold as I3 mirrored in x
    "I4": (
        (2, (1.0, 0.0, _PHI)),
        (5, (2.0, 0.0, 1.0)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ),
}

#: a direction off every symmetry axis of every group here: the centre of the
#: asymmetric unit of :func:`asymmetric_unit_mask` (its stabiliser must be trivial)
_REFERENCE_DIRECTION = (0.05, 0.6, 0.8)


class SymmetryError(ValueError):
    """A symmetry name that is not one of :data:`SYMMETRY_FORMS`.

    A ``ValueError`` (``physics`` imports nothing from the package); the configuration and
    the commands turn it into a :class:`cryofield.errors.CryofieldError`.
    """


def canonical_symmetry(name: str) -> str:
    """The canonical form of a symmetry name: upper case, ``I`` -> ``I2``.

    Raises
    ------
    SymmetryError
        For anything but :data:`SYMMETRY_FORMS`.
    """
    s = str(name).strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", s)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise SymmetryError(f"symmetry {name!r}: the order must be >= 1 ({SYMMETRY_FORMS})")
        return f"{m.group(1)}{n}"
    if s == "I":
        return "I2"
    if s in ("T", "O", "I1", "I2", "I3", "I4"):
        return s
    raise SymmetryError(f"unknown symmetry {name!r}: expected {SYMMETRY_FORMS}")


def symmetry_order(name: str) -> int:
    """Number of operators: ``n`` for ``Cn``, ``2n`` for ``Dn``, 12, 24, 60 for T, O, I."""
    s = canonical_symmetry(name)
    if s[0] == "C":
        return int(s[1:])
    if s[0] == "D":
        return 2 * int(s[1:])
    return {"T": 12, "O": 24}.get(s, 60)


def _axis_rotation(axis: tuple[float, float, float], angle: float) -> torch.Tensor:
    """``(3, 3)`` float64 rotation by ``angle`` about the unit vector of ``axis``."""
    u = torch.tensor(axis, dtype=torch.float64)
    u = u / torch.linalg.norm(u)
    K = torch.tensor(
        [[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64
    )
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def _close(generators: list[torch.Tensor]) -> torch.Tensor:
    """The finite group generated by ``generators``, identity first, as ``(G, 3, 3)``."""
    elems = [torch.eye(3, dtype=torch.float64)]
    frontier = list(elems)
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                b = g @ a
                if all(float((b - e).abs().max()) > 1e-6 for e in elems):
                    elems.append(b)
                    new.append(b)
        frontier = new
        if len(elems) > 120:  # pragma: no cover - the groups here have at most 60
            raise RuntimeError("symmetry generators do not close into a finite group")
    return torch.stack(elems)


@functools.lru_cache(maxsize=32)
def _operators(canon: str) -> torch.Tensor:
    if canon[0] in "CD":
        n = int(canon[1:])
        gens = [_axis_rotation((0.0, 0.0, 1.0), 2 * math.pi / n)]
        if canon[0] == "D":
            gens.append(_axis_rotation((1.0, 0.0, 0.0), math.pi))
    else:
        # the first two generators generate the group (RELION's third, a 3-fold given to
        # 16 digits for I3 and I4, is a product of them: tests/physics/test_symmetry.py)
        gens = [_axis_rotation(axis, 2 * math.pi / fold) for fold, axis in _GENERATORS[canon][:2]]
    ops = _close(gens)
    ops = torch.where(ops.abs() < 1e-12, torch.zeros_like(ops), ops)
    # a fixed order: identity first, then by (rotation angle, matrix entries)
    angle = torch.arccos(((ops.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    keys = [(round(float(a), 9), *(round(float(x), 9) for x in m.flatten())) for a, m in
            zip(angle, ops, strict=True)]  # fmt: skip
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return ops[order]


def symmetry_operators(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The rotation matrices of a point group in RELION's orientation.

    Parameters
    ----------
    name
        One of :data:`SYMMETRY_FORMS`.
    dtype, device
        Of the result (computed in float64).

    Returns
    -------
    torch.Tensor
        ``(G, 3, 3)`` with ``G = symmetry_order(name)``, the identity first; a map with
        the symmetry satisfies ``V(g x) = V(x)`` for each ``g``, and the poses ``R @ g``
        give the same image as ``R``.
    """
    return _operators(canonical_symmetry(name)).to(dtype=dtype, device=device)


def relion_to_cryosparc_dihedral(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rotation ``Q`` (90 deg about z) from RELION's ``Dn`` axes to cryoSPARC's.

    RELION puts the 2-fold of ``Dn`` on x, cryoSPARC on y; ``Q`` maps x to y and keeps
    the ``n``-fold on z. For a map ``V`` in RELION's orientation (poses ``R``):

    - the map in cryoSPARC's orientation is ``V_cs(x) = V(Q^T x)`` (the map rotated by
      ``Q``), its group ``Q G Q^T``;
    - the same images have the poses ``R_cs = R Q^T`` against ``V_cs``;
    - back from cryoSPARC: ``V(x) = V_cs(Q x)``, ``R = R_cs Q``.

    ``Q`` is defined up to the group: ``Q g`` (``g`` in ``Dn``) and, for odd ``n``, the
    rotation by -90 deg about z give maps related by a symmetry of the result.

    Returns
    -------
    torch.Tensor
        ``(3, 3)``.
    """
    return _axis_rotation((0.0, 0.0, 1.0), math.pi / 2).to(dtype)


def mirror_keeps_axes(name: str) -> bool:
    """Whether the z-mirror of a map with point group ``name`` (RELION's axes) has the
    group in the same axes (``M G M = G``, ``M = diag(1, 1, -1)``): true for ``Cn``,
    ``Dn``, ``O``, ``I1``, ``I2``; not for RELION's ``T``, ``I3``, ``I4``, whose hand is
    flipped by inversion instead (:mod:`cryofield.physics.handedness`)."""
    G = symmetry_operators(name, torch.float64)
    M = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    dist = ((M @ G @ M)[:, None] - G[None]).abs().amax((-1, -2))
    return bool((dist.min(1).values < 1e-6).all())


def equivalent_poses(rotations: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """The ``G`` poses equivalent to each pose: ``R @ g``.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` poses.
    operators
        ``(G, 3, 3)`` the group.

    Returns
    -------
    torch.Tensor
        ``(..., G, 3, 3)``, ``[..., 0]`` = ``R`` when the identity is first.
    """
    ops = operators.to(device=rotations.device, dtype=rotations.dtype)
    return rotations[..., None, :, :] @ ops


def nearest_equivalent(
    rotations: torch.Tensor, reference: torch.Tensor, operators: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivalent pose ``R g`` closest to a reference pose, for each pose.

    Used to compare poses modulo the group: the angle between ``R`` and ``R_ref`` up to
    the symmetry is the angle between ``nearest_equivalent(R, R_ref)`` and ``R_ref``.

    Parameters
    ----------
    rotations, reference
        ``(..., 3, 3)`` poses and reference poses (broadcastable).
    operators
        ``(G, 3, 3)`` the group.

    Returns
    -------
    aligned : torch.Tensor
        ``(..., 3, 3)`` ``R g*`` with ``g*`` maximising ``tr(R_ref^T R g)``, i.e. the
        smallest rotation angle between ``R g`` and ``R_ref``.
    index : torch.Tensor
        ``(...)`` int64, the index of ``g*`` in ``operators``.
    """
    eq = equivalent_poses(rotations, operators)  # (..., G, 3, 3)
    eq, ref = torch.broadcast_tensors(eq, reference.to(eq.dtype)[..., None, :, :])
    tr = (eq * ref).sum((-2, -1))  # tr(R_ref^T R g) = sum of the elementwise product
    index = tr.argmax(-1)
    sel = index[..., None, None, None].expand(*index.shape, 1, 3, 3)
    return torch.gather(eq, -3, sel).squeeze(-3), index


def asymmetric_unit_mask(
    directions: torch.Tensor, operators: torch.Tensor, margin_rad: float = 0.0
) -> torch.Tensor:
    """Which viewing directions lie in one asymmetric unit of the sphere (plus a margin).

    The asymmetric unit is the Dirichlet cell of a fixed reference direction ``r`` (off
    every symmetry axis) among its orbit ``{g r}``: the directions ``d`` with
    ``d . r >= d . (g r)`` for every operator ``g``, i.e. those closer to ``r`` than to any
    other point of the orbit. The cells of the ``|G|`` orbit points tile the sphere, and
    the orbit ``{g^T d}`` of a direction (the directions of the equivalent poses
    ``R g``) has exactly one point in the cell of ``r`` unless it lies on a boundary
    (measure zero, where it has two or more). The cell has ``1 / |G|`` of the sphere's
    area, and it is convex (an intersection of hemispheres).

    With ``margin_rad > 0`` each boundary moves out by that angle
    (``d . n_g >= -sin(margin)`` with ``n_g`` the unit normal of the bisecting plane of
    ``r`` and ``g r``): a grid whose points are at most ``margin_rad`` from any direction
    then keeps, for every direction of the cell, its nearest grid point.

    Parameters
    ----------
    directions
        ``(..., 3)`` directions (need not be normalised).
    operators
        ``(G, 3, 3)`` the group (:func:`symmetry_operators`).
    margin_rad
        Dilation of the cell (radians, ``>= 0``).

    Returns
    -------
    torch.Tensor
        ``(...)`` bool; all True for ``G = 1``.
    """
    d = directions.double()
    d = d / torch.linalg.norm(d, dim=-1, keepdim=True).clamp_min(1e-12)
    ops = operators.to(device=d.device, dtype=torch.float64)
    r = torch.tensor(_REFERENCE_DIRECTION, dtype=torch.float64, device=d.device)
    r = r / torch.linalg.norm(r)
    orbit = ops @ r  # (G, 3)
    n = r - orbit  # (G, 3), zero for g = e
    norm = torch.linalg.norm(n, dim=-1)
    other = norm > 1e-9
    if int((~other).sum()) != 1:  # pragma: no cover - guards the reference direction
        raise ValueError("the reference direction lies on a symmetry axis of this group")
    n = n[other] / norm[other, None]  # (G - 1, 3)
    if n.shape[0] == 0:
        return torch.ones(d.shape[:-1], dtype=torch.bool, device=d.device)
    tol = math.sin(max(float(margin_rad), 0.0)) + 1e-9
    return ((d @ n.T) >= -tol).all(dim=-1)


def symmetrize_volume(vol: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """The group average ``(1 / |G|) sum_g V(g x)`` of a map (trilinear resampling).

    Parameters
    ----------
    vol
        ``(D, D, D)`` real map indexed ``[z, y, x]``, origin at ``D // 2``.
    operators
        ``(G, 3, 3)`` the group (:func:`symmetry_operators`).

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` with the symmetry (up to interpolation), same dtype; zero is read
        outside the box.
    """
    D = vol.shape[-1]
    if vol.shape != (D, D, D):
        raise ValueError(f"symmetrize_volume: expected a (D, D, D) map, got {tuple(vol.shape)}")
    dt = vol.dtype if vol.dtype in (torch.float32, torch.float64) else torch.float32
    c = torch.arange(D, dtype=dt, device=vol.device) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1).reshape(-1, 3)  # (D^3, 3) (x, y, z)
    src = vol.to(dt)[None, None]
    out = torch.zeros(D**3, dtype=dt, device=vol.device)
    scale = 2.0 / (D - 1)
    offset = 2.0 * (D // 2) / (D - 1) - 1.0
    for g in operators.to(device=vol.device, dtype=dt):
        q = pts @ g.T  # g x
        grid = (q * scale + offset).reshape(1, 1, 1, -1, 3)
        out += F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True).reshape(-1)  # fmt: skip
    return (out / operators.shape[0]).reshape(D, D, D).to(vol.dtype)


def _grid_points(D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(D^3, 3)`` voxel coordinates ``(x, y, z)`` relative to ``D // 2``, in the order of
    a ``(D, D, D)`` map indexed ``[z, y, x]``."""
    c = torch.arange(D, dtype=dtype, device=device) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1).reshape(-1, 3)


def _sample_affine(vol: torch.Tensor, Q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``V(Q x + c)`` for a batch: ``vol (D, D, D)``, ``Q (K, 3, 3)``, ``c (K, 3)`` (px,
    ``(x, y, z)``) -> ``(K, D^3)`` (trilinear, zero outside; origin at ``D // 2``)."""
    D = vol.shape[-1]
    pts = _grid_points(D, vol.dtype, vol.device)
    q = torch.einsum("nj,kij->kni", pts, Q.to(vol.dtype)) + c.to(vol.dtype)[:, None, :]
    grid = (q * (2.0 / (D - 1)) + (2.0 * (D // 2) / (D - 1) - 1.0))[:, None, None]
    src = vol[None, None].expand(Q.shape[0], 1, D, D, D)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(Q.shape[0], -1)


def _density_centre(v: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Centre of the density of a map (``(3,)`` float64 ``(x, y, z)`` px from ``D // 2``).

    The centre of mass of the map above its mean plus one standard deviation (the solvent
    and the noise left out), then again within a ball of radius ``D / 4`` about the
    estimate, a few times. The density is taken to be where the map's values have their
    long tail: a map of negative density (images of the other contrast; its skewness is
    negative) is negated first. Every such weighting of a map with a point-group symmetry is
    itself symmetric about a ball centred on the axes, so the estimate lies on the axes
    (the symmetry centre for the groups with a fixed point); RELION's
    ``relion_align_symmetry`` likewise moves the centre of mass to the box centre first.
    """
    D = v.shape[-1]
    u = v.double()
    if float(((u - u.mean()) ** 3).mean()) < 0:
        u = -u
    pts = _grid_points(D, torch.float64, u.device).reshape(D, D, D, 3)

    def com(w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        m = w.sum()
        return (w[..., None] * pts).sum((0, 1, 2)) / m if float(m) > 0 else fallback

    zero = torch.zeros(3, dtype=torch.float64, device=u.device)
    c = com((u - u.mean() - u.std()).clamp_min(0), zero)
    solvent = u.median()
    for _ in range(iters):
        ball = ((pts - c).norm(dim=-1) < D / 4).double()
        c_new = com((u - solvent).clamp_min(0) * ball, c)
        done = float((c_new - c).norm()) < 1e-3
        c = c_new
        if done:
            break
    return c


def _constrained_directions(ops: torch.Tensor) -> torch.Tensor:
    """``(3, r)`` orthonormal basis of the directions in which a group pins its centre:
    the complement of the space every operator fixes (``Cn``: x, y, as the n-fold axis z
    leaves a centre free along it; ``D1``: y, z; groups with a fixed point: all three)."""
    M = (ops - torch.eye(3, dtype=ops.dtype, device=ops.device)).reshape(-1, 3)
    _, S, Vh = torch.linalg.svd(M, full_matrices=True)
    return Vh[S > 1e-6].T


class SymmetryFrame(NamedTuple):
    """Result of :func:`symmetry_frame`: ``V_new(x) = V(A x + c)`` has the group's symmetry
    in RELION's axes about the box centre.

    Attributes
    ----------
    rotation
        ``(3, 3)`` float64 ``A``.
    centre_px
        ``(3,)`` float64 ``c`` (``(x, y, z)``, voxels of the input map from ``D // 2``): the
        symmetry centre of ``V``. For groups with an axis but no fixed point (``Cn``) the
        component along the axis is the map's density centre (it is free).
    score
        Mean correlation of ``V_new`` with its rotations by the operators ``g != e``.
    """

    rotation: torch.Tensor
    centre_px: torch.Tensor
    score: float


def apply_symmetry_frame(
    rotations: torch.Tensor, shifts_px: torch.Tensor, frame: SymmetryFrame
) -> tuple[torch.Tensor, torch.Tensor]:
    """The poses against ``V_new(x) = V(A x + c)`` that give the images of ``(R, t)``
    against ``V``: ``(R A, t + (R c)_xy)``.

    With ``V(y) = V_new(A^T (y - c))``: ``V(R^T u) = V_new((R A)^T (u - R c))``, so the
    projection under ``R`` is that of ``V_new`` under ``R A`` moved by ``(R c)_xy``, and an
    image ``I(x) = P(x - t)`` (docs/dev/contracts.md) has the shift ``t + (R c)_xy``.

    Parameters
    ----------
    rotations, shifts_px
        ``(..., 3, 3)`` and ``(..., 2)`` poses.
    frame
        From :func:`symmetry_frame` (its ``centre_px`` in the voxels of these shifts).

    Returns
    -------
    tuple
        ``(R A, t + (R c)[..., :2])``, the dtypes of the inputs.
    """
    A = frame.rotation.to(device=rotations.device, dtype=rotations.dtype)
    c = frame.centre_px.to(device=rotations.device, dtype=rotations.dtype)
    shift = (rotations @ c)[..., :2].to(shifts_px.dtype)
    return rotations @ A, shifts_px + shift


def symmetry_frame(
    vol: torch.Tensor,
    operators: torch.Tensor,
    *,
    max_D: int = 24,
    levels: int = 4,
    n_best: int = 3,
    chunk: int = 256,
) -> SymmetryFrame:
    """The rotation and the centre that put a map's symmetry axes where the group has them.

    For a map ``V`` whose symmetry (up to noise) is a rotated copy ``A G A^T`` of the group
    ``G`` about some point ``c`` (e.g. a map from a search without symmetry: its axes are
    anywhere, and they pass through the box centre only if the search happened to centre
    the particle on them), find ``A`` and ``c`` so that ``V_new(x) = V(A x + c)`` has the
    symmetry ``G`` in RELION's axes about the box centre. The poses of
    :func:`apply_symmetry_frame` then give against ``V_new`` the images that ``(R, t)``
    give against ``V``.

    The score of ``(A, c)`` is the mean correlation of ``V(x + c)`` with
    ``V(A g A^T x + c)`` over ``g != e`` (1 for a perfectly symmetric map), both weighted
    by a soft ball about ``x = 0``, on the map Fourier-cropped to ``max_D``. ``c`` starts at
    the map's density centre (:func:`_density_centre`); the candidates for ``A`` are the
    level-0 points of one asymmetric unit of the SO(3) grid (``A`` and ``A g`` put the axes
    in the same places), and the ``n_best`` best are refined, with ``c``, by a pattern
    search: 27 rotations ``exp([w]_x) A`` (``w`` on a cube) and the moves of ``c`` by
    ``+-`` one step along each direction the group pins (:func:`_constrained_directions`
    turned by ``A``), the steps (7.5 deg, 1 px of the cropped map) halved ``levels`` times.
    This is what RELION's ``relion_align_symmetry`` does after a C1 initial model (RELION 4
    runs its initial model in C1 and applies the symmetry this way); here by real-space
    correlation.

    Parameters
    ----------
    vol
        ``(D, D, D)`` map, origin at ``D // 2``.
    operators
        ``(G, 3, 3)`` the group (:func:`symmetry_operators`).
    max_D
        Box the map is Fourier-cropped to first (even; the search's resolution).
    levels, n_best, chunk
        Local refinement levels, candidates refined, maps resampled at once.

    Returns
    -------
    SymmetryFrame
        ``A`` (``(3, 3)`` float64), ``c`` (``(3,)`` float64, voxels of ``vol``) and the
        score (``<= 1``); ``(I, 0, 1.0)`` for ``G = 1``.
    """
    from cryofield.physics import so3_grid
    from cryofield.physics.filters import fourier_crop_3d, soft_spherical_mask
    from cryofield.physics.rotation import axis_angle_to_matrix

    ops = operators.to(dtype=torch.float64, device=vol.device)
    eye = torch.eye(3, dtype=torch.float64)
    if ops.shape[0] <= 1:
        return SymmetryFrame(eye, torch.zeros(3, dtype=torch.float64), 1.0)
    v = vol.detach().to(torch.float32)
    D = v.shape[-1]
    if D > max_D:
        v = fourier_crop_3d(v, max_D - max_D % 2)
    Dm = v.shape[-1]
    scale = D / Dm  # voxels of vol per voxel of v
    c0 = _density_centre(v)
    v = v - v.mean()
    mask = soft_spherical_mask(Dm, Dm / 2 - 3, 2.0, device=v.device).reshape(-1)
    others = ops[1:]
    basis = _constrained_directions(ops)  # (3, r) in the group's frame
    eye_f = torch.eye(3, dtype=torch.float32, device=v.device)

    def reference(c: torch.Tensor) -> torch.Tensor:
        """``m(x) V(x + c)`` for ``c (K, 3)`` -> ``(K, Dm^3)`` normalised."""
        r = _sample_affine(v, eye_f.expand(c.shape[0], 3, 3), c.float()) * mask
        return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def scores(A: torch.Tensor, c: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """Mean correlation for ``A (K, 3, 3)``, ``c (K, 3)`` (cropped voxels); ``ref``:
        :func:`reference` of ``c`` (``(K, .)``, or ``(1, .)`` when every ``c`` is the same)."""
        K, G1 = A.shape[0], others.shape[0]
        if ref is None:
            ref = reference(c)
        Q = (A[:, None] @ others[None] @ A[:, None].transpose(-1, -2)).reshape(-1, 3, 3)
        cq = c[:, None].expand(K, G1, 3).reshape(-1, 3)
        row = torch.arange(K * G1, device=v.device) // G1 if ref.shape[0] > 1 else None
        out = []
        for s0 in range(0, Q.shape[0], chunk):
            sl = slice(s0, s0 + chunk)
            w = _sample_affine(v, Q[sl].float(), cq[sl].float()) * mask
            r = ref if row is None else ref[row[sl]]
            out.append((w * r).sum(-1) / w.norm(dim=-1).clamp_min(1e-12))
        return torch.cat(out).double().reshape(K, G1).mean(-1)

    cand = so3_grid.asymmetric_level_points(ops.cpu(), 0, dtype=torch.float64)[0]
    cand = cand.to(vol.device)
    ref0 = reference(c0[None])
    sc = scores(cand, c0[None].expand(cand.shape[0], 3), ref0)
    order = torch.argsort(sc, descending=True)[:n_best]
    unit = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, device=vol.device)
    wz, wy, wx = torch.meshgrid(unit, unit, unit, indexing="ij")
    cube = torch.stack([wx.flatten(), wy.flatten(), wz.flatten()], -1)  # (27, 3), 13: 0
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for A in cand[order]:
        c = c0.clone()
        s_A = float(scores(A[None], c[None])[0])
        step, t_step = math.radians(7.5), 1.0
        for _ in range(max(levels, 0)):
            for _ in range(10):
                rots = axis_angle_to_matrix(cube * step) @ A
                s_rot = scores(rots, c[None].expand(27, 3), reference(c[None]))
                dirs = A @ basis  # (3, r): the directions the group pins, in V's frame
                moves = torch.cat([dirs.T, -dirs.T]) * t_step  # (2 r, 3)
                s_mov = scores(A[None].expand(moves.shape[0], 3, 3), c + moves)
                k_rot, k_mov = int(s_rot.argmax()), int(s_mov.argmax())
                if float(s_rot[k_rot]) >= float(s_mov[k_mov]):
                    if float(s_rot[k_rot]) <= s_A + 1e-9 or k_rot == 13:
                        break
                    A, s_A = rots[k_rot], float(s_rot[k_rot])
                else:
                    if float(s_mov[k_mov]) <= s_A + 1e-9:
                        break
                    c, s_A = c + moves[k_mov], float(s_mov[k_mov])
            step /= 2
            t_step /= 2
        if best is None or s_A > best[2]:
            best = (A, c, s_A)
    assert best is not None
    A, c, s_A = best
    return SymmetryFrame(A.cpu(), (c * scale).cpu(), s_A)


def symmetry_alignment(
    vol: torch.Tensor,
    operators: torch.Tensor,
    *,
    max_D: int = 24,
    levels: int = 4,
    n_best: int = 3,
    chunk: int = 256,
) -> tuple[torch.Tensor, float]:
    """The rotation that puts a map's symmetry axes where the group has them.

    :func:`symmetry_frame` without the centre: ``A`` with ``V(A x + c)`` symmetric in
    RELION's axes, the centre ``c`` found alongside (a map whose symmetry centre is off
    the box centre has no rotation about the box centre that makes it symmetric; use
    :func:`symmetry_frame` and :func:`apply_symmetry_frame` to move the poses' shifts
    too).

    Returns
    -------
    A : torch.Tensor
        ``(3, 3)`` float64 rotation (the identity for ``G = 1``).
    score : float
        Its mean correlation (``<= 1``), about the symmetry centre.
    """
    fr = symmetry_frame(vol, operators, max_D=max_D, levels=levels, n_best=n_best, chunk=chunk)
    return fr.rotation, fr.score
