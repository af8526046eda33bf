"""Rotation representations: RELION Euler formula, round trips to 1e-6, geodesics."""

from __future__ import annotations

import math

import numpy as np
import torch

from cryofield.physics import rotation as rot


def _relion_euler_angles2matrix(alpha: float, beta: float, gamma: float) -> np.ndarray:
    """RELION src/euler.cpp Euler_angles2matrix, written out independently in numpy."""
    ca, sa = math.cos(alpha), math.sin(alpha)
    cb, sb = math.cos(beta), math.sin(beta)
    cg, sg = math.cos(gamma), math.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty((3, 3))
    A[0, 0] = cg * cc - sg * sa
    A[0, 1] = cg * cs + sg * ca
    A[0, 2] = -cg * sb
    A[1, 0] = -sg * cc - cg * sa
    A[1, 1] = -sg * cs + cg * ca
    A[1, 2] = sg * sb
    A[2, 0] = sc
    A[2, 1] = ss
    A[2, 2] = cb
    return A


def _rand_euler(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return torch.stack(
        [(2 * u[:, 0] - 1) * math.pi, u[:, 1] * math.pi, (2 * u[:, 2] - 1) * math.pi], -1
    )


def test_euler_matches_relion_formula() -> None:
    angles = _rand_euler(50)
    R = rot.euler_relion_to_matrix(angles)
    for a, m in zip(angles.numpy(), R.numpy(), strict=True):
        assert np.allclose(m, _relion_euler_angles2matrix(*a), atol=1e-12)
    # Explicit value: rot = 90 deg maps x to -y as a row (A = Rz(rot) only).
    A = rot.euler_relion_to_matrix(torch.tensor([math.pi / 2, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(A, torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]).double())


def test_euler_round_trip_including_gimbal_lock() -> None:
    angles = _rand_euler(2000)
    angles[:5, 1] = 0.0  # tilt = 0
    angles[5:10, 1] = math.pi  # tilt = pi
    R = rot.euler_relion_to_matrix(angles)
    back = rot.matrix_to_euler_relion(R)
    assert (rot.euler_relion_to_matrix(back) - R).abs().max() < 1e-6
    # Generic angles (tilt in (0, pi)) come back exactly.
    gen = slice(10, None)
    assert torch.allclose(back[gen], angles[gen], atol=1e-6)
    # float32 matrices still round trip well.
    R32 = R.float()
    assert (rot.euler_relion_to_matrix(rot.matrix_to_euler_relion(R32)) - R32).abs().max() < 5e-6


def test_inplane_composition() -> None:
    angles = _rand_euler(20)
    full = rot.euler_relion_to_matrix(angles)
    zero_psi = angles.clone()
    zero_psi[:, 2] = 0
    composed = rot.inplane_rotation(angles[:, 2]) @ rot.euler_relion_to_matrix(zero_psi)
    assert torch.allclose(full, composed, atol=1e-12)


def test_quaternion_round_trip_and_known_value() -> None:
    R = rot.random_rotations(5000, torch.Generator().manual_seed(2), dtype=torch.float64)
    q = rot.matrix_to_quaternion(R)
    assert torch.allclose(q.norm(dim=-1), torch.ones(5000, dtype=torch.float64))
    assert (q[:, 0] >= 0).all()
    assert (rot.quaternion_to_matrix(q) - R).abs().max() < 1e-6
    # 90 deg about z: q = (cos 45, 0, 0, sin 45), R maps e_x -> e_y (column vectors).
    q90 = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    Rz = rot.quaternion_to_matrix(q90)
    assert torch.allclose(
        Rz @ torch.tensor([1.0, 0, 0]).double(), torch.tensor([0.0, 1, 0]).double()
    )
    # Near-pi rotations (w ~ 0) use a different pivot and stay accurate.
    Rpi = rot.axis_angle_to_matrix(torch.tensor([[0.0, math.pi - 1e-9, 0.0]], dtype=torch.float64))
    assert (rot.quaternion_to_matrix(rot.matrix_to_quaternion(Rpi)) - Rpi).abs().max() < 1e-6


def test_axis_angle_round_trip_and_rodrigues() -> None:
    g = torch.Generator().manual_seed(3)
    axis = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g, dtype=torch.float64))
    theta = torch.rand(3000, generator=g, dtype=torch.float64) * math.pi
    theta[:5] = torch.tensor([0.0, 1e-9, 1e-5, math.pi - 1e-7, math.pi])
    v = axis * theta[:, None]
    R = rot.axis_angle_to_matrix(v)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3000, dtype=torch.float64))
    # The axis is fixed and the angle is the geodesic distance to the identity.
    assert torch.allclose((R @ axis[..., None])[..., 0], axis, atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rot.geodesic_distance_rad(R, eye), theta, atol=1e-7)
    back = rot.matrix_to_axis_angle(R)
    assert (rot.axis_angle_to_matrix(back) - R).abs().max() < 1e-6
    gen = slice(5, None)  # away from theta = pi, where +-axis are the same rotation
    assert torch.allclose(back[gen], v[gen], atol=1e-6)
    # scipy agrees (independent implementation of Rodrigues / rotvec).
    from scipy.spatial.transform import Rotation

    assert np.allclose(Rotation.from_rotvec(v.numpy()).as_matrix(), R.numpy(), atol=1e-12)


def test_axis_angle_value_and_gradient_at_zero_and_small_angles() -> None:
    """Rodrigues near theta = 0: exact value, finite gradient ``d exp([v]_x) / dv_i = [e_i]_x``
    at ``v = 0``, and gradients that match finite differences across the Taylor branch."""
    from scipy.spatial.transform import Rotation

    def cross(e: torch.Tensor) -> torch.Tensor:
        x, y, z = e.tolist()
        return torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=e.dtype)

    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        v0 = torch.zeros(3, dtype=dtype, requires_grad=True)
        R0 = rot.axis_angle_to_matrix(v0)
        assert torch.equal(R0, torch.eye(3, dtype=dtype))
        (R0 * W.to(dtype)).sum().backward()
        expected = torch.stack([(W * cross(e)).sum() for e in torch.eye(3, dtype=torch.float64)])
        assert torch.isfinite(v0.grad).all()
        assert torch.allclose(v0.grad.double(), expected, atol=1e-6)
    # values: the Taylor branch (theta^2 < 1e-6) and the closed form agree with scipy
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), dim=0)
    for theta in (1e-9, 1e-6, 1e-4, 9.99e-4, 1.001e-3, 1e-2, 0.5):
        v = axis * theta
        ref = Rotation.from_rotvec(v.numpy()).as_matrix()
        assert np.abs(rot.axis_angle_to_matrix(v).numpy() - ref).max() < 1e-15
        assert np.abs(rot.axis_angle_to_matrix(v.float()).numpy() - ref).max() < 5e-7
        vg = v.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(rot.axis_angle_to_matrix, (vg,), eps=1e-7, atol=1e-6)


def test_rotation_6d_round_trip_and_projection() -> None:
    R = rot.random_rotations(1000, torch.Generator().manual_seed(4), dtype=torch.float64)
    d6 = rot.matrix_to_rotation_6d(R)
    assert (rot.rotation_6d_to_matrix(d6) - R).abs().max() < 1e-6
    # A perturbed 6-D vector still maps to a proper rotation.
    noisy = rot.rotation_6d_to_matrix(d6 + 0.1 * torch.randn_like(d6))
    assert torch.allclose(noisy @ noisy.transpose(-1, -2), torch.eye(3).double(), atol=1e-12)
    assert torch.allclose(torch.linalg.det(noisy), torch.ones(1000, dtype=torch.float64))


def test_random_rotations_are_uniform() -> None:
    R = rot.random_rotations(20000, torch.Generator().manual_seed(5), dtype=torch.float64)
    # Haar measure: E[R] = 0 and the angle density is (1 - cos t) / pi, mean pi/2 + 2/pi.
    assert R.mean(0).abs().max() < 0.02
    ang = rot.geodesic_distance_rad(R, torch.eye(3, dtype=torch.float64))
    assert abs(float(ang.mean()) - (math.pi / 2 + 2 / math.pi)) < 0.02
    assert R.dtype == torch.float64 and rot.random_rotations(3).dtype == torch.float32
