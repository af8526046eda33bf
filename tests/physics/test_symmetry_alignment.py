"""Symmetry alignment of a map off the box centre (issue #23).

A map from a search without symmetry has its symmetry axes in any orientation AND
through any point: the C1 search centres the particle only up to the mean of the shifts,
so the symmetry centre is typically a pixel or two off the box centre. No rotation about
the box centre makes such a map symmetric; :func:`symmetry_frame` finds the rotation and
the centre, :func:`apply_symmetry_frame` moves the poses (rotation and shifts) to match.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryofield.physics.fourier import fft2_centered, ifft2_centered
from cryofield.physics.lattice import coords_1d
from cryofield.physics.rotation import random_rotations
from cryofield.physics.shift import phase_shift_fourier
from cryofield.physics.slicing import project_real_space
from cryofield.physics.symmetry import (
    SymmetryFrame,
    apply_symmetry_frame,
    symmetry_alignment,
    symmetry_frame,
    symmetry_operators,
)

torch.set_num_threads(1)

D = 24
BLOBS = [((4.0, -2.0, 1.5), (1.8, 1.2, 1.0)), ((-1.0, 3.0, 5.0), (1.1, 1.9, 1.3))]
SHIFT = (1.4, -1.1, 0.9)  # px: the symmetry centre of the test maps


def _blobs(D: int, blobs, rotations: torch.Tensor, centre=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """``(D, D, D)`` sum of anisotropic Gaussians, each at ``g c + centre`` with covariance
    ``g S g^T`` for every ``g`` in ``rotations``: the map is symmetric under
    ``x -> g x`` about ``centre``, ``V(g (x - centre) + centre) = V(x)``."""
    c = coords_1d(D, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1)
    t = torch.tensor(centre, dtype=torch.float64)
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for cen, sig in blobs:
        prec = torch.diag(1.0 / torch.tensor(sig, dtype=torch.float64) ** 2)
        for g in rotations.double():
            d = pts - (g @ torch.tensor(cen, dtype=torch.float64) + t)
            vol += torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, g @ prec @ g.T, d))
    return vol.float()


def _axes_miss_deg(A: torch.Tensor, B: torch.Tensor, ops: torch.Tensor) -> float:
    """Largest angle between the operators of ``A G A^T`` and their nearest in
    ``B G B^T`` (0: ``A`` and ``B`` put the axes in the same places)."""
    conj_a, conj_b = A @ ops @ A.T, B @ ops @ B.T
    d = (conj_a[:, None] - conj_b[None]).flatten(-2).norm(dim=-1).amin(1)
    return math.degrees(float(2 * torch.asin((d / (2 * math.sqrt(2))).clamp(max=1)).max()))


@pytest.mark.parametrize("name", ["C4", "D7"])
def test_symmetry_alignment_of_a_rotated_and_shifted_map(name: str) -> None:
    """The map symmetric about rotated axes through a point ~2 px off the box centre: the
    alignment finds the axes (within 1.5 deg) with a correlation near 1 (before issue #23
    was fixed it searched rotations about the box centre only and scored ~0.5-0.7 with
    the wrong axes)."""
    ops = symmetry_operators(name, torch.float64)
    B = random_rotations(1, torch.Generator().manual_seed(11), dtype=torch.float64)[0]
    vol = _blobs(D, BLOBS, B @ ops, SHIFT)
    A, score = symmetry_alignment(vol, ops, n_best=2, max_D=16)
    assert score > 0.9, score
    assert _axes_miss_deg(A, B, ops) < 1.5


@pytest.mark.parametrize(("name", "sign"), [("C4", 1.0), ("D7", 1.0), ("D7", -1.0)])
def test_symmetry_frame_finds_the_centre_and_the_recentred_map_is_symmetric(
    name: str, sign: float
) -> None:
    """``symmetry_frame``: ``c`` is the symmetry centre (``Cn``: up to the free component
    along the axis), and ``V(A x + c)`` is symmetric under RELION's operators about the
    box centre; also for a map of negative density (images of the other contrast)."""
    from cryofield.physics.symmetry import _density_centre, _sample_affine

    ops = symmetry_operators(name, torch.float64)
    B = random_rotations(1, torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    s = torch.tensor(SHIFT, dtype=torch.float64)
    vol = sign * _blobs(D, BLOBS, B @ ops, SHIFT)
    fr = symmetry_frame(vol, ops, n_best=2, max_D=16)
    assert isinstance(fr, SymmetryFrame)
    assert fr.score > 0.95, fr.score
    assert _axes_miss_deg(fr.rotation, B, ops) < 1.5
    axis = fr.rotation[:, 2]

    def miss(c: torch.Tensor) -> float:
        err = c - s
        if name.startswith("C"):  # the centre is free along the n-fold axis A e_z
            err = err - (err @ axis) * axis
        return float(err.norm())

    assert miss(fr.centre_px) < 0.25, (fr.centre_px, s)
    # the starting point, the centre of the density (of either sign), is already close
    assert miss(_density_centre(vol)) < 0.5, (_density_centre(vol), s)
    # V_new(x) = V(A x + c) has the group's symmetry in RELION's axes about the centre
    v = vol.double()
    new = _sample_affine(v, fr.rotation[None], fr.centre_px[None]).reshape(D, D, D)
    for g in ops[1:]:
        mate = _sample_affine(new, g[None], torch.zeros(1, 3, dtype=torch.float64))
        corr = torch.corrcoef(torch.stack([new.reshape(-1), mate.reshape(-1)]))[0, 1]
        assert float(corr) > 0.97, (g, float(corr))
    # C1: nothing to align
    fr1 = symmetry_frame(vol, ops[:1])
    assert fr1.rotation.equal(torch.eye(3, dtype=torch.float64)) and fr1.score == 1.0
    assert fr1.centre_px.abs().max() == 0


def test_apply_symmetry_frame_keeps_every_image() -> None:
    """Against ``V_new(x) = V(A x + c)`` the poses ``(R A, t + (R c)_xy)`` give the images
    that ``(R, t)`` give against ``V`` (``I(x) = P(x - t)``, docs/dev/contracts.md)."""
    Dp = 32
    gen = torch.Generator().manual_seed(3)
    A = random_rotations(1, gen, dtype=torch.float64)[0]
    c = torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)
    blobs = [((4.0, -3.0, 2.0), (2.2, 1.5, 1.3)), ((-5.0, 4.0, -3.0), (1.4, 2.4, 1.7))]
    eye = torch.eye(3, dtype=torch.float64)[None]
    v_new = _blobs(Dp, blobs, eye)  # V_new
    # V(y) = V_new(A^T (y - c)): every blob at A b + c, covariance A S A^T
    v = _blobs(Dp, blobs, A[None], tuple(c.tolist()))
    R = random_rotations(6, gen, dtype=torch.float64)
    t = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    fr = SymmetryFrame(A, c, 1.0)
    R2, t2 = apply_symmetry_frame(R, t, fr)
    assert torch.allclose(R2, R @ A)

    def images(vol: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = project_real_space(vol, R.float(), chunk_size=6).double()
        return ifft2_centered(phase_shift_fourier(fft2_centered(p), t)).real

    a, b = images(v, R, t), images(v_new, R2, t2)
    assert float((a - b).norm() / a.norm()) < 0.03
    # the shift is needed: without it the images differ
    assert float((a - images(v_new, R2, t)).norm() / a.norm()) > 0.3


def test_pose_change_modulo_the_group_in_the_maps_own_frame() -> None:
    """During a search without symmetry the map of a C4 particle is symmetric about axes
    and a centre of its own, and an image may jump to an equivalent pose between epochs.
    ``pose_change`` with the map's :func:`symmetry_frame` counts such a jump as no move
    (issue #23: 28% of a C4 set "changed basin" every epoch, doubling the search), and
    still counts a real 30 deg move."""
    from cryofield.inference.diagnostics import pose_change
    from cryofield.physics.rotation import axis_angle_to_matrix

    ops = symmetry_operators("C4", torch.float64)
    gen = torch.Generator().manual_seed(8)
    B = random_rotations(1, gen, dtype=torch.float64)[0]
    s = torch.tensor(SHIFT, dtype=torch.float64)
    vol = _blobs(D, BLOBS, B @ ops, SHIFT)  # symmetric under x -> B g B^T (x - s) + s
    n = 8
    R = random_rotations(n, gen, dtype=torch.float64)
    t = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    g = ops[1 + torch.arange(n) % 3]  # 90, 180, 270 deg
    R_eq = R @ B @ g @ B.T
    t_eq = t + (R @ s)[:, :2] - (R_eq @ s)[:, :2]

    def images(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = project_real_space(vol, R.float(), chunk_size=n).double()
        return ifft2_centered(phase_shift_fourier(fft2_centered(p), t)).real

    a, b = images(R, t), images(R_eq, t_eq)
    assert float((a - b).norm() / a.norm()) < 0.03  # the same images: equivalent poses
    fr = symmetry_frame(vol, ops, n_best=2, max_D=16)
    plain = pose_change(R, t, R_eq, t_eq, step_deg=15.0, t_step_px=1.0)
    assert plain["frac_rot_moved"] == 1.0
    mod = pose_change(R, t, R_eq, t_eq, step_deg=15.0, t_step_px=1.0, operators=ops, frame=fr)
    assert mod["frac_moved"] == 0.0, mod
    assert mod["median_deg"] < 2.0 and mod["median_shift_px"] < 0.3, mod
    # a real move of 30 deg is still one
    axes = torch.nn.functional.normalize(
        torch.randn(n, 3, generator=gen, dtype=torch.float64), dim=-1
    )
    R_mv = axis_angle_to_matrix(axes * math.radians(30.0)) @ R_eq
    moved = pose_change(R, t, R_mv, t_eq, step_deg=15.0, t_step_px=1.0, operators=ops, frame=fr)
    assert moved["frac_rot_moved"] == 1.0, moved
