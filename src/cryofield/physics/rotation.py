"""Rotation representations in the project's pose convention.

A pose ``R`` is RELION's matrix ``A`` (docs/dev/contracts.md): for Euler angles
``(rot, tilt, psi)`` (ZYZ, radians here, degrees only in files)

``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]``
and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``,

as written out in RELION's ``Euler_angles2matrix`` (``src/euler.cpp``; Scheres 2012,
J. Struct. Biol. 180:519). The projection under ``R`` integrates ``V(R^T [x, y, z])``
along z, so the viewing direction in the volume frame is ``R^T e_z`` (the third row of
``R``).

Also: unit quaternions ``(w, x, y, z)`` (Hamilton convention, ``R`` acts on column
vectors), axis-angle vectors ``v = theta * axis`` (Rodrigues), and the continuous 6-D
representation of Zhou et al. (CVPR 2019), here the first two *rows* of ``R``.
All functions take any leading batch shape ``...`` and keep dtype and device.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "axis_angle_to_matrix",
    "euler_relion_to_matrix",
    "geodesic_distance_rad",
    "inplane_rotation",
    "matrix_to_axis_angle",
    "matrix_to_euler_relion",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_to_matrix",
    "random_quaternions",
    "random_rotations",
    "rotation_6d_to_matrix",
]


def euler_relion_to_matrix(angles_rad: torch.Tensor) -> torch.Tensor:
    """RELION ZYZ Euler angles to rotation matrices (RELION's matrix ``A``).

    Parameters
    ----------
    angles_rad
        ``(..., 3)`` ``(rot, tilt, psi)`` in radians.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)``.
    """
    rot, tilt, psi = angles_rad.unbind(-1)
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1),
        torch.stack([sc, ss, cb], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_euler_relion(R: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation matrices to RELION ZYZ Euler angles with ``tilt`` in ``[0, pi]``.

    Follows the branch structure of RELION's ``Euler_matrix2angles``: when
    ``sin(tilt) ~ 0`` (gimbal lock) ``rot`` is set to 0 and the whole in-plane angle goes
    to ``psi``.

    Parameters
    ----------
    R
        ``(..., 3, 3)`` rotation matrices.
    eps
        Threshold on ``|sin(tilt)|`` below which the degenerate branch is used.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` ``(rot, tilt, psi)`` in radians, ``rot, psi`` in ``(-pi, pi]``.
    """
    abs_sb = torch.sqrt(R[..., 0, 2] ** 2 + R[..., 1, 2] ** 2)
    tilt = torch.atan2(abs_sb, R[..., 2, 2])
    rot = torch.atan2(R[..., 2, 1], R[..., 2, 0])
    psi = torch.atan2(R[..., 1, 2], -R[..., 0, 2])
    degenerate = abs_sb <= eps
    up = R[..., 2, 2] > 0
    psi_deg = torch.where(
        up, torch.atan2(-R[..., 1, 0], R[..., 0, 0]), torch.atan2(R[..., 1, 0], -R[..., 0, 0])
    )
    tilt_deg = torch.where(up, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    rot = torch.where(degenerate, torch.zeros_like(rot), rot)
    tilt = torch.where(degenerate, tilt_deg, tilt)
    psi = torch.where(degenerate, psi_deg, psi)
    return torch.stack([rot, tilt, psi], dim=-1)


def inplane_rotation(psi_rad: torch.Tensor) -> torch.Tensor:
    """Rotation about z, equal to RELION's matrix for ``(0, 0, psi)``.

    ``euler_relion_to_matrix([rot, tilt, psi]) == inplane_rotation(psi) @
    euler_relion_to_matrix([rot, tilt, 0])``. An image projected under
    ``inplane_rotation(psi) @ R`` is the image under ``R`` resampled at
    ``Rz(psi)^T [x, y]``, i.e. rotated in the image plane.

    Parameters
    ----------
    psi_rad
        ``(...)`` angles in radians.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)``.
    """
    c, s = torch.cos(psi_rad), torch.sin(psi_rad)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack(
        [torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)],
        dim=-2,
    )


def _unit_quaternion_w_nonneg(q: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` quaternions normalised and signed so that ``w >= 0`` (``q`` ~ ``-q``)."""
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` to rotation matrices.

    The input is normalised first. ``R v`` equals ``q v q*`` for column vectors ``v``.

    Parameters
    ----------
    q
        ``(..., 4)``.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)``.
    """
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``(w, x, y, z)`` with ``w >= 0``.

    Uses Shepperd's method (J. Guidance Control 1:223, 1978): of the four candidate
    formulas, each element uses the one with the largest pivot, so the result is accurate
    for all rotations, including angles near ``pi``.

    Parameters
    ----------
    R
        ``(..., 3, 3)``.

    Returns
    -------
    torch.Tensor
        ``(..., 4)``.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 * q_i^2 for i = w, x, y, z
    pivots = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22],
        dim=-1,
    )
    cand = torch.stack(
        [
            torch.stack([pivots[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, pivots[..., 1], m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, pivots[..., 2], m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, pivots[..., 3]], -1),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4), candidate j = 4 q_j * q
    best = pivots.argmax(dim=-1)
    idx = best[..., None, None].expand(*best.shape, 1, 4)
    return _unit_quaternion_w_nonneg(torch.gather(cand, -2, idx).squeeze(-2))


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors ``theta * axis`` (radians) to matrices: ``exp([v]_x)`` (Rodrigues).

    ``R = I + a K + b K^2`` with ``K = [v]_x`` the cross-product matrix of ``v``,
    ``a = sin(theta) / theta`` and ``b = (1 - cos(theta)) / theta^2``. Below ``theta^2 =
    1e-6`` the Taylor series ``a = 1 - theta^2 / 6``, ``b = 1/2 - theta^2 / 24`` is used,
    and the square root is only taken of values bounded away from zero, so the value is
    exact near ``theta = 0`` and the gradient is finite there (the residual pose
    parameterisation of :class:`cryofield.model.tables.PoseTable` sits exactly at
    ``v = 0`` after every pose search).

    Parameters
    ----------
    v
        ``(..., 3)``.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)``.
    """
    theta2 = (v * v).sum(-1)
    small = theta2 < 1e-6
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = torch.sqrt(t2)
    a = torch.where(small, 1 - theta2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(t)) / t2)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    K = torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)],
        dim=-2,
    )
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to axis-angle vectors with angle in ``[0, pi]``.

    Computed through the quaternion ``(w, u)``: ``theta = 2 atan2(|u|, w)``, which is well
    conditioned at all angles.

    Parameters
    ----------
    R
        ``(..., 3, 3)``.

    Returns
    -------
    torch.Tensor
        ``(..., 3)``.
    """
    q = matrix_to_quaternion(R)
    w, u = q[..., 0], q[..., 1:]
    n = torch.linalg.norm(u, dim=-1)
    theta = 2 * torch.atan2(n, w)
    small = n < 1e-7
    scale = torch.where(small, 2 / w.clamp_min(1e-12), theta / torch.where(small, 1, n))
    return u * scale[..., None]


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Continuous 6-D representation (Zhou et al. 2019) to rotation matrices.

    Gram-Schmidt on the two 3-vectors gives the first two rows; the third row is their
    cross product.

    Parameters
    ----------
    d6
        ``(..., 6)``: first row then second row (need not be orthonormal).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)``.
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """First two rows of ``R`` flattened, ``(..., 3, 3) -> (..., 6)``."""
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def random_quaternions(
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-uniform random unit quaternions ``(n, 4)`` with ``w >= 0``.

    A normalised 4-D standard Gaussian is uniform on the 3-sphere, hence uniform on SO(3).
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return _unit_quaternion_w_nonneg(q).to(dtype=dtype, device=device)


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-uniform random rotation matrices ``(n, 3, 3)``."""
    q = random_quaternions(n, generator, dtype=torch.float64)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def geodesic_distance_rad(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle of the rotation ``R1^T R2`` in radians, ``[0, pi]``.

    Uses ``||R1 - R2||_F = 2 sqrt(2) sin(theta / 2)``, accurate for small angles (unlike
    ``acos((tr - 1) / 2)``).

    Parameters
    ----------
    R1, R2
        ``(..., 3, 3)``, broadcastable.

    Returns
    -------
    torch.Tensor
        ``(...)``.
    """
    d = torch.linalg.norm((R1 - R2).flatten(-2), dim=-1)
    return 2 * torch.asin((d / (2 * math.sqrt(2))).clamp(max=1.0))
