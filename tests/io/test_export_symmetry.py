"""write_particles records the symmetry and mask of the poses (docs/export.md, "Symmetry
and mask"): ``# cryofield:`` lines of a .star, the sidecar of a .cs, cryoSPARC's ``Dn``
axes for a .cs; C1 without a mask writes what it always wrote."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
import yaml

from cryofield.io.cryosparc import read_cs
from cryofield.io.export import (
    ExportInfo,
    cryosparc_axes,
    read_export_info,
    sidecar_path,
    write_particles,
)
from cryofield.io.metadata import load_particle_table
from cryofield.io.poses import internal_to_relion
from cryofield.physics.rotation import random_rotations
from cryofield.physics.slicing import project_real_space
from cryofield.physics.symmetry import (
    _axis_rotation,
    _close,
    relion_to_cryosparc_dihedral,
    symmetrize_volume,
    symmetry_operators,
)

N, D = 12, 16


@pytest.fixture(scope="module")
def sim(simulated) -> Path:
    return simulated(N, D, 6.0, seed=3)[0]


@pytest.fixture(scope="module")
def poses() -> tuple[np.ndarray, np.ndarray]:
    R = random_rotations(N, torch.Generator().manual_seed(2)).double().numpy()
    t = np.random.default_rng(1).normal(size=(N, 2))
    return R, t


def _same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (G, 3, 3) stacks hold the same rotations (any order)."""
    if a.shape != b.shape:
        return False
    dist = (a[:, None].double() - b[None].double()).abs().amax((-1, -2))
    return bool((dist.min(1).values < 1e-6).all() and (dist.min(0).values < 1e-6).all())


def _group(*generators: tuple[int, tuple[float, float, float]]) -> torch.Tensor:
    return _close([_axis_rotation(axis, 2 * math.pi / fold) for fold, axis in generators])


def _same_output(a: Path, b: Path) -> bool:
    """Byte-identical, but for what differs between any two writes: starfile's 'Created
    by ... at TIME' line, and the random uids a .cs made from a star file gets."""
    if a.suffix == ".cs":
        x, y = read_cs(a), read_cs(b)
        if x.dtype != y.dtype:
            return False
        names = [n for n in x.dtype.names if n != "uid"]
        return all(np.array_equal(x[n], y[n]) for n in names)
    lines = [p.read_bytes().splitlines(keepends=True) for p in (a, b)]
    keep = [b"".join(ln for ln in f if not ln.startswith(b"# Created by the starfile"))
            for f in lines]  # fmt: skip
    return keep[0] == keep[1]


# ----------------------------------------------------------------------------- C1
@pytest.mark.parametrize("source", ["particles.star", "particles.cs"])
def test_c1_without_mask_is_unchanged(sim: Path, poses, tmp_path: Path, source: str) -> None:
    table = load_particle_table(sim / source)
    R, t = poses
    for suffix in (".star", ".cs"):
        before = write_particles(tmp_path / f"before{suffix}", table, rotations=R, shifts_px=t)
        after = write_particles(tmp_path / f"after{suffix}", table, rotations=R, shifts_px=t,
                                symmetry="C1", mask=None)  # fmt: skip
        assert _same_output(before, after)
        if suffix == ".cs" and source.endswith(".cs"):  # uids carried: every byte the same
            assert before.read_bytes() == after.read_bytes()
        assert b"# cryofield" not in after.read_bytes()
        assert not sidecar_path(after).exists()
        assert read_export_info(after) is None


def test_c1_export_removes_a_stale_sidecar(sim: Path, poses, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.star")
    out = write_particles(tmp_path / "p.cs", table, rotations=poses[0], symmetry="D7")
    assert sidecar_path(out).is_file()
    write_particles(out, table, rotations=poses[0])  # the same name, now without symmetry
    assert not sidecar_path(out).exists() and read_export_info(out) is None


# ----------------------------------------------------------------------------- .star
@pytest.mark.parametrize("mask", ["/data/masks/focus mask.mrc", 'odd\n"name".mrc'])
def test_star_header_round_trips(sim: Path, poses, tmp_path: Path, mask: str) -> None:
    table = load_particle_table(sim / "particles.star")
    R, t = poses
    plain = write_particles(tmp_path / "plain.star", table, rotations=R, shifts_px=t)
    out = write_particles(tmp_path / "d7.star", table, rotations=R, shifts_px=t,
                          symmetry="d7", mask=mask)  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[0] == "# cryofield: symmetry D7 (RELION axes)"
    assert lines[1].startswith("# cryofield: mask ")
    assert read_export_info(out) == ExportInfo("D7", "RELION", mask)
    # our reader, starfile (RELION skips '#' lines the same way) see the same particles
    back, ref = load_particle_table(out), load_particle_table(plain)
    np.testing.assert_array_equal(back.rotations, ref.rotations)
    np.testing.assert_array_equal(back.shifts_px, ref.shifts_px)
    np.testing.assert_allclose(back.rotations, R, atol=1e-6)  # RELION's axes: unchanged
    a, b = starfile.read(out, always_dict=True), starfile.read(plain, always_dict=True)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def test_star_header_for_a_mask_without_symmetry(sim: Path, poses, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.star")
    out = write_particles(tmp_path / "m.star", table, rotations=poses[0], mask="/m.mrc")
    assert out.read_text().splitlines()[:2] == ["# cryofield: symmetry C1",
                                                "# cryofield: mask /m.mrc"]  # fmt: skip
    assert read_export_info(out) == ExportInfo("C1", None, "/m.mrc")


def test_exported_poses_keep_their_symmetry_mates(sim: Path, tmp_path: Path) -> None:
    """An exported pose R read back, times any operator g of the group, projects a map with
    that symmetry to the same image as R: the export broke no equivalence. D4 in RELION's
    axes (every operator permutes the voxel grid, so the check is exact)."""
    table = load_particle_table(sim / "particles.star")
    ops = symmetry_operators("D4", torch.float64)
    rng = np.random.default_rng(0)
    c = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for centre in rng.normal(size=(4, 3)) * 2.5:
        vol += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 3)
    vol = symmetrize_volume(vol, ops)
    R = random_rotations(4, torch.Generator().manual_seed(5)).double().numpy()
    out = write_particles(tmp_path / "d4.star", table, indices=np.arange(4), rotations=R,
                          symmetry="D4")  # fmt: skip
    back = torch.as_tensor(load_particle_table(out).rotations, dtype=torch.float64)
    ref = project_real_space(vol, back.float())
    for g in ops:
        img = project_real_space(vol, (back @ g).float())
        assert float((img - ref).abs().max()) < 1e-4 * float(ref.abs().max())


# ----------------------------------------------------------------------------- .cs
def test_cs_dihedral_poses_in_cryosparc_axes_and_sidecar(sim: Path, poses, tmp_path) -> None:
    table = load_particle_table(sim / "particles.star")  # RELION columns carried into the .cs
    R, t = poses
    out = write_particles(tmp_path / "d7.cs", table, rotations=R, shifts_px=t, symmetry="D7",
                          mask="/abs/mask.mrc")  # fmt: skip
    Q = relion_to_cryosparc_dihedral().numpy()
    back = load_particle_table(out)
    np.testing.assert_allclose(back.rotations, R @ Q.T, atol=1e-5)  # R_cs = R Q^T
    np.testing.assert_allclose(back.shifts_px, t, atol=1e-4)  # the images do not move
    # carried RELION columns stay in RELION's axes
    euler, _ = internal_to_relion(R, None)
    np.testing.assert_allclose(back.raw["rlnAngleTilt"], euler[:, 1], atol=1e-6)
    side = sidecar_path(out)
    assert side.name == "d7.cs.cryofield.yaml"
    info = yaml.safe_load(side.read_text())
    assert info["particles"] == "d7.cs" and info["symmetry"] == "D7"
    assert info["axes"] == "cryoSPARC" and info["mask"] == "/abs/mask.mrc"
    assert "R_cs = R Q^T" in info["note"]
    got = read_export_info(out)
    assert (got.symmetry, got.axes, got.mask) == ("D7", "cryoSPARC", "/abs/mask.mrc")


def test_star_from_cs_carries_cryosparc_fields_in_cryosparc_axes(sim: Path, poses, tmp_path):
    from cryofield.io.poses import internal_to_cryosparc

    table = load_particle_table(sim / "particles.cs")
    R, t = poses
    out = write_particles(tmp_path / "d7.star", table, rotations=R, shifts_px=t, symmetry="D7")
    Q = relion_to_cryosparc_dihedral().numpy()
    df = starfile.read(out, always_dict=True)["particles"]
    pose, _ = internal_to_cryosparc(R @ Q.T, t)
    np.testing.assert_allclose(df["alignments3D/pose.1"], pose[:, 1], atol=1e-6)
    np.testing.assert_allclose(load_particle_table(out).rotations, R, atol=1e-6)
    assert "carried cryoSPARC fields" in out.read_text().splitlines()[1]
    assert read_export_info(out) == ExportInfo("D7", "RELION", None)


def test_cs_dihedral_needs_the_poses(sim: Path, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.star")
    with pytest.raises(ValueError, match="needs the poses"):
        write_particles(tmp_path / "x.cs", table, symmetry="D3")
    with pytest.raises(ValueError, match="unknown symmetry"):
        write_particles(tmp_path / "x.star", table, symmetry="Q5")


@pytest.mark.parametrize("sym", ["C4", "O", "I1", "I2", "T", "I3"])
def test_cs_other_groups_keep_their_poses(sim: Path, poses, tmp_path: Path, sym: str) -> None:
    table = load_particle_table(sim / "particles.star")
    out = write_particles(tmp_path / "g.cs", table, rotations=poses[0], symmetry=sym)
    np.testing.assert_allclose(load_particle_table(out).rotations, poses[0], atol=1e-5)
    info = read_export_info(out)
    same = sym in ("C4", "O", "I1", "I2")
    assert info.axes == ("cryoSPARC" if same else "RELION")
    assert info.note.startswith("WARNING") != same


# ----------------------------------------------------------------------------- axes
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dihedral_operators_map_onto_cryosparc_ones(n: int) -> None:
    """``Q g Q^T`` for every operator of RELION's Dn (2-fold on x) is an operator of the
    Dn generated with the 2-fold on y (cryoSPARC's), and the sets are equal."""
    Q = relion_to_cryosparc_dihedral()
    relion = symmetry_operators(f"D{n}", torch.float64)
    cryosparc = (
        _group((n, (0.0, 0.0, 1.0)), (2, (0.0, 1.0, 0.0)))
        if n > 1
        else _group((2, (0.0, 1.0, 0.0)))
    )
    assert _same_set(Q @ relion @ Q.T, cryosparc)
    assert np.allclose(Q.numpy() @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])  # x 2-fold -> y
    assert cryosparc_axes(f"D{n}")[1] == "cryoSPARC"
    if n % 2:  # odd n: the two conventions are different groups (the rotation matters)
        assert not _same_set(relion, cryosparc)


def test_icosahedral_and_octahedral_axes_agree_with_cryosparc() -> None:
    """cryoSPARC's I1 / I2 generators (cryoem-uoft/cryosparc-issues #127) give RELION's I1 /
    I2; O with 4-folds on x, y, z is one group; RELION's T (3-fold on z) is not the T222 of
    cryoSPARC (Scipion), which is why T is left in RELION's axes with a warning."""
    # the three generators as cryoSPARC lists them (a 2-fold and a 5-fold alone can be
    # perpendicular, and then generate only D5)
    cs_i1 = _group((2, (0.0, 1.0, 0.0)), (5, (-0.85065080702670, 0.0, 0.5257311142635)),
                   (3, (-0.9341723640, 0.3568220765, 0.0)))  # fmt: skip
    cs_i2 = _group((2, (0.0, 0.0, 1.0)), (5, (-1.618033989, -1.0, 0.0)),
                   (3, (-0.53934467, -1.4120227, 0.0)))  # fmt: skip
    assert len(cs_i1) == len(cs_i2) == 60
    assert _same_set(symmetry_operators("I1", torch.float64), cs_i1)
    assert _same_set(symmetry_operators("I2", torch.float64), cs_i2)
    assert _same_set(symmetry_operators("I", torch.float64), cs_i2)
    o = _group((4, (0.0, 0.0, 1.0)), (4, (1.0, 0.0, 0.0)))
    assert _same_set(symmetry_operators("O", torch.float64), o)
    t222 = _group((2, (0.0, 0.0, 1.0)), (3, (1.0, 1.0, 1.0)))
    assert len(t222) == 12
    assert not _same_set(symmetry_operators("T", torch.float64), t222)
