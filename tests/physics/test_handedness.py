"""Hand flip: mirrored map + mirrored poses reproduce the same images."""

from __future__ import annotations

import numpy as np
import torch

from cryofield.physics.backproject import reconstruct_fourier
from cryofield.physics.fsc import fsc
from cryofield.physics.handedness import flip_hand_poses, flip_hand_volume, mirror_matrix
from cryofield.physics.rotation import (
    euler_relion_to_matrix,
    geodesic_distance_rad,
    random_rotations,
)
from cryofield.physics.slicing import project_real_space


def _rotations(n: int, seed: int) -> torch.Tensor:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed)).float()


def test_flip_volume_is_mirror_about_origin(blobs32: torch.Tensor) -> None:
    D = blobs32.shape[-1]
    flipped = flip_hand_volume(blobs32)
    c = D // 2
    for j in (1, 3, 7):
        assert torch.equal(flipped[c + j], blobs32[c - j])
        assert torch.equal(flipped[c - j], blobs32[c + j])
    assert torch.equal(flipped[c], blobs32[c])  # the origin plane stays
    assert torch.equal(flip_hand_volume(flipped), blobs32)  # an involution
    # the chiral test volume is not its own mirror image
    assert (flipped - blobs32).abs().max() > 0.1 * blobs32.abs().max()
    as_np = flip_hand_volume(blobs32.numpy())
    assert isinstance(as_np, np.ndarray)
    np.testing.assert_array_equal(as_np, flipped.numpy())


def test_flipped_poses_are_rotations_M_R_M() -> None:
    R = _rotations(50, 0)
    Rf, shifts = flip_hand_poses(R, torch.ones(50, 2))
    M = mirror_matrix()
    torch.testing.assert_close(Rf, M @ R @ M)
    torch.testing.assert_close(
        Rf @ Rf.transpose(-1, -2), torch.eye(3).expand(50, 3, 3), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.linalg.det(Rf), torch.ones(50), atol=1e-5, rtol=0)
    assert torch.equal(shifts, torch.ones(50, 2))
    # RELION Euler form: (rot, tilt, psi) -> (rot, -tilt, psi)
    angles = torch.tensor([[0.3, 1.1, -2.0], [2.5, 0.2, 0.7]], dtype=torch.float64)
    mirrored = angles * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    Rf64, _ = flip_hand_poses(euler_relion_to_matrix(angles))
    torch.testing.assert_close(Rf64, euler_relion_to_matrix(mirrored))
    Rnp, snp = flip_hand_poses(R.numpy())
    assert isinstance(Rnp, np.ndarray) and snp is None
    np.testing.assert_allclose(Rnp, Rf.numpy())


def test_projections_of_flipped_map_at_flipped_poses_equal_originals(
    blobs32: torch.Tensor,
) -> None:
    R = _rotations(12, 1)
    images = project_real_space(blobs32, R)
    Rf, _ = flip_hand_poses(R)
    mirrored_images = project_real_space(flip_hand_volume(blobs32), Rf)
    scale = images.abs().max()
    assert (mirrored_images - images).abs().max() < 1e-4 * scale
    # the identity needs the pose flip: the mirrored map at the old poses differs
    wrong = project_real_space(flip_hand_volume(blobs32), R)
    assert (wrong - images).abs().max() > 0.05 * scale
    # and the flipped poses really are different poses (not a no-op)
    assert geodesic_distance_rad(Rf, R).mean() > 0.5


def test_reconstruction_from_flipped_poses_is_the_flipped_map(blobs32: torch.Tensor) -> None:
    n = 600
    R = _rotations(n, 2)
    images = project_real_space(blobs32, R)
    shifts = torch.zeros(n, 2)
    Rf, shifts_f = flip_hand_poses(R, shifts)
    recon = reconstruct_fourier(images, R, shifts)
    recon_flipped = reconstruct_fourier(images, Rf, shifts_f)
    D = blobs32.shape[-1]
    low = slice(1, D // 4)
    curve = fsc(recon_flipped, flip_hand_volume(blobs32))
    assert curve[low].min() > 0.95, curve
    # same map, mirrored, to numerical precision of the gridding
    curve_same = fsc(recon_flipped, flip_hand_volume(recon))
    assert curve_same[1:].min() > 0.995, curve_same
    # and against the unflipped truth it is clearly wrong (a chiral volume)
    assert fsc(recon_flipped, blobs32)[low].mean() < 0.9


def test_inversion_flips_the_hand_and_keeps_every_groups_axes(blobs32: torch.Tensor) -> None:
    """``invert=True``: the map ``V(-p)`` at poses ``Rz(180) R`` gives the images of ``V``
    at ``R`` (same shifts); a map with RELION's T symmetry stays T-symmetric in the same
    axes after the inversion, not after the z-mirror (``mirror_keeps_axes``)."""
    from cryofield.physics.symmetry import (
        mirror_keeps_axes,
        symmetrize_volume,
        symmetry_operators,
    )

    D = blobs32.shape[-1]
    inv = flip_hand_volume(blobs32, invert=True)
    c = D // 2
    assert torch.equal(inv[c + 2, c - 3, c + 5], blobs32[c - 2, c + 3, c - 5])
    assert torch.equal(flip_hand_volume(inv, invert=True), blobs32)
    R = _rotations(12, 4)
    Ri, shifts = flip_hand_poses(R, torch.ones(12, 2), invert=True)
    torch.testing.assert_close(Ri, torch.diag(torch.tensor([-1.0, -1.0, 1.0])) @ R)
    assert torch.equal(shifts, torch.ones(12, 2))
    images = project_real_space(blobs32, R)
    scale = images.abs().max()
    assert (project_real_space(inv, Ri) - images).abs().max() < 1e-4 * scale
    assert (project_real_space(inv, R) - images).abs().max() > 0.05 * scale
    assert [mirror_keeps_axes(g) for g in ("C4", "D7", "O", "I1", "I2", "T", "I3", "I4")] == [
        True, True, True, True, True, False, False, False]  # fmt: skip
    ops = symmetry_operators("T")
    sym = symmetrize_volume(blobs32, ops)

    def asym(v: torch.Tensor) -> float:  # 0 for a T-symmetric map, up to interpolation
        return float((symmetrize_volume(v, ops) - v).norm() / v.norm())

    base = asym(sym)  # the interpolation error alone (~0.07 at D=32)
    assert abs(asym(flip_hand_volume(sym, invert=True)) - base) < 1e-3
    assert asym(flip_hand_volume(sym)) > 0.3 > base  # the z-mirror moved the axes (0.55)
