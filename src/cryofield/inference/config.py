"""Training configuration (:class:`TrainConfig`), saved as ``OUTDIR/config.yaml``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryofield.errors import CryofieldError
from cryofield.physics.symmetry import SymmetryError, canonical_symmetry

#: accepted values of ``TrainConfig.contrast``
CONTRASTS = ("auto", "light-on-dark", "dark-on-light")
#: accepted values of ``TrainConfig.latent_init``: linear variability analysis at the
#: consensus poses (:mod:`cryofield.inference.variability`), 3-D classification at the
#: settled poses with the classes embedded (:mod:`cryofield.inference.classify`; the
#: refreshes during the search stay linear), or the random start alone
LATENT_INITS = ("classes", "pca", "random")
#: accepted values of ``TrainConfig.het_search``: the heterogeneous global search scores
#: every image against its latent group's map on the level-0 grid and checks the other
#: maps at its kept poses, or against every map on the whole grid
#: (:func:`cryofield.inference.pose_search.search_poses`, ``hint``)
HET_SEARCHES = ("assigned", "exhaustive")
#: how homogeneous runs train the field at fixed poses (inference/field_fit.py)
FIELD_FITS = ("backprojection", "images")


def _flag(default: Any, flag: str, text: str, **extra: Any) -> Any:
    """A :class:`TrainConfig` field with a flag of ``cryofield train``: the flag and its
    help text are the field's ``metadata`` (with ``choices`` when the values are a fixed
    set); its type and default are the field's own (:mod:`cryofield.cli.train`)."""
    return field(default=default, metadata={"flag": flag, "help": text, **extra})


@dataclass
class TrainConfig:
    """All settings of a training run (the resolved values are written to config.yaml).

    This dataclass is the one source of truth for the defaults: ``cryofield train``,
    ``cryofield demo`` and the benchmarks all start from it. A field with a flag of
    ``cryofield train`` names it, with its help text, in its ``metadata`` (``_flag``); the
    other fields are keys of config.yaml only (``--config FILE``). Settings left at ``None``
    are chosen by :meth:`resolved` from the data (box ``D``, pixel size, number of images
    ``N``) and the device, and the chosen values are logged and written to config.yaml:

    - device: CUDA when torch sees a GPU, else CPU (``device: auto``);
    - sizes: ``hidden`` 128 on CPU, 256 on CUDA; ``batch_size`` 32 on CPU, 64 on CUDA;
      ``num_threads`` the CPU cores torch sees;
    - search radius (Fourier px of the training box): from ``search_start_res_A`` to
      ``search_end_res_A`` in A, but never below ``6/64 D`` and ``16/64 D`` px (a small
      object in a small box still needs a few px of detail); the training radius after
      the search is Nyquist (``D / 2 - 1``);
    - translations searched within ``+-D / 10`` px;
    - schedule in images seen: ``hps_images = max(30000, 2 N)`` images of global search
      (heterogeneous ``max(72000, 2 N)``; whole epochs), then (homogeneous) one epoch of
      gold-standard refinement against back-projected half maps
      (:mod:`cryofield.inference.refine`, at most ``refine_iters`` iterations, stopping
      when the half-map resolution stops improving) and one field epoch at the refined
      poses: the field regressed onto their back-projected map (``field_fit:
      backprojection``; ``images``: ``field_images = max(10000, N)`` images of image-by-
      image training instead); (heterogeneous) ``sgd_epochs``
      gradient epochs, ``research_epochs`` search-again epochs and
      ``local_refine_epochs`` local epochs. ``epochs`` is the sum.

    The measured values behind these numbers are in docs/train.md.
    """

    particles: str = ""
    outdir: str = ""
    datadir: str | None = _flag(None, "--datadir", "folder to resolve relative image paths against")
    ind: str | None = _flag(None, "--ind", "index file (.npy/.txt) selecting particles")
    D: int | None = _flag(None, "-D", "training box (Fourier-cropped; default: input box)")
    zdim: int = _flag(0, "--zdim", "latent dimension (0: homogeneous)")
    # field (hidden None: 128 on CPU, 256 on CUDA)
    hidden: int | None = _flag(None, "--hidden", "MLP width (default 128 on CPU, 256 on CUDA)")
    layers: int = _flag(3, "--layers", "residual hidden layers")
    n_freqs: int = _flag(64, "--n-freqs", "random Fourier features")
    sigma: float = 0.5
    # schedule (None: chosen from N, see the class docstring)
    epochs: int | None = _flag(
        None, "--epochs", "total epochs (default: chosen from N, see docs/train.md)"
    )
    hps_images: int | None = _flag(
        None, "--hps-images", "images seen with global pose search (default max(3e4, 2N))"
    )
    field_images: int | None = _flag(
        None, "--field-images", "images of field training after refinement"
    )
    # homogeneous runs at fixed poses (after the refinement, or known poses): the field is
    # regressed onto the back-projected map of all images ("backprojection": every step
    # sees the whole data set; inference/field_fit.py, measured in docs/train.md) or
    # trained image by image on field_images images ("images")
    field_fit: str = "backprojection"
    field_fit_steps: int | None = None  # None: clip(200 voxels-in-ball / points, 400, 4000)
    field_fit_points: int = 16384
    lr_field_fit: float = 5e-3
    sgd_epochs: int = 1
    batch_size: int | None = _flag(None, "-b", "images per batch (default 32 on CPU, 64 on CUDA)")
    lr_field: float = _flag(2e-3, "--lr-field", "field learning rate")
    steps_per_batch: int = 3
    lr_pose: float = _flag(1e-3, "--lr-pose", "pose table learning rate (heterogeneous runs)")
    # gold-standard refinement against back-projected half maps (homogeneous runs)
    refine_iters: int = _flag(8, "--refine-iters", "most half-map refinement iterations (0: none)")
    refine_prior_deg: float = 1.0
    refine_global: bool = True
    # >= 2: each image refined against its half map without its fold (of refine_folds per
    # half): its own noise does not hold it in place (inference.refine.pose_floor); 0: off
    refine_folds: int = 0
    lr_latent: float = _flag(1e-2, "--lr-latent", "latent table learning rate")
    latent_l2: float = 0.0
    latent_init_std: float = 0.1
    latent_warmup: float = 0.0
    latent_init: str = _flag(
        "classes", "--latent-init",
        "latent start once the poses settle: 3-D classification embedded in z ('classes'), "
        "linear variability analysis ('pca'), or none ('random')",
        choices=LATENT_INITS,
    )  # fmt: skip
    latent_init_classes: int | None = None
    latent_init_radius_px: float | None = None
    latent_init_iters: int = 20
    latent_refresh: bool = True
    # focused heterogeneity (docs/train.md, "Masks"): a soft mask (MRC, values in [0, 1], on
    # the particles' box; cryofield.io.mask) restricts the latent start (classification,
    # variability analysis) to the variability inside it; the path is stored absolute
    mask: str | None = _flag(
        None, "--mask",
        "soft mask (MRC, values in [0, 1], the particles' box and pixel size): the latents "
        "describe the variability inside it (focused heterogeneity; needs --zdim)",
    )  # fmt: skip
    # after a masked latent start z takes no gradient steps (measured: with steps z slowly
    # learns the variation outside the mask, docs/train.md "Masks"); false: it does
    mask_hold_latents: bool = True
    # point-group symmetry of the map (cryofield.physics.symmetry, RELION's axes): once
    # imposed, the global search covers one asymmetric unit, the field learns from every
    # image at its equivalent poses, the back-projected maps are symmetrised
    symmetry: str = _flag(
        "C1", "--symmetry",
        "point-group symmetry of the map, in RELION's axes: C<n>, D<n>, T, O, I (= I2), "
        "I1-I4 (default C1: none)",
    )  # fmt: skip
    # ab initio runs search without the symmetry, then align the map's axes to the
    # group's and impose it (Trainer.align_symmetry); true: impose it from the first search
    symmetry_in_search: bool = False
    # pose search
    base_nside: int = _flag(4, "--base-nside", "HEALPix nside of the base grid")
    base_psi: int = _flag(24, "--base-psi", "in-plane angles of the base grid")
    search_levels: int = _flag(4, "--search-levels", "pose search subdivisions")
    n_keep: int = 8
    t_extent_px: float | None = _flag(
        None, "--t-extent", "translation search extent, px (default D/10)"
    )
    t_ngrid: int = 7
    # after the first epoch, the translation grid centred on the references' centre of
    # mass, not the box centre (pose_search module docstring); false: on the box centre
    search_centre: bool = True
    search_start_res_A: float = 53.0
    search_end_res_A: float = 20.0
    radius_start_px: float | None = _flag(
        None, "--radius-start", "first search radius, px (default from 53 A)"
    )
    radius_search_px: float | None = _flag(
        None, "--radius-search", "last search radius, px (default from 20 A)"
    )
    radius_max_px: float | None = _flag(
        None, "--radius-max", "training radius after the search, px (Nyquist)"
    )
    # the stopping rule of the search (homogeneous ab initio): while more images than the
    # verdict's pose-stability limit changed basin in the last search epoch, search one
    # more epoch, the radius still growing at the planned rate up to search_cap_res_A (and
    # 3/4 of Nyquist), at most search_extend x the planned search epochs (0: never; None:
    # 1, or 0 when the number of epochs is given: --epochs N means N epochs); with it > 0
    # the search also ends early once poses have settled (Trainer._shorten_search)
    search_extend: float | None = _flag(
        None,
        "--search-extend",
        "most extra search, in planned search epochs, while the poses have not settled "
        "(default 1; 0 with --epochs); 0 also keeps the planned search when they settle early",
    )
    search_cap_res_A: float = 10.0
    # balanced search (Trainer._direction_penalty): during the first search epochs each
    # level-0 rotation is ranked with a penalty of search_balance * log(occupancy ratio)
    # nats for the viewing-direction cell it lies in (the share of the images already
    # assigned there over an even share; cells at or under an even share: no penalty), the
    # strength falling linearly to 0 over search_balance_fraction of the planned search
    # epochs (at least 2 epochs); 0: off. It keeps a search from piling every image onto
    # the few directions where the early map projects strongest (two antipodal blobs)
    search_balance: float = 10.0
    search_balance_fraction: float = 0.34
    # start of a restarted search (Trainer._isotropic_start): the field fitted to the
    # spherical average of the back-projection of up to this many images at random poses
    # (an isotropic blob with the data's radial profile); 0: restarts start from an
    # untrained field too
    isotropic_start_images: int = 10000
    # ab initio runs whose viewing directions collapsed (diagnostics.view_coverage) at the
    # end of the search start again with the next seed, at most this many times; the
    # failed attempt's epochs move to OUTDIR/failed_search_<k>/ (runner._fit)
    search_restarts: int = 2
    # written by the run: the attempt (0: the first) and the search plan it started with
    # ([epochs, hps_images]; a restart begins from it again)
    search_restart: int = 0
    planned_search: list[int] | None = None
    # images over which the search radius grows from radius_start_px to radius_search_px
    # (None: all the search images; set when the search is extended)
    search_ramp_images: int | None = None
    het_search_groups: int = 8
    # heterogeneous global search (the references: the field at het_search_groups k-means
    # centres of the latents). "assigned": the centres of the whole latent table, each
    # image searches level 0 against the map of its latent's nearest centre, every map is
    # scored at its n_keep kept poses and the best one refines (an image that changes map
    # searches level 0 again against it); the maps are kept between batches and
    # het_search_refresh of them rebuilt from the field per batch (all of them at a new
    # epoch or radius). "exhaustive": the centres of the batch's latents, every image
    # against every map on the whole level-0 grid, the maps built for every batch (~G x
    # the search time). inference.references; benchmarks/README.md, "bench_step.py"
    het_search: str = "assigned"
    het_search_refresh: int = 1
    # global search epochs again after the gradient epochs, before local refinement (None:
    # 1 for heterogeneous ab initio runs, 0 otherwise)
    research_epochs: int | None = None
    # local pose refinement (final epochs)
    local_refine_epochs: int = 1
    local_step_deg: float = 2.0
    local_t_step_px: float = 0.5
    local_levels: int = 3
    local_iters: int = 1
    local_oversample: int = 2
    # poses
    poses_from_file: bool = _flag(False, "--poses-from-file", "use the poses of the particle file")
    # None: refine after an ab initio search, keep known poses (--poses-from-file) fixed
    refine_poses: bool | None = _flag(
        None,
        "--refine-poses",
        "refine the poses (default: yes ab initio, no with --poses-from-file)",
    )
    # data: contrast 'auto' (guess from the images), 'light-on-dark' (RELION/cryoSPARC
    # stacks; multiplied by -1 before meeting the CTF) or 'dark-on-light'; ``invert`` is
    # the resolved decision (see docs/dev/contracts.md, "Contrast and CTF sign")
    contrast: str = _flag(
        "auto",
        "--contrast",
        "particle contrast; light-on-dark stacks (RELION/cryoSPARC) are inverted to meet the "
        "CTF (auto: guessed from the images and logged)",
        choices=CONTRASTS,
    )
    invert: bool = False
    window: bool = _flag(True, "--window", "real-space soft window on the images")
    norm_images: int = 1000
    # runtime
    device: str = _flag(
        "auto", "--device", "auto (cuda when a GPU is seen, else cpu), cpu, cuda or cuda:N"
    )
    amp: bool = _flag(True, "--amp", "bf16 autocast on CUDA")
    deterministic: bool = _flag(False, "--deterministic", "deterministic kernels")
    seed: int = _flag(0, "--seed", "random seed")
    num_threads: int | None = _flag(None, "--threads", "CPU threads for torch (default: all cores)")
    max_rollbacks: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a loaded config.yaml); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CryofieldError(f"unknown training setting(s): {', '.join(unknown)}")
        if isinstance(d.get("latent_warmup"), bool):  # older config.yaml files stored a switch
            d = {**d, "latent_warmup": 1.0 if d["latent_warmup"] else 0.0}
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config.yaml."""
        try:
            with open(path) as fh:
                d = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()
            raise CryofieldError(
                f"{path}: not valid YAML ({first[0] if first else type(err).__name__})"
            ) from None
        if not isinstance(d, dict):
            raise CryofieldError(f"{path}: not a YAML mapping")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (yaml-safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text of the configuration."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(
        self, D: int, n_images: int | None = None, apix_A: float | None = None
    ) -> TrainConfig:
        """A copy with every ``None`` default chosen for box ``D`` (px), ``n_images``
        particles and pixel size ``apix_A`` (A at box ``D``) on ``device`` (see the class
        docstring). Without ``n_images`` the schedule keys stay as given (None is resolved
        later, when the trainer knows N); without ``apix_A`` the radii follow the box only.
        """
        c = dataclasses.replace(self, D=int(D))
        try:  # "i" -> "I2", "d7" -> "D7" (a bad name is left to validate())
            c.symmetry = canonical_symmetry(c.symmetry)
        except SymmetryError:
            pass
        nyq = D / 2 - 1
        if c.device == "auto":
            import torch

            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = c.device.startswith("cuda")
        if c.hidden is None:
            c.hidden = 256 if cuda else 128
        if c.batch_size is None:
            c.batch_size = 64 if cuda else 32
        if c.num_threads is None and not cuda:
            cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else (os.cpu_count() or 1))  # fmt: skip
            # torchrun's processes on this node share its cores
            c.num_threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        box_A = D * apix_A if apix_A else None
        if c.radius_start_px is None:
            r = 6.0 / 64.0 * D
            c.radius_start_px = min(max(r, box_A / c.search_start_res_A if box_A else r), nyq)
        if c.radius_search_px is None:
            r = 16.0 / 64.0 * D
            c.radius_search_px = min(max(r, box_A / c.search_end_res_A if box_A else r), nyq)
        if c.radius_max_px is None:
            c.radius_max_px = nyq
        if c.refine_poses is None:
            c.refine_poses = not c.poses_from_file
        if c.research_epochs is None:
            c.research_epochs = 1 if c.zdim > 0 and not c.poses_from_file else 0
        if c.mask:
            c.mask = str(Path(c.mask).expanduser().absolute())
        if c.latent_init_radius_px is None:
            c.latent_init_radius_px = min(D / 4.0, c.radius_search_px)
        if c.t_extent_px is None:
            c.t_extent_px = D / 10.0
        if c.search_extend is None:
            c.search_extend = 0.0 if c.epochs is not None else 1.0
        if n_images is not None:
            c.resolve_schedule(int(n_images))
        c.radius_start_px = float(min(c.radius_start_px, nyq))
        c.radius_search_px = float(min(max(c.radius_search_px, c.radius_start_px), nyq))
        c.radius_max_px = float(min(c.radius_max_px, nyq))
        c.latent_init_radius_px = float(min(c.latent_init_radius_px, nyq))
        c.t_extent_px = float(c.t_extent_px)
        c.validate()
        return c

    def resolve_schedule(self, n_images: int) -> None:
        """Fill ``hps_images``, ``field_images`` and ``epochs`` (in place) for ``n_images``.

        Ab initio: ``max(30000, 2 N)`` images of search (heterogeneous: ``max(72000, 2 N)``,
        images of different states converge at different times), rounded up to whole
        epochs (the measured 6 epochs of demo-homo at N=5000, 12 of demo-hetero at
        N=6000; every image is searched at least twice).
        Homogeneous runs then refine (1 epoch) and train the field on ``max(10000, N)``
        images; heterogeneous ab initio runs take ``sgd_epochs`` gradient epochs, the
        search-again and the local epochs. Known poses: the field epochs only (plus a
        refinement epoch with ``refine_poses``).
        """
        n = max(int(n_images), 1)
        if self.hps_images is None:
            least = 30_000 if self.zdim == 0 else 72_000
            self.hps_images = 0 if self.poses_from_file else max(least, 2 * n)
        if self.field_images is None:
            self.field_images = max(10_000, n)
        if self.epochs is not None:
            return
        hps = 0 if self.poses_from_file else max(1, math.ceil(self.hps_images / n))
        field_epochs = max(1, math.ceil(self.field_images / n))
        if self.zdim == 0 and self.field_fit == "backprojection":
            field_epochs = 1  # every step of the fit sees the whole data set
        if self.zdim == 0:
            refine = 1 if (self.refine_poses is not False) and self.refine_iters > 0 else 0
            self.epochs = hps + refine + field_epochs
        elif self.poses_from_file:
            local = self.local_refine_epochs if self.refine_poses else 0
            self.epochs = field_epochs + local
        else:
            research = 1 if self.research_epochs is None else self.research_epochs
            self.epochs = hps + self.sgd_epochs + research + self.local_refine_epochs

    def validate(self) -> None:
        """Raise :class:`CryofieldError` for impossible settings."""
        checks = [
            (self.zdim >= 0, f"zdim must be >= 0 (got {self.zdim})"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})"),
            (self.batch_size is None or self.batch_size >= 1,
             f"batch size must be >= 1 (got {self.batch_size})"),
            ((self.hidden is None or self.hidden >= 1) and self.layers >= 0,
             "hidden must be >= 1 and layers >= 0"),
            (self.refine_iters >= 0 and self.refine_prior_deg > 0,
             "refine_iters must be >= 0 and refine_prior_deg > 0"),
            (self.refine_folds == 0 or self.refine_folds >= 2,
             "refine_folds must be 0 (off) or >= 2"),
            (self.search_balance >= 0 and 0 <= self.search_balance_fraction <= 1,
             "search_balance must be >= 0 and search_balance_fraction in [0, 1]"),
            (self.sgd_epochs >= 0, "sgd_epochs must be >= 0"),
            (self.field_images is None or self.field_images >= 1, "field_images must be >= 1"),
            (self.D is None or (self.D >= 8 and self.D % 2 == 0), f"D must be even >= 8: {self.D}"),
            (self.device.split(":")[0] in ("cpu", "cuda", "auto"), f"bad device: {self.device}"),
            (self.hps_images is None or self.hps_images >= 0, "hps_images must be >= 0"),
            ((self.search_extend or 0) >= 0 and self.search_cap_res_A > 0,
             "search_extend must be >= 0 and search_cap_res_A > 0"),
            (self.isotropic_start_images >= 0, "isotropic_start_images must be >= 0"),
            (self.search_restarts >= 0, "search_restarts must be >= 0"),
            (self.contrast in CONTRASTS, f"contrast must be one of {CONTRASTS}: {self.contrast}"),
            (self.search_levels >= 0 and self.n_keep >= 1, "search levels >= 0, n_keep >= 1"),
            (self.latent_init in LATENT_INITS, f"latent_init must be one of {LATENT_INITS}"),
            (self.field_fit in FIELD_FITS, f"field_fit must be one of {FIELD_FITS}"),
            (self.field_fit_points >= 1 and (self.field_fit_steps or 1) >= 1
             and self.lr_field_fit > 0, "field_fit_points/steps must be >= 1, lr > 0"),
            (self.het_search in HET_SEARCHES, f"het_search must be one of {HET_SEARCHES}"),
            (self.het_search_groups >= 1 and self.het_search_refresh >= 1,
             "het_search_groups and het_search_refresh must be >= 1"),
            (self.latent_init_iters >= 1, "latent_init_iters must be >= 1"),
            (self.latent_init_classes is None or self.latent_init_classes >= 2,
             "latent_init_classes must be >= 2 (or null: clip(2 zdim, 4, 16))"),
            (0.0 <= self.latent_warmup <= 1.0, "latent_warmup must be in [0, 1]"),
            (not self.mask or self.zdim > 0,
             "--mask focuses the latent variability: it needs --zdim > 0"),
            (not self.mask or self.latent_init != "random",
             "--mask acts through the latent start: it needs --latent-init classes or pca"),
            (self.local_refine_epochs >= 0, "local_refine_epochs must be >= 0"),
            (self.research_epochs is None or self.research_epochs >= 0,
             "research_epochs must be >= 0"),
            (self.local_step_deg > 0 and self.local_t_step_px >= 0, "local steps must be > 0"),
            (self.local_levels >= 1 and self.local_iters >= 1, "local levels/iters must be >= 1"),
            (self.local_oversample in (1, 2, 3, 4), "local_oversample must be 1..4"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise CryofieldError(msg)
        try:
            canonical_symmetry(self.symmetry)
        except SymmetryError as err:
            raise CryofieldError(f"--symmetry: {err}") from None
