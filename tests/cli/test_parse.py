"""`cryofield parse`: a safe .npz table from any input, equal to the direct read."""

from __future__ import annotations

import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.io.metadata import load_particle_table


@pytest.mark.parametrize(
    "name", ["empiar_10076_7.star", "empiar_10076_7.cs", "relion31.star", "toy_projections.mrcs"]
)
def test_parse_writes_equal_table(interop_data, tmp_path, capsys, name):
    out = tmp_path / "t.npz"
    assert main(["parse", str(interop_data / name), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ref = load_particle_table(interop_data / name)
    with np.load(out, allow_pickle=False) as z:  # plain arrays only
        assert "image_paths" in z.files
    t = load_particle_table(out)
    assert len(t) == len(ref) and t.box_px == ref.box_px
    np.testing.assert_array_equal(t.image_paths, ref.image_paths)
    np.testing.assert_array_equal(t.apix_A, ref.apix_A)
    if ref.ctf is not None:
        for k in ref.ctf:
            np.testing.assert_array_equal(t.ctf[k], ref.ctf[k])
    if ref.rotations is not None:
        np.testing.assert_array_equal(t.rotations, ref.rotations)


def test_parse_attaches_cryodrgn_pickles(interop_data, tmp_path):
    out = tmp_path / "toy.npz"
    assert main(["parse", str(interop_data / "toy_projections.mrcs"), "--poses",
                 str(interop_data / "toy_angles.pkl"), "-o", str(out)]) == 0  # fmt: skip
    t = load_particle_table(out)
    assert t.rotations.shape == (1000, 3, 3)


def test_parse_fails_when_stacks_missing(interop_data, tmp_path, capsys):
    cs = interop_data / "cryosparc_P12_J24_001_particles.cs"
    assert main(["parse", str(cs), "-o", str(tmp_path / "a.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "a.npz").exists()
    assert main(["parse", str(cs), "--no-image-check", "-o", str(tmp_path / "a.npz")]) == 0
    assert len(load_particle_table(tmp_path / "a.npz")) == 2019


def test_parse_never_writes_its_input(tmp_path, capsys):
    from cryofield.io.mrc import write_mrc

    stack = write_mrc(tmp_path / "p.mrcs", np.zeros((2, 8, 8), np.float32), 2.0)
    table = tmp_path / "t.npz"
    assert main(["parse", str(stack), "-o", str(table)]) == 0
    before = table.read_bytes()
    for inp, out in ((table, table), (stack, stack)):
        assert main(["parse", str(inp), "-o", str(out)]) == 2
        assert f"refusing to write {out}: it is an input" in capsys.readouterr().err
    assert table.read_bytes() == before
