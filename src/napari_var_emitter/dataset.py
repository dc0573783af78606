"""Training data: batches of input tiles with their emitters, from files, arrays or simulation.

A :class:`TrainingData` hands out :class:`Batch` objects (numpy, CPU) for training and a fixed
list of validation batches. Four sources:

- :meth:`TrainingData.from_folders`: TIFF + emitter file pairs with the same stem (the design's
  ``train_tiff/`` + ``train_emitters/``). High-resolution photon TIFFs are binned to the camera
  grid and put through the camera model; camera-resolution TIFFs are converted ADU -> photons.
  Which kind a file is comes from ``data.tiff_kind`` or, when ``auto``, from the TIFF's own pixel
  size metadata; if that is missing the user is asked to say (never guessed silently).
- :meth:`TrainingData.from_arrays`: frames and a table already in memory (napari layers).
- :meth:`TrainingData.simulated`: on-the-fly simulation from the ``simulation`` config section.
- :meth:`TrainingData.unlabeled`: frames without emitters, for reconstruction-only adaptation.

Tiles are random ``model.input_size`` crops with random flips and transposition (the eight
symmetries of the square), the emitter coordinates transformed with them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .camera import Camera
from .config import Config
from .errors import ConfigError, InputFileError
from .table import LOC_DTYPE, empty_table, frames_slices

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
EMITTER_SUFFIXES = (".h5", ".hdf5", ".csv")


@dataclass
class Batch:
    """One batch of tiles. ``frames`` (B, C, H, W) float32 photons; ``tables`` the centre
    frame's emitters of each tile (positions in tile pixels); ``background`` (B, H, W) photons
    per pixel or None when unknown; ``labeled`` False for reconstruction-only data."""

    frames: np.ndarray
    tables: list = field(default_factory=list)
    background: np.ndarray | None = None
    labeled: bool = True

    def __len__(self):
        return len(self.frames)


def augment_tile(frames: np.ndarray, table: np.ndarray, background, k: int):
    """Apply symmetry ``k`` (0..7) of the square to a tile (C, H, W) and its emitters.

    Bit 0 flips x, bit 1 flips y, bit 2 transposes (x <-> y); pixel-centre coordinates:
    a flip maps x to ``W - 1 - x``.
    """
    t = table.copy()
    h, w = frames.shape[-2:]
    if k & 1:
        frames = frames[..., :, ::-1]
        background = None if background is None else background[:, ::-1]
        t["x"] = w - 1 - t["x"]
    if k & 2:
        frames = frames[..., ::-1, :]
        background = None if background is None else background[::-1, :]
        t["y"] = h - 1 - t["y"]
    if k & 4:
        frames = np.swapaxes(frames, -1, -2)
        background = None if background is None else background.T
        t["x"], t["y"] = t["y"].copy(), t["x"].copy()
    return np.ascontiguousarray(frames), t, (None if background is None
                                            else np.ascontiguousarray(background))


def crop_table(table: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Emitters whose position lies inside the crop ``[r0, r0+h) x [c0, c0+w)`` (pixel areas),
    shifted to crop coordinates."""
    x = table["x"] - c0
    y = table["y"] - r0
    keep = (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    t = table[keep].copy()
    t["x"] = x[keep]
    t["y"] = y[keep]
    return t


class _Stack:
    """One movie in photons (T, H, W) with its emitters split per frame (or None)."""

    def __init__(self, photons, per_frame, background=None, name=""):
        self.photons = photons
        self.per_frame = per_frame
        self.background = background
        self.name = name

    def __len__(self):
        return len(self.photons)


class TrainingData:
    """Source of training and validation batches (see the module docstring)."""

    def __init__(self, config: Config, stacks=None, simulated=False, labeled=True,
                 description=""):
        self.config = config
        self.simulated_source = simulated
        self.labeled = labeled
        self.description = description
        self._stacks = stacks or []
        self._train_idx: list[tuple[int, int]] = []
        self._val_idx: list[tuple[int, int]] = []
        if not simulated:
            self._split()
        self._val_batches: list[Batch] | None = None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def simulated(cls, config: Config) -> "TrainingData":
        """On-the-fly simulation from ``config.simulation`` (tiles of ``model.input_size``)."""
        cfg = config
        if list(cfg.simulation.frame_size) != list(cfg.model.input_size):
            cfg = Config.from_dict({**config.to_dict(), "simulation": {
                **config.to_dict()["simulation"], "frame_size": list(config.model.input_size)}})
        return cls(cfg, simulated=True, description="on-the-fly simulation")

    @classmethod
    def from_arrays(cls, frames, table, config: Config, camera: Camera | None = None,
                    background=None, name="layer") -> "TrainingData":
        """Frames (T, H, W) in ADU (converted with ``camera``) and their emitter table."""
        camera = camera or Camera()
        photons = camera.adu_to_photons(np.asarray(frames))
        if photons.ndim == 2:
            photons = photons[None]
        _check_tile_fits(photons.shape, config, name)
        table = np.asarray(table, dtype=LOC_DTYPE)
        _check_table_fits(table, photons.shape, name)
        per_frame = frames_slices(table, len(photons))
        return cls(config, [_Stack(photons, per_frame, background, name)],
                   description=f"arrays ({name}, {len(photons)} frames)")

    @classmethod
    def unlabeled(cls, frames, config: Config, camera: Camera | None = None,
                  name="layer") -> "TrainingData":
        """Frames without emitters: reconstruction-only adaptation of the encoder."""
        camera = camera or Camera()
        photons = camera.adu_to_photons(np.asarray(frames))
        if photons.ndim == 2:
            photons = photons[None]
        _check_tile_fits(photons.shape, config, name)
        return cls(config, [_Stack(photons, None, None, name)], labeled=False,
                   description=f"unlabeled ({name}, {len(photons)} frames)")

    @classmethod
    def from_folders(cls, tiff_dir, emitter_dir, config: Config) -> "TrainingData":
        """TIFF + emitter file pairs with the same stem from two folders."""
        from .io.emitters import read_emitters
        from .io.tiff import open_stack

        tiff_dir, emitter_dir = os.fspath(tiff_dir), os.fspath(emitter_dir)
        for d in (tiff_dir, emitter_dir):
            if not os.path.isdir(d):
                raise InputFileError(d, "no such folder")
        tiffs = {os.path.splitext(f)[0]: os.path.join(tiff_dir, f)
                 for f in sorted(os.listdir(tiff_dir)) if f.lower().endswith(TIFF_SUFFIXES)}
        emitters = {}
        for f in sorted(os.listdir(emitter_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in EMITTER_SUFFIXES:
                emitters.setdefault(stem, os.path.join(emitter_dir, f))
        if not tiffs:
            raise InputFileError(tiff_dir, "no .tif/.tiff files in this folder")
        missing = sorted(set(tiffs) - set(emitters))
        if missing:
            raise InputFileError(os.path.join(emitter_dir, missing[0] + ".h5"),
                                 f"no emitter file for {tiffs[missing[0]]} (same stem expected)")
        data_cfg = config.data
        stacks = []
        for stem, tpath in tiffs.items():
            with open_stack(tpath) as st:
                raw = np.asarray(st[:], dtype=np.float32)
                tiff_px = st.pixel_size_nm
            kind = _tiff_kind(tpath, raw.shape, tiff_px, data_cfg)
            t, h, w = raw.shape
            if kind == "highres":
                f = data_cfg.highres_factor
                if h % f or w % f:
                    raise InputFileError(tpath, f"high-resolution TIFF of {h}x{w} pixels is not "
                                         f"a multiple of data.highres_factor={f}")
                h, w = h // f, w // f
            epath = emitters[stem]
            # positions are physical (nm from the top-left corner): expressed on the camera
            # grid, checked against the stack (frames beyond it, positions outside it)
            table, _ = read_emitters(epath, pixel_size_nm=data_cfg.pixel_size_nm,
                                     n_frames=t, shape=(h, w))
            if kind == "highres":
                f = data_cfg.highres_factor
                photons = raw.reshape(t, h, f, w, f).sum(axis=(2, 4))
                log.info("%s: high-resolution photon TIFF (x%d), binned to %dx%d", tpath, f, h, w)
            else:
                cam = Camera(baseline=data_cfg.baseline, e_per_adu=data_cfg.e_per_adu,
                             em_gain=data_cfg.em_gain, qe=data_cfg.qe,
                             read_noise=data_cfg.read_noise)
                photons = cam.adu_to_photons(raw)
                log.info("%s: camera-resolution TIFF, ADU -> photons", tpath)
            del raw
            _check_tile_fits(photons.shape, config, tpath)
            stacks.append(_Stack(photons, frames_slices(table, t), None, stem)
                          if kind == "camera" else _HighresStack(photons, frames_slices(table, t),
                                                                 name=stem))
        return cls(config, stacks, description=f"{len(stacks)} file pair(s) from {tiff_dir}")

    # -- batches --------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Number of frames available (0 for simulation)."""
        return sum(len(s) for s in self._stacks)

    def _split(self):
        frac = self.config.training.val_fraction
        for si, s in enumerate(self._stacks):
            n = len(s)
            n_val = int(round(n * frac)) if n > 1 else 0
            n_val = min(n_val, n - 1)
            self._train_idx += [(si, t) for t in range(n - n_val)]
            self._val_idx += [(si, t) for t in range(n - n_val, n)]
        if not self._train_idx:
            raise ConfigError("training data holds no frames")

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """A random training batch (random crops and symmetries)."""
        if self.simulated_source:
            return self._simulated_batch(batch_size, rng)
        picks = [self._train_idx[i] for i in rng.integers(0, len(self._train_idx), batch_size)]
        return self._make_batch(picks, rng, augment=True)

    def validation_batches(self, batch_size: int) -> list[Batch]:
        """The fixed validation set (the same every call), split into batches."""
        if self._val_batches is None:
            rng = np.random.default_rng(12345 + self.config.training.seed)
            n = self.config.training.val_samples
            if self.simulated_source:
                self._val_batches = [self._simulated_batch(min(batch_size, n - i), rng)
                                     for i in range(0, n, batch_size)]
            else:
                idx = self._val_idx or self._train_idx[-1:]
                picks = [idx[i % len(idx)] for i in range(min(n, max(len(idx), 1) * 4))]
                self._val_batches = [self._make_batch(picks[i:i + batch_size], rng, augment=False)
                                     for i in range(0, len(picks), batch_size)]
        return self._val_batches

    def _simulated_batch(self, batch_size, rng) -> Batch:
        from .simulation import sample_training_batch

        tb = sample_training_batch(self.config.simulation, batch_size, rng,
                                   context_frames=self.config.model.context_frames)
        return Batch(frames=tb.frames.astype(np.float32), tables=list(tb.tables),
                     background=tb.background.astype(np.float32))

    def _make_batch(self, picks, rng, augment: bool) -> Batch:
        th, tw = self.config.model.input_size
        c = self.config.model.context_frames
        frames, tables, bgs = [], [], []
        have_bg = True
        for si, t in picks:
            s = self._stacks[si]
            tiles = s.context(t, c, rng) if isinstance(s, _HighresStack) else _context(s, t, c)
            _, h, w = tiles.shape
            r0 = int(rng.integers(0, h - th + 1))
            c0 = int(rng.integers(0, w - tw + 1))
            tile = tiles[:, r0:r0 + th, c0:c0 + tw]
            bg = None if s.background is None else s.background[t, r0:r0 + th, c0:c0 + tw]
            have_bg &= bg is not None
            tab = (crop_table(s.per_frame[t], r0, c0, th, tw) if s.per_frame is not None
                   else empty_table(0))
            if augment:
                tile, tab, bg = augment_tile(tile, tab, bg, int(rng.integers(0, 8)))
            tab["frame"] = 0
            frames.append(tile)
            tables.append(tab)
            bgs.append(bg)
        return Batch(frames=np.stack(frames).astype(np.float32), tables=tables,
                     background=np.stack(bgs).astype(np.float32) if have_bg and bgs else None,
                     labeled=self.labeled)


def training_batches(data: "TrainingData", batch_size: int, rng: np.random.Generator,
                     num_workers: int = 0, seed: int = 0):
    """Endless iterator of training batches.

    ``num_workers == 0``: drawn here, one after another, from ``rng`` (the trainer saves that
    generator's state in its checkpoints, so a resumed run sees exactly the batches an
    uninterrupted one would). ``num_workers > 0``: drawn ahead in that many worker processes
    (torch's ``DataLoader``) while the model trains, which keeps a GPU busy when simulating a
    batch costs about as much as a training step. Each worker has its own generator seeded
    from ``seed`` and the worker's index, so the stream is reproducible for a given seed but
    not split-exact across a resume (``seed`` should then include the step resumed from).
    """
    if num_workers <= 0:
        while True:
            yield data.train_batch(batch_size, rng)
    loader = torch.utils.data.DataLoader(
        _BatchStream(data, batch_size, seed), batch_size=None, num_workers=num_workers,
        collate_fn=_as_is, prefetch_factor=4, persistent_workers=False)
    yield from loader


def _as_is(batch):
    """DataLoader collate function: a :class:`Batch` passes through unchanged."""
    return batch


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches, one generator per worker process."""

    def __init__(self, data, batch_size, seed):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([int(self.seed), worker])
        while True:
            yield self.data.train_batch(self.batch_size, rng)


class _HighresStack(_Stack):
    """Binned noise-free photon frames: the camera model is applied per draw."""

    def context(self, t, c, rng):
        clean = _context(self, t, c)
        cam = _random_camera(rng)
        adu = cam.photons_to_adu(np.clip(clean, 0, None), rng, clip_uint16=False)
        return cam.adu_to_photons(adu)


def _random_camera(rng) -> Camera:
    """A plausible EMCCD or sCMOS camera for noise augmentation of photon images."""
    if rng.random() < 0.5:
        return Camera(em_gain=float(rng.uniform(50, 300)), e_per_adu=float(rng.uniform(5, 50)),
                      read_noise=float(rng.uniform(10, 80)), qe=float(rng.uniform(0.7, 0.95)))
    return Camera(e_per_adu=float(rng.uniform(0.3, 3)), read_noise=float(rng.uniform(0.5, 3)),
                  qe=float(rng.uniform(0.7, 0.95)))


def _context(stack: _Stack, t: int, c: int) -> np.ndarray:
    """Frames ``t - c//2 .. t + c//2`` (indices clamped at the ends of the movie)."""
    half = c // 2
    idx = np.clip(np.arange(t - half, t + half + 1), 0, len(stack) - 1)
    return np.asarray(stack.photons[idx], dtype=np.float32)


def _check_tile_fits(shape, config: Config, name):
    th, tw = config.model.input_size
    if shape[-2] < th or shape[-1] < tw:
        raise InputFileError(name, f"frames of {shape[-2]}x{shape[-1]} pixels are smaller than "
                             f"the model's training tile {th}x{tw}")


def _check_table_fits(table, shape, name):
    """Emitters must lie in the stack: frames ``0..T-1``, positions in the image up to
    :data:`~.io.emitters.EDGE_MARGIN_PX` beyond its edges (their PSF tails still show)."""
    from .io.emitters import EDGE_MARGIN_PX

    if not len(table):
        return
    t, h, w = shape
    frames = table["frame"]
    if frames.min() < 0 or frames.max() >= t:
        bad = int(frames.max() if frames.max() >= t else frames.min())
        raise InputFileError(name, f"emitters in frame {bad} (0-based) but the stack has "
                             f"frames 0..{t - 1}")
    for axis, size in (("x", w), ("y", h)):
        v = table[axis]
        out = ~np.isfinite(v) | (v < -0.5 - EDGE_MARGIN_PX) | (v > size - 0.5 + EDGE_MARGIN_PX)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise InputFileError(name, f"emitter {i + 1} at {axis}={v[i]:.2f} px lies outside "
                                 f"the {w}x{h} image (wrong pixel size or units?)")


def _tiff_kind(path, shape, tiff_px, data_cfg) -> str:
    """Decide whether a training TIFF is high-resolution photons or camera frames."""
    if data_cfg.tiff_kind != "auto":
        return data_cfg.tiff_kind
    if tiff_px:
        if abs(tiff_px * data_cfg.highres_factor - data_cfg.pixel_size_nm) < 0.02 * data_cfg.pixel_size_nm:
            return "highres"
        if abs(tiff_px - data_cfg.pixel_size_nm) < 0.02 * data_cfg.pixel_size_nm:
            return "camera"
    raise ConfigError(
        f"{path}: cannot tell whether this is a high-resolution photon TIFF or camera frames "
        f"(its pixel size metadata is {tiff_px or 'missing'}, data.pixel_size_nm is "
        f"{data_cfg.pixel_size_nm}); set data.tiff_kind to 'highres' or 'camera' in the config")


def collate_targets(batch: Batch, device=None):
    """Padded torch target tensors for the loss: ``xy`` (B, N, 2), ``photons`` (B, N),
    ``mask`` (B, N) and ``background`` (B, H, W) or None."""
    b = len(batch.tables)
    n = max([len(t) for t in batch.tables] + [1])
    xy = np.zeros((b, n, 2), np.float32)
    ph = np.zeros((b, n), np.float32)
    mask = np.zeros((b, n), bool)
    for i, t in enumerate(batch.tables):
        k = len(t)
        xy[i, :k, 0] = t["x"]
        xy[i, :k, 1] = t["y"]
        ph[i, :k] = np.nan_to_num(t["photons"], nan=0.0)
        mask[i, :k] = True
    out = {"xy": torch.from_numpy(xy), "photons": torch.from_numpy(ph),
           "mask": torch.from_numpy(mask),
           "background": None if batch.background is None else torch.from_numpy(batch.background)}
    if device is not None:
        out = {k: (v.to(device, non_blocking=True) if v is not None else None)
               for k, v in out.items()}
    return out
