"""napari writers: a Points layer of localisations to ThunderSTORM CSV or Picasso HDF5.

Points data rows are ``(frame, y, x)`` (``(y, x)`` for a single frame) in input pixels;
features named like the localisation table's fields (``photons``, ``sigma``, ``prob``,
``unc_x``, ...) are written too. The pixel size comes from the layer's metadata
(``pixel_size_nm``, default 100 nm). The files are written by :mod:`..io.emitters`
(atomically: a failed save leaves no partial file).
"""

from __future__ import annotations

import os

from .layers import DEFAULT_PIXEL_SIZE_NM, image_shape_of_points, table_from_points


def _table_and_pixel_size(data, meta: dict):
    meta = meta or {}
    features = meta.get("features")
    if features is None or len(getattr(features, "columns", features)) == 0:
        # older napari passes per-point values as "properties" only
        features = meta.get("properties")
    table = table_from_points(data, features)
    layer_meta = meta.get("metadata") or {}
    px = layer_meta.get("pixel_size_nm", DEFAULT_PIXEL_SIZE_NM)
    try:
        px = float(px)
    except (TypeError, ValueError):
        px = DEFAULT_PIXEL_SIZE_NM
    if not px > 0:
        px = DEFAULT_PIXEL_SIZE_NM
    return table, px, layer_meta


def _with_suffix(path: str, suffix: str) -> str:
    path = os.fspath(path)
    return path if path.lower().endswith(suffix) else path + suffix


def write_points_csv(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as a ThunderSTORM CSV (frames 1-based, positions in nm)."""
    from ..io.emitters import write_thunderstorm_csv

    path = _with_suffix(path, ".csv")
    table, px, _ = _table_and_pixel_size(data, meta)
    write_thunderstorm_csv(path, table, px)
    return [path]


def write_points_hdf5(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as Picasso HDF5 (``locs``) plus the ``.yaml`` Picasso needs."""
    from ..io.emitters import write_picasso_hdf5

    path = _with_suffix(path, ".hdf5")
    table, px, layer_meta = _table_and_pixel_size(data, meta)
    n_frames, height, width = image_shape_of_points(data, layer_meta)
    write_picasso_hdf5(path, table, px, width=width, height=height, n_frames=n_frames)
    return [path, os.path.splitext(path)[0] + ".yaml"]
