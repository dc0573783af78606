"""Simulated SMLM data: blinking emitters, pixel-integrated Gaussian PSFs, the contract's camera.

Physics
    Every emitter is an isotropic 2-D Gaussian of its own ``sigma`` (input pixels) integrated
    exactly over each pixel's area (differences of ``erf`` at the pixel edges), scaled by its
    photon count, on a uniform or smoothly varying background (photons per pixel). The camera
    is :meth:`~napari_var_emitter.camera.Camera.photons_to_adu` (QE, Poisson shot noise, EM gain
    with excess noise factor 2 or none, Gaussian read noise, e-/ADU, baseline, uint16 clipping).

Emitters
    A pool of fluorophores at fixed positions blinks with two-state on/off kinetics: on-times are
    geometric with mean ``mean_on_frames`` and each fluorophore is on for a fraction
    ``on_fraction`` of the time, so the number of emitters on in a frame is Poisson with mean
    ``density * area`` and the same fluorophore appears in consecutive frames at the same
    position (its photon count varies from frame to frame). Fluorophores lie uniformly in the
    field or along smooth random curves (filaments), anywhere within ``margin_px`` outside the
    frame edges too, so partial PSFs at the border are part of the data.

Everything is vectorised: a frame is the batched outer product of per-emitter erf-difference
vectors along y and x (a matmul over emitters padded per frame), never a loop per emitter.

Positions follow the package convention: input pixels, pixel-centre (pixel ``(r, c)`` covers
``[c-0.5, c+0.5) x [r-0.5, r+0.5)``), frames 0-based.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf

from .camera import Camera
from .config import SimulationConfig
from .errors import ConfigError
from .io.atomic import atomic_path
from .table import empty_table

__all__ = [
    "render_expected",
    "simulate_emitters",
    "simulate_movie",
    "SimulatedMovie",
    "sample_training_batch",
    "TrainingBatch",
    "write_simulation",
    "in_field_of_view",
    "smooth_background",
]

PHOTON_DISTRIBUTIONS = ("log-uniform", "uniform")
SCENES = ("uniform", "filaments")

# Filament geometry (input pixels): a worm-like chain walked in small steps; its tangent
# diffuses with variance step/persistence, so curves are smooth on the scale of a few PSFs.
_FILAMENT_STEP_PX = 0.5
_FILAMENT_PERSISTENCE_PX = (10.0, 40.0)
# labelled filaments are ~25 nm thick (antibody-labelled microtubules): a small spread
_FILAMENT_SPREAD_NM = 25.0

# fraction of the time a fluorophore is on: sets the pool size (density / on_fraction per
# um^2), i.e. how often a site blinks again; per-frame photon variation in quantile units
DEFAULT_ON_FRACTION = 0.1
DEFAULT_PHOTON_JITTER = 0.1

# upper bound on padded work arrays in render_expected (elements), to keep memory flat
_RENDER_CHUNK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

def render_expected(table, n_frames: int, shape, factor: int = 1, background=0.0) -> np.ndarray:
    """Render expected photons per (sub-)pixel: float32 array ``(T, H*factor, W*factor)``.

    Each emitter (``table["frame"]``, ``x``, ``y`` in input pixels, ``photons``, ``sigma`` in
    input pixels) is a 2-D Gaussian integrated over every pixel of the ``factor``-times finer
    grid with erf differences. ``background`` is photons per *input* pixel: a scalar, ``(T,)``,
    ``(H, W)`` or ``(T, H, W)``; on the fine grid it is spread evenly (divided by
    ``factor**2``). Binning the result by ``factor`` equals the ``factor=1`` rendering (the fine
    pixel edges contain the coarse ones, so the erf differences telescope). Emitters whose
    frame lies outside ``0..n_frames-1`` are ignored.
    """
    n_frames = int(n_frames)
    h, w = (int(s) for s in shape)
    f = int(factor)
    if f < 1 or h < 1 or w < 1 or n_frames < 0:
        raise ValueError(f"render_expected: bad shape {shape!r}, n_frames {n_frames} or "
                         f"factor {factor!r}")
    out = np.empty((n_frames, h * f, w * f), dtype=np.float32)
    _fill_background(out, background, n_frames, h, w, f)

    table = np.asarray(table)
    if table.size == 0 or n_frames == 0:
        return out
    frame = np.asarray(table["frame"], dtype=np.int64)
    keep = (frame >= 0) & (frame < n_frames)
    photons = np.asarray(table["photons"], dtype=np.float64)[keep]
    sigma = np.asarray(table["sigma"], dtype=np.float64)[keep]
    if not (np.all(np.isfinite(photons)) and np.all(photons >= 0)):
        raise ValueError("render_expected: emitter photons must be finite and >= 0")
    if not (np.all(np.isfinite(sigma)) and np.all(sigma > 0)):
        raise ValueError("render_expected: emitter sigma must be finite and > 0 (input pixels)")
    x = np.asarray(table["x"], dtype=np.float64)[keep]
    y = np.asarray(table["y"], dtype=np.float64)[keep]
    frame = frame[keep]
    if frame.size == 0:
        return out

    order = np.argsort(frame, kind="stable")
    frame, x, y, photons, sigma = frame[order], x[order], y[order], photons[order], sigma[order]
    counts = np.bincount(frame, minlength=n_frames)
    starts = np.concatenate(([0], np.cumsum(counts)))
    # fine-grid pixel edges in input coordinates: fine pixel j spans [j/f - 0.5, (j+1)/f - 0.5)
    edges_y = np.arange(h * f + 1, dtype=np.float64) / f - 0.5
    edges_x = np.arange(w * f + 1, dtype=np.float64) / f - 0.5

    # chunk over frames so the padded (frames, emitters, pixels) arrays stay small
    t0 = 0
    while t0 < n_frames:
        t1 = t0 + 1
        while t1 < n_frames:
            k = max(1, int(counts[t0:t1 + 1].max()))
            if (t1 + 1 - t0) * k * (h + w) * f > _RENDER_CHUNK_ELEMENTS:
                break
            t1 += 1
        a, b = starts[t0], starts[t1]
        if b > a:
            _accumulate_psfs(out[t0:t1], frame[a:b] - t0, starts[t0:t1] - a, x[a:b], y[a:b],
                             photons[a:b], sigma[a:b], edges_x, edges_y)
        t0 = t1
    return out


def _integrated_gaussian_1d(centre, sigma, edges):
    """Fraction of a 1-D Gaussian in each interval between consecutive ``edges``: (n, len-1)."""
    z = (edges[None, :] - centre[:, None]) / (math.sqrt(2.0) * sigma[:, None])
    return 0.5 * np.diff(erf(z), axis=1)


def _accumulate_psfs(out, frame, frame_starts, x, y, photons, sigma, edges_x, edges_y):
    """Add the emitters (sorted by frame, frames relative to ``out``) to ``out`` in place."""
    n_t = out.shape[0]
    py = (_integrated_gaussian_1d(y, sigma, edges_y) * photons[:, None]).astype(np.float32)
    px = _integrated_gaussian_1d(x, sigma, edges_x).astype(np.float32)
    # slot of each emitter within its frame, to pad emitters into a (frames, K, pixels) array
    rank = np.arange(frame.size) - frame_starts[frame]
    k = int(rank.max()) + 1
    ys = np.zeros((n_t, k, py.shape[1]), dtype=np.float32)
    xs = np.zeros((n_t, k, px.shape[1]), dtype=np.float32)
    ys[frame, rank] = py
    xs[frame, rank] = px
    # image[t] = sum_k photons_k * py_k (outer) px_k  ==  Y[t]^T @ X[t]
    out += np.matmul(ys.transpose(0, 2, 1), xs)


def _fill_background(out, background, n_frames, h, w, f):
    bg = np.asarray(background, dtype=np.float32)
    scale = np.float32(1.0 / (f * f))
    if bg.ndim == 0:
        out[...] = bg * scale
    elif bg.ndim == 1 and bg.shape == (n_frames,):
        out[...] = (bg * scale)[:, None, None]
    elif bg.ndim == 2 and bg.shape == (h, w):
        out[...] = _upsample_nearest(bg, f)[None] * scale
    elif bg.ndim == 3 and bg.shape == (n_frames, h, w):
        for t in range(n_frames):  # per frame keeps the repeated copy one frame big
            out[t] = _upsample_nearest(bg[t], f) * scale
    else:
        raise ValueError(f"render_expected: background of shape {bg.shape} is not a scalar, "
                         f"({n_frames},), ({h}, {w}) or ({n_frames}, {h}, {w})")


def _upsample_nearest(img, f):
    if f == 1:
        return img
    return np.repeat(np.repeat(img, f, axis=-2), f, axis=-1)


# ---------------------------------------------------------------------------------------------
# random draws
# ---------------------------------------------------------------------------------------------

def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _log_uniform(rng, lo, hi, size=None):
    """Log-uniform in [lo, hi] (uniform when lo <= 0, where a log scale does not exist)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    u = rng.random(size)
    if np.all(lo > 0):
        return lo * (hi / lo) ** u
    return lo + (hi - lo) * u


def _photons_from_quantile(u, lo, hi, distribution):
    """Inverse CDF of the photon distribution on [lo, hi] at quantile ``u``."""
    if distribution == "log-uniform":
        return lo * (hi / lo) ** u
    return lo + (hi - lo) * u


def _fold_unit(v):
    """Reflect values into [0, 1] (period 2 fold); keeps a uniform variable uniform."""
    return 1.0 - np.abs(1.0 - np.mod(v, 2.0))


def _check_range(value, name, positive=False):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (min, max), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi or lo < 0 or (positive and lo <= 0):
        need = "0 < min <= max" if positive else "0 <= min <= max"
        raise ConfigError(f"{name} must be (min, max) with {need}, got ({lo:g}, {hi:g})")
    return lo, hi


def _blinking_pool(rng, expected_on, n_frames, mean_on_frames, on_fraction, poisson_pool):
    """Simulate pools of blinking fluorophores; return only those on in at least one frame.

    ``expected_on`` (G,) is the mean number of emitters on per frame in each group (sample or
    movie); ``mean_on_frames`` is one number or one per group. Each group gets ``expected_on /
    on_fraction`` fluorophores (a Poisson number when ``poisson_pool``, else that number
    rounded at random, so a long movie keeps the asked density), started from the stationary
    state (on with probability ``on_fraction``) and switched with a two-state Markov chain:
    p(on -> off) = 1/mean_on_frames (geometric on-times of that mean) and p(off -> on) chosen
    so that the stationary on-fraction is ``on_fraction``. With a Poisson pool the number on
    per frame is exactly Poisson.

    Returns ``(group, states)``: group index (n,) and on-states (n, n_frames) bool.
    """
    expected_on = np.asarray(expected_on, dtype=np.float64)
    # one mean on-time for all groups, or one per group
    mean_on = np.broadcast_to(np.asarray(mean_on_frames, dtype=np.float64), expected_on.shape)
    pool = expected_on / on_fraction
    if poisson_pool:
        n_pool = rng.poisson(pool)
    else:
        n_pool = np.floor(pool).astype(np.int64) + (rng.random(pool.shape) < pool % 1.0)
    group = np.repeat(np.arange(expected_on.size), n_pool)
    n = group.size
    p_off = 1.0 / mean_on[group]
    p_on = p_off * on_fraction / (1.0 - on_fraction)
    states = np.empty((n, n_frames), dtype=bool)
    if n == 0 or n_frames == 0:
        return group, states
    state = rng.random(n) < on_fraction
    states[:, 0] = state
    for t in range(1, n_frames):
        r = rng.random(n)
        state = np.where(state, r >= p_off, r < p_on)
        states[:, t] = state
    ever_on = states.any(axis=1)
    return group[ever_on], states[ever_on]


def _uniform_positions(rng, n, shape, margin_px):
    h, w = shape
    x = rng.uniform(-0.5 - margin_px, w - 0.5 + margin_px, n)
    y = rng.uniform(-0.5 - margin_px, h - 0.5 + margin_px, n)
    return x, y


def _edge_band_positions(rng, n, shape, margin_px, band_px):
    """``n`` positions within ``band_px`` inside or ``margin_px`` outside the frame border:
    a side chosen in proportion to its length, uniform along it and across the band."""
    h, w = shape
    depth = rng.uniform(-margin_px, band_px, n)  # inward from the border at -0.5 / size-0.5
    side = rng.choice(4, n, p=np.array([w, w, h, h], float) / (2 * (w + h)))
    x = rng.uniform(-0.5 - margin_px, w - 0.5 + margin_px, n)
    y = rng.uniform(-0.5 - margin_px, h - 0.5 + margin_px, n)
    y = np.where(side == 0, -0.5 + depth, np.where(side == 1, h - 0.5 - depth, y))
    x = np.where(side == 2, -0.5 + depth, np.where(side == 3, w - 0.5 - depth, x))
    return x, y


def _filament_positions(rng, n, shape, margin_px, pixel_size_nm):
    """``n`` positions along a few smooth random curves crossing the (margin-extended) field.

    Each filament is a persistent random walk (worm-like chain) walked both ways from a random
    point inside the region until it has surely left it; only its steps inside the region are
    kept and positions are drawn uniformly along their arc length (steps are equal), then
    spread by the label size.
    """
    h, w = shape
    x0, x1 = -0.5 - margin_px, w - 0.5 + margin_px
    y0, y1 = -0.5 - margin_px, h - 0.5 + margin_px
    # 1-3 filaments through a 40x40 field and proportionally more through larger ones, so the
    # filament length per area (and the local density along them) does not depend on the size
    scale = max(1.0, (x1 - x0 + y1 - y0) / 80.0)
    n_fil = max(1, int(round(rng.integers(1, 4) * scale)))
    half_steps = int(math.ceil(1.2 * math.hypot(x1 - x0, y1 - y0) / _FILAMENT_STEP_PX)) + 1
    persistence = rng.uniform(*_FILAMENT_PERSISTENCE_PX, n_fil)
    start = np.stack([rng.uniform(x0, x1, n_fil), rng.uniform(y0, y1, n_fil)], axis=1)
    theta0 = rng.uniform(0, 2 * np.pi, n_fil)
    dtheta_sd = np.sqrt(_FILAMENT_STEP_PX / persistence)[:, None]

    def walk(direction0):
        turns = rng.normal(0.0, 1.0, (n_fil, half_steps)) * dtheta_sd
        theta = direction0[:, None] + np.cumsum(turns, axis=1)
        steps = _FILAMENT_STEP_PX * np.stack([np.cos(theta), np.sin(theta)], axis=2)
        return start[:, None, :] + np.cumsum(steps, axis=1)

    forward = walk(theta0)
    backward = walk(theta0 + np.pi)[:, ::-1]
    path = np.concatenate([backward, start[:, None, :], forward], axis=1)  # (F, S, 2)
    inside = ((path[..., 0] >= x0) & (path[..., 0] < x1)
              & (path[..., 1] >= y0) & (path[..., 1] < y1))
    seg_ok = inside[:, :-1] & inside[:, 1:]
    seg_f, seg_i = np.nonzero(seg_ok)
    if seg_f.size == 0:  # a degenerate (tiny) field: no whole step fits inside
        return _uniform_positions(rng, n, shape, margin_px)
    pick = rng.integers(0, seg_f.size, n)
    t = rng.random(n)[:, None]
    a = path[seg_f[pick], seg_i[pick]]
    b = path[seg_f[pick], seg_i[pick] + 1]
    p = a + t * (b - a) + rng.normal(0.0, _FILAMENT_SPREAD_NM / pixel_size_nm, (n, 2))
    return p[:, 0], p[:, 1]


def _smooth_fields(rng, n, shape):
    """``n`` random smooth fields (n, H, W): a linear gradient plus a broad Gaussian blob."""
    h, w = shape
    yy = np.linspace(-1.0, 1.0, h) if h > 1 else np.zeros(1)
    xx = np.linspace(-1.0, 1.0, w) if w > 1 else np.zeros(1)
    a, b = rng.normal(size=(2, n))
    c = 1.5 * rng.normal(size=n)
    cx, cy = rng.uniform(-1.0, 1.0, (2, n))
    width = rng.uniform(0.3, 1.0, n)
    X = xx[None, None, :]
    Y = yy[None, :, None]
    blob = np.exp(-((X - cx[:, None, None]) ** 2 + (Y - cy[:, None, None]) ** 2)
                  / (2.0 * width[:, None, None] ** 2))
    return a[:, None, None] * X + b[:, None, None] * Y + c[:, None, None] * blob


#: largest relative amplitude of a training tile's smooth background variation
MAX_BACKGROUND_VARIATION = 0.7


def smooth_background(shape, rng, low: float, high: float) -> np.ndarray:
    """A smooth random background map (H, W) float32 spanning [low, high] photons per pixel.

    ``low == high`` gives a uniform background.
    """
    low, high = _check_range((low, high), "background")
    rng = _as_rng(rng)
    g = _smooth_fields(rng, 1, shape)[0]
    span = g.max() - g.min()
    unit = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    return (low + (high - low) * unit).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# emitters
# ---------------------------------------------------------------------------------------------

def simulate_emitters(n_frames: int, shape, rng, density_per_um2: float,
                      pixel_size_nm: float = 100.0, photons=(500.0, 5000.0),
                      sigma_px=(1.0, 1.5), mean_on_frames: float = 3.0,
                      scene: str = "uniform", margin_px: float = 1.0, *,
                      photon_distribution: str = "log-uniform",
                      on_fraction: float = DEFAULT_ON_FRACTION,
                      photon_jitter: float = DEFAULT_PHOTON_JITTER) -> np.ndarray:
    """Simulate blinking emitters over ``n_frames`` frames of ``shape`` (H, W); returns a table.

    ``density_per_um2`` is the expected number of emitters *on per frame* per um^2, over the
    field plus ``margin_px`` on every side (emitters there contribute partial PSFs). A pool of
    ``density / on_fraction`` fluorophores per um^2 blinks with mean on-time
    ``mean_on_frames`` frames, so one fluorophore appears in consecutive frames at the same
    position. Each fluorophore has a brightness quantile drawn uniformly; per frame it is
    jittered by ``photon_jitter`` (sd, in quantile units, folded back into [0, 1]) and mapped
    to photons with the ``photon_distribution`` ("log-uniform" or "uniform") on ``photons``
    (min, max); the per-frame photon counts therefore follow that distribution exactly.
    ``sigma_px``: (min, max) PSF sigma in input pixels, uniform per fluorophore.
    ``scene``: "uniform" or "filaments" (smooth random curves, locally dense).

    The table (:data:`~napari_var_emitter.table.LOC_DTYPE`) is sorted by frame; ``background``
    is NaN (the scene's background is chosen by the caller).
    """
    rng = _as_rng(rng)
    h, w = _check_shape(shape)
    n_frames = int(n_frames)
    if n_frames < 0:
        raise ConfigError(f"number of frames must be >= 0, got {n_frames}")
    density_per_um2 = float(density_per_um2)
    if not np.isfinite(density_per_um2) or density_per_um2 < 0:
        raise ConfigError(f"density must be >= 0 emitters per um^2, got {density_per_um2!r}")
    if not pixel_size_nm > 0:
        raise ConfigError(f"pixel size must be > 0 nm, got {pixel_size_nm!r}")
    if photon_distribution not in PHOTON_DISTRIBUTIONS:
        raise ConfigError(f"photon distribution must be one of {PHOTON_DISTRIBUTIONS}, "
                          f"got {photon_distribution!r}")
    ph_lo, ph_hi = _check_range(photons, "photons",
                                positive=photon_distribution == "log-uniform")
    s_lo, s_hi = _check_range(sigma_px, "sigma", positive=True)
    if not mean_on_frames >= 1:
        raise ConfigError(f"mean on-time must be >= 1 frame, got {mean_on_frames!r}")
    if not 0 < on_fraction <= mean_on_frames / (1.0 + mean_on_frames):
        raise ConfigError(f"on_fraction must be in (0, {mean_on_frames / (1 + mean_on_frames):.3g}]"
                          f" for a mean on-time of {mean_on_frames} frames, got {on_fraction!r}")
    if scene not in SCENES:
        raise ConfigError(f"scene must be one of {SCENES}, got {scene!r}")
    if not margin_px >= 0:
        raise ConfigError(f"margin must be >= 0 pixels, got {margin_px!r}")
    if not photon_jitter >= 0:
        raise ConfigError(f"photon jitter must be >= 0, got {photon_jitter!r}")

    expected_on = density_per_um2 * _area_um2((h, w), margin_px, pixel_size_nm)
    _, states = _blinking_pool(rng, [expected_on], n_frames, mean_on_frames, on_fraction,
                              poisson_pool=False)
    n_fluo = states.shape[0]
    if scene == "filaments":
        fx, fy = _filament_positions(rng, n_fluo, (h, w), margin_px, pixel_size_nm)
    else:
        fx, fy = _uniform_positions(rng, n_fluo, (h, w), margin_px)
    f_sigma = rng.uniform(s_lo, s_hi, n_fluo)
    f_quantile = rng.random(n_fluo)

    frame, fluo = np.nonzero(states.T)  # frame-major: the table comes out sorted by frame
    table = empty_table(frame.size)
    table["frame"] = frame
    table["x"] = fx[fluo]
    table["y"] = fy[fluo]
    table["sigma"] = f_sigma[fluo]
    u = _fold_unit(f_quantile[fluo] + photon_jitter * rng.normal(size=frame.size))
    table["photons"] = _photons_from_quantile(u, ph_lo, ph_hi, photon_distribution)
    return table


def _check_shape(shape):
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"frame size must be two integers (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"frame size must be positive, got {shape!r}")
    return h, w


def _area_um2(shape, margin_px, pixel_size_nm):
    h, w = shape
    return (h + 2 * margin_px) * (w + 2 * margin_px) * (pixel_size_nm / 1000.0) ** 2


def in_field_of_view(table, shape) -> np.ndarray:
    """The rows of ``table`` whose position lies inside the frame ``[-0.5, W-0.5) x [-0.5, H-0.5)``.

    Emitters simulated in the margin outside the frame light the border pixels but cannot be
    localised as positions in the image; ground-truth files and training targets hold these rows.
    """
    h, w = shape
    table = np.asarray(table)
    ok = ((table["x"] >= -0.5) & (table["x"] < w - 0.5)
          & (table["y"] >= -0.5) & (table["y"] < h - 0.5))
    return table[ok]


def _pixel_under(table, shape):
    """(row, col) of the pixel under each emitter; emitters in the margin get the border pixel."""
    h, w = shape
    r = np.clip(np.rint(table["y"]).astype(np.int64), 0, h - 1)
    c = np.clip(np.rint(table["x"]).astype(np.int64), 0, w - 1)
    return r, c


# ---------------------------------------------------------------------------------------------
# movies
# ---------------------------------------------------------------------------------------------

@dataclass
class SimulatedMovie:
    """A simulated acquisition and its ground truth.

    ``adu``: (T, H, W) uint16 camera frames; ``photons_expected``: (T, H, W) float32 expected
    photons per pixel (emitters + background, before the camera); ``highres``: (T, fH, fW)
    float32 expected photons on the ``highres_factor``-times finer grid (binning it by the
    factor gives ``photons_expected``) or None; ``table``: every emitter, including those in
    the margin outside the frame (``background`` filled); ``background``: (H, W) float32
    photons per pixel, the same in every frame.
    """

    adu: np.ndarray
    photons_expected: np.ndarray
    table: np.ndarray
    camera: Camera
    background: np.ndarray
    pixel_size_nm: float
    highres: np.ndarray | None = None
    highres_factor: int = 8
    scene: str = "uniform"
    density_per_um2: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the camera frames."""
        return tuple(self.adu.shape)

    @property
    def n_frames(self) -> int:
        """Number of frames T."""
        return int(self.adu.shape[0])

    def table_in_view(self) -> np.ndarray:
        """Ground truth restricted to emitters inside the field of view (what files hold)."""
        return in_field_of_view(self.table, self.adu.shape[1:])


def simulate_movie(n_frames: int = 100, shape=(40, 40), rng=None, density_per_um2: float = 1.0,
                   pixel_size_nm: float = 100.0, photons=(500.0, 5000.0), background=(10.0, 30.0),
                   sigma_px=(1.0, 1.5), camera: Camera | None = None,
                   mean_on_frames: float = 3.0, scene: str = "uniform", margin_px: float = 1.0,
                   highres_factor: int | None = 8, *, photon_distribution: str = "log-uniform",
                   on_fraction: float = DEFAULT_ON_FRACTION) -> SimulatedMovie:
    """Simulate a movie of blinking emitters recorded by ``camera``.

    ``rng``: a numpy Generator or a seed. ``background``: photons per pixel, a number
    (uniform), a pair (min, max) (a smooth random map spanning that range, the same in every
    frame) or an (H, W) array. ``camera`` defaults to ``Camera()`` (ADU = photons).
    ``highres_factor``: also render the expected photons on that finer grid (None or 0: skip).
    Other arguments as :func:`simulate_emitters`.
    """
    rng = _as_rng(rng)
    h, w = _check_shape(shape)
    camera = Camera() if camera is None else camera
    bg_map = _movie_background(background, (h, w), rng)
    table = simulate_emitters(n_frames, (h, w), rng, density_per_um2, pixel_size_nm, photons,
                              sigma_px, mean_on_frames, scene, margin_px,
                              photon_distribution=photon_distribution, on_fraction=on_fraction)
    table["background"] = bg_map[_pixel_under(table, (h, w))]
    expected = render_expected(table, n_frames, (h, w), 1, bg_map)
    adu = camera.photons_to_adu(expected, rng)
    highres = None
    factor = int(highres_factor or 0)
    if factor > 1:
        highres = render_expected(table, n_frames, (h, w), factor, bg_map)
    elif factor == 1:
        highres = expected.copy()
    return SimulatedMovie(adu=adu, photons_expected=expected, table=table, camera=camera,
                          background=bg_map, pixel_size_nm=float(pixel_size_nm),
                          highres=highres, highres_factor=factor if factor else 8, scene=scene,
                          density_per_um2=float(density_per_um2),
                          meta={"photons": [float(v) for v in photons],
                                "sigma_px": [float(v) for v in sigma_px],
                                "mean_on_frames": float(mean_on_frames),
                                "margin_px": float(margin_px),
                                "photon_distribution": photon_distribution})


def _movie_background(background, shape, rng):
    bg = np.asarray(background, dtype=np.float64)
    if bg.ndim == 0:
        if not (np.isfinite(bg) and bg >= 0):
            raise ConfigError(f"background must be >= 0 photons per pixel, got {background!r}")
        return np.full(shape, bg, dtype=np.float32)
    if bg.shape == (2,):
        return smooth_background(shape, rng, bg[0], bg[1])
    if bg.shape == tuple(shape):
        if not (np.all(np.isfinite(bg)) and np.all(bg >= 0)):
            raise ConfigError("background map must be finite and >= 0")
        return bg.astype(np.float32)
    raise ConfigError(f"background must be a number, (min, max) or an {tuple(shape)} map, "
                      f"got shape {bg.shape}")


# ---------------------------------------------------------------------------------------------
# on-the-fly training data
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingBatch:
    """A batch of simulated training samples (numpy).

    ``frames``: (B, C, H, W) float32 camera frames converted back to photons
    (:meth:`Camera.adu_to_photons`), C consecutive frames centred on the target frame;
    ``background``: (B, H, W) float32 true background, photons per pixel;
    ``tables``: B tables of the centre frame's emitters inside the field of view (frame 0,
    x/y in input pixels, photons, sigma, background filled); ``cameras``: the B cameras;
    ``expected``: (B, C, H, W) float32 noise-free expected photons.
    """

    frames: np.ndarray
    background: np.ndarray
    tables: list
    cameras: list
    expected: np.ndarray
    pixel_size_nm: float

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def sample_training_batch(sim: SimulationConfig, batch_size: int, rng,
                          context_frames: int = 1) -> TrainingBatch:
    """Simulate ``batch_size`` independent training samples drawn from the ranges of ``sim``.

    Per sample: density uniform in ``sim.density_per_um2`` (sparse and dense equally common),
    or 0 (no emitter, not even outside the frame) for a share ``sim.empty_fraction``;
    scene filaments with probability ``sim.filament_fraction`` else uniform (a share
    ``sim.edge_fraction`` of a uniform scene's emitters lies within ``sim.edge_band_px`` of the
    border, inside or in the margin; the expected count is unchanged); PSF sigma: a
    sample value uniform in ``sim.sigma_px``, each emitter within +-10% of it (clipped to the
    range); photons: a sub-range of ``sim.photons`` drawn on a log scale, per-frame photons
    log-uniform on it; background: a level log-uniform in ``sim.background``, uniform or (half
    of the samples) smoothly varying by up to +-70% (a share ``sim.steep_background_fraction``
    instead spans a ratio up to ``sim.steep_background_ratio`` between its darkest and
    brightest pixel, around the same mean level); camera: EMCCD with probability
    ``sim.emccd_fraction`` (EM gain log-uniform in ``sim.em_gain``) else no EM gain, QE,
    baseline uniform, e-/ADU and read noise log-uniform in their ranges. e-/ADU is raised where
    needed so the brightest pixel stays below the uint16 ceiling (an experimenter avoids
    saturation). ``context_frames`` consecutive frames of blinking emitters are rendered, put
    through the camera (-> uint16 ADU) and converted back to photons.
    """
    rng = _as_rng(rng)
    sim.validate()
    b_n = int(batch_size)
    c_n = int(context_frames)
    if b_n < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size!r}")
    if c_n < 1:
        raise ConfigError(f"context_frames must be >= 1, got {context_frames!r}")
    h, w = (int(s) for s in sim.frame_size)
    px_nm = float(sim.pixel_size_nm)
    margin = float(sim.edge_margin_px)
    centre = c_n // 2

    # --- per-sample scene parameters
    density = rng.uniform(sim.density_per_um2[0], sim.density_per_um2[1], b_n)
    if sim.empty_fraction > 0:  # (drawn only when asked, so other configs keep their samples)
        density = np.where(rng.random(b_n) < sim.empty_fraction, 0.0, density)
    is_filament = rng.random(b_n) < sim.filament_fraction
    s_lo, s_hi = (float(v) for v in sim.sigma_px)
    sigma_centre = rng.uniform(s_lo, s_hi, b_n)
    ph_lo, ph_hi = (float(v) for v in sim.photons)
    ph_dist = "log-uniform" if ph_lo > 0 else "uniform"
    sample_ph_lo = _log_uniform(rng, ph_lo, ph_hi, b_n)
    sample_ph_hi = _log_uniform(rng, sample_ph_lo, ph_hi)
    level = _log_uniform(rng, sim.background[0], sim.background[1], b_n)
    # users' backgrounds vary a lot within a field (illumination profile, out-of-focus
    # light): up to +-70 % around the level, i.e. a 5.7x ratio between the darkest and the
    # brightest pixel (a tile of `simulate --background 10 50` spans 5x). Trained on +-30 %
    # only, the model fired on the bright edge of steep backgrounds in sparse frames.
    variation = np.where(rng.random(b_n) < 0.5, rng.uniform(0.0, MAX_BACKGROUND_VARIATION, b_n),
                         0.0)
    fields = _smooth_fields(rng, b_n, (h, w))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    peak = np.abs(fields).max(axis=(1, 2), keepdims=True)
    fields = np.divide(fields, peak, out=np.zeros_like(fields), where=peak > 0)
    bg_maps = (level[:, None, None] * (1.0 + variation[:, None, None] * fields)
               ).astype(np.float32)
    if sim.steep_background_fraction > 0:  # (drawn only when asked, as empty samples)
        steep = rng.random(b_n) < sim.steep_background_fraction
        ratio = np.exp(rng.uniform(0.0, np.log(sim.steep_background_ratio), b_n))
        low = fields.min(axis=(1, 2), keepdims=True)
        span = fields.max(axis=(1, 2), keepdims=True) - low
        unit = np.divide(fields - low, span, out=np.zeros_like(fields), where=span > 0)
        profile = 1.0 + (ratio[:, None, None] - 1.0) * unit  # darkest pixel 1, brightest ratio
        profile /= profile.mean(axis=(1, 2), keepdims=True)  # the level stays the mean
        bg_maps = np.where(steep[:, None, None], level[:, None, None] * profile,
                           bg_maps).astype(np.float32)

    # --- blinking emitters of all samples at once
    if isinstance(sim.mean_on_frames, (list, tuple)):  # a range: log-uniform per sample
        mean_on = _log_uniform(rng, *(float(v) for v in sim.mean_on_frames), b_n)
    else:
        mean_on = float(sim.mean_on_frames)
    shortest = float(np.min(mean_on))
    on_fraction = min(DEFAULT_ON_FRACTION, shortest / (1.0 + shortest))
    expected_on = density * _area_um2((h, w), margin, px_nm)
    group, states = _blinking_pool(rng, expected_on, c_n, mean_on, on_fraction,
                                   poisson_pool=True)
    n_fluo = group.size
    fx, fy = _uniform_positions(rng, n_fluo, (h, w), margin)
    if sim.edge_fraction > 0:
        at_edge = np.nonzero(rng.random(n_fluo) < sim.edge_fraction)[0]
        fx[at_edge], fy[at_edge] = _edge_band_positions(rng, at_edge.size, (h, w), margin,
                                                        float(sim.edge_band_px))
    for b in np.nonzero(is_filament)[0]:
        sel = np.nonzero(group == b)[0]
        if sel.size:
            fx[sel], fy[sel] = _filament_positions(rng, sel.size, (h, w), margin, px_nm)
    f_sigma = np.clip(sigma_centre[group] * rng.uniform(0.9, 1.1, n_fluo), s_lo, s_hi)
    f_quantile = rng.random(n_fluo)

    frame_in_sample, fluo = np.nonzero(states.T)
    table = empty_table(fluo.size)
    sample = group[fluo]
    table["frame"] = sample * c_n + frame_in_sample  # flat frame index b*C + c
    table["x"] = fx[fluo]
    table["y"] = fy[fluo]
    table["sigma"] = f_sigma[fluo]
    u = _fold_unit(f_quantile[fluo] + DEFAULT_PHOTON_JITTER * rng.normal(size=fluo.size))
    table["photons"] = _photons_from_quantile(u, sample_ph_lo[sample], sample_ph_hi[sample],
                                              ph_dist)
    table["background"] = bg_maps[(sample, *_pixel_under(table, (h, w)))]

    bg_frames = np.repeat(bg_maps, c_n, axis=0)  # (B*C, H, W)
    expected = render_expected(table, b_n * c_n, (h, w), 1, bg_frames).reshape(b_n, c_n, h, w)

    # --- cameras
    emccd = rng.random(b_n) < sim.emccd_fraction
    em_gain = np.where(emccd, _log_uniform(rng, sim.em_gain[0], sim.em_gain[1], b_n), 1.0)
    em_gain = np.maximum(em_gain, 1.0)
    qe = rng.uniform(sim.qe[0], sim.qe[1], b_n)
    baseline = rng.uniform(sim.baseline[0], sim.baseline[1], b_n)
    e_per_adu = _log_uniform(rng, sim.e_per_adu[0], sim.e_per_adu[1], b_n)
    read_noise = _log_uniform(rng, sim.read_noise[0], sim.read_noise[1], b_n)
    brightest = expected.reshape(b_n, -1).max(axis=1)
    headroom = np.maximum(65535.0 - baseline, 1000.0)
    # 30% above the brightest pixel's mean leaves room for its shot and EM-gain noise
    e_per_adu = np.maximum(e_per_adu, 1.3 * brightest * qe * em_gain / headroom)

    frames = np.empty((b_n, c_n, h, w), dtype=np.float32)
    cameras = []
    for b in range(b_n):
        cam = Camera(baseline=float(baseline[b]), e_per_adu=float(e_per_adu[b]),
                     em_gain=float(em_gain[b]), qe=float(qe[b]), read_noise=float(read_noise[b]))
        frames[b] = cam.adu_to_photons(cam.photons_to_adu(expected[b], rng))
        cameras.append(cam)
    if c_n > 1 and sim.missing_context_fraction > 0:  # (drawn only when asked)
        _drop_context(frames, expected, rng, sim.missing_context_fraction)

    # --- targets: the centre frame's emitters inside the field of view
    centre_rows = table[table["frame"] % c_n == centre]
    centre_rows = in_field_of_view(centre_rows, (h, w))
    owner = centre_rows["frame"] // c_n
    bounds = np.searchsorted(owner, np.arange(b_n + 1))  # rows are sorted by flat frame
    tables = []
    for b in range(b_n):
        t = centre_rows[bounds[b]:bounds[b + 1]].copy()
        t["frame"] = 0
        tables.append(t)
    return TrainingBatch(frames=frames, background=bg_maps, tables=tables, cameras=cameras,
                         expected=expected, pixel_size_nm=px_nm)


def _drop_context(frames, expected, rng, fraction):
    """In a share ``fraction`` of the samples, replace the frames before the centre, after it,
    or both (equally often) by copies of the centre frame, in place: what prediction feeds
    the network at a movie's first and last frames and for a single image."""
    b_n, c_n = frames.shape[:2]
    centre = c_n // 2
    side = np.where(rng.random(b_n) < fraction, rng.integers(1, 4, b_n), 0)  # 1 / 2 / 3 both
    for b in np.nonzero(side)[0]:
        lost = [c for c in range(c_n) if (c < centre and side[b] & 1) or
                (c > centre and side[b] & 2)]
        frames[b, lost] = frames[b, centre]
        expected[b, lost] = expected[b, centre]


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def write_simulation(out_dir, name: str, movie: SimulatedMovie, highres_factor: int | None = None
                     ) -> dict:
    """Write a simulated movie in the original design's layout; returns the four paths.

    ``DIR/train_tiff/NAME.tif``: expected photons (emitters + background, float32) on the
    ``highres_factor``-times finer grid (the design's high-resolution training TIFF: binning it
    by the factor gives the camera-resolution photons), ``DIR/train_emitters/NAME.h5``: its
    emitters (the contract's emitter H5), ``DIR/inference_tiff/NAME.tif``: the camera frames
    (uint16 ADU), ``DIR/ground_truth/NAME.csv``: ThunderSTORM CSV (``offset [photon]`` = the
    background under the emitter). The emitter files hold the emitters inside the field of
    view. ``highres_factor`` None uses ``movie.highres`` when the movie has it, else 8; a grid
    the movie does not hold is rendered a few frames at a time while writing, so long movies
    need no memory for it. Keys of the result: ``train_tiff``, ``train_emitters``,
    ``inference_tiff``, ``ground_truth``. Each file is written atomically; if one fails, the
    ones this call already wrote are removed.
    """
    from .io.emitters import write_emitter_h5, write_thunderstorm_csv

    name = os.fspath(name)
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"simulation name must be a plain file name, got {name!r}")
    out_dir = os.fspath(out_dir)
    paths = {
        "train_tiff": os.path.join(out_dir, "train_tiff", name + ".tif"),
        "train_emitters": os.path.join(out_dir, "train_emitters", name + ".h5"),
        "inference_tiff": os.path.join(out_dir, "inference_tiff", name + ".tif"),
        "ground_truth": os.path.join(out_dir, "ground_truth", name + ".csv"),
    }
    t_n, h, w = movie.shape
    if highres_factor is None:
        factor = int(movie.highres_factor) if movie.highres is not None else 8
    else:
        factor = int(highres_factor)
    if factor < 1:
        raise ConfigError(f"high-resolution factor must be >= 1, got {highres_factor!r}")
    if movie.highres is not None and factor == movie.highres_factor:
        highres = np.asarray(movie.highres, dtype=np.float32)
    else:
        highres = _highres_pages(movie, factor)
    truth = movie.table_in_view()
    px = float(movie.pixel_size_nm)
    written = []
    try:
        _write_tiff(paths["train_tiff"], highres, px / factor, shape=(t_n, h * factor, w * factor))
        written.append(paths["train_tiff"])
        write_emitter_h5(paths["train_emitters"], truth, px)
        written.append(paths["train_emitters"])
        _write_tiff(paths["inference_tiff"], np.asarray(movie.adu, dtype=np.uint16), px)
        written.append(paths["inference_tiff"])
        write_thunderstorm_csv(paths["ground_truth"], truth, px)
        written.append(paths["ground_truth"])
    except BaseException:
        for p in written:
            try:
                os.remove(p)
            except OSError:
                pass
        raise
    return paths


def _highres_pages(movie: SimulatedMovie, factor: int, chunk_frames: int = 16):
    """Yield the movie's expected photons on the ``factor`` grid, one (fH, fW) frame at a time."""
    t_n, h, w = movie.shape
    table = movie.table
    for t0 in range(0, t_n, chunk_frames):
        t1 = min(t_n, t0 + chunk_frames)
        rows = table[(table["frame"] >= t0) & (table["frame"] < t1)].copy()
        rows["frame"] -= t0
        block = render_expected(rows, t1 - t0, (h, w), factor, movie.background)
        yield from block


def _write_tiff(path, data, pixel_size_nm, shape=None):
    """ImageJ hyperstack (T, Y, X) with the pixel size in um, written atomically.

    ``data`` is an array, or an iterator of (Y, X) frames together with ``shape``.
    """
    import tifffile

    um = pixel_size_nm / 1000.0
    extra = {}
    if not isinstance(data, np.ndarray):
        extra = {"shape": shape, "dtype": np.float32}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, imagej=True, metadata={"axes": "TYX", "unit": "um"},
                         resolution=(1.0 / um, 1.0 / um), **extra)
