"""``cryofield simulate`` end to end, checked with ``cryofield info`` and the truth file."""

from __future__ import annotations

import re
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import read_mrc, write_mrc
from cryofield.simulate.dataset import SimulationConfig
from cryofield.simulate.volumes import protein_like


def _info(capsys, path: Path) -> dict[str, str]:
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    return {
        "particles": re.search(r"^particles:\s+(\d+)", out, re.M).group(1),
        "box": re.search(r"^box:\s+(\d+) px", out, re.M).group(1),
        "apix": re.search(r"^pixel size:\s+([\d.]+) A", out, re.M).group(1),
        "contrast": re.search(r"^contrast:\s+(\S+)", out, re.M).group(1),
    }


def test_preset_outputs_agree_with_request(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "-o", str(out), "--preset", "demo-hetero", "-n", "240", "-D", "32",
            "--apix", "4.5", "--junk-fraction", "0.1", "--seed", "4", "--snr", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 240 particles (24 junk), D=32" in capsys.readouterr().out
    for name in ("particles.star", "particles.cs", "particles.mrcs"):
        info = _info(capsys, out / name)
        assert info["particles"] == "240" and info["box"] == "32", name
        assert float(info["apix"]) == pytest.approx(4.5), name
        assert info["contrast"] == "light-on-dark", name  # what truth.npz says
    with np.load(out / "truth.npz", allow_pickle=False) as t:
        assert str(t["contrast"]) == "light-on-dark"
        assert len(t["volume_paths"]) == 3 and int(t["is_junk"].sum()) == 24
        assert float(t["snr"]) == 1.0 and int(t["seed"]) == 4
    cfg = SimulationConfig.from_yaml(out / "simulation.yaml")
    assert (cfg.source, cfg.n_states, cfg.n_particles) == ("states", 3, 240)


def test_no_invert_and_noiseless(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "-o", str(out), "--builtin", "protein", "-n", "60", "-D", "32",
            "--apix", "5", "--snr", "inf", "--no-invert", "--shift-px", "0"]  # fmt: skip
    assert main(argv) == 0
    assert _info(capsys, out / "particles.star")["contrast"] == "dark-on-light"
    with np.load(out / "truth.npz", allow_pickle=False) as t:
        assert float(t["noise_std"]) == 0.0 and str(t["contrast"]) == "dark-on-light"
        assert np.abs(t["shifts_px"]).max() == 0.0
    # the written simulation.yaml reproduces the dataset exactly
    again = tmp_path / "again"
    assert main(["simulate", "-o", str(again), "--config", str(out / "simulation.yaml")]) == 0
    a, _ = read_mrc(out / "particles.mrcs")
    b, _ = read_mrc(again / "particles.mrcs")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_volume_and_pdb_inputs(tmp_path: Path, capsys) -> None:
    write_mrc(tmp_path / "a.mrc", protein_like(32), 3.0)
    out = tmp_path / "vol"
    assert main(["simulate", "-o", str(out), "--volume", str(tmp_path / "a.mrc"), "-n", "50"]) == 0
    table = load_particle_table(out / "particles.star")
    assert len(table) == 50 and table.box_px == 32
    np.testing.assert_allclose(table.apix_A, 3.0)

    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    rng = np.random.default_rng(0)
    for i, xyz in enumerate(np.cumsum(rng.normal(0, 2.2, size=(60, 3)), axis=0)):
        res = gemmi.Residue()
        res.name, res.seqid = "ALA", gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name, atom.element, atom.occ, atom.b_iso = "CA", gemmi.Element("C"), 1.0, 20.0
        atom.pos = gemmi.Position(*xyz)
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(tmp_path / "m.pdb"))
    out = tmp_path / "pdb"
    argv = ["simulate", "-o", str(out), "--pdb", str(tmp_path / "m.pdb"), "--apix", "2",
            "-D", "40", "-n", "40"]  # fmt: skip
    assert main(argv) == 0
    vol, info = read_mrc(out / "volumes/state_00.mrc")
    assert vol.shape == (40, 40, 40) and info.apix_A == pytest.approx(2.0)
    assert _info(capsys, out / "particles.cs")["box"] == "40"


def test_user_errors(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert (
        main(["simulate", "-o", str(tmp_path / "x"), "--pdb", "m.pdb", "--preset", "demo-homo"])
        == 2
    )
    assert "choose one of" in capsys.readouterr().err
    assert main(["simulate", "-o", str(tmp_path / "x"), "--pdb", "m.pdb"]) == 2
    assert "--apix" in capsys.readouterr().err
    assert main(["simulate", "-o", str(tmp_path / "x"), "-D", "31"]) == 2
    assert "D must be even" in capsys.readouterr().err
    assert main(["simulate", "-o", str(tmp_path / "x"), "--volume", str(tmp_path / "no.mrc")]) == 2
    assert "no.mrc" in capsys.readouterr().err


def test_simulate_never_writes_its_input_volume(tmp_path, capsys):
    vol = tmp_path / "volumes" / "state_00.mrc"  # a name simulate writes (and cleans up)
    vol.parent.mkdir()
    write_mrc(vol, protein_like(16, seed=1), 4.0)
    before = vol.read_bytes()
    assert main(["simulate", "-o", str(tmp_path), "--volume", str(vol), "-n", "8"]) == 2
    assert f"refusing to write {vol}: it is an input" in capsys.readouterr().err
    assert vol.read_bytes() == before and not (tmp_path / "particles.star").exists()
