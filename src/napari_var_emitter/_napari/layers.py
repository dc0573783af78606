"""Pure-python helpers of the plugin: layer geometry and layer data built from results.

Nothing here needs Qt or a viewer, so all of it is tested without a display.

Geometry (contract, "Coordinates"): a layer's *data* coordinates are input pixels with the
pixel-centre convention; napari shows data at ``world = data * scale + translate``. A map
upsampled by ``f`` over an input layer with scale ``s_in`` and translate ``t_in`` therefore
gets ``scale = s_in / f`` and ``translate = t_in + s_in * (0.5 / f - 0.5)`` on each spatial
axis (its pixel ``j`` is centred on input coordinate ``(j + 0.5) / f - 0.5``), and keeps the
input's frame axis. Points are stored in input pixels (column 0 the frame for stacks) with
the input layer's own scale and translate, so what a writer reads is input pixels again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..table import LOC_DTYPE, empty_table

#: metadata key that marks a layer made by the inference widget; value: the input's name
RESULT_KEY = "var_emitter_result"

#: default pixel size (nm) when neither the layer nor the user gives one
DEFAULT_PIXEL_SIZE_NM = 100.0

#: the maps of a prediction, in the order of the contract's predictions.h5
MAP_NAMES = ("probability", "offset_x", "offset_y", "uncertainty_x", "uncertainty_y", "photons")

#: table columns carried as Points features (same names as :data:`table.LOC_DTYPE`)
TABLE_FEATURES = ("frame", "photons", "sigma", "background", "prob", "unc_x", "unc_y")


@dataclass
class InputGeometry:
    """What the result layers need to know about the input Image layer."""

    name: str
    shape: tuple  # (T, H, W) or (H, W): the layer's data shape
    scale: tuple = ()
    translate: tuple = ()
    pixel_size_nm: float = DEFAULT_PIXEL_SIZE_NM
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        nd = len(self.shape)
        if nd not in (2, 3):
            raise ValueError(f"input layer {self.name!r} has {nd} dimensions; expected "
                             "(T, Y, X) or (Y, X)")
        self.scale = tuple(float(s) for s in (self.scale or (1.0,) * nd))
        self.translate = tuple(float(t) for t in (self.translate or (0.0,) * nd))
        if len(self.scale) != nd or len(self.translate) != nd:
            raise ValueError("scale and translate must have one entry per input dimension")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_stack(self) -> bool:
        """True for a (T, Y, X) input, False for a single (Y, X) frame."""
        return self.ndim == 3

    @property
    def n_frames(self) -> int:
        return int(self.shape[0]) if self.is_stack else 1

    @property
    def frame_shape(self) -> tuple[int, int]:
        return int(self.shape[-2]), int(self.shape[-1])

    @classmethod
    def from_layer(cls, layer) -> "InputGeometry":
        """Geometry of a napari Image layer (its first level when multiscale)."""
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return cls(name=layer.name, shape=tuple(int(n) for n in data.shape),
                   scale=tuple(layer.scale), translate=tuple(layer.translate),
                   pixel_size_nm=pixel_size_from_layer(layer) or DEFAULT_PIXEL_SIZE_NM,
                   metadata=dict(layer.metadata))


def map_scale_translate(in_scale, in_translate, factor: float) -> tuple[tuple, tuple]:
    """Scale and translate of a map upsampled by ``factor`` over an input layer.

    The last two axes are spatial: ``scale = s_in / f``, ``translate = t_in +
    s_in * (0.5 / f - 0.5)``; any leading (frame) axis keeps the input's scale and translate.
    For a unit input and f = 2, 4, 8 the translate is -0.25, -0.375, -0.4375.
    """
    s_in = np.asarray(in_scale, dtype=float)
    t_in = np.asarray(in_translate, dtype=float)
    if s_in.shape != t_in.shape or s_in.ndim != 1 or len(s_in) < 2:
        raise ValueError("in_scale and in_translate must be sequences of equal length >= 2")
    f = float(factor)
    if not f > 0:
        raise ValueError(f"upsampling factor must be > 0, got {factor!r}")
    scale = s_in.copy()
    translate = t_in.copy()
    scale[-2:] = s_in[-2:] / f
    translate[-2:] = t_in[-2:] + s_in[-2:] * (0.5 / f - 0.5)
    return tuple(scale.tolist()), tuple(translate.tolist())


def input_grid_of_highres(hr_scale, hr_translate, factor: float) -> tuple[tuple, tuple]:
    """Scale and translate of the camera (input) grid under a layer upsampled by ``factor``.

    The inverse of :func:`map_scale_translate`: given a high-resolution image layer (for
    example the 8x photon image of a training pair), where do the camera pixels lie.
    """
    s_hr = np.asarray(hr_scale, dtype=float)
    t_hr = np.asarray(hr_translate, dtype=float)
    f = float(factor)
    scale = s_hr.copy()
    translate = t_hr.copy()
    scale[-2:] = s_hr[-2:] * f
    translate[-2:] = t_hr[-2:] - scale[-2:] * (0.5 / f - 0.5)
    return tuple(scale.tolist()), tuple(translate.tolist())


def points_data_from_table(table: np.ndarray, ndim: int) -> np.ndarray:
    """Points layer data from a table: ``(frame, y, x)`` rows for stacks, ``(y, x)`` for
    a single frame (``ndim`` 3 or 2), in input pixels."""
    t = np.asarray(table, dtype=LOC_DTYPE)
    if ndim == 3:
        return np.column_stack([t["frame"].astype(float), t["y"], t["x"]]).reshape(-1, 3)
    if ndim == 2:
        return np.column_stack([t["y"], t["x"]]).reshape(-1, 2)
    raise ValueError(f"points of a localisation table have 2 or 3 dimensions, not {ndim}")


def points_features(table: np.ndarray, pixel_size_nm: float) -> dict[str, np.ndarray]:
    """Features of a Points layer made from a table.

    The table columns keep their names and units (input pixels), so a writer can rebuild the
    table exactly; ``uncertainty_x_nm`` / ``uncertainty_y_nm`` repeat the predicted 1-sigma
    position errors in nm for display.
    """
    t = np.asarray(table, dtype=LOC_DTYPE)
    feats = {name: np.asarray(t[name]) for name in TABLE_FEATURES}
    feats["uncertainty_x_nm"] = np.asarray(t["unc_x"]) * float(pixel_size_nm)
    feats["uncertainty_y_nm"] = np.asarray(t["unc_y"]) * float(pixel_size_nm)
    return feats


def table_from_points(data, features=None) -> np.ndarray:
    """Rebuild a localisation table from Points layer data and features.

    ``data`` rows are ``(..., frame, y, x)`` for 3-D (and higher) points, ``(y, x)`` for
    2-D points (frame from a ``frame`` feature, else 0), in input pixels. Feature columns
    named like the table's fields (``photons``, ``sigma``, ``prob``, ``unc_x``, ...) are
    copied; the others keep the table defaults.
    """
    data = np.asarray(data, dtype=float)
    if data.ndim != 2 or data.shape[1] < 2:
        data = data.reshape(-1, max(data.shape[-1] if data.ndim else 2, 2))
    n, nd = data.shape
    t = empty_table(n)
    t["y"] = data[:, -2]
    t["x"] = data[:, -1]
    feats = _features_dict(features, n)
    if nd >= 3:
        t["frame"] = np.rint(data[:, -3]).astype(np.int64)
    elif "frame" in feats:
        t["frame"] = np.rint(np.asarray(feats["frame"], dtype=float)).astype(np.int64)
    for name in ("photons", "sigma", "background", "prob", "unc_x", "unc_y"):
        if name in feats:
            t[name] = np.asarray(feats[name], dtype=float)
    return t


def _features_dict(features, n) -> dict:
    """Features as a dict of arrays of length ``n`` (DataFrame, dict or None)."""
    if features is None:
        return {}
    if hasattr(features, "to_dict") and hasattr(features, "columns"):
        cols = {c: np.asarray(features[c]) for c in features.columns}
    else:
        cols = {k: np.asarray(v) for k, v in dict(features).items()}
    return {k: v for k, v in cols.items() if len(v) == n}


def pixel_size_from_layer(layer) -> float | None:
    """Camera pixel size (nm) of an Image layer: ``metadata['pixel_size_nm']`` first, else
    the layer scale when the layer's units say it is a length (nm or um); None if unknown."""
    px = (getattr(layer, "metadata", None) or {}).get("pixel_size_nm")
    if px is not None:
        try:
            px = float(px)
        except (TypeError, ValueError):
            px = None
        if px is not None and np.isfinite(px) and px > 0:
            return px
    units = getattr(layer, "units", None)
    scale = getattr(layer, "scale", None)
    if units is None or scale is None or len(scale) < 1:
        return None
    try:
        unit = units[-1]
        if str(unit) in ("pixel", "px", ""):
            return None
        value = float(scale[-1]) * unit
        nm = float(value.to("nanometer").magnitude)
    except Exception:  # pint raises several kinds for non-length units
        return None
    return nm if np.isfinite(nm) and nm > 0 else None


def camera_from_metadata(metadata: dict) -> dict:
    """Camera parameters stored in a layer's metadata (``metadata['camera']``), as a dict
    with the :class:`~napari_var_emitter.camera.Camera` field names that are present."""
    cam = (metadata or {}).get("camera") or {}
    out = {}
    for key in ("baseline", "e_per_adu", "em_gain", "qe", "read_noise"):
        if key in cam:
            try:
                out[key] = float(cam[key])
            except (TypeError, ValueError):
                continue
    return out


def as_lazy(array):
    """A dask array over an h5py dataset (one chunk per frame), anything else unchanged.

    napari then reads only the frames it shows, so the maps of a long stack never sit in
    memory whole.
    """
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        return array
    if isinstance(array, h5py.Dataset):
        import dask.array as da

        chunks = (1,) + tuple(array.shape[1:]) if array.ndim >= 3 else array.shape
        lazy = da.from_array(array, chunks=chunks, lock=True)
        # maps are stored in half precision, which OpenGL textures do not take
        return lazy.astype(np.float32) if array.dtype == np.float16 else lazy
    return array


def _first_frames(array, n=4) -> np.ndarray:
    """The first ``n`` frames of a (T, ...) array-like as numpy (cheap for lazy arrays)."""
    sub = array[:n]
    if hasattr(sub, "compute"):
        sub = sub.compute()
    return np.asarray(sub)


def robust_limits(array, lo=1.0, hi=99.5) -> tuple[float, float]:
    """Contrast limits from the first frames of an array (finite values only)."""
    vals = _first_frames(array) if np.ndim(array) >= 3 else np.asarray(array)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(vals, [lo, hi])
    if not b > a:
        b = a + 1e-6 if a == 0 else a + abs(a) * 1e-3
    return float(a), float(b)


def result_layer_data(result, geometry: InputGeometry, *, show_maps=True, show_peaks=True,
                      show_uncertainty=True, super_resolution=None, loc_factor=None):
    """Layer data tuples ``(data, kwargs, layer_type)`` for a prediction result.

    ``result`` is a :class:`~napari_var_emitter.inference.PredictionResult` (or anything
    with ``localizations``, ``maps``, ``factors``); ``super_resolution`` a 2-D image from
    :func:`~napari_var_emitter.inference.render_super_resolution` (an integer number of render
    pixels per input pixel) or None to leave it out. Maps of a single-frame input
    drop the length-1 frame axis. Every layer's metadata carries :data:`RESULT_KEY` with the
    input's name so a new run can replace exactly these layers.
    """
    out = []
    tag = {RESULT_KEY: geometry.name}
    factors = sorted(int(f) for f in (getattr(result, "factors", None) or result.maps.keys()))
    maps = getattr(result, "maps", None) or {}
    if loc_factor is None:
        loc_factor = getattr(result, "loc_factor", None) or (factors[0] if factors else None)
    prefix = result_prefix(geometry.name)

    def map_layer(array, factor, what, colormap, limits):
        data = as_lazy(array)
        if not geometry.is_stack and data.ndim == 3:
            data = data[0]
        scale, translate = map_scale_translate(geometry.scale, geometry.translate, factor)
        return (data, {"name": f"{prefix} {what} x{factor}", "scale": scale,
                       "translate": translate, "colormap": colormap,
                       "contrast_limits": limits, "blending": "additive",
                       "metadata": {**tag, "factor": int(factor), "map": what}}, "image")

    if show_maps:
        for f in factors:
            if f in maps and "probability" in maps[f]:
                out.append(map_layer(maps[f]["probability"], f, "probability", "magma",
                                     (0.0, 1.0)))
    if show_uncertainty and loc_factor in maps:
        for axis in ("x", "y"):
            arr = maps[loc_factor].get(f"uncertainty_{axis}")
            if arr is not None:
                out.append(map_layer(arr, loc_factor, f"uncertainty_{axis}", "viridis",
                                     robust_limits(arr)))
    if super_resolution is not None:
        # the rendering's own grid decides its geometry: render pixel j is centred on input
        # coordinate (j + 0.5) / zoom - 0.5, zoom = rendered side / input side (an integer)
        f = np.shape(super_resolution)[-1] / geometry.frame_shape[1]
        sr_scale, sr_translate = map_scale_translate(geometry.scale[-2:],
                                                     geometry.translate[-2:], f)
        out.append((np.asarray(super_resolution, dtype=np.float32),
                    {"name": f"{prefix} super-resolution", "scale": sr_scale,
                     "translate": sr_translate, "colormap": "hot",
                     "contrast_limits": robust_limits(super_resolution, 0.0, 99.9),
                     "blending": "additive",
                     "metadata": {**tag, "render_px_nm": geometry.pixel_size_nm / f}},
                    "image"))
    if show_peaks:
        out.append(peaks_layer_data(result.localizations, geometry))
    return out


def peaks_layer_data(table, geometry: InputGeometry, name=None):
    """Points layer data tuple of detected emitters, coloured by detection probability."""
    table = np.asarray(table, dtype=LOC_DTYPE)
    meta = {RESULT_KEY: geometry.name, "pixel_size_nm": float(geometry.pixel_size_nm),
            "image_shape": [geometry.n_frames, *geometry.frame_shape]}
    kwargs = {"name": name or f"{result_prefix(geometry.name)} peaks",
              "scale": geometry.scale, "translate": geometry.translate,
              "features": points_features(table, geometry.pixel_size_nm),
              "face_color": "prob", "face_colormap": "viridis",
              "face_contrast_limits": (0.0, 1.0), "border_width": 0.0,
              "size": 0.8, "out_of_slice_display": False, "metadata": meta}
    return (points_data_from_table(table, geometry.ndim), kwargs, "points")


def result_prefix(input_name: str) -> str:
    """Name prefix of the result layers of an input layer."""
    return f"VAR {input_name}"


def is_result_of(layer, input_name: str | None = None) -> bool:
    """True when ``layer`` was made by the inference widget (for ``input_name`` if given)."""
    meta = getattr(layer, "metadata", None) or {}
    if RESULT_KEY not in meta:
        return False
    return input_name is None or meta[RESULT_KEY] == input_name


def image_shape_of_points(data, metadata: dict | None = None) -> tuple[int, int, int]:
    """``(n_frames, height, width)`` of the image a Points layer belongs to.

    From ``metadata['image_shape']`` when a plugin layer stored it, else the smallest
    image that holds every point (pixel centres at integers).
    """
    shape = (metadata or {}).get("image_shape")
    if shape is not None and len(shape) == 3:
        return tuple(int(s) for s in shape)
    data = np.asarray(data, dtype=float).reshape(-1, max(np.shape(data)[-1:] or (2,)))
    if len(data) == 0:
        return (1, 1, 1)
    h = int(np.ceil(np.nanmax(data[:, -2]) + 0.5))
    w = int(np.ceil(np.nanmax(data[:, -1]) + 0.5))
    t = int(np.nanmax(data[:, -3])) + 1 if data.shape[1] >= 3 else 1
    return (max(t, 1), max(h, 1), max(w, 1))


def points_in_grid(points_data, points_scale, points_translate, grid_scale, grid_translate):
    """Re-express Points data in the pixel coordinates of another grid (an image's).

    World coordinates are ``data * scale + translate`` per axis; the trailing axes of the
    points and of the grid are matched (a 2-D grid leaves any leading point axes as they
    are). Used to bring a ground-truth Points layer onto the camera grid of an image layer.
    """
    data = np.asarray(points_data, dtype=float)
    if data.ndim != 2:
        data = data.reshape(-1, len(points_scale))
    nd = data.shape[1]
    ps = np.asarray(points_scale, dtype=float)
    pt = np.asarray(points_translate, dtype=float)
    gs = np.asarray(grid_scale, dtype=float)
    gt = np.asarray(grid_translate, dtype=float)
    k = min(nd, len(gs))
    world = data * ps + pt
    out = data.copy()
    out[:, nd - k:] = (world[:, nd - k:] - gt[len(gs) - k:]) / gs[len(gs) - k:]
    return out


def highres_factor_of(layer) -> int:
    """Upsampling factor of a high-resolution image layer (``metadata['highres_factor']``,
    e.g. the training pair sample's 8x photon image); 1 for camera frames."""
    try:
        f = int((getattr(layer, "metadata", None) or {}).get("highres_factor", 1))
    except (TypeError, ValueError):
        return 1
    return f if f > 1 else 1
