"""Hand-made cases for the truth metrics (poses, clusters, FSC, latents)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryofield.analysis import metrics
from cryofield.analysis.metrics import MIRROR


def _rots(n: int, seed: int) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def _blob_projection_xy(R: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """2-D positions of Gaussian blobs in the projection ``int V(R^T [x, y, z]) dz``.

    A blob at ``c`` satisfies ``R^T p = c`` at ``p = R c``; integrating over z keeps the
    first two coordinates, so the projected blob sits at ``(R c)[:2]`` exactly.
    """
    return np.einsum("nij,bj->nbi", R, centres)[..., :2]


def test_proper_and_mirror_relations_reproduce_images() -> None:
    """The pose relations in the module docstring give identical projections."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 3)) * 10
    R_true = _rots(50, 1)
    G = _rots(1, 2)[0]
    # proper: W(p) = V(G p) has blob centres G^T c, imaged with R' = R G
    xy_true = _blob_projection_xy(R_true, centres)
    xy_proper = _blob_projection_xy(R_true @ G, centres @ G)  # rows: (G^T c)^T = c^T G
    np.testing.assert_allclose(xy_proper, xy_true, atol=1e-9)
    # mirrored: W(p) = V(M G p) has centres G^T M c, imaged with R' = M R M G
    centres_m = (centres @ MIRROR) @ G
    xy_mirror = _blob_projection_xy(MIRROR @ R_true @ MIRROR @ G, centres_m)
    np.testing.assert_allclose(xy_mirror, xy_true, atol=1e-9)
    # and a mirrored map cannot be imaged identically with a proper relation
    xy_wrong = _blob_projection_xy(R_true @ G, centres_m)
    assert np.abs(xy_wrong - xy_true).max() > 1.0


def test_rotated_copy_scores_zero() -> None:
    R_true = _rots(300, 3)
    G = _rots(1, 4)[0]
    R_pred = R_true @ G
    G_est, mirrored, aligned = metrics.align_rotations(R_pred, R_true)
    assert not mirrored
    np.testing.assert_allclose(G_est, G, atol=1e-6)
    np.testing.assert_allclose(aligned, R_true, atol=1e-6)
    err = metrics.pose_errors(R_pred, R_true)
    assert err["rot_median_deg"] < 1e-3
    assert err["out_of_plane_mean_deg"] < 1e-3
    assert err["in_plane_mean_deg"] < 1e-3


def test_mirrored_copy_is_detected_and_scores_zero() -> None:
    R_true = _rots(300, 5)
    G = _rots(1, 6)[0]
    R_pred = MIRROR @ R_true @ MIRROR @ G
    G_est, mirrored, aligned = metrics.align_rotations(R_pred, R_true)
    assert mirrored
    np.testing.assert_allclose(G_est, G, atol=1e-6)
    np.testing.assert_allclose(aligned, R_true, atol=1e-6)
    err = metrics.pose_errors(R_pred, R_true)
    assert err["mirrored"] is True
    assert err["rot_mean_deg"] < 1e-3
    # without the mirror hypothesis the same poses are far off
    err_nm = metrics.pose_errors(R_pred, R_true, allow_mirror=False)
    assert err_nm["rot_median_deg"] > 20


def test_noise_of_known_size_and_outliers() -> None:
    """Small isotropic noise of angle a: median geodesic error ~ a; outliers ignored."""
    n = 2000
    R_true = _rots(n, 7)
    G = _rots(1, 8)[0]
    rng = np.random.default_rng(9)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angle_deg = 2.0
    noise = Rotation.from_rotvec(axes * np.radians(angle_deg)).as_matrix()
    R_pred = noise @ R_true @ G
    n_out = n // 5  # 20 % of the particles get random poses
    R_pred[:n_out] = _rots(n_out, 10)
    G_est, mirrored, _ = metrics.align_rotations(R_pred, R_true)
    assert not mirrored
    assert np.degrees(metrics._geodesic_rad(G_est, G)) < 0.3
    err = metrics.pose_errors(R_pred, R_true)
    # 80 % of errors are exactly 2 deg (noise of fixed angle), so the median is 2 deg
    assert err["rot_median_deg"] == pytest.approx(angle_deg, abs=0.3)


def test_out_of_plane_and_in_plane_split() -> None:
    """An in-plane rotation applied after the pose changes only the in-plane error."""
    R_true = _rots(100, 11)
    psi = np.radians(30.0)
    Rz = Rotation.from_euler("z", psi).as_matrix()
    R_a = Rz @ R_true
    np.testing.assert_allclose(metrics.out_of_plane_error_rad(R_a, R_true), 0, atol=1e-7)
    np.testing.assert_allclose(metrics.inplane_error_rad(R_a, R_true), psi, atol=1e-7)
    # a tilt about the image x axis changes the viewing direction by its angle
    Rx = Rotation.from_euler("x", np.radians(10.0)).as_matrix()
    R_b = Rx @ R_true
    np.testing.assert_allclose(
        np.degrees(metrics.out_of_plane_error_rad(R_b, R_true)), 10.0, atol=1e-6
    )
    np.testing.assert_allclose(metrics.inplane_error_rad(R_b, R_true), 0, atol=1e-7)
    # the viewing direction is R^T e_z
    np.testing.assert_allclose(
        metrics.viewing_directions(R_true), np.einsum("nji,j->ni", R_true, [0, 0, 1.0])
    )


def test_translation_error_after_global_offset() -> None:
    R = _rots(200, 12)
    rng = np.random.default_rng(13)
    t_true = rng.normal(size=(200, 2)) * 3
    c = np.array([1.5, -2.0, 0.7])
    t_pred = t_true + np.einsum("nij,j->ni", R[:, :2, :], c)
    err = metrics.pose_errors(R, R, t_pred, t_true)
    assert err["trans_mean_px"] < 1e-9
    np.testing.assert_allclose(err["trans_offset_px"], c, atol=1e-9)
    noise = rng.normal(size=(200, 2)) * 0.5
    err2 = metrics.pose_errors(R, R, t_true + noise, t_true)
    # mean of a 2-D Gaussian norm with sigma 0.5: 0.5 sqrt(pi / 2) ~ 0.627
    assert err2["trans_mean_px"] == pytest.approx(0.627, abs=0.07)


def test_cluster_scores() -> None:
    rng = np.random.default_rng(14)
    labels = rng.integers(0, 4, size=500)
    perm = np.array([3, 0, 2, 1])
    relabelled = perm[labels] + 10
    assert metrics.adjusted_rand_index(labels, relabelled) == pytest.approx(1.0)
    assert metrics.normalized_mutual_info(labels, relabelled) == pytest.approx(1.0)
    assert metrics.cluster_accuracy(labels, relabelled) == pytest.approx(1.0)
    noisy = relabelled.copy()
    noisy[:100] = 10  # at most 100 wrong
    acc = metrics.cluster_accuracy(labels, noisy)
    expected = 1 - np.mean(perm[labels[:100]] + 10 != 10)
    assert acc == pytest.approx(1 - (1 - expected) * 100 / 500)
    assert metrics.adjusted_rand_index(labels, rng.integers(0, 4, size=500)) < 0.05
    # more predicted clusters than labels: split clusters cost accuracy
    split = labels * 2 + (np.arange(500) % 2)
    assert metrics.cluster_accuracy(labels, split) == pytest.approx(0.5, abs=0.05)


def test_fsc_and_auc() -> None:
    rng = np.random.default_rng(15)
    v = rng.normal(size=(16, 16, 16))
    f_same = metrics.fsc_curve(v, v)
    np.testing.assert_allclose(f_same, 1.0, atol=1e-12)
    assert metrics.fsc_auc(f_same) == pytest.approx(7 / 16)
    f_neg = metrics.fsc_curve(v, -v)
    np.testing.assert_allclose(f_neg, -1.0, atol=1e-12)
    w = rng.normal(size=(16, 16, 16))
    f_ind = metrics.fsc_curve(v, w)
    assert np.abs(f_ind[2:]).max() < 0.5
    # equal signal and independent noise: FSC ~ 1/2 at every shell beyond the centre
    s = rng.normal(size=(32, 32, 32))
    f_half = metrics.fsc_curve(s + rng.normal(size=s.shape), s + rng.normal(size=s.shape))
    assert np.mean(f_half[4:]) == pytest.approx(0.5, abs=0.03)


def test_spearman_latent() -> None:
    rng = np.random.default_rng(16)
    coord = rng.uniform(size=300)
    z = np.stack([np.exp(3 * coord) * 5, rng.normal(size=300) * 0.1], axis=1)
    rho = metrics.spearman_latent_vs_coord(z, coord)
    assert len(rho) == 2
    assert abs(rho[0]) == pytest.approx(1.0)
    assert abs(rho[1]) < 0.2
    coord_nan = coord.copy()
    coord_nan[:10] = np.nan
    assert abs(metrics.spearman_latent_vs_coord(z, coord_nan)[0]) == pytest.approx(1.0)


def test_pose_error_is_accurate_at_small_angles() -> None:
    """The geodesic of ``pose_errors`` (physics.rotation's chord formula) resolves
    micro-degree errors, which ``arccos((tr - 1) / 2)`` rounds to ~1e-6 deg or to zero."""
    R_true = _rots(5, 17)
    angles = np.array([0.0, 1e-9, 1e-7, 1e-5, 1e-3])  # rad
    dR = Rotation.from_rotvec(angles[:, None] * np.array([0.6, 0.0, 0.8])).as_matrix()
    geo = metrics._geodesic_rad(R_true @ dR, R_true)
    np.testing.assert_allclose(geo, angles, rtol=1e-6, atol=1e-14)


def test_spearman_uses_the_pca_of_latent_analysis() -> None:
    """The PCs scored against a coordinate are those of ``analysis.latent.pca`` (one
    PCA in the package), signs included."""
    from scipy.stats import spearmanr

    from cryofield.analysis.latent import pca

    rng = np.random.default_rng(3)
    z = rng.normal(size=(200, 4)) * [3.0, 2.0, 1.0, 0.5]
    coord = z[:, 1] - 0.5 * z[:, 0] + rng.normal(size=200)
    pcs = pca(z).projected
    rho = metrics.spearman_latent_vs_coord(z, coord)
    assert rho == pytest.approx([spearmanr(pcs[:, j], coord).statistic for j in range(3)])


@pytest.mark.parametrize(("group", "mirror"), [("C4", False), ("D7", False), ("D7", True)])
def test_pose_errors_modulo_a_point_group(group: str, mirror: bool) -> None:
    """Poses of a symmetric particle are defined up to an operator per image and a global
    rotation (and hand): ``R_pred = R_true g_i A``. Modulo the group they score as exact
    (issue #23: `cryofield evaluate` counted the equivalent poses as 90-180 deg errors);
    a known perturbation keeps its size, and without the group the same poses are far off."""
    import torch

    from cryofield.physics.symmetry import symmetry_operators

    ops = symmetry_operators(group, torch.float64).numpy()
    rng = np.random.default_rng(1)
    n = 400
    R_true = _rots(n, 7)
    A = _rots(1, 8)[0]
    g = ops[rng.integers(len(ops), size=n)]
    Rt = MIRROR @ R_true @ MIRROR if mirror else R_true
    G = MIRROR @ g @ MIRROR if mirror else g
    R_pred = Rt @ G @ A
    err = metrics.pose_errors(R_pred, R_true, operators=ops)
    assert err["mirrored"] is mirror
    assert err["rot_median_deg"] < 1e-3 and err["frac_within_10deg"] == 1.0, err
    assert err["group_order"] == len(ops)
    plain = metrics.pose_errors(R_pred, R_true)
    assert plain["rot_median_deg"] > 30, plain
    # 3 deg about random axes on top: the median error is 3 deg
    noise = Rotation.from_rotvec(
        np.radians(3.0) * Rotation.random(n, random_state=9).apply([1.0, 0.0, 0.0])
    ).as_matrix()
    err3 = metrics.pose_errors(noise @ R_pred, R_true, operators=ops)
    assert abs(err3["rot_median_deg"] - 3.0) < 0.2, err3
