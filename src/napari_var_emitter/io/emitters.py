"""Emitter and localisation tables in and out.

Readers (format detected from the content, not the file name):

- the contract's **emitter H5**: dataset ``emitters``, a compound table with columns
  ``frame`` (0-based), ``x_nm``, ``y_nm`` and optional ``photons``, ``sigma_nm``
  (``background``, ``prob``, ``unc_x_nm``, ``unc_y_nm`` as written by us); attribute
  ``pixel_size_nm`` on the file or the dataset;
- **Picasso** locs HDF5: dataset ``locs``, x/y in pixels with integer = pixel centre,
  frames 0-based; pixel size from the ``.yaml`` beside it (``Pixelsize``);
- **ThunderSTORM** CSV: quoted header with units (``"x [nm]"``, ``"x [px]"``, ``"x [um]"``),
  1-based frames;
- **SMLM-challenge** CSV: ``Ground-truth,frame,xnano,ynano,znano,intensity``, space-padded,
  1-based frames.

Every reader returns a :data:`~napari_var_emitter.table.LOC_DTYPE` table in input pixels
(pixel-centre convention, ``x = x_nm / pixel_size_nm - 0.5``) and a metadata dict. Writers
are atomic: a crash never leaves a half-written file.
"""

from __future__ import annotations

import csv
import os
import re
import warnings

import h5py
import numpy as np
import yaml

from .. import __version__
from ..errors import InputFileError, VarEmitterError
from ..table import LOC_DTYPE, empty_table
from .atomic import atomic_path

__all__ = [
    "THUNDERSTORM_COLUMNS",
    "PICASSO_LOCS_DTYPE",
    "EDGE_MARGIN_PX",
    "read_emitters",
    "write_emitter_h5",
    "write_thunderstorm_csv",
    "write_picasso_hdf5",
    "picasso_yaml_path",
]

#: header of the localisations CSV (ThunderSTORM columns, then our extra columns)
THUNDERSTORM_COLUMNS = (
    "id", "frame", "x [nm]", "y [nm]", "sigma [nm]", "intensity [photon]", "offset [photon]",
    "bkgstd [photon]", "uncertainty [nm]", "prob", "uncertainty_x [nm]", "uncertainty_y [nm]",
)

#: Picasso's locs record (picasso.localize / picasso.io field names and types)
PICASSO_LOCS_DTYPE = np.dtype([
    ("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"), ("sx", "f4"), ("sy", "f4"),
    ("bg", "f4"), ("lpx", "f4"), ("lpy", "f4"), ("ellipticity", "f4"), ("net_gradient", "f4"),
])

#: emitters up to this many pixels outside the image are accepted: their PSF tails still
#: put light into the frame, and simulators place them there on purpose
EDGE_MARGIN_PX = 2.0

_H5_DTYPE = np.dtype([
    ("frame", "i8"), ("x_nm", "f8"), ("y_nm", "f8"), ("photons", "f8"), ("sigma_nm", "f8"),
    ("background", "f8"), ("prob", "f8"), ("unc_x_nm", "f8"), ("unc_y_nm", "f8"),
])

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_GENERATED_BY = f"napari-var-emitter {__version__}"
_UNIT_RE = re.compile(r"^\s*(.*?)\s*\[\s*(.*?)\s*\]\s*$")
_LENGTH_UNITS_NM = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3}


def _err(path, problem: str) -> InputFileError:
    return InputFileError(path, " ".join(str(problem).split()))


# ==========================================================================================
# reading
def read_emitters(path: str | os.PathLike, pixel_size_nm: float | None = None,
                  n_frames: int | None = None, shape=None) -> tuple[np.ndarray, dict]:
    """Read an emitter / localisation file into a table in input pixels.

    ``pixel_size_nm`` is the pixel size of the image the emitters belong to. For files in
    nm (emitter H5, ThunderSTORM nm, SMLM challenge) it converts nm to pixels and takes
    precedence over a pixel size stored in the file; without either, nm files are refused.
    Picasso positions are already pixels; if both its yaml and the argument give a pixel
    size and they differ, positions are rescaled through nm.

    ``n_frames`` (stack length) and ``shape`` (``(H, W)`` or ``(T, H, W)``) enable checks:
    emitter frames must be ``< n_frames`` and positions within the image up to
    :data:`EDGE_MARGIN_PX`. Returns ``(table, meta)`` where meta has ``format``
    ("emitter_h5", "picasso", "thunderstorm", "smlm_challenge"), ``pixel_size_nm`` (the nm
    size of the table's pixel unit; None when neither file nor argument tells),
    ``file_pixel_size_nm`` (stored in the file, or None), ``n_emitters``, and for Picasso
    the yaml's ``width``, ``height``, ``frames`` when present.
    """
    path = os.fspath(path)
    if pixel_size_nm is not None and not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise _err(path, f"pixel size must be a positive number of nm, got {pixel_size_nm!r}")
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) == 3:
            n_frames = shape[0] if n_frames is None else n_frames
            shape = shape[1:]
        if len(shape) != 2:
            raise ValueError(f"shape must be (H, W) or (T, H, W), got {shape}")
    _check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    try:
        if head == _HDF5_SIGNATURE or h5py.is_hdf5(path):
            table, meta = _read_hdf5(path, pixel_size_nm)
        else:
            table, meta = _read_csv(path, pixel_size_nm)
    except VarEmitterError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, OverflowError,
            RuntimeError, UnicodeError) as e:
        # a parser tripping over malformed content: report it as bad input, one line
        raise _err(path, f"cannot read emitter table ({type(e).__name__}: {e})") from None
    _validate(path, table, n_frames, shape)
    meta["n_emitters"] = int(len(table))
    return table, meta


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise _err(path, "file not found")
    if os.path.isdir(path):
        raise _err(path, "is a directory, not an emitter file")
    if os.path.getsize(path) == 0:
        raise _err(path, "file is empty")


# -- HDF5 ---------------------------------------------------------------------------------
def _read_hdf5(path: str, pixel_size_nm):
    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        raise _err(path, f"not a readable HDF5 file ({e})") from None
    with fh:
        if "emitters" in fh:
            return _read_emitter_h5(path, fh, pixel_size_nm)
        if "locs" in fh:
            return _read_picasso(path, fh, pixel_size_nm)
        names = ", ".join(sorted(fh.keys())[:5]) or "nothing"
        raise _err(path, f"HDF5 file has no 'emitters' (emitter table) or 'locs' (Picasso) "
                         f"dataset (it holds {names})")


def _columns(path: str, node, name: str) -> dict[str, np.ndarray]:
    """Columns of a compound dataset, or of a group of equal-length 1-D datasets."""
    if isinstance(node, h5py.Dataset):
        if node.dtype.names is None:
            raise _err(path, f"dataset '{name}' is not a table with named columns")
        if node.ndim != 1:
            raise _err(path, f"dataset '{name}' must be 1-D (one row per emitter), "
                             f"has shape {node.shape}")
        data = node[()]
        return {k: np.asarray(data[k]) for k in node.dtype.names}
    if isinstance(node, h5py.Group):
        cols = {}
        for k, v in node.items():
            if isinstance(v, h5py.Dataset) and v.ndim == 1:
                cols[k] = np.asarray(v[()])
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise _err(path, f"columns of '{name}' have different lengths")
        return cols
    raise _err(path, f"'{name}' is not a table")


def _numeric(path: str, cols: dict, name: str, where: str) -> np.ndarray:
    v = cols[name]
    if v.dtype.kind not in "biuf" or v.ndim != 1:
        raise _err(path, f"column '{name}' of {where} is not numeric ({v.dtype})")
    return v.astype(np.float64)


def _positive_float(value) -> float | None:
    try:
        v = float(np.asarray(value).ravel()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _read_emitter_h5(path, fh, pixel_size_nm):
    node = fh["emitters"]
    cols = _columns(path, node, "emitters")
    missing = [c for c in ("frame", "x_nm", "y_nm") if c not in cols]
    if missing:
        raise _err(path, f"dataset 'emitters' lacks column(s) {', '.join(missing)} "
                         "(need frame, x_nm, y_nm)")
    file_px = _positive_float(node.attrs.get("pixel_size_nm")) \
        or _positive_float(fh.attrs.get("pixel_size_nm"))
    px = pixel_size_nm if pixel_size_nm is not None else file_px
    if px is None:
        raise _err(path, "emitter positions are in nm but no pixel size is known "
                         "(no pixel_size_nm attribute; give the pixel size)")
    where = "dataset 'emitters'"
    frame = _numeric(path, cols, "frame", where)
    t = empty_table(len(frame))
    t["frame"] = _integer_frames(path, frame, base=0)
    t["x"] = _numeric(path, cols, "x_nm", where) / px - 0.5
    t["y"] = _numeric(path, cols, "y_nm", where) / px - 0.5
    for src, dst, scale in (("photons", "photons", 1.0), ("sigma_nm", "sigma", 1 / px),
                            ("background", "background", 1.0), ("prob", "prob", 1.0),
                            ("unc_x_nm", "unc_x", 1 / px), ("unc_y_nm", "unc_y", 1 / px)):
        if src in cols:
            t[dst] = _numeric(path, cols, src, where) * scale
    return t, {"format": "emitter_h5", "pixel_size_nm": float(px),
               "file_pixel_size_nm": file_px}


def picasso_yaml_path(path: str | os.PathLike) -> str:
    """The ``.yaml`` file Picasso expects beside a locs ``.hdf5`` file."""
    return os.path.splitext(os.fspath(path))[0] + ".yaml"


def _read_picasso_yaml(path: str) -> list[dict]:
    ypath = picasso_yaml_path(path)
    if not os.path.isfile(ypath):
        return []
    try:
        with open(ypath, encoding="utf-8") as fh:
            docs = [d for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    except (yaml.YAMLError, UnicodeError, OSError) as e:
        raise _err(ypath, f"unreadable Picasso metadata ({type(e).__name__})") from None
    return docs


def _read_picasso(path, fh, pixel_size_nm):
    cols = _columns(path, fh["locs"], "locs")
    missing = [c for c in ("frame", "x", "y") if c not in cols]
    if missing:
        raise _err(path, f"dataset 'locs' lacks column(s) {', '.join(missing)}")
    docs = _read_picasso_yaml(path)
    info: dict = {}
    for d in docs:  # Picasso stacks one document per processing step; first value wins
        for k, v in d.items():
            info.setdefault(k, v)
    file_px = _positive_float(info.get("Pixelsize")) if "Pixelsize" in info else None
    where = "dataset 'locs'"
    frame = _numeric(path, cols, "frame", where)
    x = _numeric(path, cols, "x", where)
    y = _numeric(path, cols, "y", where)
    scale = 1.0
    if file_px is not None and pixel_size_nm is not None and file_px != pixel_size_nm:
        scale = file_px / pixel_size_nm
    t = empty_table(len(frame))
    t["frame"] = _integer_frames(path, frame, base=0)
    t["x"] = (x + 0.5) * scale - 0.5
    t["y"] = (y + 0.5) * scale - 0.5
    if "photons" in cols:
        t["photons"] = _numeric(path, cols, "photons", where)
    if "sx" in cols and "sy" in cols:
        t["sigma"] = 0.5 * (_numeric(path, cols, "sx", where)
                            + _numeric(path, cols, "sy", where)) * scale
    elif "sx" in cols:
        t["sigma"] = _numeric(path, cols, "sx", where) * scale
    if "bg" in cols:
        t["background"] = _numeric(path, cols, "bg", where)
    if "lpx" in cols:
        t["unc_x"] = _numeric(path, cols, "lpx", where) * scale
    if "lpy" in cols:
        t["unc_y"] = _numeric(path, cols, "lpy", where) * scale
    ours = str(info.get("Generated by", "")).startswith("napari-var-emitter")
    if ours and "net_gradient" in cols:
        # our writer stores the detection probability in Picasso's net_gradient column
        t["prob"] = _numeric(path, cols, "net_gradient", where)
    meta = {"format": "picasso", "pixel_size_nm": pixel_size_nm or file_px,
            "file_pixel_size_nm": file_px}
    for key in ("Width", "Height", "Frames"):
        if key in info:
            try:
                meta[key.lower()] = int(info[key])
            except (TypeError, ValueError):
                pass
    return t, meta


# -- CSV ----------------------------------------------------------------------------------
def _read_csv(path: str, pixel_size_nm):
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header_line = fh.readline()
            # a binary file decodes badly somewhere: read a little more to find out early
            fh.read(4096)
    except UnicodeDecodeError:
        raise _err(path, "not a text (CSV) or HDF5 emitter file") from None
    if "\x00" in header_line:
        raise _err(path, "not a text (CSV) or HDF5 emitter file")
    try:
        header = next(csv.reader([header_line]))
    except (csv.Error, StopIteration):
        header = []
    names = [h.strip() for h in header]
    lower = [n.lower() for n in names]
    if "xnano" in lower and "ynano" in lower:
        return _read_smlm_challenge(path, lower, pixel_size_nm)
    parsed = [_UNIT_RE.match(n) for n in names]
    if any(m is not None and m.group(1).lower() == "x" for m in parsed):
        return _read_thunderstorm(path, names, pixel_size_nm)
    raise _err(path, "unrecognised emitter file: expected an HDF5 emitter/Picasso table, a "
                     "ThunderSTORM CSV (header with \"x [nm]\") or an SMLM-challenge CSV "
                     "(Ground-truth,frame,xnano,ynano,...)")


def _load_numeric_csv(path: str, n_columns: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
        try:
            data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64,
                              quotechar='"', comments=None, encoding="utf-8-sig")
        except ValueError as e:
            msg = str(e)
            # numpy counts data rows (from 0 in conversion errors, from 1 in column-count
            # errors); users count file lines from 1, header included
            m = re.search(r"at row (\d+), column (\d+)", msg)
            if m:
                msg = re.sub(r"at row (\d+), column (\d+)",
                             f"at line {int(m.group(1)) + 2}, column {int(m.group(2))}", msg)
            m = re.search(r"changed from \d+ to \d+ at row (\d+)", msg)
            if m:
                msg = re.sub(r"at row (\d+).*", f"at line {int(m.group(1)) + 1}", msg)
            raise _err(path, f"not a numeric table: {msg.rstrip('.')}") from None
    if data.size == 0:
        return np.zeros((0, n_columns))
    if data.shape[1] != n_columns:
        raise _err(path, f"rows have {data.shape[1]} values but the header names "
                         f"{n_columns} columns")
    return data


def _length_scale(path: str, unit: str, column: str, pixel_size_nm) -> tuple[float, bool]:
    """Factor converting a length column to input pixels, and whether it was in pixels."""
    u = unit.strip().lower()
    if u in ("px", "pixel", "pixels"):
        return 1.0, True
    if u in _LENGTH_UNITS_NM:
        if pixel_size_nm is None:
            raise _err(path, f"column '{column}' is in {unit} but no pixel size is known "
                             "(give the pixel size)")
        return _LENGTH_UNITS_NM[u] / pixel_size_nm, False
    raise _err(path, f"column '{column}' has an unknown unit [{unit}]")


def _read_thunderstorm(path: str, names: list[str], pixel_size_nm):
    data = _load_numeric_csv(path, len(names))
    col = {}
    for i, n in enumerate(names):
        m = _UNIT_RE.match(n)
        key, unit = (m.group(1).lower(), m.group(2)) if m else (n.lower(), "")
        col.setdefault(key, (i, unit, n))
    for needed in ("frame", "x", "y"):
        if needed not in col:
            raise _err(path, f"ThunderSTORM CSV lacks a '{needed}' column")
    t = empty_table(len(data))
    t["frame"] = _integer_frames(path, data[:, col["frame"][0]], base=1)
    for axis in ("x", "y"):
        i, unit, n = col[axis]
        # ThunderSTORM measures from the image corner in both nm and px
        t[axis] = data[:, i] * _length_scale(path, unit, n, pixel_size_nm)[0] - 0.5
    if "sigma" in col:
        i, unit, n = col["sigma"]
        t["sigma"] = data[:, i] * _length_scale(path, unit, n, pixel_size_nm)[0]
    for key, dst in (("intensity", "photons"), ("offset", "background"), ("prob", "prob")):
        if key in col:
            t[dst] = data[:, col[key][0]]
    for key, dst in (("uncertainty_x", "unc_x"), ("uncertainty_y", "unc_y")):
        if key in col:
            i, unit, n = col[key]
            t[dst] = data[:, i] * _length_scale(path, unit, n, pixel_size_nm)[0]
    for key in ("uncertainty", "uncertainty_xy"):
        if key in col and "uncertainty_x" not in col:
            i, unit, n = col[key]
            t["unc_x"] = t["unc_y"] = data[:, i] * _length_scale(path, unit, n,
                                                                  pixel_size_nm)[0]
            break
    return t, {"format": "thunderstorm", "pixel_size_nm": pixel_size_nm,
               "file_pixel_size_nm": None}


def _read_smlm_challenge(path: str, lower: list[str], pixel_size_nm):
    data = _load_numeric_csv(path, len(lower))
    for needed in ("frame", "xnano", "ynano"):
        if needed not in lower:
            raise _err(path, f"SMLM-challenge CSV lacks a '{needed}' column")
    if pixel_size_nm is None:
        raise _err(path, "positions are in nm but no pixel size is known (give the pixel size)")
    t = empty_table(len(data))
    t["frame"] = _integer_frames(path, data[:, lower.index("frame")], base=1)
    t["x"] = data[:, lower.index("xnano")] / pixel_size_nm - 0.5
    t["y"] = data[:, lower.index("ynano")] / pixel_size_nm - 0.5
    if "intensity" in lower:
        t["photons"] = data[:, lower.index("intensity")]
    return t, {"format": "smlm_challenge", "pixel_size_nm": float(pixel_size_nm),
               "file_pixel_size_nm": None}


# -- validation ---------------------------------------------------------------------------
def _integer_frames(path: str, frame: np.ndarray, base: int) -> np.ndarray:
    frame = np.asarray(frame, dtype=np.float64)
    bad = ~np.isfinite(frame) | (frame != np.round(frame))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _err(path, f"emitter {i + 1} has a non-integer frame number {frame[i]!r}")
    low = frame < base
    if low.any():
        i = int(np.flatnonzero(low)[0])
        kind = "1-based" if base == 1 else "0-based"
        raise _err(path, f"emitter {i + 1} has frame {int(frame[i])}, below the first frame "
                         f"({base}) of this {kind} format")
    if frame.size and frame.max() > 2**62:
        raise _err(path, f"frame number {frame.max():.0f} is out of range")
    return frame.astype(np.int64) - base


def _validate(path: str, t: np.ndarray, n_frames, shape) -> None:
    for axis in ("x", "y"):
        bad = ~np.isfinite(t[axis])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _err(path, f"emitter {i + 1} has a missing (NaN) or infinite {axis} coordinate")
    if n_frames is not None and len(t):
        last = int(t["frame"].max())
        if last >= n_frames:
            raise _err(path, f"emitters in frame {last} (0-based) but the stack has only "
                             f"{n_frames} frames")
    if shape is not None and len(t):
        h, w = shape
        m = EDGE_MARGIN_PX
        for axis, size in (("x", w), ("y", h)):
            v = t[axis]
            out = (v < -0.5 - m) | (v > size - 0.5 + m)
            if out.any():
                i = int(np.flatnonzero(out)[0])
                raise _err(path, f"emitter {i + 1} at {axis}={v[i]:.2f} px lies outside the "
                                 f"{w}x{h} image (more than {m:g} px beyond its edge; "
                                 "wrong pixel size?)")


# ==========================================================================================
# writing
def _as_table(table) -> np.ndarray:
    t = np.asarray(table)
    if t.dtype != LOC_DTYPE:
        t = t.astype(LOC_DTYPE)
    return t


def _check_px(pixel_size_nm) -> float:
    if pixel_size_nm is None or not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    return float(pixel_size_nm)


def write_emitter_h5(path: str | os.PathLike, table, pixel_size_nm: float) -> str:
    """Write the contract's emitter H5 (dataset ``emitters``, positions in nm) atomically.

    Columns: frame (0-based), x_nm, y_nm, photons, sigma_nm, background (photons/px),
    prob, unc_x_nm, unc_y_nm; attribute ``pixel_size_nm`` on the file and the dataset.
    """
    path = os.fspath(path)
    px = _check_px(pixel_size_nm)
    t = _as_table(table)
    rec = np.zeros(len(t), dtype=_H5_DTYPE)
    rec["frame"] = t["frame"]
    rec["x_nm"] = (t["x"] + 0.5) * px
    rec["y_nm"] = (t["y"] + 0.5) * px
    rec["photons"] = t["photons"]
    rec["sigma_nm"] = t["sigma"] * px
    rec["background"] = t["background"]
    rec["prob"] = t["prob"]
    rec["unc_x_nm"] = t["unc_x"] * px
    rec["unc_y_nm"] = t["unc_y"] * px
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            kw = {"compression": "gzip", "shuffle": True} if len(rec) else {}
            ds = fh.create_dataset("emitters", data=rec, **kw)
            ds.attrs["pixel_size_nm"] = px
            ds.attrs["units"] = "frame: 0-based; x_nm, y_nm from the image's top-left corner"
            fh.attrs["pixel_size_nm"] = px
            fh.attrs["generated_by"] = _GENERATED_BY
    return path


def _csv_column(values: np.ndarray, fmt: str) -> tuple[list, str]:
    """A column as row-format input: its values and their ``%`` format, or, when some are
    not finite, ready-made strings and ``%s`` (Java's Double.parseDouble, which ThunderSTORM
    uses, reads "NaN"/"Infinity", not Python's "nan"/"inf")."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if finite.all():
        return values.tolist(), fmt
    out = np.where(np.isnan(values), "NaN", np.where(values > 0, "Infinity", "-Infinity"))
    out = out.astype(object)
    idx = np.flatnonzero(finite)
    out[idx] = [fmt % v for v in values[idx].tolist()]
    return out.tolist(), "%s"


def write_thunderstorm_csv(path: str | os.PathLike, table, pixel_size_nm: float,
                           chunk_rows: int = 20_000) -> str:
    """Write the localisations CSV (ThunderSTORM columns + prob, per-axis uncertainty).

    ``id`` and ``frame`` are 1-based; positions in nm from the top-left corner; sigma and
    uncertainties converted from pixels; ``offset`` = background, ``bkgstd`` =
    sqrt(background) (Poisson); ``uncertainty [nm]`` = sqrt((ux^2 + uy^2) / 2).
    Rows are formatted ``chunk_rows`` at a time, so memory stays bounded (~15 MB) however
    long the table.
    """
    path = os.fspath(path)
    px = _check_px(pixel_size_nm)
    t = _as_table(table)
    header = ",".join(f'"{c}"' for c in THUNDERSTORM_COLUMNS) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(header)
            for start in range(0, len(t), chunk_rows):
                c = t[start:start + chunk_rows]
                bg = c["background"]
                with np.errstate(invalid="ignore"):
                    bkgstd = np.where(bg >= 0, np.sqrt(np.abs(bg)), np.nan)
                    unc = np.sqrt((c["unc_x"] ** 2 + c["unc_y"] ** 2) / 2) * px
                cols = [
                    (list(range(start + 1, start + len(c) + 1)), "%d"),
                    ((c["frame"].astype(np.int64) + 1).tolist(), "%d"),
                    _csv_column((c["x"] + 0.5) * px, "%.4f"),
                    _csv_column((c["y"] + 0.5) * px, "%.4f"),
                    _csv_column(c["sigma"] * px, "%.4f"),
                    _csv_column(c["photons"], "%.4f"),
                    _csv_column(bg, "%.5f"),
                    _csv_column(bkgstd, "%.5f"),
                    _csv_column(unc, "%.4f"),
                    _csv_column(c["prob"], "%.6f"),
                    _csv_column(c["unc_x"] * px, "%.4f"),
                    _csv_column(c["unc_y"] * px, "%.4f"),
                ]
                # one %-format per row instead of one per value: about twice as fast
                row = ",".join(f for _, f in cols) + "\n"
                fh.write("".join(map(row.__mod__, zip(*(v for v, _ in cols)))))
    return path


def write_picasso_hdf5(path: str | os.PathLike, table, pixel_size_nm: float, width: int,
                       height: int, n_frames: int,
                       extra_info: dict | None = None) -> tuple[str, str]:
    """Write a Picasso locs HDF5 (dataset ``locs``) and its ``.yaml``; return both paths.

    Positions stay in pixels (integer = pixel centre, as Picasso); ``sx = sy`` = sigma (the
    fitted PSF width; rows without one hold the median of the fitted ones, or 0 when no row
    has one: Picasso drops rows holding NaN), ``lpx/lpy`` = per-axis uncertainty (px),
    ``bg`` = background, ``ellipticity`` 0, and ``net_gradient`` holds the detection
    probability (Picasso filters on that column).
    The yaml holds Width, Height, Frames, Pixelsize and "Generated by", then ``extra_info``
    (e.g. how the localisations were made; Picasso keeps keys it does not know).
    """
    path = os.fspath(path)
    px = _check_px(pixel_size_nm)
    t = _as_table(table)
    if len(t) and t["frame"].min() < 0:
        raise ValueError("negative frame numbers cannot be stored in Picasso's u4 frame column")
    locs = np.zeros(len(t), dtype=PICASSO_LOCS_DTYPE)
    locs["frame"] = t["frame"]
    locs["x"] = t["x"]
    locs["y"] = t["y"]
    locs["photons"] = t["photons"]
    # Picasso drops every row with a NaN in any column when it loads a file (lib.ensure_sanity,
    # 0.11), so rows without a fitted PSF width get the median of the fitted ones (or 0)
    fitted = np.isfinite(t["sigma"])
    psf_width = np.where(fitted, t["sigma"],
                         np.median(t["sigma"][fitted]) if fitted.any() else 0.0)
    locs["sx"] = psf_width
    locs["sy"] = psf_width
    locs["bg"] = t["background"]
    locs["lpx"] = t["unc_x"]
    locs["lpy"] = t["unc_y"]
    locs["ellipticity"] = 0.0
    locs["net_gradient"] = t["prob"]
    info = {
        "Byte Order": "<",
        "Data Type": "uint16",
        "Frames": int(n_frames),
        "Height": int(height),
        "Width": int(width),
        "Pixelsize": float(px),
        "Generated by": _GENERATED_BY,
        "net_gradient": "detection probability",
        "sx, sy": "fitted PSF width; rows without a fit hold the median of the fitted ones",
        **(extra_info or {}),
    }
    ypath = picasso_yaml_path(path)
    with atomic_path(path) as tmp, atomic_path(ypath, suffix=".yaml") as ytmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("locs", data=locs)
        with open(ytmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump_all([info], fh, default_flow_style=False, sort_keys=False)
    return path, ypath
