"""Sample data: simulated movies with their ground truth, made on the spot (< 2 s each).

Each sample is deterministic (fixed seed) and returns the camera frames (uint16 ADU) as an
Image layer whose metadata carries the pixel size and camera (the inference widget fills its
fields from them) plus the ground-truth emitters as a Points layer in input pixels.
"""

from __future__ import annotations

import numpy as np

from .layers import input_grid_of_highres, map_scale_translate, points_data_from_table, \
    points_features

from ..samples import PIXEL_SIZE_NM, SAMPLE_CAMERA, make_sample  # noqa: F401 (re-exported)


def _movie_layers(movie, name: str) -> list[tuple]:
    truth = movie.table_in_view()
    t, h, w = movie.shape
    cam = movie.camera.to_dict()
    image = (movie.adu, {"name": name,
                         "metadata": {"pixel_size_nm": movie.pixel_size_nm, "camera": cam,
                                      "sample": name},
                         "contrast_limits": _limits(movie.adu)}, "image")
    return [image, _truth_points(truth, name, movie.pixel_size_nm, (t, h, w))]


def _truth_points(truth, name, pixel_size_nm, image_shape, scale=None, translate=None):
    kwargs = {"name": f"{name} ground truth",
              "features": points_features(truth, pixel_size_nm),
              "symbol": "ring", "face_color": "transparent", "border_color": "cyan",
              "border_width": 0.12, "size": 1.2, "out_of_slice_display": False,
              "metadata": {"pixel_size_nm": float(pixel_size_nm),
                           "image_shape": [int(s) for s in image_shape], "ground_truth": True}}
    if scale is not None:
        kwargs["scale"], kwargs["translate"] = scale, translate
    return (points_data_from_table(truth, 3), kwargs, "points")


def _limits(adu) -> tuple[float, float]:
    lo, hi = np.percentile(adu[: min(len(adu), 10)], [0.5, 99.9])
    return float(lo), float(max(hi, lo + 1))


def sparse_emitters() -> list[tuple]:
    """Sparse blinking emitters (about 6 per frame), 40x40 pixels, 200 frames."""
    movie = make_sample("sparse")
    return _movie_layers(movie, "sparse emitters")


def dense_emitters() -> list[tuple]:
    """Dense blinking emitters (about 50 per frame, 3 per um^2), 40x40 pixels, 200 frames."""
    movie = make_sample("dense")
    return _movie_layers(movie, "dense emitters")


def blinking_filaments() -> list[tuple]:
    """Emitters blinking along curved filaments, 64x64 pixels, 500 frames."""
    movie = make_sample("filaments")
    return _movie_layers(movie, "blinking filaments")


def training_pair() -> list[tuple]:
    """A training pair as the original design stores it: the scene's expected photons on an
    8x finer grid (the high-resolution training TIFF) and its emitters.

    The image layer is scaled to the camera grid (scale 1/8, translate -0.4375), so its
    emitters, in camera pixels, lie on it; its metadata says ``highres_factor`` 8 and the
    camera pixel size, which the training widget needs.
    """
    factor = 8
    movie = make_sample("training_pair", highres_factor=factor)
    t, h, w = movie.shape
    scale, translate = map_scale_translate((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), factor)
    name = "training pair"
    image = (movie.highres, {"name": f"{name} 8x photons", "scale": scale,
                             "translate": translate,
                             "metadata": {"pixel_size_nm": movie.pixel_size_nm / factor,
                                          "camera_pixel_size_nm": movie.pixel_size_nm,
                                          "highres_factor": factor, "kind": "highres photons",
                                          "sample": name},
                             "contrast_limits": _limits(movie.highres)}, "image")
    # the emitters' layer sits on the camera grid under the high-resolution image
    grid_scale, grid_translate = input_grid_of_highres(scale, translate, factor)
    points = _truth_points(movie.table_in_view(), name, movie.pixel_size_nm, (t, h, w),
                           scale=grid_scale, translate=grid_translate)
    return [image, points]
