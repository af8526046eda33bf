"""Point groups in RELION's orientation, the asymmetric unit of the pose search, and the
symmetric back-projection (which of ``R g`` and ``g R`` is the equivalent pose)."""

from __future__ import annotations

import math

import pytest
import torch

from cryofield.physics import so3_grid
from cryofield.physics.backproject import FourierBackprojector, reconstruct_fourier
from cryofield.physics.fsc import fsc
from cryofield.physics.lattice import coords_1d
from cryofield.physics.rotation import geodesic_distance_rad, random_rotations
from cryofield.physics.slicing import project_real_space
from cryofield.physics.symmetry import (
    SYMMETRY_FORMS,
    SymmetryError,
    asymmetric_unit_mask,
    canonical_symmetry,
    equivalent_poses,
    nearest_equivalent,
    relion_to_cryosparc_dihedral,
    symmetrize_volume,
    symmetry_operators,
    symmetry_order,
)

ORDERS = {"C1": 1, "C4": 4, "C13": 13, "D1": 2, "D2": 4, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}  # fmt: skip


def _rotation(axis: tuple[float, float, float], deg: float) -> torch.Tensor:
    u = torch.tensor(axis, dtype=torch.float64)
    u = u / torch.linalg.norm(u)
    K = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]], dtype=torch.float64)
    a = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def _contains(ops: torch.Tensor, M: torch.Tensor, atol: float = 1e-5) -> bool:
    return bool(((ops - M).abs().amax((-2, -1)) < atol).any())


def _angles_deg(ops: torch.Tensor) -> list[int]:
    tr = ops.diagonal(dim1=-2, dim2=-1).sum(-1)
    return sorted(round(math.degrees(math.acos(max(-1.0, min(1.0, (float(t) - 1) / 2)))))
                  for t in tr)  # fmt: skip


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_groups_are_closed_sets_of_rotations_of_the_right_order(name: str) -> None:
    ops = symmetry_operators(name, torch.float64)
    G = ORDERS[name]
    assert ops.shape == (G, 3, 3) and symmetry_order(name) == G
    assert torch.equal(ops[0], torch.eye(3, dtype=torch.float64))  # identity first
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(ops @ ops.transpose(-1, -2), eye.expand(G, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(ops), torch.ones(G, dtype=torch.float64))
    # distinct, and closed under products and inverses
    dist = (ops[:, None] - ops[None]).abs().amax((-2, -1))
    assert int((dist < 1e-6).sum()) == G
    prod = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    assert all(_contains(ops, p, 1e-9) for p in prod)
    assert all(_contains(ops, g.T, 1e-9) for g in ops)


def test_names_are_parsed_case_insensitively_and_bad_ones_name_the_accepted_forms() -> None:
    assert canonical_symmetry("c4") == "C4"
    assert canonical_symmetry(" d07 ") == "D7"
    assert canonical_symmetry("i") == "I2"
    assert torch.equal(symmetry_operators("I"), symmetry_operators("I2"))
    assert canonical_symmetry("I3") == "I3"
    for bad in ("C0", "D", "X3", "I5", "C4h", "", "Oh", "T2"):
        with pytest.raises(SymmetryError, match="C<n>") as err:
            canonical_symmetry(bad)
        assert SYMMETRY_FORMS in str(err.value) or "order" in str(err.value)
    assert isinstance(SymmetryError("x"), ValueError)


# Rotations read off RELION's group definitions (SymList::fill_symmetry_class in
# src/symmetries.cpp: "rot_axis <fold> x y z", with RELION's decimals).
RELION_AXES = {
    "C4": [(4, (0, 0, 1))],
    "D7": [(7, (0, 0, 1)), (2, (1, 0, 0))],
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)),
           (3, (0, 0.356822076, 0.934172364))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)),
           (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELION_AXES))
def test_operators_hold_relion_s_generators(name: str) -> None:
    ops = symmetry_operators(name, torch.float64)
    for fold, axis in RELION_AXES[name]:
        for k in range(1, fold):
            assert _contains(ops, _rotation(axis, 360.0 * k / fold)), (name, fold, axis, k)


def test_axes_of_the_groups_where_relion_puts_them() -> None:
    ops = {n: symmetry_operators(n, torch.float64) for n in ("C4", "D7", "T", "O", "I2", "I1")}
    x, y, z = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    assert _contains(ops["C4"], _rotation(z, 90)) and not _contains(ops["C4"], _rotation(x, 180))
    # Dn: the 2-folds lie in the xy plane, one on x (cryoSPARC: on y)
    assert _contains(ops["D7"], _rotation(x, 180)) and not _contains(ops["D7"], _rotation(y, 180))
    # O: 4-folds on x, y and z; 3-folds on the cube diagonals
    for a in (x, y, z):
        assert _contains(ops["O"], _rotation(a, 90))
    assert _contains(ops["O"], _rotation((1, -1, 1), 120))
    # T (RELION): a 3-fold on z, its 2-folds 54.74 deg from it, none on x, y or z
    assert _contains(ops["T"], _rotation(z, 120)) and not _contains(ops["T"], _rotation(z, 180))
    # I2 = I: 2-folds on x, y and z, 5-folds (1, 0, +-phi) in the xz plane
    phi = (1 + math.sqrt(5)) / 2
    for a in (x, y, z):
        assert _contains(ops["I2"], _rotation(a, 180))
    assert _contains(ops["I2"], _rotation((1, 0, phi), 72))
    assert _contains(ops["I2"], _rotation((-1, 0, phi), 72))
    assert not _contains(ops["I2"], _rotation((0, 1, phi), 72))
    # I1: the same 2-folds, 5-folds (phi, 0, +-1) (I2 turned by 90 deg about y)
    for a in (x, y, z):
        assert _contains(ops["I1"], _rotation(a, 180))
    assert _contains(ops["I1"], _rotation((phi, 0, 1), 72))
    # the rotation angles of each class: I 15 x 180, 20 x 120, 12 x 72 + 12 x 144
    hist = {a: _angles_deg(ops["I2"]).count(a) for a in (0, 72, 120, 144, 180)}
    assert hist == {0: 1, 72: 12, 120: 20, 144: 12, 180: 15}
    hist = {a: _angles_deg(ops["O"]).count(a) for a in (0, 90, 120, 180)}
    assert hist == {0: 1, 90: 6, 120: 8, 180: 9}
    hist = {a: _angles_deg(ops["T"]).count(a) for a in (0, 120, 180)}
    assert hist == {0: 1, 120: 8, 180: 3}


def test_cryosparc_dihedral_rotation_moves_the_two_fold_to_y() -> None:
    Q = relion_to_cryosparc_dihedral()
    assert torch.allclose(Q @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)  # fmt: skip
    for n in (2, 3, 7):
        ops = symmetry_operators(f"D{n}", torch.float64)
        cs = Q @ ops @ Q.T
        assert _contains(cs, _rotation((0, 1, 0), 180))
        assert _contains(cs, _rotation((0, 0, 1), 360 / n))
        if n % 2:  # odd n: no 2-fold on x in cryoSPARC's orientation
            assert not _contains(cs, _rotation((1, 0, 0), 180))


def _blob_volume(D: int, centres, sigmas, rotations=None) -> torch.Tensor:
    """Sum of anisotropic Gaussians ``(D, D, D)`` [z, y, x]; with ``rotations`` (G, 3, 3)
    every blob is repeated at ``g c`` with covariance ``g S g^T``: ``V(g x) = V(x)``."""
    c = coords_1d(D, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1)
    ops = torch.eye(3, dtype=torch.float64)[None] if rotations is None else rotations.double()
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for cen, sig in zip(centres, sigmas, strict=True):
        prec = torch.diag(1.0 / torch.tensor(sig, dtype=torch.float64) ** 2)
        for g in ops:
            d = pts - g @ torch.tensor(cen, dtype=torch.float64)
            P = g @ prec @ g.T
            vol += torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, P, d))
    return vol.float()


CENTRES = [(5.0, -3.0, 2.0), (-6.0, 4.0, -3.0), (2.0, 6.0, 5.0)]
SIGMAS = [(2.2, 1.5, 1.3), (1.4, 2.4, 1.7), (1.8, 1.2, 2.0)]


def test_symmetrized_map_is_invariant_under_the_group() -> None:
    D = 32
    for name in ("C4", "D3", "T"):
        ops = symmetry_operators(name)
        sym = _blob_volume(D, CENTRES, SIGMAS, ops)  # exactly symmetric, analytic
        # the group average of a symmetric map is the map (up to trilinear resampling)
        err = (symmetrize_volume(sym, ops) - sym).norm() / sym.norm()
        assert float(err) < 0.05, (name, float(err))
        # ... and of an asymmetric one, a symmetric map
        asym = _blob_volume(D, CENTRES, SIGMAS)
        avg = symmetrize_volume(asym, ops)
        assert float((avg - asym).norm() / asym.norm()) > 0.5
        for g in ops[1:3]:
            moved = symmetrize_volume(avg, g[None])  # avg(g x)
            assert float((moved - avg).norm() / avg.norm()) < 0.05


@pytest.mark.parametrize("name", ["C4", "D7", "T", "O", "I"])
def test_asymmetric_unit_holds_one_point_of_every_orbit(name: str) -> None:
    ops = symmetry_operators(name, torch.float64)
    G = ops.shape[0]
    g = torch.Generator().manual_seed(3)
    d = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    orbit = torch.einsum("gij,nj->ngi", ops, d)  # (n, G, 3): g d (= directions of R g^T)
    inside = asymmetric_unit_mask(orbit, ops)  # (n, G)
    assert bool((inside.sum(1) == 1).all())  # exactly one equivalent view per orbit
    assert abs(float(asymmetric_unit_mask(d, ops).double().mean()) * G - 1) < 0.1
    # a margin widens the unit
    assert bool(
        (asymmetric_unit_mask(d, ops, math.radians(5)) >= asymmetric_unit_mask(d, ops)).all()
    )


def _cover_deg(Q: torch.Tensor, kept: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """For each rotation Q, the angle to the nearest ``R g`` (R kept, g in the group)."""
    QG = (Q[:, None] @ ops[None].transpose(-1, -2)).reshape(-1, 9)  # Q g^T ~ R  <=> Q ~ R g
    best = torch.full((Q.shape[0],), -10.0, dtype=torch.float64)
    for s in range(0, kept.shape[0], 4096):
        tr = QG @ kept[s : s + 4096].reshape(-1, 9).T
        best = torch.maximum(best, tr.reshape(Q.shape[0], -1).amax(1))
    return torch.rad2deg(torch.arccos(((best - 1) / 2).clamp(-1, 1)))


@pytest.mark.parametrize("name", ["C4", "D7", "T", "O", "I"])
def test_search_grid_in_one_asymmetric_unit_covers_so3_modulo_the_group(name: str) -> None:
    ops = symmetry_operators(name, torch.float64)
    G = ops.shape[0]
    grid = dict(base_nside=4, base_psi=24, pole_offset=False, dtype=torch.float64)
    full, _, _ = so3_grid.level_points(0, **grid)
    kept, pix, _ = so3_grid.asymmetric_level_points(ops, 0, **grid)
    frac = kept.shape[0] / full.shape[0]
    assert 1.0 / G <= frac < 2.3 / G  # the search is |G| / (1..2.3) times smaller
    assert torch.unique(pix).numel() * 24 == kept.shape[0]  # whole pixels, every psi
    Q = random_rotations(3000, torch.Generator().manual_seed(5), dtype=torch.float64)
    c_full = _cover_deg(Q, full, torch.eye(3, dtype=torch.float64)[None])
    c_kept = _cover_deg(Q, kept, ops)
    step = 15.0  # the level-0 grid step (360 / 24 in-plane)
    assert float(c_kept.max()) < step
    assert float(c_kept.max()) < float(c_full.max()) + 0.5
    # C1 keeps everything
    assert so3_grid.asymmetric_level_points(ops[:1], 0, **grid)[0].shape == full.shape


def test_nearest_equivalent_undoes_a_group_element() -> None:
    ops = symmetry_operators("O", torch.float64)
    R = random_rotations(50, torch.Generator().manual_seed(1), dtype=torch.float64)
    k = torch.randint(24, (50,), generator=torch.Generator().manual_seed(2))
    moved = R @ ops[k]
    back, idx = nearest_equivalent(moved, R, ops)
    assert torch.allclose(back, R, atol=1e-10)
    assert torch.allclose(ops[idx], ops[k].transpose(-1, -2), atol=1e-10)  # g* = g^-1
    assert equivalent_poses(R, ops).shape == (50, 24, 3, 3)
    assert float(geodesic_distance_rad(equivalent_poses(R, ops)[:, 0], R).max()) < 1e-6


def test_symmetric_backprojection_inserts_each_image_at_R_g() -> None:
    """Projections of a D3-symmetric map at poses of one asymmetric unit: the back-projection
    with the symmetry (insertion at ``R g``) recovers the map; C1, or insertion at ``g R``,
    leaves it incomplete or wrong."""
    D = 32
    ops = symmetry_operators("D3")
    vol = _blob_volume(D, CENTRES, SIGMAS, ops)
    gen = torch.Generator().manual_seed(4)
    R = random_rotations(2000, gen)
    R = R[asymmetric_unit_mask(R[:, 2, :], ops)][:200]  # views of one asymmetric unit
    assert R.shape[0] == 200
    images = project_real_space(vol, R, chunk_size=100)
    sym = reconstruct_fourier(images, R, symmetry=ops)
    c1 = reconstruct_fourier(images, R)
    shells = slice(1, D // 2 - 3)
    f_sym, f_c1 = fsc(sym, vol)[shells], fsc(c1, vol)[shells]
    assert float(f_sym.min()) > 0.98, f_sym  # as C1 from 6x the images all around
    assert float(f_c1.mean()) < float(f_sym.mean()) - 0.05, f_c1
    # the wrong convention (g R) scrambles the map
    bp = FourierBackprojector(D)
    for g in ops:
        bp.add(images, g @ R)
    wrong = bp.volume()
    assert float(fsc(wrong, vol)[shells].mean()) < 0.8
    # inserting at R g is the C1 back-projection of the symmetry-expanded data set
    G = ops.shape[0]
    R_all = equivalent_poses(R, ops).reshape(-1, 3, 3)  # image i at rows i G .. i G + G - 1
    expanded = reconstruct_fourier(images.repeat_interleave(G, 0), R_all)
    assert torch.allclose(expanded, sym, atol=1e-4 * float(sym.abs().max()))


@pytest.mark.parametrize("name", ["C4", "T"])
def test_symmetry_alignment_finds_the_axes_of_a_rotated_symmetric_map(name: str) -> None:
    """A map with the group's symmetry about rotated axes, ``V_B(x) = V(B^T x)``: the
    alignment ``A`` puts them back (``A G A^T = B G B^T``, to within 1.5 deg)."""
    from cryofield.physics.symmetry import symmetry_alignment

    D = 24
    ops = symmetry_operators(name, torch.float64)
    B = random_rotations(1, torch.Generator().manual_seed(7), dtype=torch.float64)[0]
    vol = _blob_volume(D, [(4.0, -2.0, 1.5), (-1.0, 3.0, 5.0)], [(1.8, 1.2, 1.0), (1.1, 1.9, 1.3)],
                       B @ ops)  # fmt: skip
    A, score = symmetry_alignment(vol, ops, n_best=2)
    assert score > 0.95
    conj_a, conj_b = A @ ops @ A.T, B @ ops @ B.T
    d = (conj_a[:, None] - conj_b[None]).flatten(-2).norm(dim=-1).amin(1)
    assert float(2 * torch.asin((d / (2 * math.sqrt(2))).clamp(max=1)).max()) < math.radians(1.5)
    # C1: nothing to align
    assert symmetry_alignment(vol, ops[:1])[0].equal(torch.eye(3, dtype=torch.float64))
