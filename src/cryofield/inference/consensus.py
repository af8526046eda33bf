"""Consensus map of a homogeneous run: back-projection of the images with learned poses.

The neural field is a smooth, band-limited model of the map; once the poses are learned,
a direct Fourier back-projection of the images with those poses and their CTFs
(:class:`cryofield.physics.backproject.FourierBackprojector`, Wiener-regularised) uses
all the signal the data hold at every frequency, as the final reconstruction step of
RELION or cryoSPARC would. Two half sets (even / odd particles) give the half-map FSC
(gold standard; Henderson et al. 2012, Structure 20:205) and its 0.143 resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryofield.io.mrc import write_mrc
from cryofield.logs import get_logger
from cryofield.physics.backproject import FourierBackprojector
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc, resolution_at

log = get_logger("train")


def backproject_halves(
    images: object,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    ctf: CTFParams | None,
    apix_A: float,
    sign: float = 1.0,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-project even and odd particles separately, streaming the images in chunks.

    Parameters
    ----------
    images
        Indexable by an index array, returning ``(B, D, D)`` images (e.g. a
        :class:`~cryofield.io.particles.ParticleSource`); ``len(images) = N``.
    rotations
        ``(N, 3, 3)`` poses.
    shifts_px
        ``(N, 2)`` translations in px of the images' box.
    ctf
        CTF of the ``N`` particles, or None.
    apix_A
        Pixel size of the images (A).
    sign
        ``-1`` to invert light-on-dark images so they meet the CTF model.
    chunk
        Images read at once.

    Returns
    -------
    full, half1, half2 : torch.Tensor
        ``(D, D, D)`` maps of all particles, the even ones and the odd ones.
    """
    n = rotations.shape[0]
    D = int(torch.as_tensor(images[np.array([0])]).shape[-1])
    halves = [FourierBackprojector(D), FourierBackprojector(D)]
    for start in tqdm(range(0, n, chunk), desc="consensus map", unit="chunk", leave=False):
        idx = np.arange(start, min(n, start + chunk))
        imgs = sign * torch.as_tensor(images[idx], dtype=torch.float32)
        for h, bp in enumerate(halves):
            sel = np.flatnonzero(idx % 2 == h)
            if sel.size == 0:
                continue
            rows = torch.as_tensor(idx[sel])
            bp.add_particles(
                imgs[sel], rotations[rows], shifts_px[rows],
                None if ctf is None else ctf.subset(rows), apix_A,
            )  # fmt: skip
    full = halves[0].merge(halves[1]).volume()
    return full, halves[0].volume(), halves[1].volume()


def write_consensus_map(
    outdir: Path,
    images: object,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    ctf: CTFParams | None,
    apix_A: float,
    sign: float = 1.0,
) -> dict[str, float]:
    """Write ``consensus.mrc``, ``consensus_half1/2.mrc`` and ``consensus_fsc.txt``.

    Returns the half-map FSC resolutions at 0.143 and 0.5 (A), also logged.
    """
    full, h1, h2 = backproject_halves(images, rotations, shifts_px, ctf, apix_A, sign)
    for name, vol in (("consensus", full), ("consensus_half1", h1), ("consensus_half2", h2)):
        write_mrc(outdir / f"{name}.mrc", vol.numpy().astype(np.float32), apix_A)
    curve = fsc(h1, h2)
    res = {
        "fsc0143_A": resolution_at(curve, 0.143, apix_A)[1],
        "fsc05_A": resolution_at(curve, 0.5, apix_A)[1],
    }
    shells = np.arange(curve.shape[0])
    table = np.stack([shells, shells / (curve.shape[0] * 2 * apix_A), curve.numpy()], 1)
    np.savetxt(outdir / "consensus_fsc.txt", table, fmt=["%d", "%.5f", "%.4f"],
               header="shell  frequency_1/A  fsc(half1, half2)")  # fmt: skip
    log.info("consensus map %s: half-map FSC 0.143 at %.1f A, 0.5 at %.1f A",
             outdir / "consensus.mrc", res["fsc0143_A"], res["fsc05_A"])  # fmt: skip
    return res
