"""Sample data: deterministic, fast, consistent with the manifest; opened in a real viewer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_var_emitter._napari import sample_data as S

SAMPLES = {
    "sparse": (S.sparse_emitters, (200, 40, 40)),
    "dense": (S.dense_emitters, (200, 40, 40)),
    "filaments": (S.blinking_filaments, (500, 64, 64)),
}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_movie_samples(key):
    func, shape = SAMPLES[key]
    t0 = time.perf_counter()
    layers = func()
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"sample {key} took {elapsed:.2f} s"
    (img, img_kw, img_kind), (pts, pts_kw, pts_kind) = layers
    assert img_kind == "image" and pts_kind == "points"
    assert img.shape == shape and img.dtype == np.uint16
    assert img_kw["metadata"]["pixel_size_nm"] == 100.0
    assert img_kw["metadata"]["camera"]["baseline"] == 100.0
    # ADU above the camera baseline where the emitters and background are
    assert img.mean() > 100
    assert pts.shape[1] == 3 and len(pts) > shape[0]  # more than one emitter per frame
    t, h, w = shape
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= t - 1
    assert pts[:, 1].min() >= -0.5 and pts[:, 1].max() < h - 0.5
    assert pts[:, 2].min() >= -0.5 and pts[:, 2].max() < w - 0.5
    assert len(pts_kw["features"]["photons"]) == len(pts)
    assert pts_kw["metadata"]["image_shape"] == list(shape)
    # deterministic
    again = func()
    np.testing.assert_array_equal(again[0][0], img)
    np.testing.assert_array_equal(again[1][0], pts)


def test_density_of_the_samples_differs():
    sparse = S.sparse_emitters()[1][0]
    dense = S.dense_emitters()[1][0]
    per_frame_sparse = len(sparse) / 200
    per_frame_dense = len(dense) / 200
    # 0.3 and 3 emitters per um^2 over 16 um^2
    assert 2 < per_frame_sparse < 10
    assert 30 < per_frame_dense < 70


def test_training_pair_sample_is_aligned():
    t0 = time.perf_counter()
    (img, img_kw, _), (pts, pts_kw, _) = S.training_pair()
    assert time.perf_counter() - t0 < 2.0
    assert img.shape == (60, 320, 320) and img.dtype == np.float32
    assert img_kw["scale"] == (1.0, 0.125, 0.125)
    assert img_kw["translate"] == (0.0, -0.4375, -0.4375)
    assert img_kw["metadata"]["highres_factor"] == 8
    assert img_kw["metadata"]["camera_pixel_size_nm"] == 100.0
    assert pts_kw["scale"] == (1.0, 1.0, 1.0) and pts_kw["translate"] == (0.0, 0.0, 0.0)
    # the photon image is brightest (per 8x8 block) where the emitters are
    binned = img.reshape(60, 40, 8, 40, 8).sum(axis=(2, 4))
    f, y, x = np.rint(pts).astype(int).T
    inside = (y >= 0) & (y < 40) & (x >= 0) & (x < 40)
    at_emitters = binned[f[inside], y[inside], x[inside]].mean()
    assert at_emitters > 2 * np.median(binned)



@pytest.mark.gui
@pytest.mark.parametrize("key, n_layers", [("sparse", 2), ("dense", 2), ("filaments", 2),
                                           ("training_pair", 2)])
def test_open_every_sample_in_napari(viewer_with_plugin, key, n_layers):
    viewer = viewer_with_plugin
    viewer.open_sample("napari-var-emitter", key)
    assert len(viewer.layers) == n_layers
    image, points = viewer.layers
    assert image._type_string == "image" and points._type_string == "points"
    assert points.features.shape[0] == len(points.data)
    assert "prob" in points.features.columns
    # the emitters lie on the image in world coordinates (extent: first to last pixel
    # centre; the image's area reaches half a pixel further)
    half = 0.5 * np.asarray(image.scale)[-2:]
    lo = np.asarray(image.extent.world[0])[-2:] - half
    hi = np.asarray(image.extent.world[1])[-2:] + half
    world = points.data[:, -2:] * np.asarray(points.scale)[-2:] + np.asarray(points.translate)[-2:]
    assert (world >= lo - 1e-9).all() and (world <= hi + 1e-9).all()
