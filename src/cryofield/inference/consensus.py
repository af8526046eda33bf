"""Consensus map of a homogeneous run: back-projection of the images with learned poses.

The neural field is a smooth, band-limited model of the map; once the poses are learned,
a direct Fourier back-projection of the images with those poses and their CTFs
(:class:`cryofield.physics.backproject.FourierBackprojector`, Wiener-regularised) uses
all the signal the data hold at every frequency, as the final reconstruction step of
RELION or cryoSPARC would. Two half sets (even / odd particles) give the half-map FSC
(gold standard; Henderson et al. 2012, Structure 20:205) and its 0.143 resolution.

:func:`backproject_sets` is the one loop that back-projects the even and the odd images
into two half maps: used here, by ``cryofield backproject`` (:func:`reconstruct_particles`),
by the half-map FSC of ``analyze`` (:func:`cryofield.analysis.report.half_map_fsc`) and by
the gold-standard refinement (:func:`cryofield.inference.refine.backproject_halves_batched`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cryofield.io.mrc import write_mrc
from cryofield.logs import get_logger
from cryofield.physics.backproject import FourierBackprojector
from cryofield.physics.ctf import CTFParams
from cryofield.physics.fsc import fsc, resolution_at

log = get_logger("train")


def backproject_sets(
    images: Any,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    ctf: CTFParams | None,
    apix_A: float | np.ndarray | torch.Tensor,
    *,
    rows: np.ndarray | None = None,
    sets: np.ndarray | None = None,
    n_sets: int = 2,
    sign: float = 1.0,
    chunk: int = 512,
    pad_factor: int = 2,
    progress: str | None = None,
    symmetry: torch.Tensor | None = None,
) -> list[FourierBackprojector]:
    """Back-project images into ``n_sets`` maps: by default the even and the odd images.

    The one implementation of "back-project the even and odd images into two half maps"
    (the consensus map of ``train``, ``backproject --half-maps``, the half-map FSC of
    ``analyze`` and the gold-standard pose refinement). Images are read ``chunk`` at a
    time; the accumulators live on the images' device.

    Parameters
    ----------
    images
        Indexable by an array of image indices, returning ``(B, D, D)`` images (e.g. a
        :class:`~cryofield.io.particles.ParticleSource`).
    rotations, shifts_px
        ``(n, 3, 3)`` poses and ``(n, 2)`` translations (px of the images' box) of the
        ``n`` images back-projected, in order.
    ctf
        CTF of those ``n`` images, or None.
    apix_A
        Pixel size of the images (A): a scalar or ``(n,)``.
    rows
        ``(n,)`` image indices of the poses (default ``arange(n)``).
    sets
        ``(n,)`` set (``0 .. n_sets - 1``) of each image; default ``rows % n_sets``, i.e.
        even / odd image index for two sets, everything for one.
    sign
        ``-1`` to invert light-on-dark images so they meet the CTF model.
    chunk, pad_factor, progress
        Images read at once; Fourier oversampling (:class:`FourierBackprojector`); the
        label of a progress bar (None: no bar).
    symmetry
        ``(G, 3, 3)`` point-group operators
        (:func:`cryofield.physics.symmetry.symmetry_operators`): each image is inserted at
        its ``G`` equivalent poses; None: no symmetry.

    Returns
    -------
    list of FourierBackprojector
        One accumulator per set: ``.volume()`` gives its map, ``a.merge(b)`` both.
    """
    n = rotations.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    sets = rows % n_sets if sets is None else np.asarray(sets, dtype=np.int64)
    if rows.shape != (n,) or sets.shape != (n,):
        raise ValueError(f"rows and sets must have one entry per pose ({n})")
    apix = torch.as_tensor(np.asarray(apix_A, dtype=np.float32))
    bps: list[FourierBackprojector] = []
    with tqdm(total=n, desc=progress, unit="img", leave=False, disable=progress is None) as bar:
        for start in range(0, n, chunk):
            pos = np.arange(start, min(n, start + chunk))  # positions in rotations / rows
            imgs = torch.as_tensor(images[rows[pos]], dtype=torch.float32)
            if sign != 1.0:
                imgs = sign * imgs
            if not bps:
                bps = [
                    FourierBackprojector(imgs.shape[-1], pad_factor, imgs.device, symmetry)
                    for _ in range(n_sets)
                ]
            for h, bp in enumerate(bps):
                sel = pos[sets[pos] == h]
                if sel.size == 0:
                    continue
                at = torch.as_tensor(sel, device=rotations.device)
                bp.add_particles(
                    imgs[sel - start], rotations[at], shifts_px[at],
                    None if ctf is None else ctf.subset(torch.as_tensor(sel)),
                    apix[torch.as_tensor(sel)] if apix.ndim else apix,
                )  # fmt: skip
            bar.update(len(pos))
    if not bps:
        raise ValueError("no images to back-project")
    return bps


def backproject_halves(
    images: object,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    ctf: CTFParams | None,
    apix_A: float,
    sign: float = 1.0,
    chunk: int = 512,
    symmetry: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-project even and odd particles separately (:func:`backproject_sets`).

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
    symmetry
        ``(G, 3, 3)`` point-group operators, or None (:func:`backproject_sets`).

    Returns
    -------
    full, half1, half2 : torch.Tensor
        ``(D, D, D)`` maps of all particles, the even ones and the odd ones.
    """
    h1, h2 = backproject_sets(
        images, rotations, shifts_px, ctf, apix_A, sign=sign, chunk=chunk,
        progress="consensus map", symmetry=symmetry,
    )  # fmt: skip
    return h1.merge(h2).volume(), h1.volume(), h2.volume()


@dataclass
class Reconstruction:
    """Maps of :func:`reconstruct_particles`."""

    volume: torch.Tensor
    #: the two half maps (even / odd particles), or None
    halves: tuple[torch.Tensor, torch.Tensor] | None
    #: ``(n,)`` pixel size of each image back-projected (A)
    apix_A: np.ndarray
    D: int


def reconstruct_particles(
    source: Any,
    *,
    use_ctf: bool = True,
    invert: bool = False,
    half_maps: bool = False,
    chunk: int = 500,
    pad_factor: int = 2,
    wiener: float = 1e-3,
    symmetry: torch.Tensor | None = None,
) -> Reconstruction:
    """Map of a particle set with the poses of its table (``cryofield backproject``).

    ``source`` is a :class:`~cryofield.io.particles.ParticleSource` whose table has poses
    (``rotations``; shifts in px of the stacks, rescaled to the source's box ``D``) and,
    for ``use_ctf``, CTF parameters. ``invert`` multiplies the images by -1
    (:func:`cryofield.inference.data.decide_inversion`). With ``half_maps`` the even and
    odd particles are back-projected separately and the map is their merge. ``symmetry``
    (``(G, 3, 3)`` point-group operators) inserts every image at its ``G`` equivalent
    poses.
    """
    table = source.table
    D, n = source.D, len(source)
    scale = D / source.box_px  # shifts are in stack px; images may be cropped
    apix = np.asarray(source.apix_A, dtype=np.float64)
    R = torch.as_tensor(np.asarray(table.rotations), dtype=torch.float32)
    t = torch.zeros(n, 2) if table.shifts_px is None else torch.as_tensor(
        np.asarray(table.shifts_px) * scale, dtype=torch.float32
    )  # fmt: skip
    bps = backproject_sets(
        source, R, t, CTFParams.from_table(table) if use_ctf else None, apix,
        n_sets=2 if half_maps else 1, sign=-1.0 if invert else 1.0, chunk=chunk,
        pad_factor=pad_factor, progress="backproject", symmetry=symmetry,
    )  # fmt: skip
    if half_maps:
        halves = (bps[0].volume(wiener), bps[1].volume(wiener))
        vol = bps[0].merge(bps[1]).volume(wiener)
    else:
        halves, vol = None, bps[0].volume(wiener)
    return Reconstruction(vol, halves, apix, D)


def write_consensus_map(
    outdir: Path,
    images: object,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    ctf: CTFParams | None,
    apix_A: float,
    sign: float = 1.0,
    symmetry: torch.Tensor | None = None,
) -> dict[str, float]:
    """Write ``consensus.mrc``, ``consensus_half1/2.mrc`` and ``consensus_fsc.txt``.

    ``symmetry``: ``(G, 3, 3)`` point-group operators of the run (each image inserted at
    its ``G`` equivalent poses), or None. Returns the half-map FSC resolutions at 0.143 and
    0.5 (A), also logged.
    """
    full, h1, h2 = backproject_halves(
        images, rotations, shifts_px, ctf, apix_A, sign, symmetry=symmetry
    )
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
