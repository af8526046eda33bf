"""Image batches for training: windowing, contrast, Fourier transform, normalisation, CTF.

:meth:`BatchMaker.iter_batches` serves an epoch's batches; from a lazy stack
(:class:`~cryofield.io.particles.ParticleSource` with ``lazy=True``, what ``cryofield
train`` uses) a background thread (:class:`~cryofield.io.prefetch.Prefetcher`) reads the
next chunk of batches (their indices merged and sorted, one read per chunk), crops and
normalises them while the current batch trains; in-memory sources are served in the
calling thread. Both give the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cryofield.inference.pose_search import FrequencyPoints
from cryofield.io.metadata import common_pixel_size
from cryofield.io.prefetch import Prefetcher
from cryofield.physics.ctf import CTFParams, compute_ctf
from cryofield.physics.fourier import fft2_centered


class ImageSource(Protocol):
    """What training needs from a particle source (``io.particles.ParticleSource``)."""

    apix_A: Any

    def __len__(self) -> int: ...

    def __getitem__(self, idx: Any) -> torch.Tensor: ...


class ArraySource:
    """An in-memory image stack with the :class:`ImageSource` interface.

    Parameters
    ----------
    images
        ``(N, D, D)`` float32.
    apix_A
        Pixel size (A).
    """

    def __init__(self, images: torch.Tensor | np.ndarray, apix_A: float) -> None:
        self.images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        self.apix_A = float(apix_A)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


#: ``contrast`` values of :func:`decide_inversion`: what the images are ('auto': guess it),
#: or the answer itself ('invert', 'as-is')
CONTRAST_CHOICES = ("auto", "light-on-dark", "dark-on-light", "invert", "as-is")


@dataclass(frozen=True)
class ContrastDecision:
    """Outcome of :func:`decide_inversion`."""

    #: multiply the images by -1
    invert: bool
    #: the contrast the decision assumed: given, guessed ('unclear' when the guess was),
    #: or the forced answer ('invert' / 'as-is')
    contrast: str
    #: whether ``contrast`` was guessed from the images
    guessed: bool

    @property
    def message(self) -> str:
        """One line for the user, e.g. ``contrast: light-on-dark -> images inverted``."""
        if not self.guessed:
            shown = f"{self.contrast} (given)"
        elif self.contrast == "unclear":
            shown = "unclear, assuming light-on-dark"
        else:
            shown = self.contrast
        return f"contrast: {shown} -> images {'inverted' if self.invert else 'used as they are'}"


def decide_inversion(contrast: str, use_ctf: bool, source: Any) -> ContrastDecision:
    """Whether to multiply the images by -1 so that they meet the image model.

    The one contrast rule of ``train`` and ``backproject`` (docs/dev/contracts.md,
    "Contrast and CTF sign"). With a CTF the model is ``CTF * projection`` and the CTF of
    :mod:`cryofield.physics.ctf` is negative at low frequency, so a positive density gives
    dark-on-light images: light-on-dark stacks (RELION/cryoSPARC, inverted at extraction)
    are inverted. Without a CTF the model is the projection itself, light-on-dark: then
    dark-on-light images are inverted.

    Parameters
    ----------
    contrast
        'light-on-dark' or 'dark-on-light': what the images are; 'auto': guess it with
        ``source.contrast()`` (:func:`cryofield.io.particles.guess_contrast`; 'unclear'
        is taken as light-on-dark, the usual sign); 'invert' / 'as-is': the answer.
    use_ctf
        Whether the images meet a CTF.
    source
        The images (a :class:`~cryofield.io.particles.ParticleSource`); read only for
        'auto'.
    """
    if contrast not in CONTRAST_CHOICES:
        raise ValueError(f"contrast must be one of {CONTRAST_CHOICES}, got {contrast!r}")
    if contrast in ("invert", "as-is"):
        return ContrastDecision(contrast == "invert", contrast, guessed=False)
    guessed = contrast == "auto"
    seen = source.contrast() if guessed else contrast
    light = seen != "dark-on-light"  # 'unclear': the usual RELION/cryoSPARC sign
    return ContrastDecision(light if use_ctf else not light, seen, guessed)


@dataclass
class Batch:
    """One training batch, ready for a step: images and CTF at the frequency points."""

    #: ``(B,)`` image indices (numpy, host)
    idx: np.ndarray
    #: ``(B,)`` the same indices on the training device
    index: torch.Tensor
    #: ``(B, M)`` complex normalised transforms (:meth:`BatchMaker.images_ft`)
    images_ft: torch.Tensor
    #: ``(B, M)`` CTF (:meth:`BatchMaker.ctf`)
    ctf: torch.Tensor

    def __len__(self) -> int:
        return len(self.idx)

    def part(self, rows: np.ndarray) -> Batch:
        """The batch of rows ``rows`` (positions in this batch)."""
        r = torch.as_tensor(rows, dtype=torch.long, device=self.images_ft.device)
        return Batch(self.idx[rows], self.index[r], self.images_ft[r], self.ctf[r])


#: images per chunk that the prefetching reader reads at once (:meth:`BatchMaker.iter_batches`),
#: at most; fewer for large boxes (:data:`PREFETCH_CHUNK_BYTES` of images), at least a batch
PREFETCH_CHUNK_IMAGES = 512
PREFETCH_CHUNK_BYTES = 32 * 2**20
#: chunks prepared ahead of the one in use
PREFETCH_DEPTH = 2


def soft_window(D: int, inner: float = 0.85, outer: float = 0.99) -> torch.Tensor:
    """``(D, D)`` real-space window: 1 inside ``inner * D/2``, cosine edge to ``outer * D/2``."""
    c = torch.arange(D, dtype=torch.float32) - D // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) / (D / 2)
    t = ((r - inner) / (outer - inner)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class BatchMaker:
    """Turns image indices into normalised Fourier images and CTFs at the frequency points.

    Parameters
    ----------
    source
        Image source (images at the training box ``D``).
    ctf_params
        ``CTFParams`` of all images, or ``None`` (no CTF).
    points
        Frequency points of box ``D``.
    invert, window
        Multiply images by -1; apply :func:`soft_window`.
    scale
        Normalisation: Fourier values are divided by it (set by :meth:`estimate_scale`).
    """

    def __init__(
        self,
        source: ImageSource,
        ctf_params: CTFParams | None,
        points: FrequencyPoints,
        invert: bool = False,
        window: bool = True,
        scale: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source = source
        self.ctf_params = ctf_params
        self.points = points
        self.invert = invert
        self.window = soft_window(points.D).to(device) if window else None
        self.scale = float(scale)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        # on a GPU the CTF parameters of all images live there (no copy per batch)
        self._ctf_dev = None if ctf_params is None or not self._cuda else ctf_params.to(device)
        self._apix_dev: torch.Tensor | None = None
        table = getattr(source, "table", None)
        self.apix_A = common_pixel_size(
            source.apix_A,
            None if table is None else table.optics_group,
            "particles" if table is None else table.source_path,
        )

    def images_ft(self, idx: np.ndarray) -> torch.Tensor:
        """``(B, M)`` complex normalised transforms at all frequency points."""
        return self.transform(self.source[idx])

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`images_ft` of images already read (``(B, D, D)``, any device)."""
        img = torch.as_tensor(images).to(self.device, torch.float32, non_blocking=True)
        if img.shape[-1] != self.points.D:
            raise ValueError(f"images are {img.shape[-1]} px, training box is {self.points.D}")
        if self.invert:
            img = -img
        if self.window is not None:
            img = img * self.window
        f = fft2_centered(img).reshape(img.shape[0], -1)[:, self.points.flat_index]
        return f / self.scale

    def ctf(self, idx: np.ndarray) -> torch.Tensor:
        """``(B, M)`` CTF at the frequency points (ones without CTF)."""
        if self.ctf_params is None:
            return torch.ones(len(idx), self.points.freqs.shape[0], device=self.device)
        if self._ctf_dev is not None:
            return self._device_ctf(self.device_index(idx))
        p = self.ctf_params.subset(torch.as_tensor(np.asarray(idx), dtype=torch.long))
        p = p.to(self.device)
        return compute_ctf(self.points.freqs, self.apix_A, p).float()

    def device_index(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``idx`` as a long tensor on the device (on a GPU, copied from pinned memory
        without waiting for the device)."""
        t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if not self._cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def batch(self, idx: np.ndarray) -> Batch:
        """The :class:`Batch` of images ``idx``, read in this thread."""
        idx = np.asarray(idx)
        return Batch(idx, self.device_index(idx), self.images_ft(idx), self.ctf(idx))

    def iter_batches(
        self,
        batches: Sequence[np.ndarray],
        prefetch: bool | None = None,
        chunk_images: int | None = None,
        depth: int = PREFETCH_DEPTH,
    ) -> Iterator[Batch]:
        """The :class:`Batch` of each index array of ``batches``, in order.

        With ``prefetch`` (default: when the source reads lazily from disk, ``source.lazy``)
        a background thread prepares the batches ``depth`` chunks of about
        ``chunk_images`` images ahead (default :data:`PREFETCH_CHUNK_IMAGES`, fewer above
        D=128 so that a chunk's images stay within :data:`PREFETCH_CHUNK_BYTES`): the
        indices of a chunk's batches are merged and read at once in file order (the disk
        reads of the next chunk are started first, ``source.will_need``), then cropped,
        windowed, transformed and normalised
        (on a GPU the thread reads into pinned memory and the transforms run on the
        device here). Without it each batch is read here when asked for. The batches are
        the same either way. A generator: ``close()`` it (``contextlib.closing``) when
        stopping early, which stops the thread.
        """
        if prefetch is None:
            prefetch = bool(getattr(self.source, "lazy", False))
        if not prefetch:
            for idx in batches:
                yield self.batch(idx)
            return
        if chunk_images is None:
            D = self.points.D
            chunk_images = min(PREFETCH_CHUNK_IMAGES, PREFETCH_CHUNK_BYTES // (4 * D * D))
        per_chunk = max(1, chunk_images // max(1, max((len(b) for b in batches), default=1)))
        chunks = [batches[i : i + per_chunk] for i in range(0, len(batches), per_chunk)]
        # each chunk with the next one, whose disk reads start while this one is prepared
        work = list(zip(chunks, [*chunks[1:], None], strict=True))
        with Prefetcher(work, self._prepare_chunk, depth, "cryofield-batches") as pf:
            for prepared in pf:
                for item in prepared:
                    yield item if isinstance(item, Batch) else self._finish(*item)

    def _prepare_chunk(
        self, work: tuple[Sequence[np.ndarray], Sequence[np.ndarray] | None]
    ) -> list[Any]:
        """Worker thread: start the disk reads of the next chunk (``source.will_need``),
        read the images of this chunk's batches at once (sorted), split them into the
        batches; on the CPU finish the batches here, on a GPU hand over pinned images and
        indices."""
        chunk = [np.asarray(b) for b in work[0]]
        hint = getattr(self.source, "will_need", None)
        if work[1] is not None and hint is not None:
            hint(np.concatenate(work[1]))
        every = np.sort(np.concatenate(chunk)) if chunk else np.zeros(0, np.int64)
        images = torch.as_tensor(self.source[every])
        out: list[Any] = []
        for idx in chunk:
            img = images[torch.as_tensor(np.searchsorted(every, idx), dtype=torch.long)]
            if self._cuda:
                index = torch.as_tensor(idx, dtype=torch.long)
                out.append((idx, img.pin_memory(), index.pin_memory()))
            else:
                out.append(Batch(idx, torch.as_tensor(idx, dtype=torch.long),
                                 self.transform(img), self.ctf(idx)))  # fmt: skip
        return out

    def _finish(self, idx: np.ndarray, images: torch.Tensor, index: torch.Tensor) -> Batch:
        """Main thread, GPU: copy a prepared batch to the device and transform it there."""
        ti = index.to(self.device, non_blocking=True)
        ctf = self._device_ctf(ti) if self._ctf_dev is not None else self.ctf(idx)
        return Batch(idx, ti, self.transform(images), ctf)

    def _device_ctf(self, index: torch.Tensor) -> torch.Tensor:
        """GPU: the CTF of images ``index`` (on the device) from the parameters there; the
        pixel size goes in as a device tensor (a Python float would be copied to the
        device, and wait for it, at every batch)."""
        assert self._ctf_dev is not None
        if self._apix_dev is None:
            self._apix_dev = torch.tensor(self.apix_A, dtype=torch.float32, device=self.device)
        return compute_ctf(self.points.freqs, self._apix_dev, self._ctf_dev.subset(index)).float()

    def estimate_scale(self, n: int, generator: torch.Generator) -> float:
        """Set :attr:`scale` to the RMS Fourier amplitude of ``n`` random images."""
        N = len(self.source)
        idx = torch.randperm(N, generator=generator)[: min(n, N)].sort().values.numpy()
        self.scale = 1.0
        tot, cnt = 0.0, 0
        for i in range(0, len(idx), 256):
            f = self.images_ft(idx[i : i + 256])
            tot += float((f.real**2 + f.imag**2).sum())
            cnt += f.numel()
        self.scale = math.sqrt(tot / max(cnt, 1)) or 1.0
        return self.scale

    def estimate_envelope(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Radial amplitude envelope of the volume's transform, normalised units.

        Per integer shell ``r``: ``sqrt(max(P(r) - P_noise, 0) / mean C(r)^2)`` with ``P`` the
        mean image power, ``P_noise`` the power of the outer shells (``r > 0.8 D/2``, where
        white noise dominates) and ``C`` the CTF; smoothed over 3 shells and clipped to
        ``[1e-2, 1] x`` its maximum. Returns ``(D // 2 + 2,)``.
        """
        D = self.points.D
        N = len(self.source)
        idx = torch.randperm(N, generator=generator)[: min(n, N)].sort().values.numpy()
        nsh = D // 2 + 2
        shell = self.points.radius_px.round().long().clamp(max=nsh - 1)
        p = torch.zeros(nsh, dtype=torch.float64)
        c2 = torch.zeros(nsh, dtype=torch.float64)
        cnt = torch.zeros(nsh, dtype=torch.float64)
        for i in range(0, len(idx), 256):
            f = self.images_ft(idx[i : i + 256]).cpu()
            c = self.ctf(idx[i : i + 256]).cpu()
            p.index_add_(0, shell.cpu(), (f.real**2 + f.imag**2).sum(0).double())
            c2.index_add_(0, shell.cpu(), (c**2).sum(0).double())
            cnt.index_add_(0, shell.cpu(), torch.full_like(shell.cpu(), f.shape[0]).double())
        valid = cnt > 0
        p[valid] /= cnt[valid]
        c2[valid] /= cnt[valid]
        outer = valid & (torch.arange(nsh) > 0.8 * D / 2)
        noise = p[outer].mean() if outer.any() else torch.tensor(0.0, dtype=torch.float64)
        sig = (p - noise).clamp(min=0) / c2.clamp(min=1e-3)
        amp = torch.sqrt(sig)
        amp[~valid] = 0
        sm = amp.clone()
        sm[1:-1] = (amp[:-2] + amp[1:-1] + amp[2:]) / 3
        sm[0] = amp[0]
        top = float(sm.max()) or 1.0
        return sm.clamp(min=1e-2 * top).float()
