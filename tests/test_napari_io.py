"""The napari reader (TIFF stacks) and writers (Points -> ThunderSTORM CSV / Picasso HDF5)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from napari_var_emitter._napari import reader as R
from napari_var_emitter._napari.layers import points_data_from_table, points_features
from napari_var_emitter._napari.writers import write_points_csv, write_points_hdf5
from napari_var_emitter.io.emitters import read_emitters
from napari_var_emitter.io.tiff import write_tiff
from napari_var_emitter.table import make_table


@pytest.fixture
def stack_tif(tmp_path):
    data = (np.arange(6 * 12 * 10, dtype=np.uint16).reshape(6, 12, 10) * 7) % 1000
    path = tmp_path / "movie.tif"
    write_tiff(path, data, pixel_size_nm=160.0)
    return path, data


def test_reader_declines_what_it_cannot_read(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("x,y\n1,2\n")
    assert R.get_reader(str(csv)) is None
    assert R.get_reader(str(tmp_path / "missing.tif")) is None
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(64))
    assert R.get_reader(str(corrupt)) is None
    text = tmp_path / "notes.tiff"
    text.write_text("this is not an image\n" * 10)
    assert R.get_reader(str(text)) is None
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    assert R.get_reader(str(rgb)) is None
    assert R.get_reader([str(csv), str(rgb)]) is None


def test_reader_opens_a_stack_in_pixel_units(stack_tif):
    path, data = stack_tif
    reader = R.get_reader(str(path))
    assert reader is not None
    [(arr, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    assert isinstance(arr, np.ndarray)
    np.testing.assert_array_equal(arr, data)
    assert kwargs["name"] == "movie"
    assert kwargs["metadata"]["pixel_size_nm"] == pytest.approx(160.0)
    assert "scale" not in kwargs  # positions stay in camera pixels
    lo, hi = kwargs["contrast_limits"]
    assert lo == data[0].min() and lo < hi <= data[0].max()


def test_reader_opens_large_stacks_lazily(stack_tif, monkeypatch):
    da = pytest.importorskip("dask.array")
    path, data = stack_tif
    monkeypatch.setattr(R, "LAZY_THRESHOLD_BYTES", 0)
    [(arr, kwargs, kind)] = R.get_reader(str(path))(str(path))
    assert isinstance(arr, da.Array)
    assert arr.shape == data.shape and arr.dtype == data.dtype
    assert arr.chunks[0] == (1,) * 6  # one frame per chunk
    np.testing.assert_array_equal(np.asarray(arr[3]), data[3])
    np.testing.assert_array_equal(np.asarray(arr[1:4, 2:5, ::2]), data[1:4, 2:5, ::2])


def test_reader_shows_a_single_image_as_2d(tmp_path):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, np.full((9, 11), 5, np.uint16))
    [(arr, kwargs, _)] = R.get_reader(str(path))(str(path))
    assert arr.shape == (9, 11)
    assert "pixel_size_nm" not in kwargs["metadata"]


def _points_meta(table, px, image_shape=None):
    meta = {"pixel_size_nm": px}
    if image_shape is not None:
        meta["image_shape"] = list(image_shape)
    return {"features": points_features(table, px), "metadata": meta}


def _table():
    return make_table([0, 2, 2, 4], [0.0, 12.25, 3.5, 9.0], [0.0, 7.75, 11.0, 0.5],
                      photons=[900.0, 1500.0, 2500.0, 4000.0], prob=[0.55, 0.8, 0.95, 0.99],
                      unc_x=[0.2, 0.1, 0.05, 0.04], unc_y=[0.25, 0.11, 0.06, 0.03],
                      sigma=[1.1, 1.2, 1.3, 1.0], background=[20.0, 21.0, 22.0, 23.0])


def test_csv_writer_round_trips_through_our_reader(tmp_path):
    t = _table()
    px = 117.0
    written = write_points_csv(str(tmp_path / "locs"), points_data_from_table(t, 3),
                               _points_meta(t, px))
    assert written == [str(tmp_path / "locs.csv")]
    back, meta = read_emitters(written[0], pixel_size_nm=px)
    assert len(back) == len(t)
    order = np.lexsort((back["x"], back["frame"]))
    back = back[order]
    ref = t[np.lexsort((t["x"], t["frame"]))]
    np.testing.assert_array_equal(back["frame"], ref["frame"])
    np.testing.assert_allclose(back["x"], ref["x"], atol=1e-3)
    np.testing.assert_allclose(back["y"], ref["y"], atol=1e-3)
    np.testing.assert_allclose(back["photons"], ref["photons"], rtol=1e-4)
    np.testing.assert_allclose(back["prob"], ref["prob"], atol=1e-4)
    header = open(written[0]).readline()
    assert header.startswith('"id","frame","x [nm]","y [nm]"')


def test_hdf5_writer_round_trips_and_writes_the_yaml(tmp_path):
    t = _table()
    written = write_points_hdf5(str(tmp_path / "locs.hdf5"), points_data_from_table(t, 3),
                                _points_meta(t, 100.0, image_shape=(5, 16, 20)))
    assert written == [str(tmp_path / "locs.hdf5"), str(tmp_path / "locs.yaml")]
    assert all(os.path.isfile(p) for p in written)
    yaml_text = open(written[1]).read()
    for key in ("Width: 20", "Height: 16", "Frames: 5", "Pixelsize"):
        assert key in yaml_text
    back, _ = read_emitters(written[0])
    back = back[np.lexsort((back["x"], back["frame"]))]
    ref = t[np.lexsort((t["x"], t["frame"]))]
    np.testing.assert_array_equal(back["frame"], ref["frame"])
    np.testing.assert_allclose(back["x"], ref["x"], atol=1e-5)
    np.testing.assert_allclose(back["y"], ref["y"], atol=1e-5)


def test_writers_default_pixel_size_and_2d_points(tmp_path):
    t = make_table([0, 0], [1.0, 2.0], [3.0, 4.0])
    data2d = points_data_from_table(t, 2)
    [path] = write_points_csv(str(tmp_path / "p.csv"), data2d, {})
    back, _ = read_emitters(path, pixel_size_nm=100.0)
    np.testing.assert_allclose(np.sort(back["x"]), [1.0, 2.0], atol=1e-3)
    # without an image shape the Picasso frame size holds every point
    paths = write_points_hdf5(str(tmp_path / "p.hdf5"), data2d, {"metadata": {}})
    text = open(paths[1]).read()
    assert "Width: 3" in text and "Height: 5" in text and "Frames: 1" in text


def test_napari_save_layers_uses_our_writers(tmp_path, var_emitter_plugin):
    import napari
    from napari.layers import Points

    t = _table()
    layer = Points(points_data_from_table(t, 3), features=points_features(t, 100.0),
                   metadata={"pixel_size_nm": 100.0, "image_shape": [5, 16, 20]}, name="locs")
    [csv] = napari.save_layers(str(tmp_path / "out.csv"), [layer], plugin="napari-var-emitter")
    back, _ = read_emitters(csv, pixel_size_nm=100.0)
    assert len(back) == 4 and sorted(back["frame"]) == [0, 2, 2, 4]
    written = napari.save_layers(str(tmp_path / "out.hdf5"), [layer],
                                 plugin="napari-var-emitter")
    assert str(tmp_path / "out.hdf5") in written
    back, _ = read_emitters(str(tmp_path / "out.hdf5"))
    np.testing.assert_allclose(np.sort(back["x"]), np.sort(t["x"]), atol=1e-5)
