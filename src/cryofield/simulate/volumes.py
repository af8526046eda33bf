"""Ground-truth volumes for simulation: built-in test objects and atomic-model density.

Built-in objects are generated in code (no downloads) from a fixed seed, in box-fraction
units, so the same object is obtained at any even box size ``D`` (only the sampling
changes). They are chains of Gaussian "atoms" laid out by a persistent random walk inside
a few globular domains of different sizes, plus a right-handed helical arm, which makes
them asymmetric, chiral and rich in detail up to about the atom width (~0.8 px at D=64).

- :func:`protein_like` -- the homogeneous test object (four domains + helix).
- :func:`two_domain` -- the same object cut into a body and an arm (its second domain)
  that swings about a hinge with ``c`` in [0, 1] (continuous heterogeneity).
- :func:`discrete_states` -- 2-4 discrete states built from the same parts (arm closed,
  arm open, arm absent, an extra domain bound).
- :func:`atomic_model_density` -- density of a PDB/mmCIF model (one frame per model)
  from the 5-Gaussian electron scattering factors.

All volumes are ``(D, D, D)`` float32 arrays indexed ``vol[z, y, x]`` with the object's
origin at voxel ``D // 2`` (docs/dev/contracts.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryofield.errors import CryofieldError, InputFileError

__all__ = [
    "AtomicFrames",
    "atomic_model_density",
    "discrete_states",
    "fragment_volume",
    "protein_like",
    "read_atomic_models",
    "render_gaussians",
    "two_domain",
]

#: width (standard deviation) of one pseudo-atom, in box fractions (0.83 px at D=64)
_ATOM_SIGMA = 0.013
#: random-walk step between consecutive pseudo-atoms, in box fractions
_STEP = 0.021


def render_gaussians(
    centers_px: np.ndarray,
    weights: np.ndarray,
    sigmas_px: np.ndarray,
    D: int,
    truncate: float = 4.0,
    batch: int = 4096,
) -> np.ndarray:
    """Sum of normalised 3-D Gaussians sampled at the voxel centres of a ``D^3`` box.

    Each Gaussian ``j`` contributes ``w_j (2 pi s_j^2)^(-3/2) exp(-|r - c_j|^2 / (2 s_j^2))``
    so that its integral over the box (sum over voxels) is ``w_j`` when it is well sampled.

    Parameters
    ----------
    centers_px
        ``(n, 3)`` centres ``[x, y, z]`` in px relative to the box origin (voxel ``D // 2``).
    weights
        ``(n,)`` integral of each Gaussian (voxel units).
    sigmas_px
        ``(n,)`` or scalar standard deviation in px.
    D
        Box size.
    truncate
        Each Gaussian is evaluated within ``truncate * max(sigma)`` px of its centre.
    batch
        Gaussians processed at once (memory ~ ``batch * window^3``).

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32 volume indexed ``[z, y, x]``.
    """
    centers = np.asarray(centers_px, dtype=np.float64).reshape(-1, 3)
    n = centers.shape[0]
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (n,))
    s = np.broadcast_to(np.asarray(sigmas_px, dtype=np.float64), (n,))
    out = np.zeros(D * D * D, dtype=np.float64)
    if n == 0:
        return out.reshape(D, D, D).astype(np.float32)
    half = math.ceil(truncate * float(s.max()))
    r = np.arange(-half, half + 1)
    oz, oy, ox = np.meshgrid(r, r, r, indexing="ij")
    offsets = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], axis=1)  # (W, 3) [x, y, z]
    for start in range(0, n, batch):
        c = centers[start : start + batch] + D // 2  # (b, 3) in voxel index units
        base = np.rint(c).astype(np.int64)
        vox = base[:, None, :] + offsets[None]  # (b, W, 3)
        r2 = ((vox - c[:, None, :]) ** 2).sum(-1)  # (b, W)
        sb = s[start : start + batch, None]
        val = w[start : start + batch, None] * np.exp(-0.5 * r2 / sb**2)
        val /= (2.0 * math.pi * sb**2) ** 1.5
        inside = ((vox >= 0) & (vox < D)).all(-1)
        flat = (vox[..., 2] * D + vox[..., 1]) * D + vox[..., 0]
        out += np.bincount(flat[inside], weights=val[inside], minlength=D**3)
    return out.reshape(D, D, D).astype(np.float32)


# ----------------------------------------------------------------------------------------
# built-in objects (coordinates in box fractions, [x, y, z], origin at the box centre)


def _random_walk_domain(
    rng: np.random.Generator, start: np.ndarray, centre: np.ndarray, radius: float, n: int
) -> np.ndarray:
    """``(n, 3)`` persistent random walk confined (softly) to a ball: a globular domain."""
    pts = np.empty((n, 3))
    pos = np.asarray(start, dtype=np.float64)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    for i in range(n):
        direction = direction + 0.9 * rng.normal(size=3)
        to_centre = centre - pos
        dist = np.linalg.norm(to_centre)
        if dist > radius:
            direction = direction + 2.5 * to_centre / dist
        direction /= np.linalg.norm(direction)
        pos = pos + _STEP * direction
        pts[i] = pos
    return pts


def _helix(start: np.ndarray, axis: np.ndarray, radius: float, rise: float, n: int) -> np.ndarray:
    """``(n, 3)`` right-handed helix of pseudo-atoms (100 deg per atom) starting at ``start``."""
    axis = axis / np.linalg.norm(axis)
    u = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)  # (u, v, axis) right-handed, so increasing angle = right-handed
    t = np.deg2rad(100.0) * np.arange(n)
    return (
        start
        + radius * (np.cos(t)[:, None] * u + np.sin(t)[:, None] * v)
        + (rise * np.arange(n))[:, None] * axis
    )


def _protein_chain(seed: int) -> list[np.ndarray]:
    """Pseudo-atoms of :func:`protein_like` before centring: four domains, then the helix."""
    rng = np.random.default_rng(seed)
    domains = [  # centre, radius, atoms: four domains of decreasing size
        (np.array([-0.08, 0.02, 0.0]), 0.095, 150),
        (np.array([0.10, 0.08, -0.04]), 0.07, 85),
        (np.array([0.05, -0.11, 0.06]), 0.055, 55),
        (np.array([0.13, -0.04, 0.12]), 0.04, 30),
    ]
    chain = []
    pos = domains[0][0].copy()
    for centre, radius, n in domains:
        pts = _random_walk_domain(rng, pos, centre, radius, n)
        chain.append(pts)
        pos = pts[-1]
    arm_start = chain[0][np.argmin(chain[0][:, 1] - chain[0][:, 0])]
    chain.append(_helix(arm_start, np.array([-0.6, 0.6, -0.5]), 0.022, 0.0075, 22))
    return chain


#: scale of the built-in protein's pseudo-atom layout (box fractions)
_PROTEIN_SCALE = 1.15


def _protein_atoms(seed: int) -> np.ndarray:
    """Pseudo-atom centres of :func:`protein_like` in box fractions, centred on their mean."""
    atoms = np.concatenate(_protein_chain(seed))
    return _PROTEIN_SCALE * (atoms - atoms.mean(0))


def _render_fraction(atoms: np.ndarray, D: int, sigma: float = _ATOM_SIGMA) -> np.ndarray:
    """Render box-fraction pseudo-atoms at box ``D``; normalised so the maximum is 1."""
    vol = render_gaussians(atoms * D, np.ones(len(atoms)), sigma * D, D)
    return (vol / vol.max()).astype(np.float32)


def _check_box(D: int) -> None:
    if D < 16 or D % 2:
        raise CryofieldError(f"box size D must be even and >= 16, got {D}")


def protein_like(D: int, seed: int = 7) -> np.ndarray:
    """Asymmetric, chiral, protein-like test volume (~55% of the box diameter).

    About 350 Gaussian pseudo-atoms along a chain that folds into four globular domains of
    different sizes, plus a right-handed helical arm. The shape is the same at every ``D``.

    Parameters
    ----------
    D
        Even box size (>= 16).
    seed
        Seed of the chain layout; the default gives the documented test object.

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32, positive, maximum 1, centred on voxel ``D // 2``.
    """
    _check_box(D)
    return _render_fraction(_protein_atoms(seed), D)


@dataclass(frozen=True)
class _TwoDomainParts:
    body: np.ndarray  # (n, 3) fixed domain
    arm: np.ndarray  # (m, 3) moving domain at c = 0
    extra: np.ndarray  # (k, 3) small domain used by one discrete state
    hinge: np.ndarray  # (3,) hinge point
    axis: np.ndarray  # (3,) unit hinge axis


def _two_domain_parts(seed: int = 7) -> _TwoDomainParts:
    """The :func:`protein_like` object cut into a body and a mobile arm (its second domain).

    The arm hinges on the body atom nearest its centroid, about an axis chosen so that the
    75 deg swing moves the arm's centroid by ~0.13 box without running into the body. The
    extra domain sits in an empty pocket next to the body.
    """
    chain = [_PROTEIN_SCALE * c for c in _protein_chain(seed)]
    shift = np.concatenate(chain).mean(0)
    chain = [c - shift for c in chain]
    arm = chain[1]
    hinge = chain[0][np.argmin(np.linalg.norm(chain[0] - arm.mean(0), axis=1))]
    body = np.concatenate([chain[0], *chain[2:]])
    rng = np.random.default_rng(seed + 4)
    pocket = np.array([0.0, 0.0, -0.17])
    start = body[np.argmin(np.linalg.norm(body - pocket, axis=1))]
    extra = _random_walk_domain(rng, start, pocket, 0.055, 45)
    axis = np.array([1.0, -0.2, 0.3])
    return _TwoDomainParts(body, arm, extra, hinge, axis / np.linalg.norm(axis))


def _rotate_about(
    points: np.ndarray, pivot: np.ndarray, axis: np.ndarray, angle: float
) -> np.ndarray:
    """Rodrigues rotation of ``(n, 3)`` points by ``angle`` rad about ``axis`` through ``pivot``."""
    k = axis / np.linalg.norm(axis)
    p = points - pivot
    rotated = (
        p * math.cos(angle)
        + np.cross(k, p) * math.sin(angle)
        + np.outer(p @ k, k) * (1.0 - math.cos(angle))
    )
    return rotated + pivot


#: hinge opening of :func:`two_domain` at ``c = 1``
TWO_DOMAIN_MAX_ANGLE_DEG = 75.0


def _two_domain_atoms(c: float, with_arm: bool = True, with_extra: bool = False) -> np.ndarray:
    parts = _two_domain_parts()
    pieces = [parts.body]
    if with_arm:
        angle = math.radians(TWO_DOMAIN_MAX_ANGLE_DEG) * c
        pieces.append(_rotate_about(parts.arm, parts.hinge, parts.axis, angle))
    if with_extra:
        pieces.append(parts.extra)
    return np.concatenate(pieces)


def two_domain(D: int, c: float) -> np.ndarray:
    """The protein-like object as two rigid bodies: an arm that swings about a hinge.

    The body (three domains and the helix of :func:`protein_like`) is fixed in the box; the
    arm (its second domain, about a quarter of the mass) is rotated
    by ``c * TWO_DOMAIN_MAX_ANGLE_DEG`` (75 deg) about a tilted hinge axis, so ``c`` in
    [0, 1] is a one-dimensional conformational coordinate.

    Parameters
    ----------
    D
        Even box size (>= 16).
    c
        Conformational coordinate in [0, 1].

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32. All frames share one normalisation (the maximum of ``c=0``)
        and one origin, so differences between frames are motion only.
    """
    _check_box(D)
    if not 0.0 <= c <= 1.0:
        raise CryofieldError(f"two_domain: coordinate c must be in [0, 1], got {c}")
    ref = render_gaussians(_two_domain_atoms(0.0) * D, 1.0, _ATOM_SIGMA * D, D).max()
    vol = render_gaussians(_two_domain_atoms(c) * D, 1.0, _ATOM_SIGMA * D, D)
    return (vol / ref).astype(np.float32)


#: the discrete states of :func:`discrete_states`, in order
DISCRETE_STATE_NAMES = ("arm closed", "arm open", "arm absent", "extra domain bound")


def discrete_states(D: int, n_states: int = 3) -> list[np.ndarray]:
    """Discrete conformational/compositional states of the two-domain object.

    State 0: arm closed (``c=0``); 1: arm open (``c=1``); 2: arm absent; 3: arm closed and
    an extra small domain bound to the body (see :data:`DISCRETE_STATE_NAMES`).

    Parameters
    ----------
    D
        Even box size (>= 16).
    n_states
        2, 3 or 4: the first ``n_states`` states above.

    Returns
    -------
    list of np.ndarray
        ``n_states`` volumes ``(D, D, D)`` float32 on one common scale.
    """
    _check_box(D)
    if not 2 <= n_states <= 4:
        raise CryofieldError(f"discrete_states: n_states must be 2, 3 or 4, got {n_states}")
    recipes = [
        dict(c=0.0),
        dict(c=1.0),
        dict(c=0.0, with_arm=False),
        dict(c=0.0, with_extra=True),
    ][:n_states]
    vols = [render_gaussians(_two_domain_atoms(**r) * D, 1.0, _ATOM_SIGMA * D, D) for r in recipes]
    scale = vols[0].max()
    return [(v / scale).astype(np.float32) for v in vols]


def fragment_volume(
    vol: np.ndarray, rng: np.random.Generator, radius_frac: float = 0.17
) -> np.ndarray:
    """A broken piece of ``vol``: the density inside a soft ball around a random dense voxel.

    Parameters
    ----------
    vol
        ``(D, D, D)`` volume.
    rng
        Random generator (chooses the ball centre).
    radius_frac
        Ball radius as a fraction of the box.

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32 fragment, re-centred so its centre of mass is near ``D // 2``.
    """
    D = vol.shape[0]
    dense = np.argwhere(vol > 0.3 * vol.max())
    centre = dense[rng.integers(len(dense))].astype(np.float64)  # [z, y, x]
    idx = np.indices(vol.shape).reshape(3, -1).T
    dist = np.linalg.norm(idx - centre, axis=1).reshape(vol.shape)
    radius = radius_frac * D
    mask = 1.0 / (1.0 + np.exp((dist - radius) / 1.0))
    frag = vol * mask
    com = (np.indices(vol.shape).reshape(3, -1) @ frag.ravel()) / frag.sum()
    shift = np.rint(D // 2 - com).astype(int)
    return np.roll(frag, tuple(shift), axis=(0, 1, 2)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# atomic models


@dataclass(frozen=True)
class AtomicFrames:
    """Atoms of every model (frame) in a coordinate file.

    Attributes
    ----------
    coords_A
        List (one per model) of ``(n_k, 3)`` float64 Cartesian coordinates ``[x, y, z]`` in A.
    elements
        List of ``(n_k,)`` element symbols.
    bfactors_A2
        List of ``(n_k,)`` isotropic B-factors (A^2).
    occupancies
        List of ``(n_k,)`` occupancies.
    """

    coords_A: list[np.ndarray]
    elements: list[np.ndarray]
    bfactors_A2: list[np.ndarray]
    occupancies: list[np.ndarray]


def read_atomic_models(path: str | Path) -> AtomicFrames:
    """Read every model of a PDB/mmCIF file with gemmi (waters removed).

    Raises
    ------
    InputFileError
        When the file cannot be read or holds no atoms.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "atomic model file not found")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as err:
        raise InputFileError(path, f"cannot read as PDB/mmCIF ({err})") from err
    st.remove_waters()
    frames = AtomicFrames([], [], [], [])
    for model in st:
        xyz, el, bf, occ = [], [], [], []
        for chain in model:
            for residue in chain:
                for atom in residue:
                    xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                    el.append(atom.element.name)
                    bf.append(atom.b_iso)
                    occ.append(atom.occ)
        if xyz:
            frames.coords_A.append(np.asarray(xyz, dtype=np.float64))
            frames.elements.append(np.asarray(el))
            frames.bfactors_A2.append(np.asarray(bf, dtype=np.float64))
            frames.occupancies.append(np.asarray(occ, dtype=np.float64))
    if not frames.coords_A:
        raise InputFileError(path, "no atoms found")
    return frames


def _scattering_gaussians(elements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 5)`` a and b coefficients of the electron scattering factors per atom.

    International Tables for Crystallography Vol. C, Table 4.3.2.2 (Peng et al. 1996, Acta
    Cryst. A52, 257), as tabulated by gemmi (``Element.c4322``):
    ``f_e(s) = sum_i a_i exp(-b_i s^2)`` with ``s = sin(theta)/lambda = q / 2``, q in 1/A.
    """
    import gemmi

    table: dict[str, tuple[list[float], list[float]]] = {}
    a = np.empty((len(elements), 5))
    b = np.empty((len(elements), 5))
    for i, name in enumerate(elements):
        if name not in table:
            coef = gemmi.Element(str(name)).c4322
            if not any(coef.a):
                coef = gemmi.Element("C").c4322  # unknown element: carbon
            table[name] = (list(coef.a), list(coef.b))
        a[i], b[i] = table[name]
    return a, b


def atomic_model_density(
    path: str | Path,
    apix_A: float,
    D: int | None = None,
    bfactor_A2: float = 0.0,
    use_atom_bfactors: bool = False,
    antialias_px: float = 0.5,
    model_indices: list[int] | None = None,
) -> tuple[list[np.ndarray], int]:
    """Electron-scattering density of an atomic model, one frame per model.

    Each atom contributes the real-space transform of its 5-Gaussian electron scattering
    factor blurred by the B-factor ``B``: with ``f(q) = sum_i a_i exp(-(b_i + B) q^2 / 4)``,
    ``rho(r) = sum_i a_i (4 pi / (b_i + B))^(3/2) exp(-4 pi^2 r^2 / (b_i + B))``
    (per A^3, times the occupancy). An extra Gaussian blur of ``antialias_px`` px is added
    in quadrature so that atoms narrower than a voxel are sampled without aliasing.

    All frames share one origin, the mean atom position of the first model, which is put at
    voxel ``D // 2``; frame-to-frame differences are therefore the motion in the file.

    Parameters
    ----------
    path
        PDB or mmCIF file (several MODEL records -> several frames).
    apix_A
        Voxel size (A).
    D
        Even box size; default: the smallest even size holding 1.5x the model diameter.
    bfactor_A2
        Global B-factor added to every atom (A^2).
    use_atom_bfactors
        Add each atom's own B-factor from the file.
    antialias_px
        Extra blur (standard deviation, px).
    model_indices
        Models to render (0-based); default all.

    Returns
    -------
    (frames, D)
        ``frames``: list of ``(D, D, D)`` float32 volumes (sum over voxels times ``apix^3``
        equals the summed ``f_e(0)``); ``D``: the box used.
    """
    frames = read_atomic_models(path)
    if apix_A <= 0:
        raise CryofieldError(f"pixel size must be positive, got {apix_A}")
    origin = frames.coords_A[0].mean(0)
    if D is None:
        radius = max(np.linalg.norm(c - origin, axis=1).max() for c in frames.coords_A)
        D = max(16, 2 * math.ceil(1.5 * radius / apix_A))
    _check_box(D)
    indices = range(len(frames.coords_A)) if model_indices is None else model_indices
    vols = []
    for k in indices:
        if not 0 <= k < len(frames.coords_A):
            raise InputFileError(
                path, f"model index {k} out of range (file has {len(frames.coords_A)})"
            )
        xyz = frames.coords_A[k] - origin
        a, b = _scattering_gaussians(frames.elements[k])
        btot = b + bfactor_A2 + (frames.bfactors_A2[k][:, None] if use_atom_bfactors else 0.0)
        sigma_A2 = btot / (8.0 * math.pi**2) + (antialias_px * apix_A) ** 2
        weights = a * frames.occupancies[k][:, None]  # integral of each Gaussian (A^3 * density)
        n = len(xyz)
        centers_px = np.repeat(xyz / apix_A, 5, axis=0)
        vol = render_gaussians(
            centers_px,
            (weights / apix_A**3).reshape(n * 5),
            np.sqrt(sigma_A2).reshape(n * 5) / apix_A,
            D,
        )
        vols.append(vol)
    return vols, D
