"""``RunDir``: the one epoch chooser, the input table, the layout constants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cryofield.errors import CryofieldError
from cryofield.inference import rundir
from cryofield.inference.rundir import RunDir
from cryofield.io.metadata import load_particle_table
from cryofield.io.mrc import write_mrc


def _run(tmp_path: Path, done=(1, 2), partial=(), **cfg) -> RunDir:
    out = tmp_path / "run"
    out.mkdir(parents=True)
    (out / rundir.CONFIG_FILE).write_text(yaml.safe_dump(cfg or {"zdim": 0}))
    for e in (*done, *partial):
        (out / rundir.epoch_dirname(e)).mkdir()
    for e in done:
        (out / rundir.epoch_dirname(e) / rundir.DONE_FILE).write_text("ok\n")
    return RunDir(out)


def test_choose_epoch_last_complete_or_the_given_one(tmp_path, capsys) -> None:
    run = _run(tmp_path, done=(1, 2, 3), epochs=3)
    assert run.choose_epoch() == 3 and run.choose_epoch(2) == 2
    assert capsys.readouterr().out == ""  # a finished run: no note
    assert run.analyze_dir(3) == run.path / "analyze.3"


def test_unfinished_run_gives_its_last_complete_epoch_with_a_note(tmp_path, capsys) -> None:
    run = _run(tmp_path, done=(1, 2), partial=(3,), epochs=5)
    assert run.choose_epoch(verb="export") == 2
    out = capsys.readouterr().out
    assert "2 of 5 epochs complete; epoch 3 incomplete" in out
    assert "exporting epoch 2, its last complete checkpoint" in out
    assert run.choose_epoch(verb="analyse") == 2
    assert "analysing epoch 2" in capsys.readouterr().out


def test_choose_epoch_errors(tmp_path) -> None:
    run = _run(tmp_path, done=(1, 2), partial=(3,))
    with pytest.raises(CryofieldError, match=r"epoch 3 is missing or incomplete \(complete "
                       r"epochs: 1, 2\)"):  # fmt: skip
        run.choose_epoch(3)
    with pytest.raises(CryofieldError, match="epoch 7 is missing"):
        run.choose_epoch(7)
    empty = _run(tmp_path / "e", done=())
    with pytest.raises(CryofieldError, match=r"no complete epoch yet .*nothing to render"):
        empty.choose_epoch(verb="render")


def test_input_table_falls_back_to_the_config_particles(tmp_path) -> None:
    stack = tmp_path / "p.mrcs"
    write_mrc(stack, np.zeros((6, 8, 8), np.float32), 2.0)
    np.save(tmp_path / "ind.npy", np.array([1, 4]))
    run = _run(tmp_path, particles=str(stack), ind=str(tmp_path / "ind.npy"))
    table = run.input_table()  # no particles.npz: the config's file after its --ind
    np.testing.assert_array_equal(table.image_index, [1, 4])
    load_particle_table(stack).subset(np.array([0])).save_npz(run.path / rundir.TABLE_FILE)
    assert len(run.input_table()) == 1  # particles.npz wins
    bare = _run(tmp_path / "b")
    with pytest.raises(CryofieldError, match=r"no particles\.npz and no particles path"):
        bare.input_table()


def test_run_files_are_the_layout_constants() -> None:
    names = (rundir.CONFIG_FILE, rundir.LOG_FILE, rundir.METRICS_FILE, rundir.TABLE_FILE,
             rundir.PARTICLES_STAR, rundir.VERDICT_FILE)  # fmt: skip
    assert set(names) <= set(rundir.RUN_FILES)
