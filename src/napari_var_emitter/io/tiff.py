"""TIFF stacks in and out: lazy reading of large movies, atomic ImageJ/BigTIFF writing.

:func:`open_stack` accepts multi-page TIFF, ImageJ hyperstacks, OME-TIFF and BigTIFF and
presents every one of them as a ``(T, H, W)`` stack (a 2-D image is one frame). Nothing is
read at open time except the TIFF structure: contiguous uncompressed data is memory-mapped,
anything else (compressed, tiled, scattered pages) is decoded page by page when asked for,
so a 50 GB movie streams through a fixed amount of memory.

Every problem a user's file can have (missing, empty, not a TIFF, truncated, RGB, too many
axes, NaN pixels) is raised as :class:`~napari_var_emitter.errors.InputFileError` with a
one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import tifffile

from ..errors import InputFileError
from .atomic import atomic_path

__all__ = ["TiffStack", "open_stack", "write_tiff"]

#: beyond this many bytes of pixel data the classic TIFF offsets (32 bit) cannot address
#: the file, so :func:`write_tiff` switches from an ImageJ hyperstack to BigTIFF.
#: The margin leaves room for the IFDs and metadata written after the pixel data.
IMAGEJ_MAX_BYTES = 2**32 - 2**25

#: a compressed frame may claim at most this many times the file's size (deflate peaks
#: near 1,000:1); a larger claim is a corrupt header and must not trigger a huge allocation
_MAX_DECOMPRESSION_RATIO = 4096

_SUPPORTED_KINDS = "biufc"

# length units of ImageJ's "unit" string and OME's PhysicalSizeXUnit, in nm
_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0,
    "um": 1e3, "µm": 1e3, "μm": 1e3, "\\u00b5m": 1e3, "micron": 1e3, "microns": 1e3,
    "micrometer": 1e3, "micrometers": 1e3, "micrometre": 1e3,
    "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "centimeter": 1e7, "m": 1e9, "meter": 1e9,
    "a": 0.1, "å": 0.1, "angstrom": 0.1, "inch": 2.54e7, "in": 2.54e7,
}

# plausible pixel sizes of a microscope camera (or of an up-sampled rendering of one);
# outside this range a resolution tag is a scanner/screen default (72 dpi), not a pixel size
_PIXEL_NM_RANGE = (0.1, 1e5)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_tifffile():
    """Keep tifffile's log messages about odd files off the console; yield what it said.

    The user gets our one-line error instead; the collected messages tell us whether
    tifffile silently dropped pages of a broken file.
    """
    log = logging.getLogger("tifffile")
    old_level, old_propagate = log.level, log.propagate
    handler = _Collect()
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.ERROR)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


# tifffile's messages when it gives up on part of a file but still returns what it read
_CORRUPTION_SIGNS = ("invalid page offset", "corrupted file")


def _err(path, problem: str) -> InputFileError:
    # one-line messages only: exceptions from the TIFF parser may span lines
    return InputFileError(path, " ".join(str(problem).split()))


class TiffStack:
    """A lazily read TIFF movie of shape ``(T, H, W)``.

    Indexing returns NumPy arrays: an int gives one ``(H, W)`` frame, a slice or an index
    array gives ``(T', H, W)``. Data are read only when indexed. Floating-point data are
    checked for NaN/Inf block by block as they are read. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._tif = None
        self._memmap = None
        self._pages = None
        _check_file(self.path)
        try:
            with _quiet_tifffile() as messages:
                self._tif = tifffile.TiffFile(self.path)
                self._setup()
            broken = [m for m in messages if any(sign in m for sign in _CORRUPTION_SIGNS)]
            if broken:
                # tifffile skipped what it could not read: the stack would be silently short
                raise _err(self.path, "file is truncated or corrupt ("
                           + broken[-1].split("> ", 1)[-1] + ")")
        except InputFileError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - any parser failure on user data is bad input
            self.close()
            raise _err(self.path, f"corrupt or unsupported TIFF file ({type(e).__name__}: "
                                  f"{e})") from None

    # -- opening --------------------------------------------------------------------------
    def _setup(self) -> None:
        tif = self._tif
        if len(tif.pages) == 0:
            raise _err(self.path, "TIFF file contains no images")
        series_list = tif.series
        if not series_list:
            raise _err(self.path, "TIFF file contains no image series")
        if len(series_list) > 1:
            shapes = ", ".join("x".join(map(str, s.shape)) for s in series_list[:4])
            raise _err(self.path, f"TIFF file holds {len(series_list)} image series of different "
                                  f"shapes ({shapes}); save one single-channel stack per file")
        series = series_list[0]
        self._series = series
        if series.keyframe.dtype is None:
            raise _err(self.path, f"unsupported pixel format ({series.keyframe.bitspersample} "
                                  f"bits, sample format {series.keyframe.sampleformat})")
        dtype = np.dtype(series.dtype)
        if dtype.kind not in _SUPPORTED_KINDS or dtype.kind == "c":
            raise _err(self.path, f"unsupported pixel type {dtype} (need integer or float pixels)")
        if dtype.kind == "b":
            dtype = np.dtype(np.uint8)
        self.dtype = dtype

        full_shape, full_axes = _expanded_shape_axes(series)
        if any(n == 0 for n in full_shape):
            raise _err(self.path, f"TIFF image has zero size ({'x'.join(map(str, full_shape))})")
        sizes = dict(zip(full_axes, full_shape))
        samples = sizes.get("S", 1)
        if samples > 1:
            raise _err(self.path, f"image has {samples} samples per pixel (RGB/colour); "
                                  "give a single-channel grey-scale stack")
        keep = [(ax, n) for ax, n in zip(full_axes, full_shape) if n > 1 or ax in "YX"]
        axes = "".join(ax for ax, _ in keep)
        shape = tuple(n for _, n in keep)
        if axes[-2:] != "YX" or axes.count("Y") != 1 or axes.count("X") != 1:
            raise _err(self.path, f"unsupported axis order {full_axes!r} (need ...YX)")
        extra = [(ax, n) for ax, n in keep[:-2]]
        if len(extra) > 1:
            desc = ", ".join(f"{_AXIS_NAMES.get(ax, ax)}={n}" for ax, n in extra)
            raise _err(self.path, f"stack has more than one axis besides Y and X ({desc}); "
                                  "save a single time series (T, Y, X) per file")
        n_frames = extra[0][1] if extra else 1
        height, width = shape[-2:]
        self.shape = (int(n_frames), int(height), int(width))
        self.axes = full_axes

        file_size = os.path.getsize(self.path)
        frame_bytes = height * width * self.dtype.itemsize
        offset = None
        if not getattr(series, "is_multifile", False):
            try:
                offset = series.dataoffset
            except Exception:  # noqa: BLE001 - a corrupt page table means "not contiguous"
                offset = None
        if offset is not None:
            end = int(offset) + n_frames * frame_bytes
            if end > file_size:
                raise _err(self.path, f"file is truncated: the image data need {end} bytes, "
                                      f"the file has {file_size}")
            storage = np.dtype(tif.byteorder + series.dtype.char)
            if series.dtype.kind == "b":
                storage = np.dtype(np.uint8)
            self._memmap = np.memmap(self.path, dtype=storage, mode="r", offset=int(offset),
                                     shape=self.shape, order="C")
            return

        # page by page: frame t lives in page t // per_page (pages may hold several planes)
        keyframe = series.keyframe
        page_size = int(np.prod(keyframe.shape)) if keyframe.shape else 0
        if page_size == 0 or page_size % (height * width):
            raise _err(self.path, "TIFF pages do not match the stack's frame size")
        self._per_page = page_size // (height * width)
        n_pages = len(series)
        if n_pages * self._per_page < n_frames:
            raise _err(self.path, f"file is truncated: {n_pages * self._per_page} of "
                                  f"{n_frames} frames present")
        page_bytes = page_size * self.dtype.itemsize
        if keyframe.compression == 1:
            stored_bytes = page_size * max(int(keyframe.bitspersample), 1) // 8
            if stored_bytes > file_size or any(
                    o + c > file_size for o, c in zip(keyframe.dataoffsets,
                                                      keyframe.databytecounts)):
                raise _err(self.path, "file is truncated: image data lie beyond its end")
        elif page_bytes > _MAX_DECOMPRESSION_RATIO * file_size:
            raise _err(self.path, f"corrupt TIFF: a {file_size}-byte file claims "
                                  f"{'x'.join(map(str, keyframe.shape))} pixels per page")
        self._pages = series
        # napari/dask may fetch frames from several threads: serialise seeks + reads
        tif.filehandle.set_lock(True)

    # -- sequence protocol -----------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Always 3: ``(T, H, W)``."""
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TiffStack({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def __enter__(self) -> TiffStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __array__(self, dtype=None, copy=None):
        data = self.read()
        return data if dtype is None else data.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return self.read()
            frames = self[key[0]]
            rest = key[1:]
            if not rest:
                return frames
            # an integer frame index drops the frame axis; the rest indexes (H, W)
            return frames[rest] if frames.ndim == 2 else frames[(slice(None),) + rest]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < -n or i >= n:
                raise IndexError(f"frame {i} out of range for a stack of {n} frames")
            i %= n
            return self._read_frames(np.array([i]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self.read(start, max(start, stop))
            return self._read_frames(np.arange(start, stop, step))
        if key is Ellipsis:
            return self.read()
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} frames")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(f"unsupported frame index {key!r}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"frame index out of range for a stack of {n} frames")
        return self._read_frames(idx % n if idx.size else idx.astype(int))

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return frames ``start .. stop-1`` as a ``(T', H, W)`` array (native byte order)."""
        n = self.shape[0]
        stop = n if stop is None else stop
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        if self._memmap is None:
            return self._read_frames(np.arange(start, stop))
        block = self._from_memmap(start, stop)
        self._check_finite(block, start)
        return block

    def iter_blocks(self, block_size: int = 64):
        """Yield ``(start, block)`` pairs covering the stack in order, ``block_size`` each."""
        for start in range(0, self.shape[0], block_size):
            yield start, self.read(start, start + block_size)

    def close(self) -> None:
        """Release the file (memory map and file handle)."""
        self._memmap = None
        self._pages = None
        if self._tif is not None:
            try:
                self._tif.close()
            finally:
                self._tif = None

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._tif is None

    # -- metadata -------------------------------------------------------------------------
    @property
    def pixel_size_nm(self) -> float | None:
        """Pixel size in nm from ImageJ, OME or resolution-tag metadata; None when absent."""
        if not hasattr(self, "_pixel_size_nm"):
            try:
                self._pixel_size_nm = _pixel_size_nm(self._tif) if self._tif is not None else None
            except Exception:  # noqa: BLE001 - odd metadata never blocks reading the pixels
                self._pixel_size_nm = None
        return self._pixel_size_nm

    # -- reading --------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._tif is None:
            raise _err(self.path, "stack is closed")

    def _from_memmap(self, start: int, stop: int) -> np.ndarray:
        self._ensure_open()
        try:
            raw = self._memmap[start:stop]
            return np.array(raw, dtype=self.dtype)  # copy: native order, detached from the map
        except OSError as e:
            raise _err(self.path, f"cannot read frames {start}-{stop - 1} ({e})") from None

    def _read_frames(self, idx: np.ndarray) -> np.ndarray:
        self._ensure_open()
        h, w = self.shape[1:]
        out = np.empty((len(idx), h, w), dtype=self.dtype)
        if self._memmap is not None:
            try:
                out[...] = self._memmap[np.asarray(idx, dtype=np.intp)]
            except OSError as e:
                raise _err(self.path, f"cannot read frames ({e})") from None
        else:
            cached_page, cached = -1, None
            for k, i in enumerate(idx):
                p, sub = divmod(int(i), self._per_page)
                if p != cached_page:
                    cached = self._read_page(p, int(i))
                    cached_page = p
                out[k] = cached[sub]
        for k, i in enumerate(idx):
            self._check_finite(out[k:k + 1], int(i))
        return out

    def _read_page(self, p: int, frame: int) -> np.ndarray:
        h, w = self.shape[1:]
        try:
            with _quiet_tifffile():
                page = self._pages[p]
                if page is None:
                    raise ValueError("page is missing")
                data = page.asarray()
            data = np.asarray(data).reshape(-1, h, w)
        except InputFileError:
            raise
        except Exception as e:  # noqa: BLE001 - decoding errors of a corrupt page
            raise _err(self.path, f"cannot read frame {frame} ({type(e).__name__}: {e})") from None
        if data.shape[0] != self._per_page:
            raise _err(self.path, f"cannot read frame {frame} (page has the wrong size)")
        return data

    def _check_finite(self, block: np.ndarray, first_frame: int) -> None:
        if block.dtype.kind != "f" or block.size == 0:
            return
        finite = np.isfinite(block)
        if not finite.all():
            bad = int(np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1))[0])
            raise _err(self.path, f"frame {first_frame + bad} contains NaN or infinite pixel "
                                  "values")


_AXIS_NAMES = {"T": "T (time)", "Z": "Z", "C": "C (channel)", "I": "I (pages)", "Q": "Q",
               "S": "S (samples)", "R": "R (tiles)", "E": "E", "H": "H", "A": "A"}


def open_stack(path: str | os.PathLike) -> TiffStack:
    """Open a TIFF movie lazily as a :class:`TiffStack` of shape ``(T, H, W)``.

    Singleton axes are dropped; a 2-D image is one frame. Raises InputFileError for a
    missing file, a directory, an empty/truncated/corrupt/non-TIFF file, RGB data, or
    more than one axis besides Y and X.
    """
    return TiffStack(path)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise _err(path, "file not found")
    if os.path.isdir(path):
        raise _err(path, "is a directory, not a TIFF file")
    if not os.access(path, os.R_OK):
        raise _err(path, "permission denied")
    size = os.path.getsize(path)
    if size == 0:
        raise _err(path, "file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        if head[:2] in (b"II", b"MM") and size < 8:
            raise _err(path, "file is truncated (incomplete TIFF header)")
        kind = "a text file" if _looks_like_text(path) else "unknown binary data"
        raise _err(path, f"not a TIFF file (no TIFF signature; looks like {kind})")
    if size < 8:
        raise _err(path, "file is truncated (incomplete TIFF header)")


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as fh:
        chunk = fh.read(512)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in chunk


# ------------------------------------------------------------------------------------------
# pixel size
def _unit_nm(unit) -> float | None:
    if unit is None:
        return None
    u = str(unit).strip().lower()
    return _UNIT_NM.get(u)


def _plausible(px: float | None) -> float | None:
    if px is None or not np.isfinite(px):
        return None
    lo, hi = _PIXEL_NM_RANGE
    return float(px) if lo <= px <= hi else None


def _pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    page = tif.pages.first
    if tif.is_ome and tif.ome_metadata:
        px = _ome_pixel_size(tif.ome_metadata)
        if px is not None:
            return px
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        scale = _unit_nm(meta.get("unit"))
        xres = page.tags.get("XResolution")
        if scale is not None and xres is not None:
            num, den = xres.value
            if num > 0 and den > 0:
                return _plausible(scale * den / num)
        return None
    # plain TIFF: trust only metric resolution units; inch (2) is a print default (72 dpi)
    unit = page.tags.valueof(296, default=2)
    xres = page.tags.get("XResolution")
    if xres is None:
        return None
    num, den = xres.value
    if num <= 0 or den <= 0:
        return None
    per_unit_nm = {3: 1e7, 4: 1e6, 5: 1e3}.get(int(unit))
    if per_unit_nm is None:
        return None
    return _plausible(per_unit_nm * den / num)


def _ome_pixel_size(xml: str) -> float | None:
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for el in root.iter():
        if re.sub(r"^\{.*\}", "", el.tag) == "Pixels":
            value = el.attrib.get("PhysicalSizeX")
            if value is None:
                return None
            scale = _unit_nm(el.attrib.get("PhysicalSizeXUnit", "µm"))
            if scale is None:
                return None
            return _plausible(float(value) * scale)
    return None


# ------------------------------------------------------------------------------------------
# writing
def write_tiff(path: str | os.PathLike, array, pixel_size_nm: float | None = None) -> str:
    """Write a ``(T, H, W)`` or ``(H, W)`` stack atomically; return the path written.

    Up to about 4 GB the file is an ImageJ hyperstack (for uint8/uint16/int16/float32;
    other types as a plain multi-page TIFF); beyond that a BigTIFF. ``array`` may be any
    array-like with ``shape``, ``dtype`` and frame indexing (a memory map, a
    :class:`TiffStack`, an HDF5 dataset): non-NumPy inputs are written frame by frame.
    The pixel size, when given, is stored as resolution (and ImageJ unit "um").
    """
    path = os.fspath(path)
    shape = tuple(int(n) for n in np.shape(array)) if not hasattr(array, "shape") \
        else tuple(int(n) for n in array.shape)
    if len(shape) == 2:
        shape = (1,) + shape
        array = np.asarray(array)[None]
    if len(shape) != 3:
        raise ValueError(f"write_tiff needs a (T, H, W) or (H, W) array, got shape {shape}")
    dtype = np.dtype(array.dtype)
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    imagej = dtype in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16),
                       np.dtype(np.float32)) and nbytes <= IMAGEJ_MAX_BYTES
    bigtiff = nbytes > IMAGEJ_MAX_BYTES
    kwargs: dict = {"photometric": "minisblack"}
    if pixel_size_nm is not None:
        if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"pixel_size_nm must be positive, got {pixel_size_nm!r}")
    if imagej:
        kwargs["imagej"] = True
        metadata = {"axes": "TYX"}
        if pixel_size_nm is not None:
            ppu = 1e3 / float(pixel_size_nm)  # pixels per micrometre
            kwargs["resolution"] = (ppu, ppu)
            metadata["unit"] = "um"
        kwargs["metadata"] = metadata
    else:
        kwargs["bigtiff"] = bigtiff
        kwargs["metadata"] = {"axes": "TYX"}
        if pixel_size_nm is not None:
            ppcm = 1e7 / float(pixel_size_nm)  # pixels per centimetre
            kwargs["resolution"] = (ppcm, ppcm)
            kwargs["resolutionunit"] = "CENTIMETER"

    if isinstance(array, np.ndarray):
        data = array.astype(dtype, copy=False) if array.dtype != dtype else array
        data = np.ascontiguousarray(data)
    else:
        # stream: one frame in memory at a time
        def frames():
            for i in range(shape[0]):
                yield np.asarray(array[i], dtype=dtype).reshape(shape[1:])
        data = frames()
        kwargs["shape"] = shape
        kwargs["dtype"] = dtype
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def _expanded_shape_axes(series) -> tuple[tuple, str]:
    """A series' shape and axes with length-1 axes kept (``get_shape(False)`` in tifffile up
    to 2026.3; later releases dropped those methods, so fall back to the squeezed shape,
    which the checks above handle the same way)."""
    if hasattr(series, "get_shape") and hasattr(series, "get_axes"):
        shape, axes = series.get_shape(False), series.get_axes(False)
    else:
        shape, axes = series.shape, series.axes
    return tuple(int(n) for n in shape), str(axes)
