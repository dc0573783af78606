"""napari reader for TIFF stacks (``*.tif``, ``*.tiff``).

Frames stay in camera pixels: the file's pixel size goes into the layer's metadata
(``pixel_size_nm``) rather than into the layer scale, so the inference widget's coordinates
are input pixels as everywhere else in the package. Stacks larger than
:data:`LAZY_THRESHOLD_BYTES` open lazily as a dask array over the file's pages; a file this
reader cannot read makes :func:`get_reader` return None so napari offers it to other readers.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputFileError

#: stacks bigger than this (bytes) are read lazily, frame by frame, as napari shows them
#: (a 20,000-frame 64x64 uint16 movie is 164 MB: lazy)
LAZY_THRESHOLD_BYTES = 64 * 2**20

TIFF_SUFFIXES = (".tif", ".tiff")


def get_reader(path):
    """Return a reader function for a readable TIFF path (or list of them), else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
    if not paths:
        return None
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            return None
        p = os.fspath(p)
        if not p.lower().endswith(TIFF_SUFFIXES) or not os.path.isfile(p):
            return None
        if not _readable(p):
            return None
    return read_tiff_layers


def _readable(path: str) -> bool:
    """True when our TIFF reader accepts the file (header and frame layout only)."""
    from ..io.tiff import open_stack

    try:
        with open_stack(path):
            return True
    except InputFileError:
        return False


def read_tiff_layers(path) -> list[tuple]:
    """Layer data tuples, one Image layer per TIFF path."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [_read_one(os.fspath(p)) for p in paths]


def _read_one(path: str):
    import dask.array as da

    from ..io.tiff import open_stack

    stack = open_stack(path)
    shape = tuple(int(n) for n in stack.shape)
    dtype = np.dtype(stack.dtype)
    px = getattr(stack, "pixel_size_nm", None)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    name = os.path.splitext(os.path.basename(path))[0]
    metadata = {"path": path}
    if px:
        metadata["pixel_size_nm"] = float(px)
    lazy = nbytes > LAZY_THRESHOLD_BYTES
    if lazy:
        # the stack stays open: dask reads one frame per chunk when napari asks for it
        data = da.from_array(stack, chunks=(1,) + shape[1:], lock=True,
                             asarray=False, meta=np.empty((0,) * len(shape), dtype=dtype),
                             name=f"var-emitter-tiff-{id(stack):x}-{os.path.abspath(path)}")
        first = np.asarray(stack[0])
    else:
        try:
            data = stack.read()
        finally:
            stack.close()
        if data.shape[0] == 1:
            # a single image is shown as one 2-D frame, not a stack of one
            data = data[0]
        first = data[0] if data.ndim == 3 else data
    kwargs = {"name": name, "metadata": metadata, "rgb": False,
              "contrast_limits": _limits(first)}
    return (data, kwargs, "image")


def _limits(frame) -> tuple[float, float]:
    """Contrast limits from one frame, so a lazy stack is not read whole to find them."""
    vals = np.asarray(frame, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(np.percentile(vals, 99.9))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
