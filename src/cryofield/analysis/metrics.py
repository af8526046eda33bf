"""Scores of a reconstruction against known truth: poses, clusters, latents and maps.

Pose convention (``docs/dev/contracts.md``): a pose ``R`` projects a volume as
``P_R V(x, y) = integral V(R^T [x, y, z]) dz``. The viewing direction in the volume frame
is therefore ``R^T e_z``, the **third row** of ``R``.

Global ambiguity of ab initio poses. A reconstruction ``W`` is only defined up to a
global orthogonal map ``Q`` of the truth ``V``: ``W(p) = V(Q p)``. The images of ``W``
under pose ``R'`` equal those of ``V`` under ``R`` when ``Q R'^T [x, y, z] = R^T S [x, y, z]``
with ``S = I`` or the z-flip ``M = diag(1, 1, -1)`` (the projection integral is even in
``z``). Hence

* proper ``Q = G`` (``det = +1``): ``R' = R G``, so ``R_true^T R_pred = G`` for all images;
* improper ``Q = M G`` (a mirrored, wrong-hand map): ``R' = M R M G``, so
  ``(M R_true M)^T R_pred = G``.

:func:`align_rotations` estimates ``G`` and the hand from all images (a robust chordal
L1 mean, Weiszfeld iterations), and maps the predictions back onto the truth frame.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cryofield.analysis.align import VolumeAlignment, align_volume
from cryofield.physics.handedness import mirror_matrix
from cryofield.physics.rotation import geodesic_distance_rad

__all__ = [
    "MIRROR",
    "VolumeAlignment",
    "adjusted_rand_index",
    "align_rotations",
    "align_volume",
    "cluster_accuracy",
    "fsc_auc",
    "fsc_curve",
    "inplane_error_rad",
    "normalized_mutual_info",
    "out_of_plane_error_rad",
    "pose_errors",
    "spearman_latent_vs_coord",
    "spearman_path_vs_coord",
    "viewing_directions",
]

log = logging.getLogger("cryofield.analysis.metrics")

#: z-flip ``diag(1, 1, -1)``: the hand change of a volume, ``V'(p) = V(M p)``.
MIRROR = mirror_matrix(torch.float64).numpy()


def _project_to_so3(A: np.ndarray) -> np.ndarray:
    """Closest rotation (Frobenius norm) to a 3x3 matrix ``A`` via the SVD."""
    U, _, Vt = np.linalg.svd(A)
    d = np.sign(np.linalg.det(U @ Vt))
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def _geodesic_rad(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Angle (rad) of ``A^T B`` for stacks ``(N, 3, 3)`` (or one matrix broadcast).

    Numpy front of :func:`cryofield.physics.rotation.geodesic_distance_rad` (accurate at
    small angles, unlike ``arccos((tr - 1) / 2)``).
    """
    A = torch.from_numpy(np.array(A, np.float64))  # copies: inputs may be read-only views
    B = torch.from_numpy(np.array(B, np.float64))
    return geodesic_distance_rad(A, B).numpy()


def _robust_mean_rotation(Q: np.ndarray, n_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Robust mean of rotations ``Q (N, 3, 3)``: chordal L2 start, then chordal L1.

    Weiszfeld iterations (Hartley et al., "Rotation averaging", IJCV 2013, sec. 6) on
    the chordal distance: weights ``1 / ||Q_i - G||_F``, each step the weighted mean
    projected onto SO(3). Outliers (wrongly posed particles) thus have little pull.

    Returns
    -------
    G : (3, 3) the mean rotation.
    residual_rad : (N,) geodesic angle of each ``Q_i`` from ``G``.
    """
    G = _project_to_so3(Q.sum(axis=0))
    for _ in range(n_iter):
        d = np.linalg.norm((Q - G).reshape(len(Q), 9), axis=1)
        w = 1.0 / np.maximum(d, 1e-6)
        G_new = _project_to_so3(np.einsum("n,nij->ij", w, Q))
        if np.abs(G_new - G).max() < 1e-9:
            G = G_new
            break
        G = G_new
    return G, _geodesic_rad(G, Q)


def align_rotations(
    R_pred: np.ndarray, R_true: np.ndarray, allow_mirror: bool = True
) -> tuple[np.ndarray, bool, np.ndarray]:
    """Find the global rotation (and hand) relating predicted poses to the truth.

    Parameters
    ----------
    R_pred : (N, 3, 3) predicted poses (contract convention).
    R_true : (N, 3, 3) true poses.
    allow_mirror : also test the mirrored hypothesis ``R_pred = M R_true M G``.

    Returns
    -------
    R_global : (3, 3) ``G`` with ``R_pred ~ R_true G`` (or ``M R_true M G`` if mirrored).
    mirrored : whether the prediction is the mirror image (wrong hand) of the truth.
    R_pred_aligned : (N, 3, 3) the predictions in the truth frame, ``R_pred G^T``
        (mirrored: ``M R_pred G^T M``), directly comparable to ``R_true``.
    """
    R_pred = np.asarray(R_pred, dtype=np.float64)
    R_true = np.asarray(R_true, dtype=np.float64)
    if R_pred.shape != R_true.shape or R_pred.shape[1:] != (3, 3):
        raise ValueError(f"pose arrays must be (N, 3, 3) and equal: {R_pred.shape} {R_true.shape}")
    G, res = _robust_mean_rotation(np.einsum("nji,njk->nik", R_true, R_pred))
    mirrored = False
    if allow_mirror:
        R_true_m = MIRROR @ R_true @ MIRROR
        G_m, res_m = _robust_mean_rotation(np.einsum("nji,njk->nik", R_true_m, R_pred))
        if np.median(res_m) < np.median(res):
            G, mirrored = G_m, True
    aligned = R_pred @ G.T
    if mirrored:
        aligned = MIRROR @ aligned @ MIRROR
    return G, mirrored, aligned


def _nearest_in_group(Q: np.ndarray, ref: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """``g Q_i`` (``g`` in ``ops``, ``(G, 3, 3)``) nearest ``ref`` (max ``tr(ref^T g Q_i)``)
    for each ``Q_i`` of ``(N, 3, 3)``."""
    gQ = np.einsum("gij,njk->ngik", ops, Q)  # (N, G, 3, 3)
    tr = np.einsum("ij,ngij->ng", ref, gQ)
    return gQ[np.arange(len(Q)), tr.argmax(1)]


def align_rotations_mod_group(
    R_pred: np.ndarray,
    R_true: np.ndarray,
    operators: np.ndarray,
    allow_mirror: bool = True,
    n_candidates: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray]:
    """:func:`align_rotations` for a particle with point group ``G``: every image's pose is
    known only up to an operator, ``R_pred ~ R_true g_i A`` with ``g_i`` free per image.

    ``Q_i = R_true^T R_pred = g_i A``: ``A`` is found by trying ``n_candidates`` of the
    ``Q_i`` as ``A`` (the one whose nearest equivalents ``g Q_i`` lie closest, by the
    median angle), then the robust mean (:func:`_robust_mean_rotation`) of the nearest
    equivalents, repeated until it stops changing. Mirrored: the truth ``M R_true M`` and
    the group ``M G M``.

    Parameters
    ----------
    R_pred, R_true : (N, 3, 3) poses (contract convention).
    operators : (G, 3, 3) the group, in the truth's frame (e.g. RELION's axes).

    Returns
    -------
    A : (3, 3) the global rotation.
    mirrored : the wrong-hand hypothesis won.
    R_pred_aligned : (N, 3, 3) ``R_pred A^T`` (mirrored: ``M R_pred A^T M``), in the
        truth's frame.
    R_true_nearest : (N, 3, 3) the equivalent ``R_true g`` nearest ``R_pred_aligned``.
    """
    R_pred = np.asarray(R_pred, np.float64)
    R_true = np.asarray(R_true, np.float64)
    ops = np.asarray(operators, np.float64)
    if R_pred.shape != R_true.shape or R_pred.shape[1:] != (3, 3):
        raise ValueError(f"pose arrays must be (N, 3, 3) and equal: {R_pred.shape} {R_true.shape}")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, bool] | None = None
    for mirrored in (False, True) if allow_mirror else (False,):
        Rt = MIRROR @ R_true @ MIRROR if mirrored else R_true
        G = MIRROR @ ops @ MIRROR if mirrored else ops
        Q = np.einsum("nji,njk->nik", Rt, R_pred)  # g_i A
        cand = Q[rng.choice(len(Q), size=min(n_candidates, len(Q)), replace=False)]
        med = [np.median(_geodesic_rad(_nearest_in_group(Q, c, G), c)) for c in cand]
        A = cand[int(np.argmin(med))]
        for _ in range(10):
            A_new, _ = _robust_mean_rotation(_nearest_in_group(Q, A, G))
            done = np.abs(A_new - A).max() < 1e-9
            A = A_new
            if done:
                break
        score = float(np.median(_geodesic_rad(_nearest_in_group(Q, A, G), A)))
        if best is None or score < best[0]:
            best = (score, A, mirrored)
    assert best is not None
    _, A, mirrored = best
    aligned = R_pred @ A.T
    if mirrored:
        aligned = MIRROR @ aligned @ MIRROR
    # R_true g nearest: with g ranging over G, tr(aligned^T R_true g) largest
    eq = np.einsum("nij,gjk->ngik", R_true, ops)
    tr = np.einsum("nij,ngij->ng", aligned, eq)
    near = eq[np.arange(len(R_true)), tr.argmax(1)]
    return A, mirrored, aligned, near


def viewing_directions(R: np.ndarray) -> np.ndarray:
    """Viewing direction ``R^T e_z`` (the third row of ``R``) in the volume frame.

    Parameters
    ----------
    R : (..., 3, 3) poses.

    Returns
    -------
    (..., 3) unit vectors.
    """
    return np.asarray(R)[..., 2, :]


def out_of_plane_error_rad(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Angle (rad) between the viewing directions of two pose stacks ``(N, 3, 3)``."""
    dot = np.einsum("...i,...i->...", viewing_directions(R_a), viewing_directions(R_b))
    return np.arccos(np.clip(dot, -1.0, 1.0))


def inplane_error_rad(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """In-plane rotation (rad, in ``[0, pi]``) left after matching viewing directions.

    The relative pose ``D = R_a R_b^T`` is split as ``D = Rz(psi) T`` (swing-twist), with
    ``T`` a tilt about an axis in the image plane; ``R_a`` then images the volume as
    the pose ``T R_b`` (nearest in viewing direction) rotated in-plane by ``psi``.
    With quaternion ``q = (w, x, y, z)`` of ``D``, ``psi = 2 atan2(z, w)``.
    """
    D = np.einsum("nij,nkj->nik", np.asarray(R_a, np.float64), np.asarray(R_b, np.float64))
    q = Rotation.from_matrix(D).as_quat()  # (x, y, z, w)
    psi = 2.0 * np.arctan2(q[:, 2], q[:, 3])
    psi = np.abs((psi + np.pi) % (2.0 * np.pi) - np.pi)
    return psi


def _translation_errors_px(
    R_pred: np.ndarray, t_pred_px: np.ndarray, t_true_px: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image translation error (px) after removing a global 3-D offset.

    A reconstruction displaced by ``c`` (px, volume frame) shifts every image by the
    in-plane part of ``R c``; ``c`` is fitted by least squares over all images, so only
    inconsistent shifts count as errors. Returns ``(error_px (N,), offset_px (3,))``.
    """
    diff = np.asarray(t_pred_px, np.float64) - np.asarray(t_true_px, np.float64)  # (N, 2)
    A = np.asarray(R_pred, np.float64)[:, :2, :].reshape(-1, 3)  # (2N, 3)
    c, *_ = np.linalg.lstsq(A, diff.reshape(-1), rcond=None)
    resid = diff - (A @ c).reshape(-1, 2)
    return np.linalg.norm(resid, axis=1), c


def pose_errors(
    R_pred: np.ndarray,
    R_true: np.ndarray,
    t_pred_px: np.ndarray | None = None,
    t_true_px: np.ndarray | None = None,
    allow_mirror: bool = True,
    operators: np.ndarray | None = None,
) -> dict[str, float | bool | list[float]]:
    """Pose errors after global alignment (rotation and hand), modulo a point group.

    Parameters
    ----------
    R_pred, R_true : (N, 3, 3) poses.
    t_pred_px, t_true_px : (N, 2) shifts in pixels of the same box (optional).
    allow_mirror : allow the wrong-hand hypothesis.
    operators : (G, 3, 3) the particle's point group in the truth's frame (e.g.
        ``physics.symmetry.symmetry_operators("C4")``): each pose is compared with the
        nearest equivalent of the truth (:func:`align_rotations_mod_group`); ``None`` or
        one operator: C1.

    Returns
    -------
    dict with ``mirrored``, ``R_global`` (nested list), ``rot_mean_deg`` /
    ``rot_median_deg`` (full geodesic), ``out_of_plane_mean_deg`` / ``_median_deg``,
    ``in_plane_mean_deg`` / ``_median_deg``, ``frac_within_10deg`` (geodesic), ``group_order``
    and, with shifts, ``trans_mean_px`` / ``trans_median_px`` / ``trans_offset_px`` (the
    shifts of equivalent poses of a map symmetric about its centre are equal).
    """
    if operators is not None and len(operators) > 1:
        G, mirrored, aligned, R_true = align_rotations_mod_group(
            R_pred, R_true, operators, allow_mirror=allow_mirror
        )
    else:
        G, mirrored, aligned = align_rotations(R_pred, R_true, allow_mirror=allow_mirror)
        R_true = np.asarray(R_true, np.float64)
    geo = np.degrees(_geodesic_rad(aligned, R_true))
    oop = np.degrees(out_of_plane_error_rad(aligned, R_true))
    inp = np.degrees(inplane_error_rad(aligned, R_true))
    out: dict[str, float | bool | list[float]] = {
        "n": len(R_true),
        "mirrored": bool(mirrored),
        "R_global": G.tolist(),
        "rot_mean_deg": float(geo.mean()),
        "rot_median_deg": float(np.median(geo)),
        "out_of_plane_mean_deg": float(oop.mean()),
        "out_of_plane_median_deg": float(np.median(oop)),
        "in_plane_mean_deg": float(inp.mean()),
        "in_plane_median_deg": float(np.median(inp)),
        "frac_within_10deg": float((geo <= 10.0).mean()),
        "group_order": 1 if operators is None else len(operators),
    }
    if t_pred_px is not None and t_true_px is not None:
        err, offset = _translation_errors_px(R_pred, t_pred_px, t_true_px)
        out["trans_mean_px"] = float(err.mean())
        out["trans_median_px"] = float(np.median(err))
        out["trans_offset_px"] = [float(v) for v in offset]
    return out


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions."""
    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Normalised mutual information (arithmetic normalisation), in ``[0, 1]``."""
    return float(normalized_mutual_info_score(np.asarray(labels_true), np.asarray(labels_pred)))


def cluster_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Fraction of particles correctly labelled after the best one-to-one matching.

    Predicted clusters are matched to true labels by the Hungarian algorithm on the
    contingency table (maximum total agreement); with more predicted clusters than true
    labels the unmatched clusters count as wrong.
    """
    yt = np.asarray(labels_true)
    yp = np.asarray(labels_pred)
    if yt.shape != yp.shape or yt.ndim != 1:
        raise ValueError(f"label arrays must be 1-D and equal: {yt.shape} {yp.shape}")
    if len(yt) == 0:
        return float("nan")
    ut, it = np.unique(yt, return_inverse=True)
    up, ip = np.unique(yp, return_inverse=True)
    C = np.zeros((len(up), len(ut)), dtype=np.int64)
    np.add.at(C, (ip, it), 1)
    rows, cols = linear_sum_assignment(C, maximize=True)
    return float(C[rows, cols].sum() / len(yt))


def fsc_curve(vol1: np.ndarray, vol2: np.ndarray) -> np.ndarray:
    """Fourier shell correlation of two ``(D, D, D)`` maps, shells ``0 .. D//2 - 1``.

    Numpy wrapper of :func:`cryofield.physics.fsc.fsc` (shell ``s``: ``round(|k| D) = s``).

    Returns
    -------
    (D // 2,) float64.
    """
    from cryofield.physics.fsc import fsc

    v1 = torch.as_tensor(np.asarray(vol1, np.float64))
    v2 = torch.as_tensor(np.asarray(vol2, np.float64))
    if v1.shape != v2.shape or v1.ndim != 3:
        raise ValueError(f"FSC needs two equal (D, D, D) maps, got {v1.shape} and {v2.shape}")
    return fsc(v1, v2).double().numpy()


def fsc_auc(fsc: np.ndarray) -> float:
    """Area under an FSC curve against frequency in cycles/px (CryoBench's FSC-AUC).

    Shell ``s`` of a ``(D//2,)`` curve sits at ``k = s / D``; the trapezoid area over
    ``[0, (D//2 - 1) / D]`` is reported, so a perfect map scores just under 0.5
    (Jeon et al., "CryoBench", NeurIPS 2024: AUC of the FSC up to Nyquist).
    """
    f = np.asarray(fsc, np.float64)
    k = np.arange(len(f)) / (2.0 * len(f))
    return float(np.sum(0.5 * (f[1:] + f[:-1]) * np.diff(k)))


def spearman_latent_vs_coord(z: np.ndarray, coord: np.ndarray, n_pcs: int = 3) -> list[float]:
    """Spearman correlation of each of the first ``n_pcs`` latent PCs with a coordinate.

    Parameters
    ----------
    z : (N, zdim) latents.
    coord : (N,) continuous truth (NaN entries are ignored).

    Returns
    -------
    list of ``min(n_pcs, zdim)`` correlations (signed; the PCs' signs are those of
    :func:`cryofield.analysis.latent.pca`, a convention, so compare ``abs`` values).
    """
    from scipy.stats import spearmanr

    from cryofield.analysis.latent import pca

    z = np.asarray(z, np.float64).reshape(len(z), -1)
    c = np.asarray(coord, np.float64)
    ok = np.isfinite(c)
    z, c = z[ok], c[ok]
    if len(c) < 3:
        return []
    pcs = pca(z).projected
    out = []
    for j in range(min(n_pcs, pcs.shape[1])):
        if np.ptp(pcs[:, j]) == 0 or np.ptp(c) == 0:
            out.append(float("nan"))
            continue
        out.append(float(spearmanr(pcs[:, j], c).statistic))
    return out


def spearman_path_vs_coord(z: np.ndarray, coord: np.ndarray) -> float | None:
    """Spearman correlation (signed; sign a convention) of the main path of the latent
    space (:func:`cryofield.analysis.latent.path_coordinate`) with a coordinate ``(N,)``
    (NaN entries ignored); None when there is no path (too few particles)."""
    from scipy.stats import spearmanr

    from cryofield.analysis.latent import path_coordinate

    z = np.asarray(z, np.float64).reshape(len(z), -1)
    c = np.asarray(coord, np.float64)
    ok = np.isfinite(c)
    path = path_coordinate(z[ok]) if ok.sum() >= 3 else None
    return None if path is None else float(spearmanr(path, c[ok]).statistic)
