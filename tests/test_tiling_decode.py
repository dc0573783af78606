"""Tiling and map decoding, independent of any trained weights."""

import numpy as np
import pytest
import torch

from napari_var_emitter.inference import decode_maps, tile_grid


@pytest.mark.parametrize("size", [8, 39, 40, 41, 67, 96, 130, 1000])
def test_tile_cores_partition_the_frame(size):
    starts, bounds = tile_grid(size, 40, 6)
    assert bounds[0] == 0 and bounds[-1] == size
    assert all(b1 > b0 for b0, b1 in zip(bounds, bounds[1:]))  # no empty core, no overlap
    for k, s in enumerate(starts):
        a, b = bounds[k], bounds[k + 1]
        assert s <= a and b <= s + 40  # the core lies inside its tile
        if size > 40:
            # every owned pixel keeps >= margin context unless it is at the frame edge
            assert a == 0 or a - s >= 6
            assert b == size or s + 40 - b >= 6


def _maps(f, h, w, peaks):
    """Hand-made maps with the given (row, col, p, dx, dy) peaks at factor f."""
    shape = (1, f * h, f * w)
    m = {k: torch.zeros(shape) for k in ("prob", "offset_x", "offset_y", "photons",
                                            "background", "sigma_x", "sigma_y")}
    for r, c, p, dx, dy in peaks:
        m["prob"][0, r, c] = p
        m["offset_x"][0, r, c] = dx
        m["offset_y"][0, r, c] = dy
        m["photons"][0, r, c] = 1000.0
        m["sigma_x"][0, r, c] = 0.1
        m["sigma_y"][0, r, c] = 0.2
    return m


def test_decode_positions_follow_the_contract_convention():
    f = 2
    m = _maps(f, 10, 10, [(4, 6, 0.9, 0.1, -0.2), (15, 3, 0.95, 0.0, 0.0), (10, 10, 0.2, 0, 0)])
    (t,) = decode_maps(m, f, threshold=0.5)
    assert len(t) == 2  # the p=0.2 candidate is below threshold
    t = t[np.argsort(t["y"])]
    # map pixel j has its centre at (j + 0.5)/f - 0.5 in input pixels
    assert t["x"][0] == pytest.approx((6 + 0.5) / 2 - 0.5 + 0.1, abs=1e-6)
    assert t["y"][0] == pytest.approx((4 + 0.5) / 2 - 0.5 - 0.2, abs=1e-6)
    assert t["x"][1] == pytest.approx((3 + 0.5) / 2 - 0.5, abs=1e-6)
    assert t["unc_x"][0] == pytest.approx(0.1) and t["unc_y"][0] == pytest.approx(0.2)
    assert t["photons"][0] == pytest.approx(1000.0)


def test_decode_integrates_probability_split_between_neighbours():
    # one emitter whose probability mass is split over two map pixels: found once
    m = _maps(2, 10, 10, [(8, 8, 0.35, 0, 0), (8, 9, 0.3, 0, 0)])
    (t,) = decode_maps(m, 2, threshold=0.5)
    assert len(t) == 1
    assert t["prob"][0] == pytest.approx(0.65, abs=1e-5)


def test_decode_finds_one_emitter_in_diffuse_probability():
    # an emitter at input (x=4.3, y=5.6) whose probability (0.09 each) spreads over the
    # 3x3 x2 pixels around it, every pixel's offset pointing at it: one detection there
    f, ex, ey = 2, 4.3, 5.6
    peaks = []
    cj, ci = int((ey + 0.5) * f), int((ex + 0.5) * f)
    for j in range(cj - 1, cj + 2):
        for i in range(ci - 1, ci + 2):
            dx = ex - ((i + 0.5) / f - 0.5)
            dy = ey - ((j + 0.5) / f - 0.5)
            peaks.append((j, i, 0.09, dx, dy))
    m = _maps(f, 12, 12, peaks)
    (t,) = decode_maps(m, f, threshold=0.5)
    assert len(t) == 1
    assert t["x"][0] == pytest.approx(ex, abs=1e-5) and t["y"][0] == pytest.approx(ey, abs=1e-5)
    assert t["prob"][0] == pytest.approx(0.81, abs=1e-5)


def _blob(f, ex, ey, centre, ring):
    """Peaks of one emitter at input (ex, ey): ``centre`` on its map pixel, ``ring / 8`` on
    each of the 8 around it, every offset pointing at the emitter."""
    cj, ci = int((ey + 0.5) * f), int((ex + 0.5) * f)
    out = []
    for j in range(cj - 1, cj + 2):
        for i in range(ci - 1, ci + 2):
            p = centre if (j, i) == (cj, ci) else ring / 8
            out.append((j, i, p, ex - ((i + 0.5) / f - 0.5), ey - ((j + 0.5) / f - 0.5)))
    return out


@pytest.mark.parametrize("gap", [1.6, 2.0, 2.3])
def test_decode_resolves_two_emitters_closer_than_the_matching_tolerance(gap):
    # two compact blobs (0.8 each) 1.6-2.3 input px apart (3-5 x2 pixels): a window centred
    # between them holds more probability than either alone; the decoder must report two
    f = 2
    emitters = [(5.2, 6.1), (5.2 + gap, 6.1)]
    peaks = [pk for ex, ey in emitters for pk in _blob(f, ex, ey, 0.5, 0.3)]
    (t,) = decode_maps(_maps(f, 14, 14, peaks), f, threshold=0.5)
    assert len(t) == 2
    t = t[np.argsort(t["x"])]
    for (ex, ey), x, y, p in zip(emitters, t["x"], t["y"], t["prob"]):
        assert x == pytest.approx(ex, abs=0.05) and y == pytest.approx(ey, abs=0.05)
        assert p == pytest.approx(0.8, abs=0.05)


def test_decode_merges_one_emitter_whose_probability_has_two_maxima():
    # one emitter at input x=3.0 whose probability sits on two x2 pixels 3 map px apart
    # (two local maxima), both offsets pointing at it: one detection carrying both masses
    f, ex, ey = 2, 3.0, 4.0
    row = int((ey + 0.5) * f)
    dy = ey - ((row + 0.5) / f - 0.5)
    peaks = [(row, c, 0.4, ex - ((c + 0.5) / f - 0.5), dy) for c in (5, 8)]
    (t,) = decode_maps(_maps(f, 10, 10, peaks), f, threshold=0.5)
    assert len(t) == 1
    assert t["x"][0] == pytest.approx(ex, abs=1e-5) and t["y"][0] == pytest.approx(ey, abs=1e-5)
    assert t["prob"][0] == pytest.approx(0.8, abs=1e-5)


def test_decode_never_merges_detections_of_different_tiles():
    # the same emitter position in two tiles of one batch: one detection in each tile
    f = 2
    one = _maps(f, 10, 10, _blob(f, 4.2, 3.7, 0.6, 0.3))
    both = {k: torch.cat([v, v]) for k, v in one.items()}
    tables = decode_maps(both, f, threshold=0.5)
    assert [len(t) for t in tables] == [1, 1]
    assert tables[0]["x"][0] == pytest.approx(tables[1]["x"][0]) == pytest.approx(4.2, abs=1e-5)


def test_decode_does_not_chain_two_emitters_through_a_weak_candidate_between_them():
    # two blobs 1.8 px apart (x2 columns 9 and 12, row 13) and a weak candidate 2 px above
    # them whose offsets point midway, 0.9 px from each: one blob may absorb it, but the two
    # blobs stay two detections
    f = 2
    peaks = [pk for ex in (4.0, 5.8) for pk in _blob(f, ex, 6.0, 0.5, 0.3)]
    row, col = 9, 11
    peaks.append((row, col, 0.15, 4.9 - ((col + 0.5) / f - 0.5), 6.0 - ((row + 0.5) / f - 0.5)))
    (t,) = decode_maps(_maps(f, 14, 14, peaks), f, threshold=0.5)
    assert len(t) == 2
    assert np.sort(t["x"]) == pytest.approx([4.0, 5.8], abs=0.2)


@pytest.mark.parametrize("f, side", [(2, 5), (4, 9), (8, 14)])
def test_decode_finds_a_flat_blob_whole_at_every_scale(f, side):
    # 0.8 spread evenly over side x side map pixels (up to 1.75 input px across): one
    # detection carrying all of it, whatever the map factor
    m = _maps(f, 12, 12, [])
    c0 = f * 6 - side // 2
    m["prob"][0, c0:c0 + side, c0:c0 + side] = 0.8 / side ** 2
    (t,) = decode_maps(m, f, threshold=0.5)
    assert len(t) == 1 and t["prob"][0] == pytest.approx(0.8, abs=1e-4)


def test_decoding_at_a_threshold_keeps_exactly_the_low_threshold_detections_above_it():
    # calibration decodes once at a low threshold and filters by prob: that must equal
    # decoding at each threshold (the candidates may not depend on the threshold)
    rng = np.random.default_rng(3)
    f = 2
    peaks = []
    for _ in range(40):
        ex, ey = rng.uniform(1, 19, 2)
        peaks += _blob(f, ex, ey, rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.4))
    m = _maps(f, 20, 20, peaks)
    (low,) = decode_maps(m, f, threshold=0.2)
    for t in (0.3, 0.45, 0.6, 0.8):
        (at,) = decode_maps(m, f, threshold=t)
        kept = low[low["prob"] >= t]
        assert len(at) == len(kept)
        assert np.array_equal(at["x"], kept["x"]) and np.array_equal(at["prob"], kept["prob"])


@pytest.mark.parametrize("n, radius, groups", [(0, 1.0, 1), (1, 1.0, 1), (400, 1.0, 1),
                                               (1500, 1.0, 25), (300, 2.5, 4)])
def test_close_pairs_finds_exactly_the_pairs_within_the_radius(n, radius, groups):
    from napari_var_emitter.inference import close_pairs

    rng = np.random.default_rng(n)
    x, y = rng.uniform(0, 40, n), rng.uniform(0, 40, n)
    x[: n // 5] = np.round(x[: n // 5])  # many equal x: the sweep must look past ties
    g = rng.integers(0, groups, n)
    found = close_pairs(x, y, radius, g)
    got = {tuple(sorted(map(int, p))) for p in found}
    assert len(got) == len(found)  # each pair once
    # brute force over all pairs
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    i, j = np.nonzero(np.triu((d < radius) & (g[:, None] == g[None]), k=1))
    assert got == set(zip(i.tolist(), j.tolist()))
    # without groups every pair within the radius counts
    d_all = np.triu(d < radius, k=1)
    assert len(close_pairs(x, y, radius)) == int(d_all.sum())


@pytest.mark.parametrize("vertical", [True, False])
def test_close_pairs_on_a_straight_filament(vertical):
    from napari_var_emitter.inference import close_pairs

    # detections 0.6 px apart along a line parallel to one axis (plus a NaN position): the
    # sweep must give the same pairs whichever axis it runs along
    along = np.arange(300) * 0.6
    across = 20.0 + np.random.default_rng(0).normal(0, 0.05, 300)
    x, y = (across, along) if vertical else (along, across)
    x = np.append(x, np.nan)
    y = np.append(y, 5.0)
    pairs = {tuple(sorted(map(int, p))) for p in close_pairs(x, y, 1.0)}
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    i, j = np.nonzero(np.triu(d < 1.0, k=1))
    assert pairs == set(zip(i.tolist(), j.tolist()))
    assert len(pairs) == 299  # each detection with its neighbours 0.6 px away only


@pytest.mark.parametrize("size", [3, 5, 9, 17])
def test_window_sums_and_maxima_are_those_of_torch_pooling(size):
    """The decoder's window sums (plain and Gaussian-weighted) and maxima, written as
    shifted adds for speed, equal avg_pool2d x size^2, conv2d and max_pool2d at every
    pixel, the frame's edge included (zeros beyond it for sums, nothing for maxima)."""
    import torch.nn.functional as F

    from napari_var_emitter.inference import _window_max, _window_sum

    gen = torch.Generator().manual_seed(size)
    x = torch.rand(3, 21, 26, generator=gen) ** 4
    r = size // 2
    boxed = F.avg_pool2d(x[:, None], size, 1, r, count_include_pad=True)[:, 0] * size ** 2
    torch.testing.assert_close(_window_sum(x, size), boxed, atol=1e-5, rtol=1e-5)
    g = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / 8.0)
    conv = F.conv2d(x[:, None], (g[:, None] * g[None, :])[None, None], padding=r)[:, 0]
    torch.testing.assert_close(_window_sum(x, size, g), conv, atol=1e-5, rtol=1e-5)
    x64 = x.double()
    assert torch.equal(_window_max(x64, size), F.max_pool2d(x64[:, None], size, 1, r)[:, 0])
