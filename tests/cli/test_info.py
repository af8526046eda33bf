"""`cryofield info` on every interop file, and on bad files (exit 2, one line, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cryofield.cli.main import main
from cryofield.io.mrc import write_mrc

INTEROP = [
    "FinalRefinement-OriginalParticles-PfCRT.star",
    "cryosparc_J2_particles_exported.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "empiar_10076_7.cs",
    "empiar_10076_7.mrc",
    "empiar_10076_7.star",
    "relion31.6opticsgroups.star",
    "relion31.mrcs",
    "relion31.star",
    "relion31.v2.star",
    "relion5.star",
    "toy_projections.mrcs",
    "toy_projections.star",
]


def _field(out: str, name: str) -> str:
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{name}:"))
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("name", INTEROP)
def test_info_on_interop_files(interop_data, capsys, name):
    assert main(["info", str(interop_data / name)]) == 0
    out = capsys.readouterr().out
    for key in ("particles", "box", "pixel size", "optics groups", "CTF", "poses", "images"):
        assert _field(out, key)


def test_info_numbers(interop_data, capsys):
    main(["info", str(interop_data / "relion31.6opticsgroups.star")])
    out = capsys.readouterr().out
    assert _field(out, "particles") == "139"
    assert _field(out, "box") == "196 px"
    assert _field(out, "pixel size") == "1.24 - 1.25 A"
    assert _field(out, "optics groups") == "6"
    assert "group 4: 7 particles, 1.25 A/px, 200 kV, Cs 2.6 mm" in out
    assert "rlnOriginXAngst" in _field(out, "poses")
    assert "not found" in _field(out, "images")  # stacks are not shipped: said, no crash

    main(["info", str(interop_data / "empiar_10076_7.star")])
    out = capsys.readouterr().out
    assert _field(out, "particles") == "7" and _field(out, "box") == "320 px"
    assert _field(out, "contrast").startswith("dark-on-light")
    assert _field(out, "poses") == "none"

    main(["info", str(interop_data / "cryosparc_P12_J24_001_particles.cs")])
    out = capsys.readouterr().out
    assert _field(out, "particles") == "2019" and _field(out, "pixel size") == "2.95 A"
    assert "alignments3D/pose" in _field(out, "poses")


def test_info_with_ind(interop_data, tmp_path, capsys):
    np.save(tmp_path / "keep.npy", np.array([0, 2, 4]))
    assert main(["info", str(interop_data / "toy_projections.star"), "--ind",
                 str(tmp_path / "keep.npy")]) == 0  # fmt: skip
    assert _field(capsys.readouterr().out, "particles") == "3 (of 1000, after --ind)"


def test_info_bad_file_exits_2_without_traceback(tmp_path):
    p = write_mrc(tmp_path / "t.mrcs", np.zeros((4, 16, 16), np.float32), 1.0)
    p.write_bytes(p.read_bytes()[:-500])
    (tmp_path / "x.mrcs").write_text("hello\n" * 300)
    for bad in (p, tmp_path / "x.mrcs"):
        res = subprocess.run(
            [sys.executable, "-m", "cryofield.cli.main", "info", str(bad)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2
        assert "Traceback" not in res.stderr
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and bad.name in err[0] and err[0].startswith("cryofield info: error:")


def test_info_on_a_volume(tmp_path, capsys):
    # a 64^3 map used to be reported as 64 particles
    vol = np.zeros((64, 64, 64), np.float32)
    vol[20:40, 20:40, 20:40] = 2.0
    vol[0, 0, 0] = -1.0
    path = write_mrc(tmp_path / "vol.mrc", vol, 1.5)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "particles:" not in out
    assert _field(out, "volume").startswith("64 x 64 x 64 voxels; not a particle stack")
    assert _field(out, "box") == "64 px" and _field(out, "pixel size") == "1.5 A"
    mean = float(vol.astype(np.float64).mean())
    assert _field(out, "density") == f"min -1, max 2, mean {mean:.4g}"
    assert main(["info", str(path), "--ind", str(tmp_path / "keep.npy")]) == 2
    assert "a volume, not particles: --ind do not apply" in capsys.readouterr().err
    # the same data named .mrcs is a stack of 64 images
    stack = write_mrc(tmp_path / "vol.mrcs", vol, 1.5)
    assert main(["info", str(stack)]) == 0
    assert _field(capsys.readouterr().out, "particles") == "64"


def test_info_on_interop_volume_and_ispg1_stack(interop_data, capsys):
    assert main(["info", str(interop_data / "hand-vol.mrc")]) == 0
    out = capsys.readouterr().out
    assert _field(out, "box") == "64 px" and "particles:" not in out
    assert main(["info", str(interop_data / "empiar_10076_7.mrc")]) == 0  # ISPG 1, 7 images
    assert _field(capsys.readouterr().out, "particles") == "7"
