"""TIFF stacks: lazy reading of every layout we accept, clear errors for the rest, writing."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import tifffile

from napari_var_emitter.errors import InputFileError
from napari_var_emitter.io import tiff as tiffmod
from napari_var_emitter.io.tiff import TiffStack, open_stack, write_tiff

DEEPSTORM_TIF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                             "deepstorm_demo1_training", "ArtificialDataset_demo1.tif")
if not os.path.exists(DEEPSTORM_TIF):
    DEEPSTORM_TIF = "/work/shared/data/deepstorm_demo1_training/ArtificialDataset_demo1.tif"


@pytest.fixture
def movie():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, size=(7, 12, 9), dtype=np.uint16)


def _error_of(path) -> str:
    with pytest.raises(InputFileError) as info:
        with open_stack(path) as st:
            st.read()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------
# layouts that must open
def test_imagej_roundtrip_is_memory_mapped_with_pixel_size(tmp_path, movie):
    p = tmp_path / "m.tif"
    assert write_tiff(p, movie, pixel_size_nm=110.0) == str(p)
    with tifffile.TiffFile(p) as tf:
        assert tf.is_imagej and not tf.is_bigtiff
    with open_stack(p) as st:
        assert isinstance(st, TiffStack)
        assert st.shape == (7, 12, 9) and len(st) == 7 and st.ndim == 3
        assert st.dtype == np.uint16
        assert st.pixel_size_nm == pytest.approx(110.0)
        assert st._memmap is not None  # contiguous data are mapped, not read
        np.testing.assert_array_equal(st[3], movie[3])
        np.testing.assert_array_equal(st[-1], movie[-1])
        np.testing.assert_array_equal(st[2:5], movie[2:5])
        np.testing.assert_array_equal(st[::3], movie[::3])
        np.testing.assert_array_equal(st[[6, 0, 2]], movie[[6, 0, 2]])
        np.testing.assert_array_equal(st[1, 2:4, 5], movie[1, 2:4, 5])
        np.testing.assert_array_equal(st[1:3, :, 0], movie[1:3, :, 0])
        np.testing.assert_array_equal(st.read(1, 4), movie[1:4])
        np.testing.assert_array_equal(st.read(), movie)
        np.testing.assert_array_equal(np.asarray(st), movie)
        assert st[2:2].shape == (0, 12, 9)
        with pytest.raises(IndexError):
            st[7]
    assert st.closed
    with pytest.raises(InputFileError, match="closed"):
        st[0]


def test_two_d_image_is_one_frame(tmp_path):
    img = np.arange(20, dtype=np.float32).reshape(4, 5)
    p = tmp_path / "one.tif"
    tifffile.imwrite(p, img)
    with open_stack(p) as st:
        assert st.shape == (1, 4, 5)
        np.testing.assert_array_equal(st[0], img)
        assert st.pixel_size_nm is None


def test_float64_plain_tiff_keeps_pixel_size_in_centimetre_resolution(tmp_path, movie):
    data = movie.astype(np.float64) / 7
    p = tmp_path / "f64.tif"
    write_tiff(p, data, pixel_size_nm=65.0)
    with tifffile.TiffFile(p) as tf:
        assert not tf.is_imagej  # ImageJ has no float64
    with open_stack(p) as st:
        assert st.dtype == np.float64 and st.pixel_size_nm == pytest.approx(65.0)
        np.testing.assert_array_equal(st[:], data)


def test_inch_resolution_default_is_not_a_pixel_size(tmp_path, movie):
    p = tmp_path / "dpi.tif"
    tifffile.imwrite(p, movie, photometric="minisblack", resolution=(72, 72),
                     resolutionunit="INCH")
    with open_stack(p) as st:
        assert st.pixel_size_nm is None


@pytest.mark.parametrize("options", [
    {"compression": "zlib"},
    {"tile": (16, 16)},
    {"compression": "zlib", "predictor": True},
])
def test_non_contiguous_pages_are_read_page_by_page(tmp_path, movie, options):
    p = tmp_path / "c.tif"
    tifffile.imwrite(p, movie, photometric="minisblack", **options)
    with open_stack(p) as st:
        assert st._memmap is None
        assert st.shape == movie.shape
        np.testing.assert_array_equal(st[4], movie[4])
        np.testing.assert_array_equal(st[[5, 1]], movie[[5, 1]])
        np.testing.assert_array_equal(st[:], movie)


def test_bigtiff_big_endian(tmp_path, movie):
    p = tmp_path / "be.tif"
    tifffile.imwrite(p, movie, bigtiff=True, byteorder=">", photometric="minisblack")
    with open_stack(p) as st:
        assert st.dtype == np.dtype("uint16") and st.dtype.isnative
        out = st[:]
        assert out.dtype.isnative
        np.testing.assert_array_equal(out, movie)


def test_imagej_hyperstack_singleton_axes_are_squeezed(tmp_path, movie):
    p = tmp_path / "hs.tif"
    tifffile.imwrite(p, movie[:, None, None], imagej=True, metadata={"axes": "TZCYX"})
    with open_stack(p) as st:
        assert st.shape == (7, 12, 9)
        np.testing.assert_array_equal(st[:], movie)
    # a Z stack (T = 1) is also a sequence of frames
    p2 = tmp_path / "z.tif"
    tifffile.imwrite(p2, movie[None, :, None], imagej=True, metadata={"axes": "TZCYX"})
    with open_stack(p2) as st:
        assert st.shape == (7, 12, 9)


def test_ome_tiff_pixel_size_and_squeeze(tmp_path, movie):
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(p, movie[:, None, None], ome=True,
                     metadata={"axes": "TCZYX", "PhysicalSizeX": 0.16,
                               "PhysicalSizeXUnit": "µm"})
    with open_stack(p) as st:
        assert st.shape == (7, 12, 9)
        assert st.pixel_size_nm == pytest.approx(160.0)
        np.testing.assert_array_equal(st[6], movie[6])


@pytest.mark.parametrize("layout", ["plain", "imagej-hyperstack", "ome", "rgb", "tc"])
def test_reading_works_with_tifffile_releases_without_get_shape(tmp_path, movie, monkeypatch,
                                                                 layout):
    """tifffile 2026.9 dropped TiffPageSeries.get_shape/get_axes (seen on a GPU machine:
    every TIFF failed to open); the reader falls back to the series' own shape and axes."""
    monkeypatch.delattr(tifffile.TiffPageSeries, "get_shape")
    monkeypatch.delattr(tifffile.TiffPageSeries, "get_axes")
    p = tmp_path / f"{layout}.tif"
    if layout == "plain":
        tifffile.imwrite(p, movie, photometric="minisblack")
    elif layout == "imagej-hyperstack":
        tifffile.imwrite(p, movie[:, None, None], imagej=True, metadata={"axes": "TZCYX"})
    elif layout == "ome":
        tifffile.imwrite(p, movie[:, None, None], ome=True, metadata={"axes": "TCZYX"})
    elif layout == "rgb":
        tifffile.imwrite(p, np.zeros((10, 8, 3), np.uint8), photometric="rgb")
        assert "samples per pixel" in _error_of(p)
        return
    else:
        tifffile.imwrite(p, np.zeros((3, 2, 5, 6), np.uint16), imagej=True,
                         metadata={"axes": "TCYX"})
        assert "more than one axis" in _error_of(p)
        return
    with open_stack(p) as st:
        assert st.shape == (7, 12, 9)
        np.testing.assert_array_equal(st[:], movie)


def test_external_deepstorm_stack():
    if not os.path.exists(DEEPSTORM_TIF):
        pytest.skip("external Deep-STORM demo stack not present in shared/data")
    with open_stack(DEEPSTORM_TIF) as st:
        assert st.shape == (20, 64, 64) and st.dtype == np.uint16
        assert st.pixel_size_nm == pytest.approx(100.0)  # ImageJ 10 px/um
        frame = st[0]
        assert frame.min() >= 50 and 300 < frame.mean() < 600  # camera counts, not noise


def test_reading_one_frame_does_not_load_the_movie(tmp_path):
    # 1000 frames of 64 x 128 uint16 = 16 MB; one frame is 16 kB
    rng = np.random.default_rng(1)
    big = np.repeat(rng.integers(0, 50, size=(1, 64, 128), dtype=np.uint16), 1000, axis=0)
    plain, packed = tmp_path / "plain.tif", tmp_path / "packed.tif"
    tifffile.imwrite(plain, big, photometric="minisblack")
    tifffile.imwrite(packed, big, photometric="minisblack", compression="zlib")
    del big
    for p in (plain, packed):
        tracemalloc.start()
        with open_stack(p) as st:
            frame = st[500]
            block = st.read(10, 20)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert frame.shape == (64, 128) and block.shape == (10, 64, 128)
        assert peak < 3_000_000, (p, peak)


# ------------------------------------------------------------------------------------------
# files that must be refused, with one clear line
def test_missing_file_and_directory(tmp_path):
    assert "not found" in _error_of(tmp_path / "nope.tif")
    assert "directory" in _error_of(tmp_path)


def test_empty_text_and_random_files(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    assert "empty" in _error_of(empty)
    text = tmp_path / "notes.tif"
    text.write_text("frame,x,y\n1,2,3\n")
    assert "not a TIFF" in _error_of(text) and "text" in _error_of(text)
    rnd = tmp_path / "random.tif"
    rnd.write_bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    assert "not a TIFF" in _error_of(rnd)
    header_only = tmp_path / "hdr.tif"
    header_only.write_bytes(b"II*\x00")
    assert "truncated" in _error_of(header_only)


def test_truncated_files(tmp_path, movie):
    p = tmp_path / "full.tif"
    write_tiff(p, movie)
    data = p.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error_of(cut)
    # a compressed file cut inside its pixel data: refused at open or when read
    pz = tmp_path / "z.tif"
    rng = np.random.default_rng(5)
    tifffile.imwrite(pz, rng.integers(0, 60000, (6, 40, 40), dtype=np.uint16),
                     photometric="minisblack", compression="zlib")
    blob = pz.read_bytes()
    cutz = tmp_path / "cutz.tif"
    cutz.write_bytes(blob[: int(len(blob) * 0.6)])
    _error_of(cutz)


def test_rgb_and_multi_sample_are_refused(tmp_path):
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, np.zeros((10, 8, 3), np.uint8), photometric="rgb")
    assert "samples per pixel" in _error_of(p)
    p4 = tmp_path / "rgba.tif"
    tifffile.imwrite(p4, np.zeros((2, 10, 8, 4), np.uint8), photometric="rgb",
                     extrasamples=["unassalpha"])
    assert "RGB" in _error_of(p4)


def test_two_non_singleton_axes_are_refused(tmp_path):
    p = tmp_path / "tc.tif"
    tifffile.imwrite(p, np.zeros((3, 2, 5, 6), np.uint16), imagej=True,
                     metadata={"axes": "TCYX"})
    msg = _error_of(p)
    assert "more than one axis" in msg and "T (time)=3" in msg and "C (channel)=2" in msg
    pz = tmp_path / "zt.tif"
    tifffile.imwrite(pz, np.zeros((3, 4, 5, 6), np.uint16), imagej=True,
                     metadata={"axes": "TZYX"})
    assert "more than one axis" in _error_of(pz)


def test_nan_frames_are_reported_by_frame_number(tmp_path, movie):
    data = movie.astype(np.float32)
    data[4, 3, 2] = np.nan
    data[5, 0, 0] = np.inf
    for name, kw in (("mm.tif", {}), ("z.tif", {"compression": "zlib"})):
        p = tmp_path / name
        tifffile.imwrite(p, data, photometric="minisblack", **kw)
        with open_stack(p) as st:
            np.testing.assert_array_equal(st[:4], data[:4])  # good frames still readable
            with pytest.raises(InputFileError, match="frame 4 contains NaN"):
                st[:]
            with pytest.raises(InputFileError, match="frame 5 contains NaN or infinite"):
                st[5]


# ------------------------------------------------------------------------------------------
# writing
def test_write_2d_and_streamed_array_like(tmp_path, movie):
    p2 = tmp_path / "img.tif"
    write_tiff(p2, movie[0])
    with open_stack(p2) as st:
        assert st.shape == (1, 12, 9)
    src = tmp_path / "src.tif"
    tifffile.imwrite(src, movie, photometric="minisblack", compression="zlib")
    dst = tmp_path / "copy.tif"
    with open_stack(src) as st:
        write_tiff(dst, st, pixel_size_nm=97.5)  # not an ndarray: written frame by frame
    with open_stack(dst) as st:
        np.testing.assert_array_equal(st[:], movie)
        assert st.pixel_size_nm == pytest.approx(97.5)


def test_write_switches_to_bigtiff_beyond_the_imagej_limit(tmp_path, movie, monkeypatch):
    monkeypatch.setattr(tiffmod, "IMAGEJ_MAX_BYTES", movie.nbytes - 1)
    p = tmp_path / "big.tif"
    write_tiff(p, movie, pixel_size_nm=100.0)
    with tifffile.TiffFile(p) as tf:
        assert tf.is_bigtiff and not tf.is_imagej
    with open_stack(p) as st:
        np.testing.assert_array_equal(st[:], movie)
        assert st.pixel_size_nm == pytest.approx(100.0)


class _FailingStack:
    """Array-like whose third frame cannot be produced (a crash mid-write)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype = data, data.shape, data.dtype

    def __getitem__(self, i):
        if i == 2:
            raise RuntimeError("source failed")
        return self.data[i]


def test_write_is_atomic(tmp_path, movie):
    p = tmp_path / "keep.tif"
    write_tiff(p, movie[:1])
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        write_tiff(p, _FailingStack(movie))
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.tif"]  # no temporary left behind


def test_concurrent_reads_and_blocks(tmp_path):
    # napari/dask read frames from worker threads; compressed pages share one file handle
    rng = np.random.default_rng(9)
    data = rng.integers(0, 60000, size=(40, 32, 32), dtype=np.uint16)
    p = tmp_path / "threads.tif"
    tifffile.imwrite(p, data, photometric="minisblack", compression="zlib")
    from concurrent.futures import ThreadPoolExecutor

    with open_stack(p) as st:
        order = [int(i) for i in rng.permutation(40)] * 3
        with ThreadPoolExecutor(4) as pool:
            frames = list(pool.map(lambda i: st[i], order))
        for i, f in zip(order, frames):
            np.testing.assert_array_equal(f, data[i])
        blocks = list(st.iter_blocks(16))
        assert [b[0] for b in blocks] == [0, 16, 32]
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), data)
