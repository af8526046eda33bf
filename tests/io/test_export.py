"""write_particles: poses/latents/classes back into .star and .cs, proven by reconstruction.

A small noiseless simulated set (known poses) is read WITHOUT its poses, the true poses are
exported, the file is read back with cryofield's own reader, and a back-projection from
the read-back poses must match the true volume (FSC > 0.9 at low resolution).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from numpy.lib import recfunctions as rfn

from cryofield.errors import CryofieldError
from cryofield.io.export import latent_column_names, latent_field_names, write_particles
from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.mrc import read_mrc
from cryofield.io.poses import internal_to_cryosparc, internal_to_relion
from cryofield.io.star import original_link_columns, write_star
from cryofield.physics.backproject import reconstruct_fourier
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc
from cryofield.physics.handedness import flip_hand_poses, flip_hand_volume
from cryofield.physics.rotation import random_rotations

N, D = 300, 32
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnOriginX", "rlnOriginY")  # fmt: skip
CS_POSE_FIELDS = ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A")


@pytest.fixture(scope="module")
def sim(simulated) -> Path:
    """A noiseless simulated dataset of N particles (D=32, 6 A/px) with exact truth."""
    return simulated(N, D, 6.0, seed=7)[0]


@pytest.fixture(scope="module")
def truth(simulated) -> dict[str, np.ndarray]:
    return simulated(N, D, 6.0, seed=7)[1]


@pytest.fixture(scope="module")
def true_volume(sim: Path, truth: dict[str, np.ndarray]) -> torch.Tensor:
    vol, _ = read_mrc(sim / str(truth["volume_paths"][0]), mmap=False)
    return torch.as_tensor(np.asarray(vol, dtype=np.float32))


def without_poses(table: ParticleTable) -> ParticleTable:
    """The table as an ab initio run sees it: no pose columns anywhere."""
    raw = table.raw
    if isinstance(raw, pd.DataFrame):
        raw = raw.drop(columns=[c for c in POSE_COLUMNS if c in raw.columns])
    else:
        drop = [f for f in CS_POSE_FIELDS if f in raw.dtype.names]
        raw = rfn.drop_fields(raw, drop, usemask=False)
    return replace(table, raw=raw, rotations=None, shifts_px=None)


def reconstruct(table: ParticleTable) -> torch.Tensor:
    """Back-project a table's own images with its own poses and CTF."""
    stacks = {}
    images = np.zeros((len(table), table.box_px, table.box_px), dtype=np.float32)
    for i, (p, k) in enumerate(zip(table.image_paths, table.image_index, strict=True)):
        if p not in stacks:
            stacks[p] = np.asarray(read_mrc(p, mmap=False)[0])
        images[i] = stacks[p][k]
    return reconstruct_fourier(
        torch.as_tensor(images),
        torch.as_tensor(table.rotations),
        torch.as_tensor(table.shifts_px),
        CTFParams.from_table(table),
        torch.as_tensor(table.apix_A, dtype=torch.float32),
    )


def low_res_fsc(vol: torch.Tensor, ref: torch.Tensor, sign: float) -> torch.Tensor:
    """FSC shells 1 .. D/4 (resolution 2 * D * apix / D = 12 A .. 48 A here)."""
    return fsc(sign * vol, ref)[1 : D // 4]


@pytest.mark.parametrize(
    ("source", "suffix"),
    [("particles.star", ".star"), ("particles.cs", ".cs"), ("particles.cs", ".star")],
)
def test_true_poses_exported_reconstruct_the_volume(
    sim: Path, truth: dict, true_volume: torch.Tensor, tmp_path: Path, source: str, suffix: str
) -> None:
    table = without_poses(load_particle_table(sim / source))
    assert table.rotations is None
    out = write_particles(tmp_path / f"run{suffix}", table, rotations=truth["rotations"],
                          shifts_px=truth["shifts_px"])  # fmt: skip
    back = load_particle_table(out)
    assert len(back) == N
    np.testing.assert_allclose(back.rotations, truth["rotations"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(back.shifts_px, truth["shifts_px"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(back.image_index, table.image_index)
    assert all(os.path.samefile(a, b) for a, b in zip(back.image_paths, table.image_paths,
                                                         strict=True))  # fmt: skip
    np.testing.assert_allclose(back.ctf["defocus_u_A"], table.ctf["defocus_u_A"], rtol=1e-6)
    sign = -1.0 if truth["invert"] else 1.0
    curve = low_res_fsc(reconstruct(back), true_volume, sign)
    assert curve.min() > 0.9, curve


def test_flip_hand_export_reconstructs_the_mirrored_map(
    sim: Path, truth: dict, true_volume: torch.Tensor, tmp_path: Path
) -> None:
    table = without_poses(load_particle_table(sim / "particles.star"))
    R_flip, t_flip = flip_hand_poses(truth["rotations"], truth["shifts_px"])
    back = load_particle_table(
        write_particles(tmp_path / "flipped.star", table, rotations=R_flip, shifts_px=t_flip)
    )
    sign = -1.0 if truth["invert"] else 1.0
    recon = reconstruct(back)
    assert low_res_fsc(recon, flip_hand_volume(true_volume), sign).min() > 0.9
    assert low_res_fsc(recon, true_volume, sign).mean() < 0.8  # a chiral object


def test_external_readers_see_poses_latents_classes(sim: Path, truth: dict, tmp_path: Path) -> None:
    from cryosparc.dataset import Dataset

    table = without_poses(load_particle_table(sim / "particles.star"))
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, 3)).astype(np.float32)
    classes = rng.integers(0, 4, size=N)
    R, t = truth["rotations"], truth["shifts_px"]
    star = write_particles(tmp_path / "a.star", table, rotations=R, shifts_px=t, latents=z,
                           classes=classes)  # fmt: skip
    cs = write_particles(tmp_path / "a.cs", table, rotations=R, shifts_px=t, latents=z,
                         classes=classes)  # fmt: skip

    blocks = starfile.read(star, always_dict=True)
    df = blocks["particles"]
    assert "optics" in blocks and len(df) == N
    euler, origin_px = internal_to_relion(R, t)
    np.testing.assert_allclose(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], euler,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(df[["rlnOriginXAngst", "rlnOriginYAngst"]], origin_px * 6.0,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(df[latent_column_names(3)].to_numpy(), z, rtol=1e-6)
    np.testing.assert_array_equal(df["rlnClassNumber"].to_numpy(), classes + 1)

    ds = Dataset.load(str(cs))
    assert len(ds) == N
    pose, shift = internal_to_cryosparc(R, t)
    np.testing.assert_allclose(ds["alignments3D/pose"], pose, atol=1e-5)
    np.testing.assert_allclose(ds["alignments3D/shift"], shift, atol=1e-5)
    np.testing.assert_allclose(ds["alignments3D/psize_A"], 6.0)
    np.testing.assert_array_equal(ds["alignments3D/class"], classes)
    for k, name in enumerate(latent_field_names(3)):
        np.testing.assert_allclose(ds[name], z[:, k], rtol=1e-6)
    assert int(ds["blob/idx"][5]) == int(table.image_index[5])


def _cs_columns(arr: np.ndarray) -> set[str]:
    cols = set()
    for name in arr.dtype.names:
        shape = arr.dtype.fields[name][0].shape
        cols |= {name} if not shape else {f"{name}.{k}" for k in range(int(np.prod(shape)))}
    return cols


def test_cross_format_keeps_every_particle_and_column(sim: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    R = random_rotations(N, torch.Generator().manual_seed(1)).numpy()
    t = rng.normal(size=(N, 2))
    # .cs -> .star: every .cs field is a column, values kept, poses are the new ones
    cs_table = load_particle_table(sim / "particles.cs")
    star = write_particles(tmp_path / "from_cs.star", cs_table, rotations=R, shifts_px=t)
    df = starfile.read(star, always_dict=True)["particles"]
    assert len(df) == N
    assert _cs_columns(cs_table.raw) <= set(df.columns)
    np.testing.assert_allclose(df["ctf/df1_A"], cs_table.raw["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_array_equal(df["blob/idx"], cs_table.raw["blob/idx"])
    assert [int(u) for u in df["uid"].astype(str)] == cs_table.raw["uid"].tolist()
    pose, _ = internal_to_cryosparc(R, t)
    np.testing.assert_allclose(df["alignments3D/pose.1"], pose[:, 1], atol=1e-5)  # not stale
    # .star -> .cs: every particle and optics column is a field
    star_table = load_particle_table(sim / "particles.star")
    cs = write_particles(tmp_path / "from_star.cs", star_table, rotations=R, shifts_px=t)
    arr = np.load(cs, allow_pickle=False)
    assert len(arr) == N
    wanted = set(star_table.raw.columns) | set(star_table.raw_optics.columns)
    assert wanted <= set(arr.dtype.names)
    np.testing.assert_allclose(arr["rlnDefocusU"], star_table.raw["rlnDefocusU"])
    names = [s.decode() for s in arr["rlnImageName"]]
    assert names == star_table.raw["rlnImageName"].astype(str).tolist()
    euler, _ = internal_to_relion(R, t)
    np.testing.assert_allclose(arr["rlnAngleTilt"], euler[:, 1], atol=1e-6)  # not stale
    # and each round trip reads back with the same particles
    for path in (star, cs):
        back = load_particle_table(path)
        np.testing.assert_allclose(back.rotations, R, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(back.image_index, star_table.image_index)


def test_subset_order_paths_and_atomicity(sim: Path, truth: dict, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.star")
    idx = np.array([17, 3, 250, 3])
    R = truth["rotations"][idx]
    inside = write_particles(sim / "subset_test.star", table, indices=idx, rotations=R)
    try:
        back = load_particle_table(inside)
        np.testing.assert_array_equal(back.image_index, table.image_index[idx])
        np.testing.assert_allclose(back.rotations, R, atol=1e-5, rtol=0)
        np.testing.assert_allclose(back.shifts_px, 0.0, atol=1e-6)  # new poses, zero shifts
        name = starfile.read(inside, always_dict=True)["particles"]["rlnImageName"][0]
        assert not name.split("@")[1].startswith("/")  # relative: the stack is beside it
    finally:
        inside.unlink()
    outside = write_particles(tmp_path / "elsewhere.cs", table, indices=idx)
    arr = np.load(outside, allow_pickle=False)
    assert Path(arr["blob/path"][0].decode()).is_absolute()  # absolute: not below the output
    back = load_particle_table(outside)  # the table's own poses are kept when none are given
    np.testing.assert_allclose(back.rotations, table.rotations[idx], atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.cs"]  # no temp files


def test_bad_arguments_are_refused_and_write_nothing(sim: Path, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.star")
    with pytest.raises(CryofieldError, match=r"must end in \.star or \.cs"):
        write_particles(tmp_path / "x.mrcs", table)
    with pytest.raises(CryofieldError, match="no particles selected"):
        write_particles(tmp_path / "x.star", table, indices=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="rotations has 5 rows"):
        write_particles(tmp_path / "x.star", table, rotations=np.tile(np.eye(3), (5, 1, 1)))
    with pytest.raises(ValueError, match="non-negative"):
        write_particles(tmp_path / "x.cs", table, classes=-np.ones(N))
    with pytest.raises(ValueError, match="not both"):
        write_particles(tmp_path / "x.cs", table, shifts_px=np.zeros((N, 2)),
                        shifts_A=np.zeros((N, 2)))  # fmt: skip
    with pytest.raises(CryofieldError, match="out of range"):
        write_particles(tmp_path / "x.star", table, indices=np.array([N]))
    assert list(tmp_path.iterdir()) == []


def test_shifts_in_angstrom_are_divided_by_the_table_pixel_size(sim: Path, tmp_path: Path) -> None:
    table = load_particle_table(sim / "particles.cs")
    t_A = np.random.default_rng(2).normal(size=(N, 2)) * 10.0
    back = load_particle_table(
        write_particles(tmp_path / "a.cs", table, rotations=table.rotations, shifts_A=t_A)
    )
    np.testing.assert_allclose(back.shifts_px, t_A / 6.0, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ real interop files
INTEROP = [
    "empiar_10076_7.star",
    "empiar_10076_7.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "cryosparc_J2_particles_exported.cs",
    "relion31.6opticsgroups.star",
    "FinalRefinement-OriginalParticles-PfCRT.star",
]


@pytest.mark.parametrize("name", INTEROP)
@pytest.mark.parametrize("suffix", [".star", ".cs"])
def test_interop_files_round_trip(interop_data: Path, tmp_path: Path, name: str,
                                  suffix: str) -> None:  # fmt: skip
    from cryosparc.dataset import Dataset

    table = load_particle_table(interop_data / name)
    n = len(table)
    R = random_rotations(n, torch.Generator().manual_seed(3)).numpy()
    t = np.random.default_rng(3).normal(size=(n, 2)) * 3
    z = np.random.default_rng(4).normal(size=(n, 2))
    out = write_particles(tmp_path / f"out{suffix}", table, rotations=R, shifts_px=t, latents=z,
                          classes=np.arange(n) % 3)  # fmt: skip
    back = load_particle_table(out)
    assert len(back) == n
    np.testing.assert_allclose(back.rotations, R, atol=1e-5, rtol=0)
    np.testing.assert_allclose(back.shifts_px, t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(back.apix_A, table.apix_A, rtol=1e-6)
    np.testing.assert_array_equal(back.image_index, table.image_index)
    for key in ("defocus_u_A", "defocus_v_A", "voltage_kV", "cs_mm"):
        np.testing.assert_allclose(back.ctf[key], table.ctf[key], rtol=1e-5)
    if suffix == ".cs":
        arr = np.load(out, allow_pickle=False)
        assert len(Dataset.load(str(out))) == n
        np.testing.assert_array_equal(arr["alignments3D/class"], np.arange(n) % 3)
        if table.source_format == "cs":  # every untouched original field is bit-identical
            changed = {"blob/path", "alignments3D/class", *CS_POSE_FIELDS}
            for f in table.raw.dtype.names:
                if f not in changed:
                    np.testing.assert_array_equal(arr[f], table.raw[f], err_msg=f)
        else:
            assert set(table.raw.columns) <= set(arr.dtype.names)
    else:
        blocks = starfile.read(out, always_dict=True)
        df = next(v for k, v in blocks.items() if k != "optics")
        np.testing.assert_array_equal(df["rlnClassNumber"], np.arange(n) % 3 + 1)
        np.testing.assert_allclose(df[latent_column_names(2)].to_numpy(), z, rtol=1e-6)
        if table.source_format == "star":  # every untouched original column is identical
            changed = {"rlnImageName", "rlnClassNumber", *POSE_COLUMNS}
            for c in table.raw.columns:
                if c not in changed:
                    assert df[c].astype(str).tolist() == table.raw[c].astype(str).tolist(), c
            if table.raw_optics is not None:
                pd.testing.assert_frame_equal(blocks["optics"], table.raw_optics)
        else:
            assert _cs_columns(table.raw) <= set(df.columns)


# ------------------------------------------------------- downsampled input particles
def test_downsampled_table_is_written_as_its_original_particles(
    interop_data: Path, tmp_path: Path
) -> None:
    orig = load_particle_table(interop_data / "relion31.star")  # 256 px, 2.806 A/px
    star = tmp_path / "small.star"
    names = [f"{i + 1:06d}@small.mrcs" for i in range(len(orig))]
    write_star(star, orig, image_names=names, box_px=64,
               extra_columns=original_link_columns(orig, tmp_path))  # fmt: skip
    small = load_particle_table(star)  # what 'cryofield downsample' writes: 11.224 A/px
    rows = np.array([4, 0, 2])
    R = random_rotations(len(rows), torch.Generator().manual_seed(1)).numpy()
    t_small = np.random.default_rng(1).uniform(-3, 3, size=(len(rows), 2))  # 64-px pixels
    for suffix in (".star", ".cs"):
        for kw in ({"shifts_px": t_small}, {"shifts_A": t_small * 2.806 * 4}):
            out = write_particles(tmp_path / f"full{suffix}", small, indices=rows, rotations=R,
                                  classes=np.array([0, 1, 1]), **kw)  # fmt: skip
            back = load_particle_table(out)
            np.testing.assert_array_equal(back.image_paths, orig.image_paths[rows])
            np.testing.assert_array_equal(back.image_index, orig.image_index[rows])
            np.testing.assert_allclose(back.apix_A, 2.806, rtol=1e-6)
            assert back.box_px == 256
            np.testing.assert_allclose(back.rotations, R, atol=1e-5, rtol=0)
            np.testing.assert_allclose(back.shifts_px, t_small * 4, atol=1e-4, rtol=0)
            np.testing.assert_allclose(back.ctf["defocus_u_A"], orig.ctf["defocus_u_A"][rows])
    df = starfile.read(tmp_path / "full.star", always_dict=True)["particles"]
    assert "rlnCryofieldOriginalImageSize" not in df.columns
    np.testing.assert_array_equal(df["rlnImageOriginalName"],  # RELION's own, as it was
                                  orig.raw["rlnImageOriginalName"].to_numpy()[rows])  # fmt: skip
    # explicitly the downsampled particles
    out = write_particles(tmp_path / "small_out.star", small, indices=rows, rotations=R,
                          shifts_px=t_small, downsampled=True)  # fmt: skip
    back = load_particle_table(out)
    np.testing.assert_allclose(back.apix_A, 2.806 * 4, rtol=1e-12)
    np.testing.assert_allclose(back.shifts_px, t_small, atol=1e-4, rtol=0)
    assert all(p.endswith("small.mrcs") for p in back.image_paths)
    # originals that have gone: an error naming the file, nothing written
    gone = replace(small, raw=small.raw.assign(rlnImageOriginalName="1@/nowhere/p.mrcs"))
    with pytest.raises(CryofieldError, match=r"/nowhere/p\.mrcs"):
        write_particles(tmp_path / "never.star", gone, rotations=np.tile(np.eye(3), (5, 1, 1)))
    assert not (tmp_path / "never.star").exists()
