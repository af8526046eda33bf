"""Optics that training cannot use: several pixel sizes are refused, ignored terms named."""

from __future__ import annotations

import numpy as np

from cryofield.cli.main import main
from cryofield.io.mrc import write_mrc


def _two_group_star(tmp_path, apix=(2.0, 2.5), extra_optics: str = "") -> str:
    write_mrc(tmp_path / "s.mrcs", np.random.default_rng(0).normal(size=(8, 16, 16)).astype(
        np.float32), 2.0)  # fmt: skip
    names = ["_rlnOpticsGroup", "_rlnOpticsGroupName", "_rlnImagePixelSize", "_rlnImageSize",
             "_rlnVoltage", "_rlnSphericalAberration", "_rlnAmplitudeContrast"]  # fmt: skip
    extra_names = [f"_{c.split('=')[0]}" for c in extra_optics.split()]
    extra_values = " ".join(c.split("=")[1] for c in extra_optics.split())
    optics = "\n".join(
        f"{g} group{g} {a} 16 300 2.7 0.1 {extra_values}" for g, a in enumerate(apix, start=1)
    )
    rows = "\n".join(f"{i + 1}@s.mrcs 10000 9800 0 {1 + i % 2}" for i in range(8))
    text = (
        "data_optics\nloop_\n" + "\n".join(names + extra_names) + f"\n{optics}\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        f"_rlnOpticsGroup\n{rows}\n"
    )
    path = tmp_path / "p.star"
    path.write_text(text)
    return str(path)


def test_train_refuses_several_pixel_sizes(tmp_path, capsys):
    star = _two_group_star(tmp_path)
    assert main(["train", star, "-o", str(tmp_path / "run")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("cryofield train: error:"), err
    assert "group 1: 2 A" in err[0] and "group 2: 2.5 A" in err[0] and "p.star" in err[0]


def test_info_names_ignored_optics(tmp_path, capsys):
    star = _two_group_star(tmp_path, (2.0, 2.0), "rlnBeamTiltX=0.5 rlnBeamTiltY=0 "
                           "rlnCtfDataAreCtfPremultiplied=1")  # fmt: skip
    assert main(["info", star]) == 0
    err = capsys.readouterr().err
    assert err.count("which cryofield ignores") == 1, err
    assert "beam tilt (rlnBeamTiltX)" in err and "rlnBeamTiltY" not in err  # Y is zero
    assert "CTF-premultiplied images (rlnCtfDataAreCtfPremultiplied)" in err
