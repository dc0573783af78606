"""Two-spot fits that split a detection into the two close emitters it really is."""

import numpy as np
import pytest

from napari_var_emitter.camera import Camera
from napari_var_emitter.pairsplit import _near_other_detection, split_merged_pairs
from napari_var_emitter.simulation import render_expected
from napari_var_emitter.table import LOC_DTYPE, empty_table

SCMOS = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
SHAPE = (40, 40)


def _frames(rng, emitters, n_frames, sigma=0.9, background=20.0):
    """Camera frames (photons) of ``emitters`` [(frame, x, y, photons), ...]."""
    t = empty_table(len(emitters))
    for k, (f, x, y, n) in enumerate(emitters):
        t["frame"][k], t["x"][k], t["y"][k], t["photons"][k] = f, x, y, n
    t["sigma"] = sigma
    expected = render_expected(t, n_frames, SHAPE, 1, background)
    return SCMOS.adu_to_photons(SCMOS.photons_to_adu(expected, rng)), t


def _detections(rows):
    """Network-like detections [(frame, x, y, photons), ...] with uncertainty 0.05 px."""
    t = empty_table(len(rows))
    for k, (f, x, y, n) in enumerate(rows):
        t["frame"][k], t["x"][k], t["y"][k], t["photons"][k] = f, x, y, n
    t["prob"], t["background"], t["unc_x"], t["unc_y"] = 0.9, 20.0, 0.05, 0.05
    return t


def _assert_unchanged(out, table, sigma=None):
    """Nothing split or moved; ``sigma``: the true PSF width the screen must have filled in,
    "filled" (any plausible width), or None (left as it was)."""
    assert out.dtype == table.dtype and len(out) == len(table)
    for name in table.dtype.names:  # field by field: NaN (no PSF width) equals NaN
        if name != "sigma" or sigma is None:
            np.testing.assert_array_equal(out[name], table[name])
    if sigma == "filled":
        assert np.all((out["sigma"] > 0.65) & (out["sigma"] < 2.4))
    elif sigma is not None:
        np.testing.assert_allclose(out["sigma"], sigma, rtol=0.3)
        assert abs(np.median(out["sigma"]) / sigma - 1) < 0.05


def test_a_blended_pair_is_split_into_both_emitters():
    rng = np.random.default_rng(1)
    n = 30
    angle = rng.uniform(0, np.pi, n)
    cx, cy = rng.uniform(12, 28, n), rng.uniform(12, 28, n)
    dx, dy = 0.7 * np.cos(angle), 0.7 * np.sin(angle)  # 1.4 px apart, PSF sigma 0.9 px
    emitters = ([(f, cx[f] + dx[f], cy[f] + dy[f], 3000.0) for f in range(n)]
                + [(f, cx[f] - dx[f], cy[f] - dy[f], 2000.0) for f in range(n)])
    frames, _ = _frames(rng, emitters, n)
    # the network's blend: one detection between them
    table = _detections([(f, cx[f] + 0.1, cy[f], 5000.0) for f in range(n)])
    table["unc_x"], table["unc_y"] = 0.01, 0.01  # a floor below the fit's errors
    out = split_merged_pairs(table, frames, SCMOS)
    assert out.dtype == LOC_DTYPE and len(out) == 2 * n
    errors, z = [], []
    for f in range(n):
        got = out[out["frame"] == f]
        assert len(got) == 2
        for sign in (1, -1):
            ex, ey = got["x"] - (cx[f] + sign * dx[f]), got["y"] - (cy[f] + sign * dy[f])
            k = np.argmin(np.hypot(ex, ey))
            errors.append(np.hypot(ex[k], ey[k]))
            z += [ex[k] / got["unc_x"][k], ey[k] / got["unc_y"][k]]
        # blended spots trade photons; their sum is well measured
        assert got["photons"].sum() == pytest.approx(5000.0, rel=0.1)
    # a few hundredths of a pixel (the CRLB here is ~0.05 px), with honest standard errors
    assert np.median(errors) < 0.1 and max(errors) < 0.3
    assert 0.8 < np.std(z) < 1.3
    # both spots keep the detection's probability; the network's uncertainty of the blend
    # is the floor (the fit alone is overconfident where neighbours are present)
    assert np.all(out["prob"] == 0.9)
    table["unc_x"], table["unc_y"] = 0.5, 0.5
    floored = split_merged_pairs(table, frames, SCMOS)
    assert np.all((floored["unc_x"] == 0.5) & (floored["unc_y"] == 0.5))
    # sorted as every batch is: frame, then y, then x
    order = np.lexsort((out["x"], out["y"], out["frame"]))
    np.testing.assert_array_equal(order, np.arange(len(out)))


def test_single_emitters_are_never_split():
    rng = np.random.default_rng(2)
    n = 80
    x, y = rng.uniform(5, 35, n), rng.uniform(5, 35, n)
    photons = np.exp(rng.uniform(np.log(500), np.log(8000), n))
    frames, _ = _frames(rng, [(f, x[f], y[f], photons[f]) for f in range(n)], n, sigma=1.2)
    table = _detections([(f, x[f] + 0.1, y[f] - 0.1, photons[f]) for f in range(n)])
    out = split_merged_pairs(table, frames, SCMOS)
    _assert_unchanged(out, table, sigma=1.2)  # the network gives no PSF width: the screen's


def test_a_second_spot_on_another_detection_is_that_neighbour_not_a_pair():
    rng = np.random.default_rng(3)
    n = 20
    emitters = [(f, 20.0, 20.0, 3000.0) for f in range(n)] + [(f, 21.8, 20.0, 3000.0)
                                                              for f in range(n)]
    frames, _ = _frames(rng, emitters, n)
    # both emitters already reported: nothing to split
    both = _detections([(f, 20.0, 20.05, 3000.0) for f in range(n)]
                       + [(f, 21.8, 19.95, 3000.0) for f in range(n)])
    both = both[np.lexsort((both["x"], both["y"], both["frame"]))]
    out = split_merged_pairs(both, frames, SCMOS)
    _assert_unchanged(out, both, sigma="filled")  # (each other's light widens those fits)


def test_the_neighbour_test_looks_only_at_each_pairs_own_frame():
    # the rule's "no spot within 2 px of another detection", against an all-pairs loop, on
    # tables in any frame order, with detections without a position
    rng = np.random.default_rng(8)
    for _ in range(5):
        n = 400
        table = empty_table(n)
        table["frame"] = rng.integers(0, 12, n)
        table["x"], table["y"] = rng.uniform(0, 40, n), rng.uniform(0, 40, n)
        table["x"][rng.random(n) < 0.05] = np.nan
        which = rng.choice(n, 80, replace=False)
        params = rng.uniform(0, 40, (80, 8))
        params[:, 0] = table["x"][which] + rng.normal(0, 1.5, 80)
        params[:, 1] = table["y"][which] + rng.normal(0, 1.5, 80)
        expected = [any(f == table["frame"][j] and j != i
                        and np.hypot(p[3 * s] - table["x"][j], p[3 * s + 1] - table["y"][j]) < 2
                        for j in range(n) for s in (0, 1))
                    for i, f, p in zip(which, table["frame"][which], params)]
        found = _near_other_detection(table, which, params, 2.0)
        assert 10 < sum(expected) < 70
        np.testing.assert_array_equal(found, expected)


def test_detections_at_the_frame_border_are_left_to_the_border_refit():
    rng = np.random.default_rng(4)
    n = 10
    emitters = ([(f, 0.2, 20.0 + 0.7, 3000.0) for f in range(n)]
                + [(f, 0.2, 20.0 - 0.7, 3000.0) for f in range(n)])
    frames, _ = _frames(rng, emitters, n)
    table = _detections([(f, 0.3, 20.0, 6000.0) for f in range(n)])
    _assert_unchanged(split_merged_pairs(table, frames, SCMOS), table)


def test_frame_offset_and_empty_tables():
    rng = np.random.default_rng(5)
    emitters = [(0, 20.7, 20.0, 3000.0), (0, 19.3, 20.0, 3000.0)]
    frames, _ = _frames(rng, emitters, 1)
    table = _detections([(100, 20.0, 20.0, 6000.0)])  # batch starting at frame 100
    out = split_merged_pairs(table, frames, SCMOS, frame_offset=100)
    assert len(out) == 2 and np.all(out["frame"] == 100)
    np.testing.assert_allclose(np.sort(out["x"]), [19.3, 20.7], atol=0.15)
    assert len(split_merged_pairs(empty_table(0), frames, SCMOS)) == 0


def test_bundled_model_with_the_pair_fit_finds_more_emitters_with_a_narrow_psf():
    """End to end on the case it is for: simulate -> predict -> evaluate, narrow PSF at
    1 emitter/um^2, where blended pairs cost the network most."""
    from napari_var_emitter.inference import Predictor
    from napari_var_emitter.metrics import evaluate_tables
    from napari_var_emitter.simulation import simulate_movie

    predictor = Predictor.from_pretrained(device="cpu")
    movie = simulate_movie(120, SHAPE, rng=21, density_per_um2=1.0, sigma_px=(0.8, 0.9),
                           camera=SCMOS, highres_factor=None)
    truth = movie.table_in_view()
    scores = {}
    for pair_fit in (True, False):
        locs = predictor.predict(movie.adu, camera=SCMOS, maps=False,
                                 pair_fit=pair_fit).localizations
        scores[pair_fit] = evaluate_tables(truth, locs, image_shape=SHAPE, n_frames=120,
                                           camera=SCMOS)
    assert scores[True]["jaccard"] >= scores[False]["jaccard"] + 0.01
    assert scores[True]["recall"] > scores[False]["recall"]
    assert scores[True]["rmse_nm"] <= scores[False]["rmse_nm"] + 0.5
