"""Convergence diagnostics and the verdict, on synthetic runs that worked and that failed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryofield.inference import diagnostics as dg
from cryofield.physics.rotation import (
    axis_angle_to_matrix,
    euler_relion_to_matrix,
    geodesic_distance_rad,
    inplane_rotation,
    random_rotations,
)

N = 300
D = 64
APIX = 4.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small_rotations(n: int, angle_deg: float, seed: int) -> torch.Tensor:
    """Rotations by exactly ``angle_deg`` about random axes."""
    axes = torch.randn(n, 3, generator=_gen(seed), dtype=torch.float64)
    axes = axes / axes.norm(dim=1, keepdim=True)
    return axis_angle_to_matrix(axes * math.radians(angle_deg))


def _two_blobs(n: int, spread_deg: float, seed: int) -> torch.Tensor:
    """Poses whose viewing directions lie in two opposite blobs around the z axis."""
    rng = np.random.default_rng(seed)
    tilt = np.radians(np.abs(rng.normal(0.0, spread_deg, n)))
    tilt = np.where(rng.integers(0, 2, n) == 1, tilt, np.pi - tilt)
    rot, psi = rng.uniform(-np.pi, np.pi, (2, n))
    return euler_relion_to_matrix(torch.tensor(np.stack([rot, tilt, psi], -1)))


def _clustered_z(n: int, seed: int, zdim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, zdim)) * 2.0
    return centres[rng.integers(0, 3, n)] + rng.normal(size=(n, zdim)) * 0.5


# ------------------------------------------------------------------ pose_change
def test_pose_change_counts_moved_images() -> None:
    R0 = random_rotations(N, _gen(0), dtype=torch.float64)
    R1 = R0.clone()
    R1[:210] = R0[:210] @ _small_rotations(210, 5.0, 1)  # 70 % move 5 deg
    R1[210:] = R0[210:] @ _small_rotations(90, 40.0, 2)  # 30 % jump 40 deg
    t0 = torch.zeros(N, 2)
    t1 = t0.clone()
    t1[:30, 0] = 5.0  # 10 % shift by 5 px (all among the 5-deg ones)
    pc = dg.pose_change(R0, t0, R1, t1, step_deg=15.0, t_step_px=3.0)
    assert pc["n"] == N
    assert pc["frac_rot_moved"] == pytest.approx(0.3)
    assert pc["frac_shift_moved"] == pytest.approx(0.1)
    assert pc["frac_moved"] == pytest.approx(0.4)
    assert pc["median_deg"] == pytest.approx(5.0, abs=1e-4)
    assert pc["p90_deg"] == pytest.approx(40.0, abs=1e-4)
    # numpy in, no shifts
    pc2 = dg.pose_change(R0.numpy(), None, R1.numpy(), None, 15.0, 3.0)
    assert pc2["frac_moved"] == pytest.approx(0.3) and pc2["frac_shift_moved"] == 0.0
    with pytest.raises(ValueError):
        dg.pose_change(R0[:5], None, R1[:4], None, 15.0, 3.0)


def test_pose_change_of_random_poses() -> None:
    """Independent random poses move by ~126 deg on average: nearly all images 'move'."""
    R0 = random_rotations(N, _gen(3))
    R1 = random_rotations(N, _gen(4))
    pc = dg.pose_change(R0, None, R1, None, 15.0, 3.0)
    assert pc["frac_moved"] > 0.98
    assert 100.0 < pc["median_deg"] < 150.0


# ------------------------------------------------------------------ view_coverage
def test_view_coverage_uniform() -> None:
    cov = dg.view_coverage(random_rotations(N, _gen(5)))
    assert cov["n_cells"] == 192 and not cov["collapsed"] and cov["collapse_kind"] == ""
    assert cov["occupied_uniform"] == pytest.approx(192 * (1 - (1 - 1 / 192) ** N))
    assert 0.9 < cov["occupancy_ratio"] < 1.1
    assert 0.97 < cov["entropy_ratio"] < 1.03
    assert cov["axial_concentration"] < 0.45
    assert cov["top2_fraction"] < 0.06
    json.dumps(cov)  # plain numbers


def test_view_coverage_two_antipodal_blobs() -> None:
    cov = dg.view_coverage(_two_blobs(N, 15.0, 6))
    assert cov["collapsed"] and cov["collapse_kind"] == "two antipodal blobs"
    assert cov["axial_concentration"] > 0.9
    assert abs(cov["axis"][2]) > 0.95  # the blobs sit on the z axis (third row of R)
    assert cov["antipodal_balance"] > 0.4
    assert cov["occupancy_ratio"] < 0.4 and cov["entropy_ratio"] < 0.8


def test_view_coverage_uses_the_third_row() -> None:
    """All views along +x: ``R = Rz(psi) Ry(90 deg)`` has third row (1, 0, 0) whatever psi
    (its third column, what ``R e_z`` would give, varies with psi)."""
    R0 = euler_relion_to_matrix(torch.tensor([0.0, math.pi / 2, 0.0], dtype=torch.float64))
    R = inplane_rotation(torch.linspace(-3, 3, N, dtype=torch.float64)) @ R0
    cov = dg.view_coverage(R)
    assert cov["occupied"] == 1 and cov["top2_fraction"] == 1.0
    assert cov["collapsed"] and cov["collapse_kind"] == "few directions"
    assert abs(cov["axis"][0]) == pytest.approx(1.0, abs=1e-6)
    assert dg.view_coverage(R.transpose(1, 2))["occupied"] > 10


def test_view_coverage_few_images_not_judged() -> None:
    cov = dg.view_coverage(_two_blobs(10, 5.0, 7))
    assert not cov["collapsed"]


# ------------------------------------------------------------------ latent_structure
def test_latent_structure_clusters_and_noise() -> None:
    s = dg.latent_structure(_clustered_z(N, 8), seed=0)
    assert s["structured"] and s["score"] > 3
    assert s["top_fraction"] > 0.5 > s["top_fraction_isotropic"]
    assert s["gap_k"] in (2, 3, 4) and s["gap"] > 0.5
    iso = dg.latent_structure(np.random.default_rng(9).normal(size=(N, 8)), seed=0)
    assert not iso["structured"] and iso["score"] < 0.5
    assert iso["top_fraction"] == pytest.approx(iso["top_fraction_isotropic"], abs=0.03)
    assert iso["top_fraction"] == pytest.approx(iso["top_fraction_shuffled"], abs=0.03)
    json.dumps(s)


def test_latent_structure_pca_rotated_clusters() -> None:
    """Latents rotated to principal axes (as the trainer's variability start) have no
    correlations left: the shuffled control matches, the other two tests still see it."""
    z = _clustered_z(N, 10)
    z = z - z.mean(0)
    z = z @ np.linalg.svd(z, full_matrices=False)[2].T
    s = dg.latent_structure(z, seed=1)
    assert abs(s["correlation_excess"]) < 0.05
    assert s["structured"] and s["spectrum_excess"] > 0.3 and s["gap"] > 0.5


def test_latent_structure_one_dimension() -> None:
    rng = np.random.default_rng(11)
    two = np.r_[rng.normal(-2, 0.5, 150), rng.normal(2, 0.5, 150)][:, None]
    assert dg.latent_structure(two)["structured"]
    assert not dg.latent_structure(rng.normal(size=(N, 1)))["structured"]
    few = dg.latent_structure(rng.normal(size=(5, 3)))
    assert not few["structured"] and math.isnan(few["score"])


# ------------------------------------------------------------------ verdict
def _history(stable: bool, seed: int) -> list[dict]:
    """Six search epochs and one local epoch with their pose changes."""
    hist = [{"epoch": 1, "phase": "hps"}]
    R = random_rotations(N, _gen(seed), dtype=torch.float64)
    for e in range(2, 8):
        if stable:
            R_new = R @ _small_rotations(N, 2.0, seed + e)
        else:
            R_new = random_rotations(N, _gen(seed + e), dtype=torch.float64)
        pc = dg.pose_change(R, torch.zeros(N, 2), R_new, torch.zeros(N, 2), 15.0, 3.33)
        hist.append({"epoch": e, "phase": "hps" if e < 7 else "local", "pose_change": pc})
        R = R_new
    return hist


def _final(good: bool, seed: int) -> dict:
    R = random_rotations(N, _gen(seed)) if good else _two_blobs(N, 15.0, seed)
    z = _clustered_z(N, seed) if good else np.random.default_rng(seed).normal(size=(N, 8))
    return {
        "apix_A": APIX,
        "radius_start_px": 6.0,
        "view_coverage": dg.view_coverage(R),
        "fsc0143_A": 12.0 if good else 80.0,  # limit: max(8 apix, 64 apix / 6) = 42.7 A
        "latent_structure": dg.latent_structure(z, seed=seed),
    }


def test_verdict_converged() -> None:
    v = dg.verdict(_history(True, 20), _final(True, 21), n_images=N, D=D)
    assert v.converged, v.reasons
    assert v.reasons == [] and v.advice == ""
    assert v.headline.startswith("poses stable, views spread,") and "12.0 A" in v.headline
    assert [c["ok"] for c in v.checks] == [True, True, True, True]
    assert "\n" not in v.headline


def test_verdict_failed_every_way() -> None:
    v = dg.verdict(_history(False, 30), _final(False, 31), n_images=N, D=D)
    assert not v.converged
    assert [c["name"] for c in v.checks if c["ok"] is False] == [
        "pose stability",
        "view coverage",
        "half-map resolution",
        "latent structure",
    ]
    assert len(v.reasons) == 4
    assert v.headline == "poses still change from one search epoch to the next"
    assert "search epoch 6" in v.reasons[0]  # the last search epoch, not the local one
    assert "two antipodal blobs" in v.reasons[1]
    assert "80.0 A" in v.reasons[2] and "42.7 A" in v.reasons[2]
    assert "noise" in v.reasons[3]
    assert "--contrast" in v.advice and f"only {N}: ab initio" in v.advice
    assert v.advice.count("--contrast") == 1  # each action once
    text = dg.format_verdict(v)
    assert text.startswith("did not converge: poses") and text.count("\n  - ") == 4


@pytest.mark.parametrize(
    ("bad", "name", "headline"),
    [
        ("views", "view coverage", "viewing directions collapsed into two antipodal blobs"),
        ("latents", "latent structure", "no structure"),
        ("fsc", "half-map resolution", "half maps agree only to 80.0 A"),
    ],
)
def test_verdict_single_failure(bad: str, name: str, headline: str) -> None:
    good, failed = _final(True, 40), _final(False, 41)
    key = {"views": "view_coverage", "latents": "latent_structure", "fsc": "fsc0143_A"}[bad]
    final = {**good, key: failed[key]}
    v = dg.verdict(_history(True, 42), final, n_images=5000, D=D)
    assert not v.converged
    assert [c["name"] for c in v.checks if c["ok"] is False] == [name]
    assert headline in v.headline and len(v.reasons) == 1
    assert "only " not in v.advice  # enough images: no advice about their number


def test_verdict_partial_information() -> None:
    """Known poses (no search): coverage is not judged, missing inputs are skipped."""
    hist = [{"epoch": 1, "phase": "fixed"}, {"epoch": 2, "phase": "local"}]
    final = {"view_coverage": dg.view_coverage(_two_blobs(N, 10.0, 50))}
    v = dg.verdict(hist, final, n_images=N, D=D)
    assert v.converged and v.reasons == []
    assert {c["name"]: c["ok"] for c in v.checks} == {
        "pose stability": None,
        "view coverage": None,
        "half-map resolution": None,
    }
    assert "no check could be made" in v.headline
    # a moderately unsettled search passes with a note
    hist = _history(True, 51)
    hist[-2]["pose_change"] = {**hist[-2]["pose_change"], "frac_moved": 0.12}
    v = dg.verdict(hist, {}, n_images=5000, D=D)
    assert v.converged and "more search epochs may help" in v.checks[0]["message"]
    # a small set must settle further: the field overfits its few images, so a wrong
    # solution settles too (300 images at SNR 0.1 settled at 12-14% with 20 deg errors)
    v = dg.verdict(hist, {}, n_images=300, D=D)
    assert not v.converged and "a set of 300 images must settle below 8%" in v.reasons[0]


@pytest.mark.parametrize(
    ("frac", "ok", "note"), [(0.005, True, False), (0.03, True, True), (0.065, False, False)]
)
def test_verdict_gold_standard_check(frac: float, ok: bool, note: bool) -> None:
    """The refinement's global search against the half maps moving many images to
    another basin fails the run (pref_view after a restart: 6.5% moved, 10.5 deg median
    error, which no other check caught); converged runs move 0-1.5%."""
    hist = _history(True, 60)
    pc = {**hist[-2]["pose_change"], "frac_moved": frac}
    hist.insert(-1, {"epoch": 7, "phase": "refine", "pose_change": pc})
    v = dg.verdict(hist, _final(True, 61), n_images=5000, D=D)
    check = next(c for c in v.checks if c["name"] == "gold-standard check")
    assert check["ok"] is ok and v.converged is ok
    assert ("check the map" in check["message"]) is note
    if not ok:
        assert v.headline == "the images do not fit the map at their poses"
        assert "6.5% of the images found a better pose more than 15 deg away" in v.reasons[0]
    # under 1,000 images it is reported, not judged
    small = dg.verdict(hist, _final(True, 61), n_images=500, D=D)
    check = next(c for c in small.checks if c["name"] == "gold-standard check")
    assert check["ok"] is None and "not judged under 1000 images" in check["message"]
    # runs without the refinement (heterogeneous, known poses) are not judged by it
    assert "gold-standard check" not in [
        c["name"]
        for c in dg.verdict(_history(True, 60), _final(True, 61), n_images=5000, D=D).checks
    ]


def test_write_verdict(tmp_path) -> None:
    v = dg.verdict(_history(False, 60), _final(False, 61), n_images=N, D=D)
    v.checks.append({"name": "x", "ok": None, "message": "nan", "value": float("nan")})
    path = dg.write_verdict(tmp_path, v)
    assert path == tmp_path / "verdict.json"
    back = json.loads(path.read_text())
    assert back["converged"] is False and back["headline"] == v.headline
    assert back["reasons"] == v.reasons and back["advice"] == v.advice
    assert back["checks"][-1]["value"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["verdict.json"]  # no temp file left


def test_geodesic_helper_agrees() -> None:
    """The angles pose_change reports are the project's geodesic distance."""
    R0 = random_rotations(20, _gen(70), dtype=torch.float64)
    R1 = random_rotations(20, _gen(71), dtype=torch.float64)
    pc = dg.pose_change(R0, None, R1, None, 0.0, 1.0)
    ref = np.degrees(geodesic_distance_rad(R0, R1).numpy())
    assert pc["median_deg"] == pytest.approx(float(np.median(ref)))
