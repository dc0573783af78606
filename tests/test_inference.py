"""Inference API: tiling and stitching, maps at every scale, streaming, bad stacks.

Stitching is tested with a stub network whose output we control exactly: the input frame
encodes each pixel's own (frame, row, col), so the stub knows where its tile lies and
draws a detection at the known emitter positions, optionally biased the way two real
neighbouring tiles disagree about an emitter on their border.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from napari_var_emitter.camera import Camera
from napari_var_emitter.config import Config
from napari_var_emitter.errors import Cancelled, InputFileError
from napari_var_emitter.inference import (MAP_DEFINED_PROBABILITY, MAP_NAMES, PredictionResult, Predictor,
                                          merge_frame_detections, tile_grid)
from napari_var_emitter.table import concat_tables, empty_table, make_table


# -- a network whose detections we dictate --------------------------------------------------

CODE_FRAME, CODE_ROW = 1_000_000, 1_000  # pixel value = frame*1e6 + row*1e3 + col


def coordinate_stack(n_frames, h, w) -> np.ndarray:
    """Frames whose pixel values state their own (frame, row, col): exact in float32."""
    t, r, c = np.meshgrid(np.arange(n_frames), np.arange(h), np.arange(w), indexing="ij")
    return (t * CODE_FRAME + r * CODE_ROW + c).astype(np.float32)


class StubNet(nn.Module):
    """Reports exactly the emitters it is given (absolute frame positions) that fall in the
    tile it sees, with the position pushed ``bias`` px towards the tile's *outside*
    (bias > 0: estimates of a border emitter cross the border in both neighbouring tiles;
    bias < 0: each tile keeps it on its own side)."""

    def __init__(self, emitters: dict, bias: float = 0.0):
        super().__init__()
        self.emitters = emitters  # frame -> list of (x, y)
        self.bias = bias
        self.seen = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, frames, factors=None, with_recon=True):
        b, _, th, tw = frames.shape
        self.seen.append(frames[:, 0].clone())
        maps = {}
        for f in factors:
            m = {k: torch.zeros(b, f * th, f * tw) for k in
                 ("logit", "prob", "offset_x", "offset_y", "photons", "sigma_x", "sigma_y",
                  "background")}
            m["logit"].fill_(-10.0)
            m["sigma_x"].fill_(0.1)
            m["sigma_y"].fill_(0.2)
            for i in range(b):
                code = int(frames[i, 0, 0, 0].item())
                t, rest = divmod(code, CODE_FRAME)
                r0, c0 = divmod(rest, CODE_ROW)
                for x, y in self.emitters.get(t, []):
                    xt, yt = x - c0, y - r0
                    if not (-0.5 <= xt < tw - 0.5 and -0.5 <= yt < th - 0.5):
                        continue
                    xe = xt + self.bias * math.copysign(1.0, xt - (tw - 1) / 2)
                    ye = yt + self.bias * math.copysign(1.0, yt - (th - 1) / 2)
                    j = min(max(int(math.floor((ye + 0.5) * f)), 0), f * th - 1)
                    k = min(max(int(math.floor((xe + 0.5) * f)), 0), f * tw - 1)
                    m["prob"][i, j, k] = 0.9
                    m["logit"][i, j, k] = math.log(9.0)
                    m["offset_x"][i, j, k] = xe - ((k + 0.5) / f - 0.5)
                    m["offset_y"][i, j, k] = ye - ((j + 0.5) / f - 0.5)
                    m["photons"][i, j, k] = 1000.0 + t
            maps[f] = m
        return {"maps": maps}


def stub_predictor(emitters, bias=0.0, tile=40) -> Predictor:
    cfg = Config.from_dict({"model": {
        "input_size": [tile, tile],
        "target_sizes": [[2 * tile, 2 * tile], [4 * tile, 4 * tile], [8 * tile, 8 * tile]]}})
    return Predictor(StubNet(emitters, bias), cfg, device="cpu")


def border_emitters(h, w, tile=40):
    """Emitters exactly on every inner core border (x and y), on border crossings, and in
    the middle of cores; positions in input px (pixel-centre convention)."""
    margin = max(2, tile // 6)  # Predictor.predict_iter's margin for this tile size
    _, ybounds = tile_grid(h, tile, margin)
    _, xbounds = tile_grid(w, tile, margin)
    x_borders = [b - 0.5 for b in xbounds[1:-1]]  # core k covers [bounds[k]-0.5, bounds[k+1]-0.5)
    y_borders = [b - 0.5 for b in ybounds[1:-1]]
    x_mid = [(a + b) / 2 - 0.5 + 0.13 for a, b in zip(xbounds, xbounds[1:])]
    y_mid = [(a + b) / 2 - 0.5 - 0.21 for a, b in zip(ybounds, ybounds[1:])]
    pts = [(x, y) for x in x_borders for y in y_mid]
    pts += [(x, y) for x in x_mid for y in y_borders]
    pts += [(x, y) for x in x_borders for y in y_borders]
    pts += [(x, y) for x in x_mid for y in y_mid]
    return pts, x_borders, y_borders


@pytest.mark.parametrize("bias", [0.0, 0.05, -0.05, 0.3])
def test_emitters_on_tile_borders_are_found_exactly_once(bias):
    h, w = 96, 130
    pts, x_borders, y_borders = border_emitters(h, w)
    assert 33.5 in x_borders or len(x_borders) >= 2  # the 96x130 frame has inner borders
    assert len(x_borders) >= 2 and len(y_borders) >= 1
    emitters = {0: pts, 1: [(x + 0.25, y) for x, y in pts]}
    pred = stub_predictor(emitters, bias)
    res = pred.predict(coordinate_stack(2, h, w), maps=False, batch_size=7)
    locs = res.localizations
    for t in (0, 1):
        got = locs[locs["frame"] == t]
        truth = np.array(emitters[t])
        assert len(got) == len(truth), (t, bias, len(got), len(truth))
        # every true emitter matched by exactly one detection, within the stub's bias
        d = np.hypot(got["x"][:, None] - truth[None, :, 0], got["y"][:, None] - truth[None, :, 1])
        nearest = d.argmin(axis=0)
        assert len(set(nearest.tolist())) == len(truth)
        assert d.min(axis=0).max() <= abs(bias) * math.sqrt(2) + 1e-4
        assert np.all(got["photons"] == 1000.0 + t)
    assert np.all(locs["unc_x"] == pytest.approx(0.1)) and np.all(locs["unc_y"] == pytest.approx(0.2))


def test_border_emitter_at_x_33_5_of_a_96_wide_frame():
    """The example of the issue: compute where the cores meet and put an emitter there."""
    _, xb = tile_grid(96, 40, 6)
    border = xb[1] - 0.5
    pred = stub_predictor({0: [(border, 20.0)]}, bias=0.04)
    locs = pred.predict(coordinate_stack(1, 40, 96), maps=True).localizations
    assert len(locs) == 1
    assert locs["x"][0] == pytest.approx(border, abs=0.05)


def _merge(*parts):
    """One frame's detections from several tiles, ``parts`` = (table, own, tile id)."""
    tab = concat_tables([t for t, _, _ in parts])
    own = np.concatenate([o for _, o, _ in parts])
    src = np.concatenate([np.full(len(t), i) for t, _, i in parts])
    return tab[merge_frame_detections(tab, own, src)]


def test_merge_keeps_one_of_two_tiles_twins_and_distinct_neighbours():
    a = make_table([0, 0], [10.0, 12.0], [5.0, 5.0], prob=[0.9, 0.8])
    b = make_table([0, 0], [10.1, 13.3], [5.0, 5.0], prob=[0.95, 0.7])
    merged = _merge((a, np.array([True, True]), 0), (b, np.array([False, True]), 1))
    # 10.0 (own core) beats its twin 10.1 from the other tile (outside its core) despite a
    # lower probability; 12.0 and 13.3 are 1.3 px apart: two emitters, both kept
    assert sorted(merged["x"].tolist()) == [10.0, 12.0, 13.3]
    # the same emitter seen from two tiles, both outside their cores (estimates crossed
    # the border): the more probable is kept
    c = make_table([0], [20.4], [5.0], prob=[0.6])
    d = make_table([0], [20.6], [5.0], prob=[0.7])
    merged = _merge((c, np.array([False]), 0), (d, np.array([False]), 1))
    assert merged["x"].tolist() == [20.6]
    same_tile = make_table([0, 0], [10.0, 10.2], [5.0, 5.0])
    assert len(_merge((same_tile, np.array([True, True]), 0))) == 2


def test_camera_conversion_happens_before_the_network():
    adu = np.full((2, 40, 40), 500, np.uint16)
    adu[1] = 300
    pred = stub_predictor({})
    cam = Camera(baseline=100, e_per_adu=2.0, em_gain=10.0, qe=0.8)
    pred.predict(adu, camera=cam, maps=False)
    seen = torch.cat(pred.model.seen)
    assert torch.allclose(seen[0], torch.tensor((500 - 100) * 2.0 / (10 * 0.8)))
    assert torch.allclose(seen[1], torch.tensor((300 - 100) * 2.0 / (10 * 0.8)))


# -- the real (tiny, untrained) model: outputs and their shapes -----------------------------

def test_maps_at_every_scale_stitched_to_the_frame(untrained_checkpoint, drain):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    stack = np.random.default_rng(0).poisson(20, (3, 96, 130)).astype(np.uint16)
    events, res = drain(pred.predict_iter(stack, batch_size=100))
    assert isinstance(res, PredictionResult)
    assert [e.done for e in events] == [1, 2, 3] and all(e.total == 3 for e in events)
    assert res.shape == (3, 96, 130) and res.factors == [2, 4, 8]
    for f in (2, 4, 8):
        assert set(res.maps[f]) == set(MAP_NAMES)
        for name in MAP_NAMES:
            arr = np.asarray(res.maps[f][name])
            assert arr.shape == (3, f * 96, f * 130), (f, name)
        p = np.asarray(res.maps[f]["probability"])
        assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
        # the per-emitter maps are defined (finite) exactly where an emitter may be
        defined = p >= MAP_DEFINED_PROBABILITY
        for name in MAP_NAMES[1:]:
            arr = np.asarray(res.maps[f][name])
            assert np.isfinite(arr[defined]).all() and np.isnan(arr[~defined]).all(), name
        assert (np.asarray(res.maps[f]["uncertainty_x"])[defined] > 0).all()
    # the fast path gives the same localisations without computing any map
    fast = pred.predict(stack, maps=False)
    assert fast.maps == {} and fast.factors == [pred.loc_factor]
    np.testing.assert_array_equal(fast.localizations, res.localizations)


def test_a_model_with_context_sees_each_frames_neighbours_and_copies_at_the_ends(
        tiny_model_config, tmp_path):
    from napari_var_emitter.checkpoint import save_checkpoint
    from napari_var_emitter.model import VarEmitterNet

    d = tiny_model_config.to_dict()
    cfg = Config.from_dict({**d, "model": {**d["model"], "context_frames": 3}})
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "ctx.pth", VarEmitterNet(cfg.model).state_dict(), cfg, step=0)
    pred = Predictor.from_checkpoint(tmp_path / "ctx.pth", device="cpu")
    movie = np.random.default_rng(2).poisson(30, (5, 20, 24)).astype(np.uint16)

    def prob(stack, batch_size=64):
        res = pred.predict(stack, batch_size=batch_size, border_fit=False, pair_fit=False)
        return np.asarray(res.maps[2]["probability"])

    whole = prob(movie)
    # frames are read in blocks: the neighbours across a block's edge are the same
    np.testing.assert_allclose(prob(movie, batch_size=4), whole, atol=1e-6)
    # a middle frame is predicted from it and its two neighbours
    np.testing.assert_allclose(prob(movie[1:4])[1], whole[2], atol=1e-6)
    assert not np.allclose(prob(movie[[2, 2, 2]])[1], whole[2], rtol=1e-4, atol=0)
    # the first and last frames lack a neighbour: the frame itself stands in for it
    np.testing.assert_allclose(prob(movie[[0, 0, 1]])[1], whole[0], atol=1e-6)
    np.testing.assert_allclose(prob(movie[[3, 4, 4]])[1], whole[4], atol=1e-6)
    # a single image is its own context
    np.testing.assert_allclose(prob(movie[3])[0], prob(movie[[3, 3, 3]])[1], atol=1e-6)


def test_maps_stream_into_predictions_h5_and_read_back_lazily(untrained_checkpoint, tmp_path):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    stack = np.random.default_rng(1).poisson(20, (5, 24, 40)).astype(np.uint16)
    path = tmp_path / "predictions.h5"
    res = pred.predict(stack, batch_size=6, maps_h5=path, h5_attrs={"model_id": "tiny"})
    ds = res.maps[8]["probability"]
    assert isinstance(ds, h5py.Dataset) and ds.shape == (5, 192, 320)
    assert ds.chunks[0] == 1 and ds.compression == "gzip"
    # half precision where 3 digits suffice; photons (can exceed 65,504) in float32
    assert ds.dtype == np.float16 and res.maps[2]["photons"].dtype == np.float32
    # the file holds what the in-memory path computes (to float16 precision)
    mem = pred.predict(stack, batch_size=6)
    for name in ("probability", "offset_x", "photons"):
        np.testing.assert_allclose(res.maps[2][name][:], mem.maps[2][name], rtol=2e-3,
                                   atol=1e-4, equal_nan=True)
    with h5py.File(path, "r") as fh:
        assert fh.attrs["model_id"] == "tiny"
        assert len(fh["localizations"]) == len(res.localizations)
    ds.file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.h5"]


def test_all_zero_frames_give_zero_localisations(untrained_checkpoint):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    res = pred.predict(np.zeros((4, 32, 32), np.uint16), maps=False)
    assert len(res.localizations) == 0 and res.shape == (4, 32, 32)
    single = pred.predict(np.zeros((32, 32), np.float32))  # 2-D input = one frame
    assert single.shape == (1, 32, 32) and len(single.localizations) == 0


def test_tiles_of_constant_frames_get_zero_probability():
    from napari_var_emitter.inference import _blank_constant_tiles

    centre = torch.rand(3, 8, 8)
    centre[1] = 7.0  # one constant tile
    out = {2: {"prob": torch.full((3, 16, 16), 0.6)}, 4: {"prob": torch.full((3, 32, 32), 0.6)}}
    _blank_constant_tiles(out, centre)
    for m in out.values():
        assert torch.all(m["prob"][1] == 0) and torch.all(m["prob"][[0, 2]] == 0.6)


def test_constant_frames_give_no_localisations_with_the_bundled_model():
    # normalised, a constant frame is all zeros: an input the network never saw (v0.5
    # reported 364 "emitters" on an all-zero 40x40 frame); frames with spots are unchanged
    from napari_var_emitter.simulation import simulate_movie

    pred = Predictor.from_pretrained(device="cpu")
    movie = simulate_movie(2, (40, 40), rng=3, density_per_um2=1.0, highres_factor=None)
    frames = np.concatenate([np.zeros((1, 40, 40)), np.full((1, 40, 40), 100.0),
                             movie.adu]).astype(np.float32)
    res = pred.predict(frames, maps=True)
    assert set(res.localizations["frame"]) == {2, 3}
    assert np.all(res.maps[2]["probability"][:2] == 0)
    # without the all-zero frame: the frames with spots keep the same neighbours (a model
    # with context frames sees the constant frame before the first one either way)
    alone = pred.predict(frames[1:], maps=False).localizations
    assert set(alone["frame"]) == {1, 2}
    assert len(alone) == len(res.localizations) > 5
    np.testing.assert_allclose(alone["x"], res.localizations["x"], atol=1e-4)


def test_bundled_model_reports_few_noise_peaks_on_steep_empty_backgrounds():
    """Sparse movies have many empty frames, and users' backgrounds rise across the field
    (an illumination spot, out-of-focus light). v0.6 reported 2.6 noise peaks per empty
    frame on a background rising 10x across a 40x40 frame (up to 13 on some), v0.7 about
    0.6 and v0.8 0.2 (benchmarks/bench_empty.py)."""
    from napari_var_emitter.simulation import smooth_background

    cam = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
    rng = np.random.default_rng(5)
    maps = [smooth_background((40, 40), rng, 20.0, 200.0) for _ in range(12)]
    expected = np.repeat(np.stack(maps), 10, axis=0).astype(np.float32)
    adu = cam.photons_to_adu(expected, rng)
    found = Predictor.from_pretrained(device="cpu").predict(adu, camera=cam,
                                                            maps=False).localizations
    assert len(found) / len(adu) < 2.0  # v0.8: 0.4 on these frames, v0.7: 1.0, v0.6: 3.0


def test_bundled_model_reports_almost_nothing_on_flat_empty_frames():
    """Frames with no emitter and a flat background (dark, moderate and bright): about one
    noise peak per 100 frames (v0.7 1.1, v0.8 0.9). A GPU-trained candidate of session 11
    reported 14 per 100 frames here and was not shipped (BENCHMARKS.md, v0.8)."""
    cam = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
    rng = np.random.default_rng(9)
    flat = np.concatenate([np.full((150, 40, 40), b, np.float32) for b in (5.0, 20.0, 100.0)])
    adu = cam.photons_to_adu(flat, rng)
    found = Predictor.from_pretrained(device="cpu").predict(adu, camera=cam,
                                                            maps=False).localizations
    assert len(found) / len(adu) < 0.05


def test_frames_smaller_than_a_tile_are_localised_at_their_own_size():
    """A 24x24 movie (the corner of a 40x40 one, sloping background) is localised at its
    own size (padded to the 40x40 tile, as before session 9, it got Jaccard 0.74 and
    precision 0.77 in `benchmarks/bench_small_frames.py`)."""
    from napari_var_emitter.metrics import evaluate_tables
    from napari_var_emitter.simulation import simulate_movie

    cam = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
    movie = simulate_movie(60, (40, 40), rng=7, density_per_um2=1.0, photons=(500, 5000),
                           background=(10, 50), camera=cam, highres_factor=None)
    truth = movie.table[(movie.table["x"] < 23.5) & (movie.table["y"] < 23.5)]
    truth = truth[(truth["x"] >= -0.5) & (truth["y"] >= -0.5)]
    small = Predictor.from_pretrained(device="cpu").predict(
        movie.adu[:, :24, :24], camera=cam, maps=False, border_fit=False).localizations
    r = evaluate_tables(truth, small, image_shape=(24, 24), n_frames=60)
    assert r["precision"] > 0.92 and r["recall"] > 0.85 and r["jaccard"] > 0.85, r


def test_frames_smaller_than_a_tile_give_maps_of_their_size_and_tiny_frames_are_refused(
        untrained_checkpoint):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    res = pred.predict(np.full((2, 9, 13), 20, np.uint16))  # smaller than the 16x16 tile
    assert np.asarray(res.maps[2]["probability"]).shape == (2, 18, 26)
    with pytest.raises(InputFileError, match="smaller than the model can use"):
        pred.predict(np.zeros((2, 5, 40), np.uint16), name="tiny.tif")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_frames_are_refused_naming_the_frame(untrained_checkpoint, bad):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    stack = np.full((4, 16, 16), 10.0, np.float32)
    stack[2, 3, 4] = bad
    with pytest.raises(InputFileError, match="frame 2 contains NaN or Inf") as info:
        pred.predict(stack, name="float.tif", batch_size=1)
    assert str(info.value).startswith("float.tif: ")


def test_cancel_stops_prediction_and_removes_the_partial_file(untrained_checkpoint, tmp_path):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    stack = np.full((6, 16, 16), 10, np.uint16)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        pred.predict(stack, batch_size=1, maps_h5=tmp_path / "predictions.h5", cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_localisations_come_ordered_by_frame_then_y_then_x():
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(12, (70, 90), rng=4, density_per_um2=2.0, photons=(2000, 5000),
                           highres_factor=None)
    t = Predictor.from_pretrained(device="cpu").predict(movie.adu, maps=False,
                                                        batch_size=5).localizations
    assert len(t) > 50 and len(np.unique(t["frame"])) == 12
    assert np.array_equal(np.lexsort((t["x"], t["y"], t["frame"])), np.arange(len(t)))


def test_spot_fits_on_chunks_of_several_batches_give_the_batchwise_result(monkeypatch):
    """The border refit and the pair split take several network batches' detections at once
    (their cost per call is fixed); the frame bookkeeping must make that invisible."""
    import napari_var_emitter.inference as inference
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(30, (40, 40), rng=6, density_per_um2=3.0, photons=(1000, 5000),
                           highres_factor=None)
    pred = Predictor.from_pretrained(device="cpu")
    runs = []
    # per batch of 4 frames; three batches at once; as many as hold 200 detections
    for pixels, detections in ((1, 10 ** 6), (12 * 40 * 40, 10 ** 6), (10 ** 9, 200)):
        monkeypatch.setitem(inference.FIT_CHUNK_PIXELS, "cpu", pixels)
        monkeypatch.setitem(inference.FIT_CHUNK_DETECTIONS, "cpu", detections)
        runs.append(pred.predict(movie.adu, maps=False, batch_size=4).localizations)
    per_batch, chunked, by_detections = runs
    np.testing.assert_array_equal(by_detections["frame"], per_batch["frame"])
    np.testing.assert_allclose(by_detections["x"], per_batch["x"], atol=1e-3)
    assert len(chunked) == len(per_batch) > 150
    np.testing.assert_array_equal(chunked["frame"], per_batch["frame"])
    for name in ("x", "y", "photons", "sigma"):
        np.testing.assert_allclose(chunked[name], per_batch[name], atol=1e-3, rtol=1e-3)
    # the fits did run: pairs were split and every interior row got a PSF width
    assert np.isfinite(chunked["sigma"]).mean() > 0.9


def test_bundled_model_finds_both_emitters_of_close_pairs():
    """Emitters with a neighbour 180-300 nm away (inside the 250 nm matching tolerance, so
    one localisation between them matches only one) are found as often as a microscopist
    needs at 2/um^2: the decoder must not merge such pairs (the window-sum decoder of v0.5
    found 58 % of them; measured 83 % with this one, isolated emitters 98 %)."""
    from napari_var_emitter.metrics import match_tables
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(40, (40, 40), rng=21, density_per_um2=2.0, photons=(1000, 5000),
                           highres_factor=None)
    truth = movie.table_in_view()
    locs = Predictor.from_pretrained(device="cpu").predict(movie.adu, maps=False).localizations
    ti, _ = match_tables(truth, locs, 250.0, 100.0)
    found = np.zeros(len(truth), bool)
    found[ti] = True
    nearest = np.full(len(truth), np.inf)
    for frame in np.unique(truth["frame"]):
        idx = np.flatnonzero(truth["frame"] == frame)
        x, y = truth["x"][idx], truth["y"][idx]
        d = np.hypot(x[:, None] - x, y[:, None] - y)
        np.fill_diagonal(d, np.inf)
        nearest[idx] = d.min(1)
    close = (nearest >= 1.8) & (nearest < 3.0)
    assert close.sum() > 200
    assert found[close].mean() > 0.72
    assert found[nearest >= 4].mean() > 0.95


@pytest.mark.parametrize("sigma", [(0.85, 0.95), (1.8, 1.9)])
def test_result_reports_the_psf_width_of_the_movie(sigma):
    """What a user reads to pick a threshold for their data (BENCHMARKS.md, session 15):
    the median fitted PSF width follows the microscope's, narrow or wide."""
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(8, (40, 40), rng=3, density_per_um2=1.0, photons=(1000, 5000),
                           sigma_px=sigma, highres_factor=None)
    res = Predictor.from_pretrained(device="cpu").predict(movie.adu, maps=False)
    assert len(res.localizations) > 50
    assert res.psf_sigma_px == pytest.approx(np.mean(sigma), rel=0.1)
    empty = PredictionResult(localizations=empty_table(0), shape=(1, 40, 40),
                             pixel_size_nm=100.0, factors=[2], loc_factor=2)
    assert math.isnan(empty.psf_sigma_px)


def test_bundled_model_maps_at_every_scale_locate_the_emitters():
    """The 2x, 4x and 8x probability maps of the shipped model each decode to the emitters
    (the maps users look at must mean what the localisations say)."""
    from napari_var_emitter.inference import decode_maps
    from napari_var_emitter.metrics import evaluate_tables
    from napari_var_emitter.simulation import simulate_movie
    from napari_var_emitter.table import concat_tables

    movie = simulate_movie(20, (40, 40), rng=8, density_per_um2=0.5, photons=(1000, 5000),
                           highres_factor=None)
    pred = Predictor.from_pretrained(device="cpu")
    res = pred.predict(movie.adu, batch_size=20)
    for f in (2, 4, 8):
        maps = {k: torch.from_numpy(np.nan_to_num(np.asarray(res.maps[f][name])))
                for name, k in (("probability", "prob"), ("offset_x", "offset_x"),
                                ("offset_y", "offset_y"), ("photons", "photons"),
                                ("uncertainty_x", "sigma_x"), ("uncertainty_y", "sigma_y"))}
        maps["background"] = torch.zeros_like(maps["prob"])
        tables = decode_maps(maps, f, 0.5)
        for frame, t in enumerate(tables):
            t["frame"] = frame
        ev = evaluate_tables(movie.table_in_view(), concat_tables(tables))
        assert ev["jaccard"] > 0.6, (f, ev["jaccard"])


def test_default_batch_size_is_small_on_a_cpu_and_large_on_a_gpu():
    from napari_var_emitter.inference import default_batch_size

    assert default_batch_size("cpu") == 64
    assert default_batch_size(torch.device("cuda", 0)) == 1024


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch):
    from napari_var_emitter.inference import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert process_device("auto") == "cuda:1" and process_device("cuda") == "cuda:1"
    assert process_device("cpu") == "cpu" and process_device("cuda:3") == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device("auto") == "auto"  # not under torchrun: unchanged
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device("auto") == "auto"  # one GPU: every rank shares it


def test_cpu_predictor_keeps_weights_channels_last_with_the_same_detections():
    from napari_var_emitter.simulation import simulate_movie

    pred = Predictor.from_pretrained(device="cpu")
    convs = [m for m in pred.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    movie = simulate_movie(6, (40, 56), rng=3, density_per_um2=1.0, highres_factor=None)
    fast = pred.predict(movie.adu, camera=movie.camera, maps=True)
    pred.model.to(memory_format=torch.contiguous_format)
    plain = pred.predict(movie.adu, camera=movie.camera, maps=True)
    assert len(fast.localizations) == len(plain.localizations) > 10
    for name in ("x", "y", "photons"):
        np.testing.assert_allclose(fast.localizations[name], plain.localizations[name],
                                   rtol=1e-3, atol=1e-3)
    for f in fast.maps:
        np.testing.assert_allclose(fast.maps[f]["probability"], plain.maps[f]["probability"],
                                   atol=1e-4)


def test_freed_memory_is_kept_for_reuse_on_glibc_only(monkeypatch):
    import platform
    import sys

    from napari_var_emitter.inference import reuse_freed_memory

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert reuse_freed_memory() is True
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory() is False
