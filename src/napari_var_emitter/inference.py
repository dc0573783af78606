"""Inference: ADU stack in, localisations (and optionally multi-scale maps) out.

:class:`Predictor` wraps a trained :class:`~napari_var_emitter.model.VarEmitterNet`.
``predict_iter`` is a generator (it yields :class:`ProgressEvent` per batch and *returns* a
:class:`PredictionResult`), so the same code drives the command line, a napari
``thread_worker`` and plain tests. Frames of any size are cut into overlapping tiles of the
model's input size; each tile owns a "core" region and the cores partition the frame. Two
neighbouring tiles estimate a border emitter's position slightly differently, so a strict
"keep what falls in your core" rule would report it twice or never when their estimates
straddle the border; tiles therefore report a band beyond their core too and
:func:`merge_frame_detections` keeps one detection per emitter (test_inference checks it).
A frame smaller than a tile along an axis is cut into smaller tiles of whole patches that
fit in it (or one pixel more, mirrored), so the network sees (almost) only real pixels.
Detections within a pixel of the frame's own border are refitted by :mod:`.spotfit`; those
inside it whose light looks like two emitters are split by :mod:`.pairsplit`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera
from .checkpoint import build_model_from_checkpoint, load_checkpoint
from .config import Config
from .errors import Cancelled, CheckpointError, InputFileError
from .pairsplit import split_merged_pairs
from .spotfit import (BORDER_FIT_BAND_PX, border_candidate_threshold, distance_inside,
                      frames_tensor, refit_border_detections)
from .table import LOC_DTYPE, concat_tables, empty_table

#: smallest frame side the model accepts (smaller frames carry too little context)
MIN_FRAME_SIDE = 8
#: tiles per forward pass when every scale's maps are computed (bounds peak memory)
MAX_TILES_WITH_MAPS = 16
#: tiles also report emitters up to this far (input px) beyond their core, so that an
#: emitter whose position two neighbouring tiles estimate on opposite sides of the core
#: border is still seen by both; :func:`merge_frame_detections` keeps one of them
BORDER_BAND_PX = 1.0
#: detections closer than this (input px) are one emitter: twins from two different tiles
#: (the tiles see the same pixels and differ only in context, so their estimates of one
#: emitter differ far less than this) and two maxima of one blob within a tile (the decoder)
DUPLICATE_RADIUS_PX = 1.0
BUNDLED_WEIGHTS = "var_emitter_default.pth"
#: the border refit and the pair split take the detections of this many frame pixels at
#: once, or fewer frames once they hold FIT_CHUNK_DETECTIONS. A fit call costs a few
#: thousand tensor operations whatever its size: per network batch of 1,024 tiles on an H200
#: that was ~65 ms of kernel launches, 10x the network's time. Its memory grows with the
#: detections: about 11 MB per 1,000 (5 emitters/um^2, measured on a CPU)
FIT_CHUNK_PIXELS = {"cuda": 8_000_000, "cpu": 1_000_000}
FIT_CHUNK_DETECTIONS = {"cuda": 150_000, "cpu": 10_000}


@dataclass
class ProgressEvent:
    """Progress of a running prediction: frames done out of total, localisations so far."""

    done: int
    total: int
    n_localizations: int = 0


@dataclass
class PredictionResult:
    """Localisations (``table.LOC_DTYPE``, input pixels) and, when asked, the maps:
    ``maps[f][name]`` array-like of shape (T, f*H, f*W) for name in :data:`MAP_NAMES`;
    ``threshold`` is the detection threshold the localisations were decoded with (rows the
    border refit kept, :mod:`.spotfit`, may have a probability down to a third of it);
    ``settings`` how they were made (model id, threshold, ``tta``, ``border_fit``,
    ``pair_fit``), written into the Picasso yaml."""

    localizations: np.ndarray
    shape: tuple
    pixel_size_nm: float
    factors: list
    loc_factor: int
    maps: dict = field(default_factory=dict)
    camera: Camera = field(default_factory=Camera)
    threshold: float = 0.5
    settings: dict = field(default_factory=dict)

    @property
    def psf_sigma_px(self) -> float:
        """Median PSF sigma (input px) the spot fits found for the detections (``sigma``),
        NaN when none was fitted. A property of the microscope: with a wide PSF (1.5 px or
        more) and up to about 2 emitters/um^2 a higher threshold (0.5) is more accurate
        (BENCHMARKS.md, "Session 15")."""
        s = self.localizations["sigma"]
        s = s[np.isfinite(s)]
        return float(np.median(s)) if len(s) else float("nan")

    def psf_summary(self) -> str:
        """``"PSF sigma 1.23 px"`` (:attr:`psf_sigma_px`) for a summary line, or ``""``
        when no width was fitted."""
        sigma = self.psf_sigma_px
        return f"PSF sigma {sigma:.2f} px" if np.isfinite(sigma) else ""


#: detection threshold of a model without a calibrated one
DEFAULT_THRESHOLD = 0.5
#: below this detection probability a map pixel's offset, uncertainty and photons are NaN
MAP_DEFINED_PROBABILITY = 1e-3
MAP_NAMES = ("probability", "offset_x", "offset_y", "uncertainty_x", "uncertainty_y", "photons")
_MAP_KEYS = {"probability": "prob", "offset_x": "offset_x", "offset_y": "offset_y",
             "uncertainty_x": "sigma_x", "uncertainty_y": "sigma_y", "photons": "photons"}


def available_devices() -> list[str]:
    """Device choices on this machine: ``auto``, ``cpu`` and ``cuda``/``mps`` when present."""
    devs = ["auto", "cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def process_device(device: str = "auto") -> str:
    """The device of this process: under torchrun (``LOCAL_RANK`` set) with several GPUs,
    ``auto``/``cuda`` becomes this process's own GPU, ``cuda:LOCAL_RANK`` (modulo the GPUs
    present), so the ranks of a node do not all run on the first one."""
    local = os.environ.get("LOCAL_RANK")
    if (local is None or str(device) not in ("auto", "cuda") or not torch.cuda.is_available()
            or torch.cuda.device_count() < 2):
        return str(device)
    return f"cuda:{int(local) % torch.cuda.device_count()}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; anything else is checked to exist."""
    from .errors import ConfigError

    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None
                              and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or mps)") from None


def default_batch_size(device) -> int:
    """Frames per forward pass when the user gives none: 64 on a CPU (larger batches are no
    faster there and use more memory), 1024 on a GPU (H100: 17,800 frames/s against 7,600 at
    64, where each batch's fixed cost dominates)."""
    return 1024 if torch.device(device).type == "cuda" else 64


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system.

    Each forward pass allocates and frees activation tensors of tens of MB. By default glibc
    serves such blocks with ``mmap`` and unmaps them on free, so the next batch page-faults
    the same memory in again (system time was ~15 % of ``predict``'s wall time on a 2-core
    VM). Raising the mmap and trim thresholds keeps them on the heap: ``predict`` of 2,000
    40x40 frames went from 229 to 252 frames/s in one process (channels-last weights both
    times), 151 to 170 end to end with them; peak RSS about 35 MB higher, still flat in the
    number of frames. Process-wide, so only entry points call it (``var-emitter
    predict``), never the library on import. Returns False where it does not apply (not
    glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's option numbers (malloc.h)
    done = [mallopt(option, value) == 1 for option, value in
            ((m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1))]
    return all(done)


def bundled_checkpoint_path() -> str:
    """Path of the model shipped inside the package."""
    return str(resources.files("napari_var_emitter") / "weights" / BUNDLED_WEIGHTS)


def tile_grid(size: int, tile: int, margin: int):
    """Tile starts along one axis and the core boundaries that partition ``[0, size)``.

    Returns ``(starts, bounds)``: tile k covers ``[starts[k], starts[k] + tile)`` and owns the
    pixels ``[bounds[k], bounds[k+1])``. Neighbouring tiles overlap by at least ``2*margin``
    so every owned pixel is at least ``margin`` from a cut edge of its tile.
    """
    if size <= tile:
        return [0], [0, size]
    stride = max(tile - 2 * margin, 1)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    starts = sorted(set(starts))
    bounds = [0] + [(starts[k + 1] + starts[k] + tile) // 2 for k in range(len(starts) - 1)] + [size]
    return starts, bounds


#: a map pixel whose neighbourhood (about one input pixel across) holds less probability
#: than this starts no candidate
#: (far below any calibrated threshold; it bounds the decoder's work on empty tiles)
CANDIDATE_FLOOR = 0.05
#: width (input px) of the proximity weight that shares a map pixel's probability between
#: the candidates whose windows overlap on it
SHARE_SIGMA_PX = 0.5


def decode_maps(m: dict, f: int, threshold: float) -> list[np.ndarray]:
    """Localisations from the maps of one scale (tensors (N, f*H, f*W)), one table per tile.

    An emitter's probability mass may spread over several map pixels (more so at finer
    scales), so each detection integrates the probability within a window of one input
    pixel's radius (``2f + 1`` map pixels) around a candidate. Decoding:

    1. **Candidates** are the local maxima of the probability summed within about half an
       input pixel either way (3x3 map pixels at x2, 5x5 at x4, 9x9 at x8; ties go to the
       stronger pixel, then to the fuller window): compact blobs, so two
       emitters 1.5-2.5 px apart give two candidates. (An
       earlier decoder took maxima of the whole-window sum; a window centred between two
       such emitters holds more than either alone, so the pair was reported once and about
       half of all emitters with a neighbour within 2.5 px were missed.)
    2. **Shared pixels**: a map pixel inside the windows of several candidates gives each a
       share of its probability, in proportion to the candidate's strength times a Gaussian
       of their distance (:data:`SHARE_SIGMA_PX`), so no probability is counted twice.
    3. Each candidate's **detection probability** is its share of the window's probability;
       its position, photons and uncertainties are the share-weighted means of the per-pixel
       predictions (pixel centre ``(j + 0.5)/f - 0.5`` plus offset).
    4. **One emitter split into two candidates** (a blob with two maxima): the per-pixel
       offsets of both point at the same place, so candidates of one tile whose positions
       are closer than :data:`DUPLICATE_RADIUS_PX` are merged (probabilities added, values
       averaged with the probabilities as weights).
    5. A detection needs a (merged) probability of at least ``threshold``; the reported
       ``prob`` is capped at 1.

    The candidates do not depend on ``threshold`` (calibration relies on that).
    """
    table, tile = decode_maps_table(m, f, threshold)
    edges = np.searchsorted(tile, np.arange(m["prob"].shape[0] + 1))
    return [table[a:b].copy() for a, b in zip(edges[:-1], edges[1:])]


def decode_maps_table(m: dict, f: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode_maps` as one table for all tiles, ordered by tile, and each row's tile
    index (what long stacks need: no Python work per tile)."""
    tile, mass, values = _decode_candidates(m, f)
    tile, mass, values = _merge_split_candidates(tile, mass, values)
    keep = mass >= threshold
    table = empty_table(int(keep.sum()))
    for key, v in values.items():
        table[key] = v[keep]
    table["prob"] = np.minimum(mass[keep], 1.0)
    table["sigma"] = np.nan
    return table, tile[keep]


def _decode_candidates(m: dict, f: int):
    """Steps 1-3 of :func:`decode_maps`: (tile index, probability, {column: values}) of every
    candidate, as numpy arrays in row-major order (so grouped by tile)."""
    p = m["prob"].float()
    _, h, w = p.shape
    dev = p.device
    k = 2 * f + 1
    r = k // 2
    # blob strength: the probability within about half an input pixel either way (3x3 map
    # pixels at x2, 5x5 at x4, 9x9 at x8: at finer scales one blob spans more map pixels);
    # a candidate is the strongest pixel within that distance
    c = max(3, 2 * (f // 2) + 1)
    p3 = _window_sum(p, c)
    # ties go to the stronger pixel, then (a flat blob) to the pixel whose whole window
    # holds the most, then a fixed order; float64 so these tie-breakers survive rounding
    window = _window_sum(p, k)
    order = torch.arange(h * w, device=dev, dtype=torch.float64).reshape(h, w)
    score = p3.double() + 1e-4 * p.double() + 1e-8 * window.double() + 1e-13 * order
    cand = (score >= _window_max(score, c)) & (p3 >= CANDIDATE_FLOOR)
    d = torch.arange(-r, r + 1, device=dev)
    proximity = torch.exp(-d.float() ** 2 / (2 * (SHARE_SIGMA_PX * f) ** 2))
    kernel = proximity[:, None] * proximity[None, :]
    strength = torch.where(cand, p3, torch.zeros((), device=dev))
    # each pixel's total claim: the sum over candidates of strength x proximity
    claims = _window_sum(strength, k, proximity).clamp_min(1e-12)
    n, j, i = torch.nonzero(cand, as_tuple=True)
    # only the windows around the candidates are needed: gather them (a few per tile)
    win_rows = (j[:, None, None] + d[None, :, None]).expand(-1, k, k).reshape(-1, k * k)
    win_cols = (i[:, None, None] + d[None, None, :]).expand(-1, k, k).reshape(-1, k * k)
    inside = (win_rows >= 0) & (win_rows < h) & (win_cols >= 0) & (win_cols < w)
    win_rows, win_cols = win_rows.clamp(0, h - 1), win_cols.clamp(0, w - 1)
    tile = n[:, None].expand_as(win_rows)
    share = strength[n, j, i][:, None] * kernel.reshape(1, -1) / claims[tile, win_rows, win_cols]
    pw = torch.where(inside, p[tile, win_rows, win_cols] * share, torch.zeros((), device=dev))
    mass = pw.sum(1)
    norm = mass.clamp_min(1e-12)

    def weighted(a, grid=0.0):
        """Share-weighted window mean of map ``a`` (plus the pixel-centre ``grid``)."""
        v = a.float()[tile, win_rows, win_cols] + grid
        return (pw * torch.where(inside, v, torch.zeros((), device=dev))).sum(1) / norm

    cols = {
        "x": weighted(m["offset_x"], (win_cols + 0.5) / f - 0.5),
        "y": weighted(m["offset_y"], (win_rows + 0.5) / f - 0.5),
        "photons": weighted(m["photons"]),
        "background": weighted(m["background"]),
        "unc_x": weighted(m["sigma_x"]),
        "unc_y": weighted(m["sigma_y"]),
    }
    values = torch.stack([mass, *cols.values()]).double().cpu().numpy()  # one GPU transfer
    return n.cpu().numpy(), values[0], dict(zip(cols, values[1:]))


def _window_sum(x: torch.Tensor, size: int, weights: torch.Tensor | None = None):
    """Sum of ``x`` (N, H, W) over the ``size`` x ``size`` window around each pixel (zeros
    beyond the edge), each row and column of the window weighted by ``weights`` (length
    ``size``, symmetric; None: 1). Shifted adds, one axis after the other: on a CPU, 3-4x
    faster than ``avg_pool2d`` / ``conv2d`` with one channel, which made decoding a third
    of `predict`'s time."""
    r = size // 2
    _, h, w = x.shape
    padded = F.pad(x, (r, r, r, r))
    wt = [1.0] * size if weights is None else weights.tolist()
    rows = sum(wt[i] * padded[:, i:i + h, :] for i in range(size))
    return sum(wt[j] * rows[:, :, j:j + w] for j in range(size))


def _window_max(x: torch.Tensor, size: int) -> torch.Tensor:
    """Maximum of ``x`` (N, H, W) over the ``size`` x ``size`` window around each pixel
    (what ``max_pool2d`` with stride 1 gives, several times faster on a CPU)."""
    r = size // 2
    _, h, w = x.shape
    padded = F.pad(x, (r, r, r, r), value=-math.inf)
    rows = padded[:, 0:h, :]
    for i in range(1, size):
        rows = torch.maximum(rows, padded[:, i:i + h, :])
    out = rows[:, :, 0:w]
    for j in range(1, size):
        out = torch.maximum(out, rows[:, :, j:j + w])
    return out


def _merge_split_candidates(tile, mass, values, radius: float = DUPLICATE_RADIUS_PX):
    """Step 4 of :func:`decode_maps`: candidates of one tile closer than ``radius`` become one
    (mass added, values mass-weighted); the order (by tile) is kept.

    Greedy, strongest first: a candidate absorbs the weaker ones within ``radius`` of itself
    that no stronger candidate has absorbed. (Connected groups would chain: a weak candidate
    between two emitters 1.8 px apart would merge all three into one.)"""
    finite = np.isfinite(values["x"]) & np.isfinite(values["y"])
    if finite.sum() < 2:
        return tile, mass, values
    idx = np.flatnonzero(finite)
    pairs = idx[close_pairs(values["x"][idx], values["y"][idx], radius, tile[idx])]
    if not len(pairs):
        return tile, mass, values
    owner = _greedy_owners(len(mass), pairs, np.argsort(-mass, kind="stable"))
    heads, group = np.unique(owner, return_inverse=True)  # heads in index order = tile order
    total = np.bincount(group, mass, len(heads))
    weight = np.maximum(total, 1e-12)
    merged = {key: np.bincount(group, v * mass, len(heads)) / weight
              for key, v in values.items()}
    return tile[heads], total, merged


class Predictor:
    """A trained model ready for inference (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: Config, device="auto",
                 model_id: str = "custom", calibration: dict | None = None):
        from .calibration import calibration_from_checkpoint

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN's convolutions work in channels-last layout: with the weights stored
            # that way no layer reorders them on every call (2-core Xeon, bundled model:
            # 219 -> 229 frames/s in `predict`; outputs equal to 2e-6 in probability)
            self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.model_id = model_id
        #: ``{"threshold": float | None, "sigma_scale": (sx, sy), "sigma_power": (px, py),
        #: "sigma_reference_px": (rx, ry), "tta": {...} | None}`` (see :mod:`.calibration`)
        self.calibration = calibration_from_checkpoint({"calibration": calibration})

    @property
    def default_threshold(self) -> float:
        """The calibrated detection threshold of this model, else 0.5."""
        return self.threshold_for(tta=False)

    def threshold_for(self, tta: bool = False) -> float:
        """The calibrated threshold of plain or symmetry-averaged prediction, else 0.5."""
        return self.calibration_for(tta)["threshold"] or DEFAULT_THRESHOLD

    def calibration_for(self, tta: bool = False) -> dict:
        """``{"threshold", "sigma_scale", "sigma_power", "sigma_reference_px"}`` for plain
        or symmetry-averaged (``tta``)
        prediction; a checkpoint calibrated before symmetry averaging existed has only the
        plain one, which then serves both."""
        if tta and self.calibration.get("tta") is not None:
            return self.calibration["tta"]
        return self.calibration

    @classmethod
    def from_checkpoint(cls, path, device="auto") -> "Predictor":
        """Load a checkpoint written by training (``best_model.pth`` / ``last_model.pth``)."""
        ckpt = load_checkpoint(path)
        model = build_model_from_checkpoint(ckpt, path)
        return cls(model, ckpt["config_obj"], device=device,
                   model_id=ckpt.get("model_id", os.path.basename(os.fspath(path))),
                   calibration=ckpt.get("calibration"))

    @classmethod
    def from_pretrained(cls, device="auto") -> "Predictor":
        """The model shipped inside the package (loaded offline)."""
        path = bundled_checkpoint_path()
        if not os.path.exists(path):
            raise CheckpointError(path, "the bundled model is missing from this installation")
        return cls.from_checkpoint(path, device=device)

    @property
    def factors(self) -> list[int]:
        return list(self.config.model.factors)

    @property
    def loc_factor(self) -> int:
        return int(self.config.model.loc_factor)

    def predict(self, stack, **kwargs) -> PredictionResult:
        """Run :meth:`predict_iter` to the end and return its result."""
        return run_to_end(self.predict_iter(stack, **kwargs))

    def predict_iter(self, stack, camera: Camera | None = None, pixel_size_nm: float = 100.0,
                     threshold: float | None = None, batch_size: int = 32, maps: bool = True,
                     maps_h5=None, name: str = "input", cancel=None, h5_attrs=None,
                     calibrated: bool = True, tta: bool = False, border_fit: bool = True,
                     pair_fit: bool = True):
        """Localise every frame of ``stack`` (T, H, W) or (H, W) in ADU.

        ``threshold``: detection probability (None: the model's calibrated one, else 0.5).
        ``calibrated=False`` ignores the stored calibration (threshold 0.5 when none is
        given, uncertainties as the network predicts them). ``tta=True`` averages the
        network's maps over the eight symmetries of each tile (:mod:`.symmetry`): more
        accurate, eight times slower, with its own stored calibration. ``border_fit`` refits
        the detections within a pixel of the frame border by maximum likelihood and lets the
        fit decide whether their centre is inside the frame (:mod:`.spotfit`); such
        detections are kept from a third of ``threshold`` up. ``pair_fit`` fits two spots
        where one detection's light looks like two emitters and reports both when the pair
        describes it much better (:mod:`.pairsplit`).

        Yields a :class:`ProgressEvent` after each batch and returns a
        :class:`PredictionResult`. ``maps=True`` computes every scale; with ``maps_h5`` the
        maps stream into that HDF5 file (``predictions.h5`` layout) and the result's maps
        read lazily from it, so memory does not grow with the number of frames.
        ``cancel`` is an optional callable returning True to stop (raises :class:`Cancelled`).
        """
        from .calibration import calibrated_sigma
        from .outputs import PredictionsH5Writer
        from .symmetry import SYMMETRIES, symmetry_averaged_maps

        camera = camera or Camera()
        cal = self.calibration_for(tta)
        if threshold is None:
            threshold = self.threshold_for(tta) if calibrated else DEFAULT_THRESHOLD
        # per axis (scale, power, reference): see calibration.calibrated_sigma
        sigma_cal = (tuple(zip(cal["sigma_scale"], cal["sigma_power"],
                               cal["sigma_reference_px"]))
                     if calibrated else ((1.0, 1.0, 1.0),) * 2)
        if not 0 < threshold <= 1:
            from .errors import ConfigError
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        if batch_size < 1:
            from .errors import ConfigError
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        shape = tuple(int(s) for s in getattr(stack, "shape", np.shape(stack)))
        single = len(shape) == 2
        if single:
            stack = np.asarray(stack)[None]
            shape = (1,) + shape
        if len(shape) != 3:
            raise InputFileError(name, f"expected frames of shape (T, H, W) or (H, W), got {shape}")
        t_total, h, w = shape
        if h < MIN_FRAME_SIDE or w < MIN_FRAME_SIDE:
            raise InputFileError(name, f"frames of {h}x{w} pixels are smaller than the model can "
                                 f"use (at least {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE})")
        factors = self.factors if maps else [self.loc_factor]
        th, tw = self.config.model.input_size
        # a frame smaller than a tile along an axis is cut into tiles as large as fit in it, in
        # whole patches (the network takes any multiple of its patch size), or one pixel
        # larger (mirrored by one row: harmless, where 2-3 were not): padded to a full tile,
        # the frame's edge inside the tile looked like more frame and spots cut by it were
        # reported inside (24x24 crops: Jaccard 0.74 instead of 0.88,
        # `benchmarks/bench_small_frames.py`)
        patch = self.config.model.patch_size
        th = min(th, max(patch, (h + 1) // patch * patch))
        tw = min(tw, max(patch, (w + 1) // patch * patch))
        # overlap of neighbouring tiles: a sixth of the tile in use along each axis (a tile
        # shrunk to a small frame with the full tile's margin stepped by one pixel)
        margin_y, margin_x = max(2, th // 6), max(2, tw // 6)
        ys, ybounds = tile_grid(h, th, margin_y)
        xs, xbounds = tile_grid(w, tw, margin_x)
        band = min(BORDER_BAND_PX, float(min(margin_y, margin_x)))
        ctx = self.config.model.context_frames
        half = ctx // 2
        # with maps, the x8 activations of a tile are ~64x its input: fewer tiles per
        # forward pass keep peak memory bounded (localisation-only runs keep full batches)
        tiles_per_pass = min(batch_size, MAX_TILES_WITH_MAPS) if maps else batch_size
        frames_per_batch = max(1, tiles_per_pass // (len(ys) * len(xs)))
        writer = None
        mem_maps = None
        if maps and maps_h5 is not None:
            writer = PredictionsH5Writer(maps_h5, (t_total, h, w), factors, attrs=h5_attrs)
        elif maps:
            mem_maps = {f: {k: np.zeros((t_total, f * h, f * w), np.float32) for k in MAP_NAMES}
                        for f in factors}
        tables = []
        n_locs = 0
        fits = _SpotFitQueue(self.device, camera, threshold, border_fit, pair_fit)
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                    else _nullcontext())
        try:
            for t0 in range(0, t_total, frames_per_batch):
                if cancel is not None and cancel():
                    raise Cancelled("prediction cancelled")
                t1 = min(t0 + frames_per_batch, t_total)
                lo, hi = max(t0 - half, 0), min(t1 + half, t_total)
                block = _read_block(stack, lo, hi, name)
                photons = camera.adu_to_photons(block)
                tiles, where = _cut_tiles(photons, t0 - lo, t1 - lo, ctx, ys, xs, th, tw)
                with torch.inference_mode(), autocast:
                    x = torch.from_numpy(tiles).to(self.device)
                    if tta:
                        # transposing a non-square tile would change its shape: flips only
                        out = symmetry_averaged_maps(self.model, x, factors,
                                                     SYMMETRIES if th == tw else SYMMETRIES[:4])
                    else:
                        out = self.model(x, factors=factors, with_recon=False)["maps"]
                    _blank_constant_tiles(out, x[:, half])
                table, tile = decode_maps_table(
                    out[self.loc_factor], self.loc_factor,
                    border_candidate_threshold(threshold) if border_fit else threshold)
                if sigma_cal != ((1.0, 1.0, 1.0),) * 2:
                    # calibrate measured the decoded uncertainties: calibrated the same way
                    # here (and the maps, for their readers, after decoding)
                    for axis, c in zip("xy", sigma_cal):
                        table["unc_" + axis] = calibrated_sigma(table["unc_" + axis], *c)
                        if maps:
                            for m in out.values():
                                m["sigma_" + axis] = calibrated_sigma(m["sigma_" + axis], *c)
                if border_fit:
                    # weak candidates matter only at the frame border: dropping the others
                    # first keeps them out of the tile-seam merging
                    keep = ((table["prob"] >= threshold)
                            | _near_frame_border(table, tile, where, ys, xs, h, w))
                    table, tile = table[keep], tile[keep]
                batch = _place_detections(table, tile, where, ys, xs, ybounds, xbounds, band, t0,
                                          threshold)
                done = fits.add(batch, photons[t0 - lo:t1 - lo], t0, last=t1 == t_total)
                if done is not None and len(done):
                    tables.append(done)
                    n_locs += len(done)
                if maps:
                    stitched = _stitch_maps(out, factors, t1 - t0, where, ys, xs, ybounds,
                                            xbounds, h, w)
                    if writer is not None:
                        writer.write_maps(t0, stitched)
                    else:
                        for f in factors:
                            for k in MAP_NAMES:
                                mem_maps[f][k][t0:t1] = stitched[f][k]
                yield ProgressEvent(t1, t_total, n_locs)
            locs = concat_tables(tables) if tables else empty_table(0)
            tables.clear()
            if writer is not None:
                writer.write_localizations(locs)
                writer.close()
                result_maps = writer.open_lazy()
            else:
                result_maps = mem_maps or {}
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return PredictionResult(localizations=locs, shape=(t_total, h, w),
                                pixel_size_nm=float(pixel_size_nm), factors=factors,
                                loc_factor=self.loc_factor, maps=result_maps, camera=camera,
                                threshold=float(threshold),
                                settings={"model_id": self.model_id,
                                          "threshold": float(threshold), "tta": bool(tta),
                                          "border_fit": bool(border_fit),
                                          "pair_fit": bool(pair_fit)})


class _SpotFitQueue:
    """The border refit and the pair split (:mod:`.spotfit`, :mod:`.pairsplit`) of a run's
    detections, on chunks of about :data:`FIT_CHUNK_PIXELS` frame pixels (or
    :data:`FIT_CHUNK_DETECTIONS` detections) rather than per network batch: :meth:`add`
    holds a batch's detections and frames (photons) back until a chunk is full, then
    returns the chunk's fitted table (frames in order)."""

    def __init__(self, device, camera: Camera, threshold: float, border_fit: bool,
                 pair_fit: bool):
        self.device, self.camera, self.threshold = device, camera, threshold
        self.border_fit, self.pair_fit = border_fit, pair_fit
        kind = "cuda" if device.type == "cuda" else "cpu"
        self.chunk_pixels = FIT_CHUNK_PIXELS[kind]
        self.chunk_detections = FIT_CHUNK_DETECTIONS[kind]
        self.tables, self.frames, self.first_frame = [], [], 0
        self.pixels = self.detections = 0

    def add(self, table, photons: np.ndarray, first_frame: int, last: bool):
        """Queue ``table`` (detections of frames ``first_frame`` on, in frame coordinates)
        and their ``photons`` (T, H, W); ``last``: no more batches follow. Returns the
        fitted table of the chunk this completes, else None."""
        if not (self.border_fit or self.pair_fit):
            return table
        if not self.frames:
            self.first_frame = first_frame
        self.tables.append(table)
        self.frames.append(photons)
        self.pixels += photons.size
        self.detections += len(table)
        if (self.pixels < self.chunk_pixels and self.detections < self.chunk_detections
                and not last):
            return None
        table = concat_tables(self.tables)
        frames = np.concatenate(self.frames) if len(self.frames) > 1 else self.frames[0]
        self.tables, self.frames = [], []
        self.pixels = self.detections = 0
        if not len(table):
            return table
        # both fits run on the network's device: one transfer of the frames
        frames = frames_tensor(frames, self.device)
        if self.border_fit:
            table = refit_border_detections(table, frames, self.camera, self.threshold,
                                            frame_offset=self.first_frame)
        if self.pair_fit:
            table = split_merged_pairs(table, frames, self.camera,
                                       frame_offset=self.first_frame)
        return table


def _blank_constant_tiles(out: dict, centre: torch.Tensor) -> None:
    """Zero the probability maps of tiles whose (centre) frame is constant: such a tile holds
    no spot (an all-zero frame, a saturated or padded region), but normalised it is all
    zeros, an input the network never saw, and its maps would be noise."""
    flat = centre.flatten(1)
    constant = flat.amax(1) == flat.amin(1)
    if bool(constant.any()):
        for m in out.values():
            m["prob"] = m["prob"].masked_fill(constant[:, None, None], 0.0)


def _near_frame_border(table, tile, where, ys, xs, h, w) -> np.ndarray:
    """Which tile detections lie within :data:`~.spotfit.BORDER_FIT_BAND_PX` of the frame's
    own border (tile coordinates shifted by the tile's place in the frame)."""
    _, ky, kx = np.asarray(where, dtype=np.intp).reshape(-1, 3)[tile].T
    x = table["x"] + np.asarray(xs)[kx]
    y = table["y"] + np.asarray(ys)[ky]
    return distance_inside(x, y, (h, w)) < BORDER_FIT_BAND_PX


def _place_detections(table, tile, where, ys, xs, ybounds, xbounds, band, t0,
                      threshold: float = 0.0):
    """Tile detections -> one frame-coordinate table for a batch of frames, each emitter once,
    ordered by (frame, y, x).

    ``tile`` is each row's tile index, ``where[tile] = (frame in batch, ky, kx)``. A tile keeps
    the detections in its core, widened by ``band`` across inner borders; twins found by two
    tiles near a border are merged by :func:`merge_frame_detections`. The rows come grouped
    by frame, so batches in frame order need no global sort.
    """
    where = np.asarray(where, dtype=np.intp).reshape(-1, 3)
    ti, ky, kx = where[tile].T
    ys, xs = np.asarray(ys), np.asarray(xs)
    yb, xb = np.asarray(ybounds, float), np.asarray(xbounds, float)
    table["x"] += xs[kx]
    table["y"] += ys[ky]
    y, x = table["y"], table["x"]
    # a tile's core: [bounds[k], bounds[k + 1]) in pixel centres, widened by the band on inner
    # borders only (never beyond the frame's own edges)
    inner_lo_y, inner_hi_y = ky > 0, ky < len(ys) - 1
    inner_lo_x, inner_hi_x = kx > 0, kx < len(xs) - 1
    keep = ((y >= yb[ky] - 0.5 - band * inner_lo_y) & (y < yb[ky + 1] - 0.5 + band * inner_hi_y)
            & (x >= xb[kx] - 0.5 - band * inner_lo_x) & (x < xb[kx + 1] - 0.5 + band * inner_hi_x))
    own = ((y >= yb[ky] - 0.5) & (y < yb[ky + 1] - 0.5)
           & (x >= xb[kx] - 0.5) & (x < xb[kx + 1] - 0.5))
    table, own, tile, ti = table[keep], own[keep], tile[keep], ti[keep]
    table["frame"] = t0 + ti
    if len(ys) * len(xs) > 1 and len(table) > 1:
        # rows are grouped by frame (tiles are numbered frame by frame)
        starts = np.flatnonzero(np.r_[True, ti[1:] != ti[:-1], True])
        keep = np.ones(len(table), bool)
        for a, b in zip(starts[:-1], starts[1:]):
            if tile[a] != tile[b - 1]:  # detections from more than one tile
                keep[a:b] = merge_frame_detections(table[a:b], own[a:b], tile[a:b],
                                                   threshold=threshold)
        table = table[keep]
    return table[np.lexsort((table["x"], table["y"], table["frame"]))]


def merge_frame_detections(tab, own, src, radius: float = DUPLICATE_RADIUS_PX,
                           threshold: float = 0.0) -> np.ndarray:
    """Which of one frame's detections to keep (a boolean mask), each emitter once.

    ``src`` is each detection's tile and ``own`` marks the detections that lie in their
    tile's core. Detections from *different* tiles closer than ``radius`` are the same
    emitter seen twice near a border; the one in its own tile's core wins (then the more
    probable). A detection outside its core with no twin is kept: the tile that owns that
    place missed it (or put it on the other side), and the detection is still at least
    ``margin - band`` pixels from its tile's cut edge. Candidates below ``threshold`` (weak
    ones kept for the border refit) lose to any twin at or above it, so an emitter the
    network found is never replaced by a candidate the refit may then drop.
    """
    keep = np.ones(len(tab), bool)
    if len(tab) < 2 or np.all(src == src[0]):
        return keep
    pairs = close_pairs(np.asarray(tab["x"], float), np.asarray(tab["y"], float), radius)
    pairs = pairs[src[pairs[:, 0]] != src[pairs[:, 1]]]
    if not len(pairs):
        return keep
    # detections at the threshold first, then own-core ones, then by probability: greedy
    # suppression of cross-tile twins
    order = np.lexsort((-tab["prob"], ~np.asarray(own, bool), tab["prob"] < threshold))
    owner = _greedy_owners(len(tab), pairs, order)
    return owner == np.arange(len(tab))


def close_pairs(x, y, radius: float, group=None) -> np.ndarray:
    """Index pairs (k, 2) of points closer than ``radius`` (and in the same ``group``, when
    given), each pair once.

    A sweep over the points sorted by (group, x): for a shift ``s``, point ``i`` is compared
    with the ``s``-th next one. Once no point has an ``s``-th next one of its group within
    ``radius`` in x, no larger shift can have one either. The number of shifts is the largest
    number of points in a ``radius``-wide strip, so the sweep runs along whichever axis has
    the sparser strips (a filament parallel to one axis crowds that axis's strips).
    Detections are sparse on this scale, so the sweep stops after a few shifts; it also
    spares the command line the 0.1-0.3 s import of ``scipy.spatial``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    g = np.zeros(len(x), np.int64) if group is None else np.asarray(group)
    if _densest_strip(y, g, radius) < _densest_strip(x, g, radius):
        x, y = y, x  # sweep along y; the distances are symmetric
    order = np.lexsort((x, g))
    xs, ys, gs = x[order], y[order], g[order]
    found = []
    for s in range(1, len(xs)):
        near = (gs[s:] == gs[:-s]) & (xs[s:] - xs[:-s] < radius)
        if not near.any():
            break
        i = np.flatnonzero(near)
        i = i[np.hypot(xs[i + s] - xs[i], ys[i + s] - ys[i]) < radius]
        found.append(np.stack([order[i], order[i + s]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.intp)


def _densest_strip(v, g, radius: float) -> int:
    """The most points of one group within ``radius`` along ``v`` (finite values only)."""
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return 0
    v, g = v[ok], g[ok]
    span = float(v.max() - v.min()) + 2.0 * radius + 1.0  # groups laid end to end on one line
    key = np.sort((g - g.min()) * span + (v - v.min()))
    return int((np.searchsorted(key, key + radius) - np.arange(len(key))).max())


def _greedy_owners(n: int, pairs, order) -> np.ndarray:
    """Greedy grouping of ``n`` items linked by ``pairs`` (k, 2): in ``order`` (strongest
    first), an item not yet owned owns itself and every unowned item linked to it. Returns
    each item's owner (an item that owns itself heads its group). Used for a tile's split
    candidates and for twins of neighbouring tiles alike."""
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(int(a), []).append(int(b))
        neighbours.setdefault(int(b), []).append(int(a))
    owner = np.arange(n)
    taken = np.zeros(n, bool)
    for c in order:
        if taken[c] or c not in neighbours:
            continue
        taken[c] = True
        for nb in neighbours[c]:
            if not taken[nb]:
                taken[nb] = True
                owner[nb] = c
    return owner


def run_to_end(gen):
    """Exhaust a generator and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _read_block(stack, lo, hi, name) -> np.ndarray:
    block = np.asarray(stack[lo:hi])
    if block.ndim != 3:
        raise InputFileError(name, f"expected frames of shape (T, H, W), got a block of {block.shape}")
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        bad = int(np.nonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0][0])
        raise InputFileError(name, f"frame {lo + bad} contains NaN or Inf values")
    if block.dtype.kind not in "uif":
        raise InputFileError(name, f"unsupported pixel type {block.dtype}")
    return block


def _cut_tiles(photons, a, b, ctx, ys, xs, th, tw):
    """Tiles (N, ctx, th, tw) for frames ``a..b-1`` of the block and their (frame, ky, kx)
    indices. A frame smaller than a tile (one pixel short of whole patches, or smaller than
    one patch) is mirrored at its bottom and right edges, which continues a sloping
    background (a constant filling makes a step that reads as spots)."""
    t, h, w = photons.shape
    if h < th or w < tw:
        photons = np.pad(photons, ((0, 0), (0, max(th - h, 0)), (0, max(tw - w, 0))),
                         mode="symmetric")
    half = ctx // 2
    frame_idx = np.arange(a, b)
    idx = np.clip(frame_idx[:, None] + np.arange(-half, half + 1)[None, :], 0, t - 1)
    frames = photons[idx]  # (frames, ctx, H, W)
    # tile order: frame by frame, then row by row of tiles (what the decoders rely on)
    tiles = np.stack([frames[:, :, r0:r0 + th, c0:c0 + tw] for r0 in ys for c0 in xs], axis=1)
    tiles = tiles.reshape(-1, ctx, th, tw)
    ti, ky, kx = np.meshgrid(frame_idx - a, np.arange(len(ys)), np.arange(len(xs)),
                             indexing="ij")
    where = np.stack([ti.ravel(), ky.ravel(), kx.ravel()], axis=1)
    return np.ascontiguousarray(tiles, dtype=np.float32), where


def _stitch_maps(out, factors, n_frames, where, ys, xs, ybounds, xbounds, h, w):
    """Assemble per-tile maps into whole-frame maps using each tile's core region."""
    res = {}
    for f in factors:
        m = out[f]
        arrays = {k: m[_MAP_KEYS[k]].float().cpu().numpy() for k in MAP_NAMES}
        frame_maps = {k: np.zeros((n_frames, f * h, f * w), np.float32) for k in MAP_NAMES}
        for n, (ti, ky, kx) in enumerate(where):
            r0, c0 = ys[ky], xs[kx]
            ra, rb = ybounds[ky], ybounds[ky + 1]
            ca, cb = xbounds[kx], xbounds[kx + 1]
            for k in MAP_NAMES:
                frame_maps[k][ti, f * ra:f * rb, f * ca:f * cb] = \
                    arrays[k][n, f * (ra - r0):f * (rb - r0), f * (ca - c0):f * (cb - c0)]
        # Offsets, uncertainties and photons describe "the emitter in this pixel": where the
        # probability says there is none they mean nothing. NaN says so, and makes the maps
        # of a long stack compress about 5x (they are noise-like wherever they are defined).
        undefined = frame_maps["probability"] < MAP_DEFINED_PROBABILITY
        for k in MAP_NAMES:
            if k != "probability":
                frame_maps[k][undefined] = np.nan
        res[f] = frame_maps
    return res


def render_super_resolution(table, shape, pixel_size_nm: float, render_px_nm: float = 10.0,
                            blur_nm: float | None = None, max_side: int = 4096) -> np.ndarray:
    """Gaussian-blurred 2-D histogram of all localisations (the super-resolution image).

    ``shape`` is the (H, W) of the input frames in pixels; the output has
    ``pixel_size_nm / render_px_nm`` times more pixels per axis (capped at ``max_side``).
    ``blur_nm`` defaults to the median localisation uncertainty (at least one render pixel).
    """
    from scipy.ndimage import gaussian_filter

    h, w = shape[-2:]
    zoom = max(1, int(round(pixel_size_nm / render_px_nm)))
    zoom = max(1, min(zoom, max_side // max(h, w, 1)))
    img = np.zeros((h * zoom, w * zoom), np.float32)
    t = np.asarray(table, dtype=LOC_DTYPE)
    if len(t):
        xi = np.floor((t["x"] + 0.5) * zoom).astype(int)
        yi = np.floor((t["y"] + 0.5) * zoom).astype(int)
        ok = (xi >= 0) & (xi < w * zoom) & (yi >= 0) & (yi < h * zoom)
        np.add.at(img, (yi[ok], xi[ok]), 1.0)
        if blur_nm is None:
            unc = np.sqrt((t["unc_x"] ** 2 + t["unc_y"] ** 2) / 2)
            unc = unc[np.isfinite(unc)]
            blur_nm = float(np.median(unc) * pixel_size_nm) if len(unc) else render_px_nm
        sig = max(blur_nm / (pixel_size_nm / zoom), 1.0)
        img = gaussian_filter(img, sig)
    return img
