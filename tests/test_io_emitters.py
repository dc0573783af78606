"""Emitter / localisation files: every accepted format, conversions, validation, writers."""

from __future__ import annotations

import csv
import os

import h5py
import numpy as np
import pytest
import yaml

from napari_var_emitter.errors import InputFileError
from napari_var_emitter.io import emitters as emod
from napari_var_emitter.io.emitters import (
    PICASSO_LOCS_DTYPE,
    THUNDERSTORM_COLUMNS,
    read_emitters,
    write_emitter_h5,
    write_picasso_hdf5,
    write_thunderstorm_csv,
)
from napari_var_emitter.table import LOC_DTYPE, make_table

DEMO_CSV = "/work/shared/data/deepstorm_demo1_training/positions_demo1.csv"


@pytest.fixture
def table():
    return make_table(
        frame=[0, 0, 3, 7],
        x=[0.0, 10.25, -0.5, 31.9],
        y=[5.0, 0.75, 12.0, 2.1],
        photons=[1000.0, 2500.5, 800.0, 123.0],
        sigma=[1.3, 1.1, 1.25, 1.5],
        background=[20.0, 20.0, np.nan, 4.0],
        prob=[1.0, 0.9, 0.55, 0.75],
        unc_x=[0.06, 0.1, np.nan, 0.2],
        unc_y=[0.08, 0.1, np.nan, 0.3],
    )


def _assert_tables_close(a, b, fields=LOC_DTYPE.names, atol=1e-9):
    assert a.dtype == LOC_DTYPE and len(a) == len(b)
    for k in fields:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def _error(path, *args, **kwargs) -> str:
    with pytest.raises(InputFileError) as info:
        read_emitters(path, *args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------
# emitter H5
def test_emitter_h5_roundtrip_and_nm_convention(tmp_path, table):
    p = tmp_path / "e.h5"
    write_emitter_h5(p, table, pixel_size_nm=100.0)
    with h5py.File(p, "r") as fh:
        ds = fh["emitters"]
        assert {"frame", "x_nm", "y_nm", "photons", "sigma_nm"} <= set(ds.dtype.names)
        assert fh.attrs["pixel_size_nm"] == 100.0 and ds.attrs["pixel_size_nm"] == 100.0
        # nm from the top-left corner: pixel centre x = 0 is 50 nm, x = -0.5 is the edge
        np.testing.assert_allclose(ds["x_nm"][:], [50.0, 1075.0, 0.0, 3240.0])
        np.testing.assert_allclose(ds["sigma_nm"][:], [130.0, 110.0, 125.0, 150.0])
        np.testing.assert_array_equal(ds["frame"][:], [0, 0, 3, 7])
    back, meta = read_emitters(p)
    _assert_tables_close(back, table)
    assert meta["format"] == "emitter_h5" and meta["pixel_size_nm"] == 100.0
    assert meta["n_emitters"] == 4
    # the same nm positions paired with an 8x finer image: the argument wins
    fine, meta = read_emitters(p, pixel_size_nm=12.5)
    np.testing.assert_allclose(fine["x"], (table["x"] + 0.5) * 8 - 0.5)
    np.testing.assert_allclose(fine["sigma"], table["sigma"] * 8)
    assert meta["pixel_size_nm"] == 12.5 and meta["file_pixel_size_nm"] == 100.0


def test_minimal_emitter_h5_from_another_tool(tmp_path):
    p = tmp_path / "min.h5"
    rec = np.zeros(3, dtype=[("frame", "u2"), ("x_nm", "f4"), ("y_nm", "f4")])
    rec["frame"] = [0, 1, 1]
    rec["x_nm"] = [150.0, 250.0, 4000.0]
    rec["y_nm"] = [50.0, 50.0, 50.0]
    with h5py.File(p, "w") as fh:
        fh.create_dataset("emitters", data=rec)
    t, _ = read_emitters(p, pixel_size_nm=100.0, n_frames=2, shape=(10, 40))
    np.testing.assert_allclose(t["x"], [1.0, 2.0, 39.5])
    assert np.isnan(t["photons"]).all() and (t["prob"] == 1).all()
    assert "no pixel size" in _error(p)


def test_emitter_h5_as_group_of_columns(tmp_path):
    p = tmp_path / "cols.h5"
    with h5py.File(p, "w") as fh:
        g = fh.create_group("emitters")
        g["frame"] = np.array([2, 0])
        g["x_nm"] = np.array([100.0, 300.0])
        g["y_nm"] = np.array([100.0, 300.0])
        g["photons"] = np.array([10.0, 20.0])
        g.attrs["pixel_size_nm"] = 50.0
    t, meta = read_emitters(p)
    np.testing.assert_allclose(t["x"], [1.5, 5.5])
    np.testing.assert_array_equal(t["frame"], [2, 0])
    assert meta["pixel_size_nm"] == 50.0


def test_bad_h5_files(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as fh:
        fh["images"] = np.zeros((2, 3))
    assert "no 'emitters'" in _error(p, 100)
    p2 = tmp_path / "cols.h5"
    with h5py.File(p2, "w") as fh:
        fh.create_dataset("emitters", data=np.zeros(2, dtype=[("frame", "i4"), ("x_nm", "f8")]))
    assert "lacks column(s) y_nm" in _error(p2, 100)
    p3 = tmp_path / "plain.h5"
    with h5py.File(p3, "w") as fh:
        fh["emitters"] = np.zeros((4, 3))
    assert "named columns" in _error(p3, 100)
    p4 = tmp_path / "text.h5"
    rec = np.zeros(1, dtype=[("frame", "i4"), ("x_nm", "S4"), ("y_nm", "f8")])
    with h5py.File(p4, "w") as fh:
        fh.create_dataset("emitters", data=rec)
    assert "not numeric" in _error(p4, 100)


def test_nan_and_fractional_frames_are_refused(tmp_path, table):
    bad = table.copy()
    bad["y"][2] = np.nan
    p = tmp_path / "nan.h5"
    write_emitter_h5(p, bad, 100.0)
    assert "emitter 3 has a missing (NaN)" in _error(p)
    p2 = tmp_path / "frac.h5"
    rec = np.zeros(2, dtype=[("frame", "f8"), ("x_nm", "f8"), ("y_nm", "f8")])
    rec["frame"] = [0, 1.5]
    with h5py.File(p2, "w") as fh:
        fh.create_dataset("emitters", data=rec)
    assert "non-integer frame" in _error(p2, 100)


def test_frame_and_image_bounds(tmp_path, table):
    p = tmp_path / "e.h5"
    write_emitter_h5(p, table, 100.0)
    read_emitters(p, n_frames=8, shape=(13, 33))
    assert "frame 7" in _error(p, n_frames=7) and "7 frames" in _error(p, n_frames=7)
    # x = 31.9 is 1.6 px beyond a 31-px-wide image: inside the 2 px margin
    read_emitters(p, shape=(13, 31))
    msg = _error(p, shape=(13, 29))
    assert "x=31.90" in msg and "outside the 29x13 image" in msg
    # a (T, H, W) shape checks frames too
    assert "frames" in _error(p, shape=(5, 13, 33))


# ------------------------------------------------------------------------------------------
# ThunderSTORM CSV
def test_thunderstorm_writer_exact_columns(tmp_path, table):
    p = tmp_path / "locs.csv"
    write_thunderstorm_csv(p, table, pixel_size_nm=100.0)
    lines = p.read_text().splitlines()
    assert lines[0] == ('"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]",'
                        '"offset [photon]","bkgstd [photon]","uncertainty [nm]","prob",'
                        '"uncertainty_x [nm]","uncertainty_y [nm]"')
    assert tuple(next(csv.reader([lines[0]]))) == THUNDERSTORM_COLUMNS
    rows = [r.split(",") for r in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [r[1] for r in rows] == ["1", "1", "4", "8"]
    first = [float(v) for v in rows[0]]
    assert first[2] == pytest.approx(50.0) and first[3] == pytest.approx(550.0)
    assert first[4] == pytest.approx(130.0) and first[5] == pytest.approx(1000.0)
    assert first[6] == pytest.approx(20.0) and first[7] == pytest.approx(np.sqrt(20.0), 1e-5)
    assert first[8] == pytest.approx(np.sqrt((6.0 ** 2 + 8.0 ** 2) / 2), 1e-4)
    assert first[9] == pytest.approx(1.0)
    assert first[10] == pytest.approx(6.0) and first[11] == pytest.approx(8.0)
    # missing values are written the way Java (ThunderSTORM) parses them
    assert rows[2][6] == "NaN" and rows[2][7] == "NaN" and rows[2][8] == "NaN"
    back, meta = read_emitters(p, pixel_size_nm=100.0)
    assert meta["format"] == "thunderstorm"
    _assert_tables_close(back, table, atol=1e-5)


def test_thunderstorm_pixel_units_and_plain_uncertainty(tmp_path):
    p = tmp_path / "px.csv"
    p.write_text('"id","frame","x [px]","y [px]","sigma [px]","intensity [photon]",'
                 '"uncertainty_xy [nm]"\n1,1,0.5,10.0,1.2,500,20\n2,2,64.0,0.25,1.0,600,40\n')
    t, meta = read_emitters(p, pixel_size_nm=100.0)
    np.testing.assert_allclose(t["x"], [0.0, 63.5])
    np.testing.assert_allclose(t["y"], [9.5, -0.25])
    np.testing.assert_allclose(t["sigma"], [1.2, 1.0])
    np.testing.assert_allclose(t["unc_x"], [0.2, 0.4])
    np.testing.assert_allclose(t["unc_y"], [0.2, 0.4])
    np.testing.assert_array_equal(t["frame"], [0, 1])
    # positions in pixels need no pixel size, uncertainty in nm does
    assert "no pixel size" in _error(p)


def test_thunderstorm_micrometres(tmp_path):
    p = tmp_path / "um.csv"
    p.write_text('"frame","x [µm]","y [um]"\n3,0.25,1.05\n')
    t, _ = read_emitters(p, pixel_size_nm=100.0)
    np.testing.assert_allclose([t["x"][0], t["y"][0]], [2.0, 10.0])
    assert t["frame"][0] == 2


def test_external_deepstorm_thunderstorm_file():
    if not os.path.exists(DEMO_CSV):
        pytest.skip("external Deep-STORM positions_demo1.csv not present in shared/data")
    t, meta = read_emitters(DEMO_CSV, pixel_size_nm=100.0, n_frames=20, shape=(64, 64))
    assert len(t) == 4956 and meta["n_emitters"] == 4956
    assert t["frame"].min() == 0 and t["frame"].max() == 19
    assert np.bincount(t["frame"]).min() > 150  # ~250 emitters per frame
    # first row: frame 1, x 67.843 nm, y 2484.15594 nm, sigma 111.28713 nm
    assert t["frame"][0] == 0
    assert t["x"][0] == pytest.approx(0.67843 - 0.5)
    assert t["y"][0] == pytest.approx(24.8415594 - 0.5)
    assert t["sigma"][0] == pytest.approx(1.1128713)
    assert t["photons"][0] == pytest.approx(2458.46515) and t["background"][0] == 50.0
    assert -0.5 <= t["x"].min() and t["x"].max() <= 63.5
    assert np.isnan(t["unc_x"]).all() and (t["prob"] == 1).all()


def test_csv_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('"id","frame","x [nm]","y [nm]"\n1,1,10,20\n2,1,abc,30\n')
    msg = _error(p, 100)
    assert "not a numeric table" in msg and "line 3" in msg
    p2 = tmp_path / "ragged.csv"
    p2.write_text('"frame","x [nm]","y [nm]"\n1,10,20\n1,10\n')
    assert "line 3" in _error(p2, 100)
    p3 = tmp_path / "unknown.csv"
    p3.write_text("a,b,c\n1,2,3\n")
    assert "unrecognised emitter file" in _error(p3, 100)
    p4 = tmp_path / "zero.csv"
    p4.write_text('"frame","x [nm]","y [nm]"\n0,10,20\n')
    assert "1-based" in _error(p4, 100)
    p5 = tmp_path / "noframe.csv"
    p5.write_text('"x [nm]","y [nm]"\n10,20\n')
    assert "'frame'" in _error(p5, 100)
    p6 = tmp_path / "unit.csv"
    p6.write_text('"frame","x [furlong]","y [nm]"\n1,10,20\n')
    assert "unknown unit" in _error(p6, 100)
    p7 = tmp_path / "binary.csv"
    p7.write_bytes(bytes(range(256)) * 4)
    assert "not a text" in _error(p7, 100)
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in _error(tmp_path / "empty.csv", 100)
    assert "not found" in _error(tmp_path / "missing.csv", 100)
    assert "directory" in _error(tmp_path, 100)


def test_header_only_csv_is_an_empty_table(tmp_path):
    p = tmp_path / "none.csv"
    write_thunderstorm_csv(p, np.zeros(0, LOC_DTYPE), 100.0)
    t, meta = read_emitters(p, 100.0, n_frames=3, shape=(4, 4))
    assert len(t) == 0 and t.dtype == LOC_DTYPE and meta["n_emitters"] == 0


# ------------------------------------------------------------------------------------------
# SMLM challenge CSV
def test_smlm_challenge_csv(tmp_path):
    p = tmp_path / "activations.csv"
    p.write_text("Ground-truth,frame,xnano,ynano,znano,intensity\n"
                 "     1,     1,  2504.60,  4015.20,  -178.20,  2431.80\n"
                 "     2,     1,    50.00,    75.00,     0.00,   900.00\n"
                 "     3,    20,  6350.00,   100.00,    12.00,  1500.00\n")
    t, meta = read_emitters(p, pixel_size_nm=100.0, n_frames=20, shape=(64, 64))
    assert meta["format"] == "smlm_challenge"
    np.testing.assert_array_equal(t["frame"], [0, 0, 19])
    np.testing.assert_allclose(t["x"], [24.546, 0.0, 63.0])
    np.testing.assert_allclose(t["y"], [39.652, 0.25, 0.5])
    np.testing.assert_allclose(t["photons"], [2431.8, 900.0, 1500.0])
    assert "no pixel size" in _error(p)


# ------------------------------------------------------------------------------------------
# Picasso
def test_picasso_writer_format_and_roundtrip(tmp_path, table):
    p = tmp_path / "locs.hdf5"
    h5, ypath = write_picasso_hdf5(p, table, pixel_size_nm=130.0, width=40, height=20,
                                   n_frames=9)
    assert h5 == str(p) and ypath == str(tmp_path / "locs.yaml")
    with h5py.File(p, "r") as fh:
        locs = fh["locs"][()]
    assert locs.dtype == PICASSO_LOCS_DTYPE
    assert locs.dtype.names == ("frame", "x", "y", "photons", "sx", "sy", "bg", "lpx", "lpy",
                                "ellipticity", "net_gradient")
    assert locs.dtype["frame"] == np.dtype("u4") and locs.dtype["x"] == np.dtype("f4")
    np.testing.assert_allclose(locs["x"], table["x"], atol=1e-5)  # pixels, centre = integer
    np.testing.assert_allclose(locs["sx"], table["sigma"], atol=1e-6)
    np.testing.assert_allclose(locs["lpy"], table["unc_y"], atol=1e-6)
    with open(ypath) as fh:
        docs = list(yaml.safe_load_all(fh))
    info = docs[0]
    assert info["Width"] == 40 and info["Height"] == 20 and info["Frames"] == 9
    assert info["Pixelsize"] == 130.0 and info["Generated by"].startswith("napari-var-emitter")
    back, meta = read_emitters(p)
    assert meta["format"] == "picasso" and meta["pixel_size_nm"] == 130.0
    assert (meta["width"], meta["height"], meta["frames"]) == (40, 20, 9)
    _assert_tables_close(back, table, atol=1e-5)
    # paired with an image of 65 nm pixels the same emitters sit at twice the coordinates
    fine, _ = read_emitters(p, pixel_size_nm=65.0)
    np.testing.assert_allclose(fine["x"], (table["x"] + 0.5) * 2 - 0.5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["locs.hdf5", "locs.yaml"]


def test_picasso_file_from_picasso(tmp_path):
    # as Picasso Localize writes it: several yaml documents, Pixelsize in a later one
    p = tmp_path / "movie_locs.hdf5"
    locs = np.zeros(2, dtype=PICASSO_LOCS_DTYPE)
    locs["frame"] = [0, 4]
    locs["x"] = [3.0, 7.5]
    locs["y"] = [1.0, 2.0]
    locs["net_gradient"] = [5000.0, 9000.0]
    with h5py.File(p, "w") as fh:
        fh.create_dataset("locs", data=locs)
    with open(tmp_path / "movie_locs.yaml", "w") as fh:
        yaml.safe_dump_all([{"Frames": 5, "Height": 16, "Width": 16},
                            {"Generated by": "Picasso Localize", "Pixelsize": 160}], fh)
    t, meta = read_emitters(p, n_frames=5, shape=(16, 16))
    assert meta["file_pixel_size_nm"] == 160.0
    np.testing.assert_allclose(t["x"], [3.0, 7.5])
    assert (t["prob"] == 1).all()  # a net gradient is not a probability
    # without its yaml the pixel positions still read; no pixel size known
    os.remove(tmp_path / "movie_locs.yaml")
    t2, meta2 = read_emitters(p)
    np.testing.assert_allclose(t2["y"], [1.0, 2.0])
    assert meta2["pixel_size_nm"] is None


def test_rows_without_a_fitted_psf_width_get_a_finite_one_in_picasso_files(tmp_path):
    """Picasso drops every row holding a NaN when it loads a file: the network's rows, which
    have no fitted PSF width, must not vanish there."""
    t = make_table(frame=[0, 1, 2, 3], x=[3.0, 4.0, 5.0, 6.0], y=[1.0, 2.0, 3.0, 4.0],
                   photons=1000.0, sigma=[np.nan, 1.2, np.nan, 1.4], background=20.0,
                   prob=0.9, unc_x=0.1, unc_y=0.1)
    p = tmp_path / "locs.hdf5"
    write_picasso_hdf5(p, t, 100.0, 40, 20, 4)
    with h5py.File(p, "r") as fh:
        locs = fh["locs"][()]
    np.testing.assert_allclose(locs["sx"], [1.3, 1.2, 1.3, 1.4], rtol=1e-6)
    assert all(np.isfinite(locs[name]).all() for name in locs.dtype.names)
    write_picasso_hdf5(p, make_table(frame=[0], x=[1.0], y=[1.0], photons=9.0, background=1.0,
                                     unc_x=0.1, unc_y=0.1), 100.0, 40, 20, 1)
    with h5py.File(p, "r") as fh:
        assert fh["locs"]["sx"][0] == 0.0  # no fitted width anywhere


def test_picasso_load_locs_opens_our_file(tmp_path, table):
    picasso_io = pytest.importorskip("picasso.io", reason="picasso (picassosr) not installed")
    p = tmp_path / "locs.hdf5"
    table = table.copy()
    table["sigma"][1] = np.nan  # a network row: no fitted width
    write_picasso_hdf5(p, table, 100.0, 40, 20, 9)
    locs, info = picasso_io.load_locs(str(p))
    # Picasso keeps the rows it deems sane: finite everywhere and x, y >= 0 (the fixture's
    # row 2 is at x = -0.5 and has no background or uncertainty)
    assert len(locs) == len(table) - 1 and info[0]["Width"] == 40


# ------------------------------------------------------------------------------------------
# atomic writers
def test_writers_are_atomic(tmp_path, table, monkeypatch):
    p = tmp_path / "locs.csv"
    write_thunderstorm_csv(p, table, 100.0)
    before = p.read_bytes()
    calls = {"n": 0}
    real = emod._csv_column

    def failing(values, fmt):
        calls["n"] += 1
        if calls["n"] > 15:  # fails in the second chunk, after the first was written
            raise OSError(28, "No space left on device")
        return real(values, fmt)

    monkeypatch.setattr(emod, "_csv_column", failing)
    from napari_var_emitter.errors import OutputError
    with pytest.raises(OutputError, match="disk full"):
        write_thunderstorm_csv(p, table, 100.0, chunk_rows=2)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["locs.csv"]
    with pytest.raises(ValueError):
        write_emitter_h5(tmp_path / "x.h5", table, pixel_size_nm=0)
