"""Hierarchical pose search on a voxel grid: slicing, grid, and recovery of true poses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from synth import blob_volume

from cryofield.inference.pose_search import (
    FrequencyPoints,
    SearchSettings,
    centre_images,
    centre_references,
    level0_slices,
    reference_centres_px,
    search_poses,
    shift_grid,
    slice_grid,
)
from cryofield.model.field import HartleyField, hartley_grid_to_fourier
from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fourier import fft3_centered
from cryofield.physics.rotation import geodesic_distance_rad, random_rotations
from cryofield.physics.slicing import extract_slices
from cryofield.physics.so3_grid import child_pairs, grid_spacing_rad, level_points, pair_rotations


def test_frequency_points_sorted_half_plane_and_friedel():
    pts = FrequencyPoints.build(16)
    assert torch.all(pts.radius_px[1:] >= pts.radius_px[:-1])
    assert float(pts.radius_px.max()) <= 7.0
    idx, w = pts.half_index(7.0)
    # every non-DC point has exactly one Friedel mate in the half plane
    n_full = pts.count(7.0)
    assert float(w.sum()) == n_full
    k = pts.freqs[idx]
    both = torch.cat([k, -k[1:]])  # DC once
    assert torch.unique(both, dim=0).shape[0] == n_full


def test_slice_grid_matches_physics_extract_slices_and_crop():
    D = 24
    vol = blob_volume(D, 5)
    F = fft3_centered(vol)
    R = random_rotations(6, generator=torch.Generator().manual_seed(1))
    pts = FrequencyPoints.build(D)
    fr = pts.freqs[: pts.count(6.0)]
    ref = extract_slices(F, R, fr)
    ours = slice_grid(F, D, R, fr)
    assert torch.allclose(ours, ref, atol=1e-3 * float(F.abs().max()))
    # cropped cube with the same voxels gives the same slices inside its radius
    Dc = 18
    o = D // 2 - Dc // 2
    crop = F[o : o + Dc, o : o + Dc, o : o + Dc]
    assert torch.allclose(slice_grid(crop, D, R, fr), ref, atol=1e-3 * float(F.abs().max()))
    # per-image grids and per-image rotation sets
    per = slice_grid(F.expand(6, D, D, D), D, R[:, None], fr)[:, 0]
    assert torch.allclose(per, ref, atol=1e-3 * float(F.abs().max()))


def _spacing_deg(base_psi: int, level: int) -> float:
    return math.degrees(grid_spacing_rad(level, base_psi))


def test_grid_children_refine_the_parent():
    grid = dict(base_nside=1, base_psi=6, pole_offset=False)
    rots, pix, psi = level_points(0, **grid)
    assert rots.shape == (72, 3, 3)
    cpix, cpsi = child_pairs(pix[:5], psi[:5])
    assert cpix.shape == (5, 8)
    child = pair_rotations(cpix, cpsi, 1, **grid)
    d = torch.rad2deg(geodesic_distance_rad(child, rots[:5, None].expand(5, 8, 3, 3)))
    # children lie within one base-grid spacing of their parent
    assert float(d.max()) < 60.0


def test_search_grid_rotations_are_those_the_runs_were_measured_with():
    """The search's grid (no pole offset) is unchanged: rows saved from the grid module
    the pose search used before it moved to ``physics.so3_grid`` (float32, 7 decimals),
    and the definition ``euler_relion_to_matrix(phi, theta, (j + 1/2) 2 pi / n_psi)``
    with ``(theta, phi)`` the nested HEALPix pixel centre, bit for bit."""
    import healpy
    import numpy as np

    from cryofield.physics.rotation import euler_relion_to_matrix

    grid = dict(base_nside=4, base_psi=24, pole_offset=False)
    rots, pix, psi = level_points(0, **grid)
    saved = {  # id: (pixel, psi index, R row-major)
        0: (0, 0, [0.0245469, 0.2091389, -0.9775778, -0.71644, 0.6856747, 0.1287006,
                   0.6972167, 0.6972167, 0.1666667]),
        1: (0, 1, [-0.1617178, 0.3794783, -0.9109575, -0.6983812, 0.6081818, 0.377331,
                   0.6972167, 0.6972167, 0.1666667]),
        1000: (41, 16, [-0.3011535, 0.9099161, 0.2852354, -0.724726, -0.023997, -0.6886191,
                        -0.6197408, -0.4140976, 0.6666667]),
        4607: (191, 23, [-0.2091389, 0.0245469, -0.9775778, 0.6856747, 0.71644, -0.1287006,
                         0.6972167, -0.6972167, -0.1666667]),
    }  # fmt: skip
    for i, (p, j, row) in saved.items():
        assert (int(pix[i]), int(psi[i])) == (p, j)
        assert torch.allclose(rots[i].flatten(), torch.tensor(row), atol=1e-6)
    lv2 = pair_rotations(torch.tensor([5, 700, 3000]), torch.tensor([3, 40, 95]), 2, **grid)
    saved2 = [
        [-0.0856997, 0.2656401, -0.9602556, -0.8047702, 0.5497396, 0.2239002,
         0.5873674, 0.7919733, 0.1666667],
        [0.8261961, -0.3026936, 0.4751596, 0.2005858, 0.9461821, 0.2539781,
         -0.5264651, -0.1145255, 0.8424479],
        [-0.1884636, 0.5085673, -0.8401433, 0.9512833, 0.3070889, -0.0275034,
         0.2440114, -0.8043977, -0.5416667],
    ]  # fmt: skip
    assert torch.allclose(lv2.reshape(3, 9), torch.tensor(saved2), atol=1e-6)
    cpix, cpsi = child_pairs(torch.tensor([[7]]), torch.tensor([[5]]))
    assert cpix.tolist() == [[[28, 28, 29, 29, 30, 30, 31, 31]]]
    assert cpsi.tolist() == [[[10, 11, 10, 11, 10, 11, 10, 11]]]
    # every level-0 point and the children down to level 3, bit for bit
    for lv, nside, n_psi in ((0, 4, 24), (3, 32, 192)):
        p = torch.arange(12 * nside * nside).repeat_interleave(n_psi)[:: 7 + 97 * lv]
        j = torch.arange(n_psi).repeat(12 * nside * nside)[:: 7 + 97 * lv]
        theta, phi = healpy.pix2ang(nside, p.numpy(), nest=True)
        ang = np.stack([phi, theta, (j.numpy() + 0.5) * (2 * math.pi / n_psi)], axis=-1)
        ref = euler_relion_to_matrix(torch.as_tensor(ang, dtype=torch.float64)).float()
        assert torch.equal(pair_rotations(p, j, lv, **grid), ref)


def _observations(F: torch.Tensor, D: int, R, t, pts: FrequencyPoints, with_ctf: bool):
    n = R.shape[0]
    S = slice_grid(F, D, R[:, None], pts.freqs)[:, 0]
    X = centre_images(S, pts.freqs, -t[:, None, :])[:, 0]
    if not with_ctf:
        return X, torch.ones_like(X.real)
    ctf = CTFParams.from_arrays(
        defocus_u_A=torch.linspace(8000, 20000, n).numpy(), defocus_v_A=9000.0,
        astig_angle_deg=20.0, voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1, n=n,
    )  # fmt: skip
    c = compute_ctf(pts.freqs, 3.0, ctf)
    return X * c, c


def test_search_recovers_true_poses_of_a_known_volume_to_grid_precision():
    D = 32
    vol = blob_volume(D, 8)
    F = fft3_centered(vol)
    g = torch.Generator().manual_seed(0)
    R = random_rotations(12, generator=g)
    t = (torch.rand(12, 2, generator=g) - 0.5) * 4
    pts = FrequencyPoints.build(D)
    X, c = _observations(F, D, R, t, pts, with_ctf=True)
    # translations about the box centre (the blobs' centre of mass is 3 px from it; the
    # search about the map's centre is tested below)
    st = SearchSettings(base_nside=4, base_psi=24, levels=3, t_extent_px=3.0, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=12.0, centre=False)  # fmt: skip
    Rh, th = search_poses(F, D, X, c, pts, st)[:2]
    err_deg = torch.rad2deg(geodesic_distance_rad(Rh, R))
    spacing = _spacing_deg(24, 3)  # 1.9 deg
    assert float(err_deg.median()) < spacing
    assert float(err_deg.max()) < 2 * spacing
    assert float((th - t).norm(dim=-1).max()) < 0.5


def test_search_recovers_poses_of_a_known_neural_field():
    torch.manual_seed(0)
    D = 24
    field = HartleyField(D, hidden=64, layers=2, n_freqs=16, sigma=0.3)
    field.set_envelope(torch.exp(-torch.arange(14.0) / 4))
    with torch.no_grad():
        grid, _ = field.grid_ht(10.0)
    F = hartley_grid_to_fourier(grid)
    g = torch.Generator().manual_seed(2)
    R = random_rotations(8, generator=g)
    t = torch.zeros(8, 2)
    pts = FrequencyPoints.build(D)
    X, c = _observations(F, D, R, t, pts, with_ctf=False)
    st = SearchSettings(base_nside=2, base_psi=12, levels=3, t_extent_px=0.0, t_ngrid=1,
                        radius_lo_px=5.0, radius_hi_px=10.0)  # fmt: skip
    Rh, th = search_poses(F, D, X[:, : pts.count(10.0)], c, pts, st)[:2]
    err_deg = torch.rad2deg(geodesic_distance_rad(Rh, R))
    assert float(err_deg.median()) < _spacing_deg(12, 3)
    assert float(th.abs().max()) == 0.0
    assert math.isfinite(float(err_deg.max()))


def test_search_against_several_references_picks_each_image_s_volume():
    D = 32
    base = blob_volume(D, 8)
    # reference 1 is reference 0 plus extra mass: a heavier volume must not win by default
    refs = torch.stack([fft3_centered(base), fft3_centered(base + blob_volume(D, 3, seed=5))])
    g = torch.Generator().manual_seed(3)
    n = 16
    truth = torch.arange(n) % 2
    R = random_rotations(n, generator=g)
    t = (torch.rand(n, 2, generator=g) - 0.5) * 4
    pts = FrequencyPoints.build(D)
    obs = [_observations(refs[k], D, R, t, pts, with_ctf=True) for k in (0, 1)]
    X = torch.where(truth[:, None] == 1, obs[1][0], obs[0][0])
    X = X + 0.05 * float(X.abs().mean()) * torch.randn(X.shape, generator=g, dtype=X.dtype)
    # translations about the box centre (the centred search is tested below)
    st = SearchSettings(base_nside=4, base_psi=24, levels=2, t_extent_px=3.0, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=10.0, centre=False)  # fmt: skip
    res = search_poses(refs, D, X, obs[0][1], pts, st, chunk=5)
    assert torch.equal(res.reference, truth)
    err_deg = torch.rad2deg(geodesic_distance_rad(res.rotations, R))
    assert float(err_deg.max()) < 2 * _spacing_deg(24, 2)
    assert float((res.shifts_px - t).norm(dim=-1).max()) < 0.5
    # one reference: every image is aligned to it
    assert int(search_poses(refs[0], D, X, obs[0][1], pts, st).reference.max()) == 0


def test_search_with_c4_symmetry_finds_the_true_poses_modulo_the_group():
    """A C4-symmetric map (the built-in protein averaged over C4): the search over one
    asymmetric unit (a quarter of the level-0 grid and a bit) finds every image's pose up
    to the group, ``min_g angle(R_found g, R_true)``."""
    from cryofield.physics.so3_grid import asymmetric_level_points
    from cryofield.physics.symmetry import nearest_equivalent, symmetrize_volume, symmetry_operators
    from cryofield.simulate.volumes import protein_like

    D = 32
    ops = symmetry_operators("C4")
    vol = symmetrize_volume(torch.as_tensor(protein_like(D)), ops)
    F = fft3_centered(vol)
    g = torch.Generator().manual_seed(4)
    R = random_rotations(10, generator=g)
    t = (torch.rand(10, 2, generator=g) - 0.5) * 4
    pts = FrequencyPoints.build(D)
    X, c = _observations(F, D, R, t, pts, with_ctf=True)
    st = SearchSettings(base_nside=4, base_psi=24, levels=3, t_extent_px=3.0, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=12.0, symmetry="C4")  # fmt: skip
    n_all = level_points(0, pole_offset=False)[0].shape[0]
    n_asu = asymmetric_level_points(ops, 0, pole_offset=False)[0].shape[0]
    assert n_asu < 0.35 * n_all  # the level-0 search is ~3x smaller (1/4 + the margin)
    Rh, th = search_poses(F, D, X, c, pts, st)[:2]
    aligned = nearest_equivalent(Rh, R, ops)[0]
    err_deg = torch.rad2deg(geodesic_distance_rad(aligned, R))
    spacing = _spacing_deg(24, 3)  # 1.9 deg
    assert float(err_deg.median()) < spacing, err_deg
    assert float(err_deg.max()) < 2 * spacing, err_deg
    assert float((th - t).norm(dim=-1).max()) < 0.5
    # most true views lie outside the searched unit: found as another equivalent pose
    raw_deg = torch.rad2deg(geodesic_distance_rad(Rh, R))
    assert int((raw_deg > 45).sum()) >= 3, raw_deg


def _two_state_images(n: int, noise: float, seed: int = 3, domain: bool = False):
    """Images of two volumes (alternating), with their truth, at box 32: two unrelated
    objects, or (``domain``) one object without and with an extra domain."""
    D = 32
    base = blob_volume(D, 8)
    other = base + blob_volume(D, 3, seed=5) if domain else blob_volume(D, 8, seed=7)
    refs = torch.stack([fft3_centered(base), fft3_centered(other)])
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) % 2
    R = random_rotations(n, generator=g)
    t = (torch.rand(n, 2, generator=g) - 0.5) * 4
    pts = FrequencyPoints.build(D)
    obs = [_observations(refs[k], D, R, t, pts, with_ctf=True) for k in (0, 1)]
    X = torch.where(truth[:, None] == 1, obs[1][0], obs[0][0])
    X = X + noise * float(X.abs().mean()) * torch.randn(X.shape, generator=g, dtype=X.dtype)
    st = SearchSettings(base_nside=4, base_psi=24, levels=2, t_extent_px=3.0, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=10.0)  # fmt: skip
    return D, refs, X, obs[0][1], pts, st, truth, R, t


def test_assigned_search_with_the_right_hint_matches_the_exhaustive_search():
    D, refs, X, c, pts, st, truth, _, _ = _two_state_images(16, noise=0.3)
    full = search_poses(refs, D, X, c, pts, st, chunk=5)
    fast = search_poses(refs, D, X, c, pts, st, chunk=5, hint=truth)
    assert torch.equal(full.reference, truth) and torch.equal(fast.reference, truth)
    assert torch.allclose(fast.rotations, full.rotations, atol=1e-6)
    assert torch.allclose(fast.shifts_px, full.shifts_px, atol=1e-6)
    assert torch.allclose(fast.error, full.error, rtol=1e-4)
    # the level-0 slices of the centred maps computed once (at a larger radius), with
    # the maps' centres, give the same search
    cref, cen = centre_references(refs, D)
    s0 = level0_slices(cref, D, pts, st, radius_px=8.0)
    assert s0.shape[:2] == (2, 4608)
    again = search_poses(cref, D, X, c, pts, st, chunk=5, hint=truth, slices0=s0,
                         centres_px=cen)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(again, fast, strict=True))
    with pytest.raises(ValueError, match="level-0 slices"):
        search_poses(cref, D, X, c, pts, st, hint=truth, slices0=s0[:, :, :5], centres_px=cen)


def test_assigned_search_with_a_wrong_hint_mostly_finds_the_right_reference():
    """Every image starts from the other volume's map (an object without / with an extra
    domain, the heavier map included). The other map, searched again about the best
    translation, explains most of them better: 29 of 32 end on their own map, 25 of them
    at the right pose (the exhaustive search: 32 and 32). With two unrelated objects the
    wrong map's best translation is further off: 25 of 32 on their own map. Cheaper
    checks did worse here: the other map at that one translation, 27 (domain) and 12
    (unrelated) of 32; the other map at the hinted map's kept poses, 0 of 8 (unrelated)."""
    D, refs, X, c, pts, st, truth, R, t = _two_state_images(32, noise=0.3, domain=True)
    full = search_poses(refs, D, X, c, pts, st, chunk=5)
    assert torch.equal(full.reference, truth)
    res = search_poses(refs, D, X, c, pts, st, chunk=5, hint=1 - truth)
    right = res.reference == truth
    assert int(right.sum()) >= 29, res.reference
    err_deg = torch.rad2deg(geodesic_distance_rad(res.rotations, R))
    good = right & (err_deg < 2 * _spacing_deg(24, 2)) & ((res.shifts_px - t).norm(dim=-1) < 0.5)
    assert int(good.sum()) >= 25, (res.reference, err_deg)
    # a right hint for half of them: those keep it
    hint = torch.where(torch.arange(32) < 16, truth, 1 - truth)
    half = search_poses(refs, D, X, c, pts, st, chunk=5, hint=hint)
    assert torch.equal(half.reference[:16], truth[:16])
    # unrelated objects
    D, refs, X, c, pts, st, truth, R, t = _two_state_images(32, noise=0.3)
    res = search_poses(refs, D, X, c, pts, st, chunk=5, hint=1 - truth)
    assert int((res.reference == truth).sum()) >= 25, res.reference


def test_one_reference_search_is_unchanged_by_a_hint_or_cached_slices():
    """G = 1: the hint and precomputed level-0 slices change nothing, bit for bit (also
    with symmetry, whose level 0 is one asymmetric unit)."""
    D, refs, X, c, pts, st, _, _, _ = _two_state_images(8, noise=0.3)
    st = dataclasses.replace(st, centre=False)  # cached slices of the maps as given
    for settings in (st, dataclasses.replace(st, symmetry="C4")):
        ref = search_poses(refs[0], D, X, c, pts, settings)
        hinted = search_poses(refs[0], D, X, c, pts, settings, hint=torch.zeros(8).long())
        s0 = level0_slices(refs[0], D, pts, settings, radius_px=9.0)
        cached = search_poses(refs[0], D, X, c, pts, settings, slices0=s0)
        for other in (hinted, cached):
            assert all(torch.equal(a, b) for a, b in zip(ref, other, strict=True))
        assert int(ref.reference.max()) == 0
    # the exhaustive search of several references with cached slices: the same too
    full = search_poses(refs, D, X, c, pts, st)
    cached = search_poses(refs, D, X, c, pts, st, slices0=level0_slices(refs, D, pts, st))
    assert all(torch.equal(a, b) for a, b in zip(full, cached, strict=True))


def test_a_direction_penalty_moves_only_the_images_it_outweighs():
    """``penalty0`` (the balanced search): zero changes nothing, on both paths; a wall on
    the cells of the true directions sends every image elsewhere, at the same error rank
    it would otherwise have lost; a penalty far below the likelihood gap (noise-free
    images, a small penalty) leaves every pose where it was. The errors returned are the
    errors alone."""
    from cryofield.inference.balance import DirectionBalance
    from cryofield.inference.pose_search import level0_points

    D, refs, X, c, pts, st, truth, R, _ = _two_state_images(12, noise=0.0)
    q_cells = DirectionBalance.cells_of(level0_points(st)[0])
    zero = torch.zeros(len(q_cells))
    for hint in (None, truth):
        plain = search_poses(refs, D, X, c, pts, st, chunk=5, hint=hint)
        same = search_poses(refs, D, X, c, pts, st, chunk=5, hint=hint, penalty0=zero)
        assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    plain = search_poses(refs, D, X, c, pts, st, chunk=5)
    assert float(torch.rad2deg(geodesic_distance_rad(plain.rotations, R)).max()) < 2 * _spacing_deg(
        24, 2
    )
    true_cells = DirectionBalance.cells_of(R)
    wall = torch.as_tensor(np.isin(q_cells, true_cells), dtype=torch.float32) * 1e6
    moved = search_poses(refs, D, X, c, pts, st, chunk=5, penalty0=wall)
    assert not np.isin(DirectionBalance.cells_of(moved.rotations), true_cells).any()
    # worse poses (the neighbouring cells), at their own error; an image whose best pose
    # was already across a cell border keeps it
    assert bool((moved.error >= plain.error).all())
    assert int((moved.error > plain.error).sum()) >= 6
    small = search_poses(refs, D, X, c, pts, st, chunk=5, penalty0=wall * 1e-9)
    assert torch.equal(small.rotations, plain.rotations)
    with pytest.raises(ValueError, match="one value per level-0"):
        search_poses(refs, D, X, c, pts, st, penalty0=zero[:5])


def _off_centre_blobs(D: int, c: tuple[float, float, float]) -> torch.Tensor:
    """The blob volume moved by ``c = (x, y, z)`` px (its centre of mass at about ``c``)."""
    vol = blob_volume(D, 8)
    vol = vol - vol.min()
    F = fft3_centered(vol.to(torch.complex64))
    return shift_grid(F[None], D, torch.tensor([c]))[0]


def test_reference_centres_find_a_moved_map_and_respect_the_symmetry_axes():
    D = 32
    F0 = _off_centre_blobs(D, (0.0, 0.0, 0.0))
    c0 = reference_centres_px(F0, D)[0]
    F = _off_centre_blobs(D, (4.0, -3.0, 2.0))
    c = reference_centres_px(torch.stack([F, F0]), D)
    # moving the map by s moves its centre by s (whatever the blobs' own centre c0)
    assert torch.allclose(c[0] - c0, torch.tensor([4.0, -3.0, 2.0]), atol=0.3), c
    assert torch.allclose(c[1], c0, atol=1e-4)
    # the same from the band-limited grid the search uses (crop to radius 6 px)
    Dc, o = 16, D // 2 - 8
    crop = F[o : o + Dc, o : o + Dc, o : o + Dc]
    assert torch.allclose(reference_centres_px(crop, D)[0] - c0, c[0] - c0, atol=0.6)
    # Cn keeps the axis component only, the other groups none
    assert torch.allclose(reference_centres_px(F, D, "C4")[0, :2], torch.zeros(2))
    assert torch.equal(reference_centres_px(F, D, "D2")[0], torch.zeros(3))
    # centring brings the centre to the origin
    Fc, cc = centre_references(F, D)
    assert float(reference_centres_px(Fc, D)[0].norm()) < 0.05
    assert torch.allclose(cc, c[:1])


def test_centred_search_reaches_particles_of_an_off_centre_map_and_returns_its_frame():
    """A map whose centre of mass is 4.3 px off the box centre, and images of its particle
    picked within +-3 px of the particle's centre: in the map's frame the translations
    reach 3 + 4.3 px. A grid of +-3 px about the box centre misses several; about the
    map's centre of mass it finds every pose, the translations given in the map's own
    frame (the ones the images were made with)."""
    D = 32
    F = _off_centre_blobs(D, (5.0, -4.0, 3.0))
    cen = reference_centres_px(F, D)[0]
    assert 4.0 < float(cen.norm()) < 6.0
    g = torch.Generator().manual_seed(1)
    R = random_rotations(16, generator=g)
    t_pick = (torch.rand(16, 2, generator=g) - 0.5) * 6  # about the particle's centre
    t = t_pick - torch.einsum("bij,j->bi", R[:, :2, :], cen)  # in the map's frame
    pts = FrequencyPoints.build(D)
    X, c = _observations(F, D, R, t, pts, with_ctf=True)
    st = SearchSettings(base_nside=4, base_psi=24, levels=3, t_extent_px=3.0, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=12.0)  # fmt: skip
    out = {}
    for centre in (True, False):
        Rh, th = search_poses(F, D, X, c, pts, dataclasses.replace(st, centre=centre))[:2]
        err = torch.rad2deg(geodesic_distance_rad(Rh, R))
        out[centre] = (err, (th - t).norm(dim=-1))
    err, terr = out[True]
    assert float(err.median()) < _spacing_deg(24, 3), err
    assert float(err.max()) < 4 * _spacing_deg(24, 3), err
    assert float(terr.max()) < 0.5, terr
    err_box, terr_box = out[False]
    assert int(((err_box > 10) | (terr_box > 1)).sum()) >= 4, (err_box, terr_box)
    # cached level-0 slices of the centred maps, with their centres: the same poses
    refs, cen = centre_references(F, D)
    cached = search_poses(refs, D, X, c, pts, st, slices0=level0_slices(refs, D, pts, st),
                          centres_px=cen)  # fmt: skip
    full = search_poses(F, D, X, c, pts, st)
    assert all(torch.equal(a, b) for a, b in zip(full, cached, strict=True))
    with pytest.raises(ValueError, match="centres_px"):
        search_poses(F, D, X, c, pts, st, slices0=level0_slices(F, D, pts, st))


def test_references_are_moved_by_at_most_an_eighth_of_the_box():
    D = 32
    F = _off_centre_blobs(D, (9.0, 0.0, 0.0))
    c = reference_centres_px(F, D)[0]
    assert float(c.norm()) > 6.0
    moved, cen = centre_references(F, D)
    assert abs(float(cen[0].norm()) - D / 8) < 1e-4
    assert torch.allclose(moved, shift_grid(F[None], D, -cen))
    assert torch.allclose(cen[0] / cen[0].norm(), c / c.norm(), atol=1e-5)


def test_particles_beyond_the_grid_are_counted_and_a_grid_grown_by_the_rule_finds_them():
    """Images picked 4-5 px off the particle's centre at D=32: the default grid (+-3.2 px,
    7 x 7) cannot reach them, most end on its border or past it and take wrong poses;
    the rule grows it by one step per search (epoch, in training) while over its limit,
    the step unchanged, and the grown grid finds them all. Images within the grid are
    not counted as beyond it."""
    from cryofield.inference.pose_search import (
        BEYOND_GRID_LIMIT,
        beyond_grid,
        widened_translation_grid,
    )

    D = 32
    F = _off_centre_blobs(D, (0.0, 0.0, 0.0))
    cen = reference_centres_px(F, D)[0]
    g = torch.Generator().manual_seed(2)
    R = random_rotations(24, generator=g)
    ang = torch.rand(24, generator=g) * 2 * math.pi
    rad = 4.0 + torch.rand(24, generator=g)
    t_pick = torch.stack([rad * torch.cos(ang), rad * torch.sin(ang)], -1)
    t = t_pick - torch.einsum("bij,j->bi", R[:, :2, :], cen)  # in the map's frame
    pts = FrequencyPoints.build(D)
    X, c = _observations(F, D, R, t, pts, with_ctf=True)
    st = SearchSettings(base_nside=4, base_psi=24, levels=3, t_extent_px=D / 10, t_ngrid=7,
                        radius_lo_px=6.0, radius_hi_px=12.0)  # fmt: skip
    step = 2 * st.t_extent_px / (st.t_ngrid - 1)
    grids = []
    while True:
        res = search_poses(F, D, X, c, pts, st)
        frac = float(beyond_grid(res.grid_offsets_px, st.t_extent_px, st.t_ngrid).float().mean())
        err = torch.rad2deg(geodesic_distance_rad(res.rotations, R))
        grids.append((st.t_ngrid, frac, int((err > 10).sum())))
        wider = widened_translation_grid(st.t_extent_px, st.t_ngrid, frac, D)
        if wider is None:
            break
        st = dataclasses.replace(st, t_extent_px=wider[0], t_ngrid=wider[1])
        assert abs(2 * wider[0] / (wider[1] - 1) - step) < 1e-9  # the same step
    assert grids[0][1] > 0.3 and grids[0][2] >= 5, grids
    assert st.t_ngrid > 7 and st.t_extent_px <= D / 5 + 1e-6, grids
    assert grids[-1][1] <= BEYOND_GRID_LIMIT, grids
    assert float(err.max()) < 4 * _spacing_deg(24, 3), (grids, err)
    assert float((res.shifts_px - t).norm(dim=-1).max()) < 0.5
    # never past a fifth of the box; nothing without a translation search
    assert widened_translation_grid(6.0, 7, 1.0, D) is None
    assert widened_translation_grid(0.0, 1, 1.0, D) is None
