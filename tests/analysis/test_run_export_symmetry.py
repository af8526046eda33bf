"""``analysis.export`` (``select`` / ``export``) with a run trained with ``--symmetry`` and
``--mask``: the files record both, a ``Dn`` .cs and the map beside it are in cryoSPARC's
axes (docs/export.md, "Symmetry and mask")."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fakerun import FakeRun

from cryofield.analysis import export
from cryofield.cli.main import main
from cryofield.inference.rundir import RunDir
from cryofield.io.export import ExportInfo, read_export_info, sidecar_path
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc
from cryofield.physics.handedness import flip_hand_volume, mirror_matrix
from cryofield.physics.slicing import project_real_space
from cryofield.physics.symmetry import relion_to_cryosparc_dihedral

MASK = "/abs/masks/focus.mrc"


def _configure(outdir: Path, **values: object) -> None:
    path = outdir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(values)
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def hom_run(fake_hom_run: FakeRun, tmp_path: Path) -> Path:
    """A private copy of the homogeneous fake run, trained 'with' D7 and a mask."""
    ignore = shutil.ignore_patterns("analyze.*", "eval_vol.*")
    out = Path(shutil.copytree(fake_hom_run.outdir, tmp_path / "run", ignore=ignore))
    _configure(out, symmetry="D7", mask=MASK)
    return out


def _Q() -> np.ndarray:
    return relion_to_cryosparc_dihedral().numpy()


def test_run_symmetry_follows_the_alignment_of_the_axes(hom_run: Path, capsys) -> None:
    run = RunDir(hom_run)
    assert export.run_symmetry(run, 2) == "D7"  # no state.pt: the configured group
    torch.save({"symmetry_aligned": False, "epoch": 2}, run.epoch_dir(2) / "state.pt")
    assert export.run_symmetry(run, 2) == "C1"  # still in the C1 search
    assert "comes before symmetry D7 was imposed" in capsys.readouterr().out
    assert export.run_symmetry(run, 2, quiet=True) == "C1"
    assert capsys.readouterr().out == ""
    _configure(hom_run, poses_from_file=True)  # known poses: the group holds from the start
    assert export.run_symmetry(run, 2) == "D7"
    _configure(hom_run, poses_from_file=False)
    torch.save({"symmetry_aligned": True, "epoch": 2}, run.epoch_dir(2) / "state.pt")
    assert export.run_symmetry(run, 2) == "D7"
    _configure(hom_run, symmetry="c1")
    assert export.run_symmetry(run, 2) == "C1"


def test_relion_to_cryosparc_volume_rotates_the_map_exactly(fake_hom_run: FakeRun) -> None:
    vol = np.asarray(read_mrc(fake_hom_run.volume_path, mmap=False)[0], dtype=np.float32)
    D = vol.shape[0]
    c = D // 2
    out = export.relion_to_cryosparc_volume(vol)
    Q = _Q()
    # V_cs(p) = V(Q^T p) at every voxel whose source lies in the box
    for x, y, z in [(1, 2, 3), (-4, 0, 5), (6, -7, -2)]:
        src = np.rint(Q.T @ [x, y, z]).astype(int)
        assert out[z + c, y + c, x + c] == vol[src[2] + c, src[1] + c, src[0] + c]
    # the poses R Q^T against the rotated map give the images R gives against the map
    R = torch.tensor(np.asarray(RunDir(fake_hom_run.outdir).poses(2)["rotations"][:6]))
    ref = project_real_space(torch.tensor(vol), R)
    img = project_real_space(torch.tensor(out), (R.double() @ torch.tensor(Q.T)).float())
    assert float((img - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    # a map with RELION's x 2-fold gets cryoSPARC's y 2-fold
    sym_x = vol + np.roll(vol[::-1, ::-1, :], 1, axis=(0, 1))  # V(p) + V(Rx(180) p)
    turned = export.relion_to_cryosparc_volume(sym_x)
    y_fold = np.roll(turned[::-1, :, ::-1], 1, axis=(0, 2))  # V_cs(Ry(180) p)
    np.testing.assert_array_equal(turned, y_fold)


def test_star_export_records_symmetry_and_mask(hom_run: Path, capsys) -> None:
    sel = export.select_particles(hom_run)
    assert (sel.symmetry, sel.mask) == ("D7", MASK)
    out = export.write_selection(sel, hom_run / "d7.star")
    assert out.read_text().splitlines()[:2] == [
        "# cryofield: symmetry D7 (RELION axes)",
        f"# cryofield: mask {MASK}",
    ]
    assert read_export_info(out) == ExportInfo("D7", "RELION", MASK)
    R = np.asarray(sel.poses["rotations"], dtype=np.float64)[sel.rows]
    np.testing.assert_allclose(load_particle_table(out).rotations, R, atol=1e-5)
    printed = capsys.readouterr().out
    assert f"recorded symmetry D7 (RELION axes) and mask {MASK} in the '# cryofield:'" in printed
    assert not export.cryosparc_map_path(out).exists()  # RELION's axes: no second map


@pytest.mark.parametrize("flip", [False, True])
def test_cs_export_of_a_dihedral_run_is_in_cryosparc_axes(hom_run: Path, capsys, flip) -> None:
    sel = export.select_particles(hom_run)
    out = export.write_selection(sel, hom_run / "d7.cs", flip_hand=flip)
    R = np.asarray(sel.poses["rotations"], dtype=np.float64)[sel.rows]
    vol = np.asarray(read_mrc(RunDir(hom_run).volume_path(2), mmap=False)[0], np.float32)
    if flip:
        M = mirror_matrix().numpy()
        R, vol = M @ R @ M, flip_hand_volume(vol)
    np.testing.assert_allclose(load_particle_table(out).rotations, R @ _Q().T, atol=1e-5)
    side = sidecar_path(out)
    info = read_export_info(out)
    assert (info.symmetry, info.axes, info.mask) == ("D7", "cryoSPARC", MASK)
    map_path = export.flipped_map_path(out) if flip else export.cryosparc_map_path(out)
    written = np.asarray(read_mrc(map_path, mmap=False)[0])
    np.testing.assert_array_equal(written, export.relion_to_cryosparc_volume(vol))
    printed = capsys.readouterr().out
    assert f"recorded symmetry D7 (cryoSPARC axes) and mask {MASK} in {side}" in printed
    assert "in cryoSPARC's axes" in printed and str(map_path) in printed
    assert set(export.output_paths(out)) >= {out, side, map_path}


def test_cli_export_and_select_say_where_it_went(hom_run: Path, fake_hom_run, capsys) -> None:
    out = hom_run / "x.cs"
    assert main(["export", str(hom_run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"in {sidecar_path(out)}" in printed
    assert "poses rotated into cryoSPARC's axes" in printed
    a, b = hom_run / "sel.star", hom_run / "sel.cs"
    ind = hom_run / "ind.npy"
    np.save(ind, fake_hom_run.input_index[:10])
    assert main(["select", str(hom_run), "--ind", str(ind), "-o", str(a), "-o", str(b)]) == 0
    printed = capsys.readouterr().out
    assert f"at the top of {a}" in printed and f"in {sidecar_path(b)}" in printed
    assert read_export_info(a).symmetry == read_export_info(b).symmetry == "D7"


def test_c1_run_writes_no_record(fake_hom_run: FakeRun, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(fake_hom_run.outdir, tmp_path / "run"))
    sel = export.select_particles(run)
    assert (sel.symmetry, sel.mask) == ("C1", None)
    for name in ("c1.star", "c1.cs"):
        out = export.write_selection(sel, tmp_path / name)
        assert read_export_info(out) is None and b"# cryofield" not in out.read_bytes()
        assert not sidecar_path(out).exists() and not export.cryosparc_map_path(out).exists()
    assert "recorded" not in capsys.readouterr().out


def test_flip_hand_of_groups_the_mirror_moves_inverts(hom_run: Path, capsys) -> None:
    """RELION's T (3-fold on z, 2-folds off the axes) mirrored along z is T about other
    axes; D7 mirrored is D7. A T run's hand is flipped by inversion (map V(-p), poses
    Rz(180) R), which keeps RELION's T axes (issue #23: before, a warning only)."""
    sel = export.select_particles(hom_run)
    R = np.asarray(sel.poses["rotations"], dtype=np.float64)[sel.rows]
    vol = np.asarray(read_mrc(RunDir(hom_run).volume_path(2), mmap=False)[0], np.float32)
    out = export.write_selection(sel, hom_run / "d7.star", flip_hand=True)
    assert "inversion" not in capsys.readouterr().out
    M = mirror_matrix().numpy()
    np.testing.assert_allclose(load_particle_table(out).rotations, M @ R @ M, atol=1e-5)
    _configure(hom_run, symmetry="T")
    out = export.write_selection(export.select_particles(hom_run), hom_run / "t.star",
                                 flip_hand=True)  # fmt: skip
    assert "flipped by inversion through the centre" in capsys.readouterr().out
    Rz = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(load_particle_table(out).rotations, Rz @ R, atol=1e-5)
    written = np.asarray(read_mrc(export.flipped_map_path(out), mmap=False)[0])
    np.testing.assert_array_equal(written, flip_hand_volume(vol, invert=True))
