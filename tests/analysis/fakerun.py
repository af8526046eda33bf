"""Builder of a small fake training run that follows the run-directory contract exactly.

``docs/dev/contracts.md`` ("Train output directory"): config.yaml, metrics.jsonl,
particles.npz (the table after --ind), epoch_NNN/{weights.pt, poses.npz, latents.npz,
volume.mrc, DONE}. The images are real projections of a blob map with known poses, so
half-map reconstructions and pose scores have an exact truth (``truth.npz`` in the
layout of ``simulate_dataset``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.spatial.transform import Rotation

from cryofield.io.metadata import ParticleTable
from cryofield.io.mrc import write_mrc
from cryofield.model.field import HartleyField
from cryofield.physics.slicing import project_real_space

D = 16
APIX_A = 3.0
N_INPUT = 90


@dataclass
class FakeRun:
    """Paths and truth of a fake run."""

    outdir: Path
    truth_path: Path
    volume_path: Path
    input_index: np.ndarray  # particle_index: rows of the input table used by the run
    labels_true: np.ndarray  # (N_INPUT,)
    G: np.ndarray  # global rotation: R_pred = R_true @ G
    zdim: int


def blob_volume(d: int = D, seed: int = 0) -> np.ndarray:
    """(d, d, d) sum of Gaussian blobs, asymmetric (for alignment and hand tests)."""
    rng = np.random.default_rng(seed)
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    p = np.stack([x, y, z], -1).astype(np.float64)
    centres = rng.normal(size=(5, 3)) * d / 9
    vol = sum(np.exp(-((p - cc) ** 2).sum(-1) / (2 * (d / 14) ** 2)) for cc in centres)
    return vol.astype(np.float32)


def _input_table(folder: Path, rotations: np.ndarray, vol: np.ndarray) -> ParticleTable:
    """Write a real stack of projections and return a RELION-like table over it."""
    imgs = project_real_space(torch.tensor(vol), torch.tensor(rotations, dtype=torch.float32))
    stack = folder / "particles.mrcs"
    write_mrc(stack, imgs.numpy(), APIX_A)
    n = len(rotations)
    raw = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnDefocusU": np.full(n, 15000.0),
            "rlnDefocusV": np.full(n, 14800.0),
            "rlnDefocusAngle": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnRandomSubset": (np.arange(n) % 2) + 1,
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [APIX_A],
            "rlnImageSize": [D],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    return ParticleTable(
        image_paths=np.full(n, str(stack.resolve())),
        image_index=np.arange(n),
        apix_A=np.full(n, APIX_A),
        box_px=D,
        ctf=None,
        rotations=None,
        shifts_px=None,
        optics_group=np.ones(n, dtype=np.int64),
        source_path=str(folder / "particles.star"),
        source_format="star",
        raw=raw,
        raw_optics=optics,
        raw_block="particles",
    )


def make_fake_run(folder: Path, zdim: int, seed: int = 0, mirrored: bool = False) -> FakeRun:
    """Build input data, truth and a run directory in ``folder``.

    The run's frame is the truth's under ``W(p) = V(Q p)``, ``Q = G`` or (mirrored, the
    wrong hand) ``Q = M G``; its poses are then ``R G`` or ``M R M G``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    vol = blob_volume(D, seed)
    R_true = Rotation.random(N_INPUT, random_state=seed + 1).as_matrix().astype(np.float32)
    table = _input_table(data, R_true, vol)
    labels = np.arange(N_INPUT) % 3
    coord = np.where(labels == 0, rng.uniform(size=N_INPUT), np.nan)
    vol_path = write_mrc(data / "state_00.mrc", vol, APIX_A)
    truth = data / "truth.npz"
    np.savez(
        truth,
        rotations=R_true,
        shifts_px=np.zeros((N_INPUT, 2), np.float32),
        labels=labels,
        is_junk=np.zeros(N_INPUT, bool),
        coord=coord,
        defocus_u_A=np.full(N_INPUT, 15000.0),
        snr=np.array(np.inf),
        seed=np.array(seed),
        apix_A=np.array(APIX_A),
        D=np.array(D),
        volume_paths=np.array(["state_00.mrc"]),
    )
    # the run used --ind: particles 5 .. 84 of the input
    ind = np.arange(5, N_INPUT - 5)
    out = folder / (("run_het" if zdim else "run_hom") + ("_mirror" if mirrored else ""))
    out.mkdir()
    cfg = {
        "particles": str(data / "particles.star"),
        "ind": None,
        "zdim": zdim,
        "D": D,
        "seed": seed,
        "outdir": str(out),
    }
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    table.subset(ind).save_npz(out / "particles.npz")
    lines = [
        {
            "epoch": e,
            "phase": "hps" if e == 1 else "sgd",
            "loss": 1.0 / e,
            "radius_px": 4 + 2 * e,
            "images_s": 100.0,
            "time_s": 1.0 * e,
        }
        for e in (1, 2)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    G = Rotation.random(random_state=seed + 7).as_matrix()
    M = np.diag([1.0, 1.0, -1.0])
    Q = M @ G if mirrored else G
    R_run = (M @ R_true[ind] @ M @ G) if mirrored else (R_true[ind] @ G)
    torch.manual_seed(seed)
    field = HartleyField(D=D, apix_A=APIX_A, zdim=zdim, hidden=32, layers=1, n_freqs=8)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    for epoch in (1, 2):
        ed = out / f"epoch_{epoch:03d}"
        ed.mkdir()
        torch.save({"state_dict": field.state_dict(), "hparams": field.hparams}, ed / "weights.pt")
        np.savez(
            ed / "poses.npz",
            rotations=R_run.astype(np.float32),
            shifts_px=np.zeros((len(ind), 2), np.float32),
            shifts_A=np.zeros((len(ind), 2), np.float32),
            particle_index=ind.astype(np.int64),
        )
        if zdim:
            z = centres[labels[ind], :zdim] + rng.normal(size=(len(ind), zdim)) * 0.3
            np.savez(ed / "latents.npz", z=z.astype(np.float32))
        else:
            # the map in the frame of the run's poses: W(p) = V(Q p) = rotate_volume(V, Q^T)
            from cryofield.analysis.align import rotate_volume

            Qt = torch.tensor(Q.T, dtype=torch.float32)[None]
            w = rotate_volume(torch.tensor(vol), Qt)[0].numpy()
            write_mrc(ed / "volume.mrc", w, APIX_A)
        (ed / "DONE").write_text("")
    return FakeRun(out, truth, vol_path, ind, labels, G, zdim)
