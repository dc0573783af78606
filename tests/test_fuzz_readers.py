"""Property tests: whatever bytes a user hands us, the readers fail only with our errors.

Random bytes, corrupted TIFFs, random shapes/dtypes/layouts written by tifffile, random
CSV text and random HDF5 tables go through ``open_stack`` / ``read_emitters``; the only
exceptions allowed to escape are :class:`VarEmitterError` subclasses, and whatever opens
must return the data that were written.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings

import h5py
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_var_emitter.errors import VarEmitterError
from napari_var_emitter.io.emitters import read_emitters
from napari_var_emitter.io.tiff import open_stack

# a fixed, quick run by default; VAR_EMITTER_FUZZ_EXAMPLES=5000 for a long random hunt
_LONG = int(os.environ.get("VAR_EMITTER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 60, deadline=None, derandomize=not _LONG,
                suppress_health_check=[HealthCheck.too_slow], database=None)


def _scratch(suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return path


def _read_all(path: str):
    """Open and read every frame; return the data, or None on one of our errors."""
    try:
        with open_stack(path) as stack:
            return stack.shape, stack[:]
    except VarEmitterError as e:
        assert "\n" not in str(e)
        return None


def _small_tiff(seed: int, **kw) -> bytes:
    buf = io.BytesIO()
    data = np.random.default_rng(seed).integers(0, 1000, size=(3, 8, 6), dtype=np.uint16)
    tifffile.imwrite(buf, data, photometric="minisblack", **kw)
    return buf.getvalue()


_VALID_TIFFS = [
    _small_tiff(0),
    _small_tiff(1, compression="zlib"),
    _small_tiff(2, imagej=True),
    _small_tiff(3, bigtiff=True, tile=(16, 16)),
]


@FUZZ
@given(st.binary(min_size=0, max_size=2048),
       st.sampled_from([b"", b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"]))
def test_random_bytes_named_tif(blob, prefix):
    path = _scratch(".tif")
    try:
        with open(path, "wb") as fh:
            fh.write(prefix + blob)
        _read_all(path)
    finally:
        os.remove(path)


@FUZZ
@given(st.integers(0, len(_VALID_TIFFS) - 1),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                max_size=8),
       st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_corrupted_tiffs(which, flips, keep_fraction):
    blob = bytearray(_VALID_TIFFS[which])
    for pos, value in flips:
        blob[pos % len(blob)] = value
    if keep_fraction is not None:
        blob = blob[: max(1, int(len(blob) * keep_fraction))]
    path = _scratch(".tif")
    try:
        with open(path, "wb") as fh:
            fh.write(bytes(blob))
        result = _read_all(path)
        if result is not None:
            shape, data = result
            assert data.shape == shape and data.ndim == 3
    finally:
        os.remove(path)


_DTYPES = ["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64", "int8"]


@FUZZ
@given(st.lists(st.integers(1, 5), min_size=2, max_size=5),
       st.sampled_from(_DTYPES),
       st.sampled_from(["plain", "imagej", "zlib", "tiled", "bigtiff", "big-endian",
                        "rgb-guess"]),
       st.integers(0, 2**31))
def test_random_stacks_written_by_tifffile(shape, dtype, layout, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(shape[:-2]) + (shape[-2] * 3, shape[-1] * 3)
    data = (rng.random(shape) * 100).astype(dtype)
    kw = {"photometric": "minisblack"}
    if layout == "imagej":
        if dtype not in ("uint8", "uint16", "int16", "float32") or len(shape) > 5:
            return
        axes = "TZCYX"[-len(shape):]
        kw = {"imagej": True, "metadata": {"axes": axes}}
    elif layout == "zlib":
        kw["compression"] = "zlib"
    elif layout == "tiled":
        kw["tile"] = (16, 16)
    elif layout == "bigtiff":
        kw["bigtiff"] = True
    elif layout == "big-endian":
        kw["byteorder"] = ">"
    elif layout == "rgb-guess":
        kw = {}  # let tifffile guess: shapes with a 3 or 4 may become RGB
    path = _scratch(".tif")
    try:
        with warnings.catch_warnings():
            # the guess is the point of this layout: tifffile warns that it will stop guessing
            warnings.simplefilter("ignore", DeprecationWarning)
            tifffile.imwrite(path, data, **kw)
        result = _read_all(path)
        squeezed = data.reshape([n for n in shape[:-2] if n > 1] + list(shape[-2:]))
        extra = squeezed.ndim - 2
        if layout != "rgb-guess":
            # a single time axis (or none) must open; two or more must be refused
            assert (result is not None) == (extra <= 1), (shape, layout)
        if result is not None:
            got_shape, got = result
            expected = squeezed.reshape((-1,) + shape[-2:])
            assert got_shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    finally:
        os.remove(path)


_HEADERS = [
    '"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]"',
    '"frame","x [px]","y [px]"',
    "Ground-truth,frame,xnano,ynano,znano,intensity",
    '"frame","x [nm]"',
    "",
]
_CELLS = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "NaN", "inf", "abc", '"1"', "1e400", "0x10", "-0", "1,2"]),
    st.text(max_size=6),
)


@FUZZ
@given(st.sampled_from(_HEADERS),
       st.lists(st.lists(_CELLS, min_size=0, max_size=7), max_size=6),
       st.one_of(st.none(), st.sampled_from([100.0, 65.0])),
       st.booleans())
def test_random_csv_text(header, rows, pixel_size, with_bounds):
    text = header + "\n" + "\n".join(",".join(r) for r in rows)
    path = _scratch(".csv")
    try:
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        kw = {"n_frames": 5, "shape": (30, 30)} if with_bounds else {}
        try:
            table, meta = read_emitters(path, pixel_size_nm=pixel_size, **kw)
        except VarEmitterError as e:
            assert "\n" not in str(e)
        else:
            assert np.isfinite(table["x"]).all() and np.isfinite(table["y"]).all()
            assert (table["frame"] >= 0).all()
    except UnicodeEncodeError:
        pass  # hypothesis produced text that cannot be a file at all
    finally:
        os.remove(path)


_FIELD_TYPES = ["i4", "u2", "f4", "f8", "S3", "bool"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["frame", "x_nm", "y_nm", "photons", "sigma_nm",
                                            "x", "y", "bg", "junk"]),
                          st.sampled_from(_FIELD_TYPES)),
                min_size=1, max_size=6, unique_by=lambda t: t[0]),
       st.sampled_from(["emitters", "locs", "other"]),
       st.integers(0, 6),
       st.one_of(st.none(), st.floats(-10, 500), st.just(float("nan"))),
       st.integers(0, 2**31))
def test_random_hdf5_tables(fields, name, n_rows, attr_px, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype([(f, t) for f, t in fields])
    rec = np.zeros(n_rows, dtype=dtype)
    for f, t in fields:
        if t == "S3":
            rec[f] = [b"ab"] * n_rows
        else:
            vals = rng.choice([0.0, 1.0, 2.5, -3.0, 1e6, np.nan], size=n_rows)
            with np.errstate(invalid="ignore"):
                rec[f] = vals.astype(t) if t.startswith("f") or t == "bool" else \
                    np.nan_to_num(vals).astype(t)
    path = _scratch(".h5")
    try:
        with h5py.File(path, "w") as fh:
            ds = fh.create_dataset(name, data=rec)
            if attr_px is not None:
                ds.attrs["pixel_size_nm"] = attr_px
        try:
            table, _ = read_emitters(path, n_frames=3, shape=(64, 64))
        except VarEmitterError as e:
            assert "\n" not in str(e)
        else:
            assert np.isfinite(table["x"]).all() and len(table) == n_rows
    finally:
        os.remove(path)


@FUZZ
@given(st.binary(min_size=1, max_size=1024),
       st.sampled_from([".csv", ".h5", ".hdf5", ".txt"]),
       st.sampled_from([b"", b"\x89HDF\r\n\x1a\n"]))
def test_random_bytes_as_emitter_files(blob, suffix, prefix):
    path = _scratch(suffix)
    try:
        with open(path, "wb") as fh:
            fh.write(prefix + blob)
        with pytest.raises(VarEmitterError):
            read_emitters(path, pixel_size_nm=100.0)
    finally:
        os.remove(path)
