"""The localisation table: one record per emitter, shared by every module.

Positions are in **input pixels, pixel-centre convention** (pixel ``(row r, col c)`` has its
centre at ``x=c, y=r``); frames are 0-based. Conversion to nm (``x_nm = (x + 0.5) * px``)
and 1-based frames happens only in the file writers/readers.
"""

from __future__ import annotations

import numpy as np

#: dtype of a localisation / emitter table.
#: ``x, y, sigma, unc_x, unc_y`` are in input pixels; ``photons`` per emitter;
#: ``background`` photons per pixel; ``prob`` detection probability (1 for ground truth).
LOC_DTYPE = np.dtype(
    [
        ("frame", "i8"),
        ("x", "f8"),
        ("y", "f8"),
        ("photons", "f8"),
        ("sigma", "f8"),
        ("background", "f8"),
        ("prob", "f8"),
        ("unc_x", "f8"),
        ("unc_y", "f8"),
    ]
)

#: default value of each optional field when a source does not provide it
DEFAULTS = {"photons": np.nan, "sigma": np.nan, "background": np.nan, "prob": 1.0,
            "unc_x": np.nan, "unc_y": np.nan}


def empty_table(n: int = 0) -> np.ndarray:
    """Return a table of ``n`` records with the optional fields at their defaults."""
    t = np.zeros(n, dtype=LOC_DTYPE)
    for k, v in DEFAULTS.items():
        t[k] = v
    return t


def make_table(frame, x, y, **fields) -> np.ndarray:
    """Build a table from column arrays; missing optional columns get their defaults."""
    x = np.asarray(x, dtype=float).ravel()
    t = empty_table(len(x))
    t["frame"] = np.asarray(frame).ravel()
    t["x"] = x
    t["y"] = np.asarray(y, dtype=float).ravel()
    for k, v in fields.items():
        if k not in LOC_DTYPE.names:
            raise KeyError(f"unknown localisation field {k!r}")
        if v is not None:
            t[k] = v
    return t


def concat_tables(tables) -> np.ndarray:
    """Concatenate tables (an empty list gives an empty table)."""
    tables = [np.asarray(t, dtype=LOC_DTYPE) for t in tables]
    return np.concatenate(tables) if tables else empty_table(0)


def frames_slices(table: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """Split a table into one sub-table per frame ``0..n_frames-1``."""
    order = np.argsort(table["frame"], kind="stable")
    t = table[order]
    edges = np.searchsorted(t["frame"], np.arange(n_frames + 1))
    return [t[edges[i]:edges[i + 1]] for i in range(n_frames)]
