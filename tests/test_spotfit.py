"""Maximum-likelihood spot fits and the refit of detections at the frame border."""

import numpy as np
import pytest
import torch

from napari_var_emitter.camera import Camera
from napari_var_emitter.simulation import render_expected
from napari_var_emitter.spotfit import (distance_inside, fit_spots, pixel_variance,
                                        refit_border_detections)
from napari_var_emitter.table import empty_table

SCMOS = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
SHAPE = (40, 40)


def _spots(x, y, photons, sigma, background=20.0, shape=SHAPE):
    """Expected photons of one spot per frame (frame k holds spot k)."""
    n = len(x)
    t = empty_table(n)
    t["frame"] = np.arange(n)
    t["x"], t["y"] = x, y
    t["photons"] = photons
    t["sigma"] = sigma
    return render_expected(t, n, shape, 1, background), t


@pytest.mark.parametrize("x, y", [(20.3, 17.8), (-0.3, 12.4), (39.2, 39.1), (25.6, 0.05)])
def test_noise_free_spot_is_recovered_inside_and_cut_by_the_border(x, y):
    frames, _ = _spots([x], [y], 3000.0, [1.4])
    # start where the network would: half a pixel off, with the wrong photons and width
    start_x = min(max(x + 0.4, 0.0), 39.0)
    fit = fit_spots(frames, [0], [start_x], [y - 0.3], [1500.0], [10.0], sigma=1.1)
    assert fit.x[0] == pytest.approx(x, abs=2e-3)
    assert fit.y[0] == pytest.approx(y, abs=2e-3)
    assert fit.photons[0] == pytest.approx(3000.0, rel=2e-3)
    assert fit.sigma[0] == pytest.approx(1.4, abs=2e-3)
    assert fit.background[0] == pytest.approx(20.0, rel=1e-2)
    assert fit.reduced_chi2[0] < 1e-6


def test_standard_errors_match_the_scatter_of_the_fits_on_camera_frames():
    """The refitted detections' uncertainties are the fit's standard errors: over many
    noisy spots (sCMOS, interior and cut by the border) error / standard error has std ~1."""
    rng = np.random.default_rng(3)
    n = 400
    x = np.where(np.arange(n) % 2, rng.uniform(10, 30, n), rng.uniform(-0.2, 0.6, n))
    y = rng.uniform(8, 32, n)
    expected, _ = _spots(x, y, rng.uniform(800, 3000, n), rng.uniform(1.0, 1.5, n), 30.0)
    frames = SCMOS.adu_to_photons(SCMOS.photons_to_adu(expected, rng))
    fit = fit_spots(frames, np.arange(n), x + rng.normal(0, 0.2, n), y + rng.normal(0, 0.2, n),
                    np.full(n, 1500.0), np.full(n, 30.0), SCMOS)
    zx, zy = (fit.x - x) / fit.se_x, (fit.y - y) / fit.se_y
    assert 0.85 < np.std(zx) < 1.2 and 0.85 < np.std(zy) < 1.2
    assert abs(np.mean(zx)) < 0.15 and abs(np.mean(zy)) < 0.15
    assert np.median(fit.reduced_chi2) == pytest.approx(1.0, abs=0.15)


def test_emccd_noise_doubles_the_shot_noise():
    em = Camera(e_per_adu=20.0, em_gain=200.0, qe=0.9, read_noise=50.0)
    plain = Camera(e_per_adu=20.0 / 200.0, qe=0.9)  # same photons per ADU, no EM register
    mu = np.array([10.0, 100.0])
    read = (50.0 / (200 * 0.9)) ** 2
    rounding = (20.0 / (200 * 0.9)) ** 2 / 12
    np.testing.assert_allclose(pixel_variance(mu, em), 2 * mu / 0.9 + read + rounding)
    np.testing.assert_allclose(pixel_variance(mu, plain), mu / 0.9 + rounding)


def test_no_spots_gives_empty_fits():
    fit = fit_spots(np.zeros((1, 8, 8)), [], [], [], [], [])
    assert len(fit.x) == 0 and len(fit.se_y) == 0


def test_a_spot_with_a_non_finite_start_is_left_out_without_harming_the_others():
    frames, _ = _spots([10.2, 20.0], [12.0, 20.0], 3000.0, [1.3, 1.3])
    fit = fit_spots(frames, [0, 1], [10.0, np.nan], [12.1, 20.0], [2000.0, 2000.0],
                    [20.0, np.inf])
    assert fit.x[0] == pytest.approx(10.2, abs=2e-3)
    assert np.isnan(fit.x[1]) and np.isnan(fit.se_x[1])


def test_fits_on_a_torch_tensor_match_fits_on_the_array():
    frames, _ = _spots([10.2, -0.1], [12.0, 30.0], 2000.0, [1.3, 1.6])
    noisy = SCMOS.adu_to_photons(SCMOS.photons_to_adu(frames, np.random.default_rng(2)))
    args = ([0, 1], [10.0, 0.2], [12.1, 30.2], [1000.0, 1000.0], [20.0, 20.0], SCMOS)
    a = fit_spots(noisy, *args)
    b = fit_spots(torch.from_numpy(noisy), *args)
    np.testing.assert_allclose([a.x, a.y, a.photons, a.se_x], [b.x, b.y, b.photons, b.se_x])


def _detections(rows):
    t = empty_table(len(rows))
    for i, (frame, x, y, prob) in enumerate(rows):
        t[i]["frame"], t[i]["x"], t[i]["y"], t[i]["prob"] = frame, x, y, prob
    t["photons"], t["background"] = 1000.0, 20.0
    t["unc_x"] = t["unc_y"] = 0.01
    return t


def test_border_rule_keeps_a_weak_spot_inside_drops_one_outside_and_leaves_the_rest():
    # frame 0: a spot 0.3 px inside the left border; frame 1: 0.4 px beyond the top border;
    # frame 2: a weak candidate in the interior; frame 3: a strong interior spot
    expected, _ = _spots([-0.2, 15.0, 20.0, 25.0], [20.0, -0.9, 20.0, 20.0],
                         [2500.0, 2500.0, 2500.0, 2500.0], [1.3] * 4)
    frames = SCMOS.adu_to_photons(SCMOS.photons_to_adu(expected, np.random.default_rng(5)))
    # the network's habit: border spots placed too far inside, with a low probability
    table = _detections([(0, 0.15, 20.1, 0.25), (1, 15.1, -0.25, 0.6), (2, 20.0, 20.0, 0.3),
                         (3, 25.02, 19.97, 0.9)])
    out = refit_border_detections(table, frames, SCMOS, threshold=0.45)
    assert list(out["frame"]) == [0, 3]
    assert out["x"][0] == pytest.approx(-0.2, abs=0.15)  # refitted ...
    assert out["photons"][0] == pytest.approx(2500.0, rel=0.2)
    assert np.isfinite(out["sigma"][0])  # ... with the fitted width and its own errors,
    assert 0.03 < out["unc_x"][0] < 0.3  # which are a bound (edge spot: x worse than y)
    assert out["unc_y"][0] < out["unc_x"][0]
    table["unc_x"] = 0.5  # the network's uncertainty is the floor
    assert refit_border_detections(table, frames, SCMOS, threshold=0.45)["unc_x"][0] == 0.5
    assert out["x"][1] == 25.02 and np.isnan(out["sigma"][1])  # the interior one untouched
    # below a third of the threshold a border candidate is not even fitted
    assert len(refit_border_detections(table[:1], frames, SCMOS, threshold=0.9)) == 0


def test_border_rule_drops_weak_candidates_on_pure_noise():
    rng = np.random.default_rng(9)
    frames = SCMOS.adu_to_photons(SCMOS.photons_to_adu(np.full((200, 40, 40), 30.0), rng))
    # weak candidates the network might report at the border of empty frames
    table = _detections([(f, 0.1 + 0.3 * (f % 3), 4.0 + (f % 30), 0.3) for f in range(200)])
    table["photons"] = 150.0
    assert len(refit_border_detections(table, frames, SCMOS, threshold=0.45)) <= 2


def test_border_rule_keeps_the_network_decision_when_a_neighbour_spoils_the_fit():
    # two bright spots 2 px apart at the border: one Gaussian cannot describe the window
    expected, _ = _spots([0.2], [20.0], [4000.0], [1.2])
    second, _ = _spots([0.4], [22.0], [4000.0], [1.2], background=0.0)
    frames = SCMOS.adu_to_photons(SCMOS.photons_to_adu(expected + second,
                                                       np.random.default_rng(6)))
    table = _detections([(0, 0.5, 20.2, 0.7)])
    out = refit_border_detections(table, frames, SCMOS, threshold=0.45)
    assert len(out) == 1 and out["x"][0] == 0.5  # kept as the network reported it


def _edge_movie(rng, n, depth, photons, background=30.0):
    """One spot per frame ``depth`` px inside (negative: outside) a random side."""
    along = rng.uniform(4, 35, n)
    side = rng.integers(0, 4, n)
    near = -0.5 + depth
    x = np.select([side == 0, side == 1], [near, 39 - near], along)
    y = np.select([side == 2, side == 3], [near, 39 - near], along)
    expected, t = _spots(x, y, photons, rng.uniform(1.0, 1.5, n), background)
    return SCMOS.photons_to_adu(expected, rng), t


def _found(table, truth, radius=2.5):
    hit = [np.any(np.hypot(table["x"][table["frame"] == f] - truth["x"][f],
                           table["y"][table["frame"] == f] - truth["y"][f]) < radius)
           for f in range(len(truth))]
    return float(np.mean(hit))


def test_bundled_model_finds_spots_on_the_border_pixels_and_rejects_spots_outside():
    """The border refit's reason to exist, end to end: spots centred on the border pixels
    are found far more often, spots half a pixel outside the frame are not reported."""
    from napari_var_emitter.inference import Predictor

    predictor = Predictor.from_pretrained(device="cpu")
    rng = np.random.default_rng(8)
    adu, truth = _edge_movie(rng, 80, 0.5, 500.0)  # dim: v0.8 finds 0.85, 0.75 without the refit
    with_fit = predictor.predict(adu, camera=SCMOS, maps=False).localizations
    without = predictor.predict(adu, camera=SCMOS, maps=False, border_fit=False).localizations
    assert _found(with_fit, truth) >= 0.8
    assert _found(with_fit, truth) >= _found(without, truth) + 0.1
    # and placed where they are, half a pixel inside
    depth = distance_inside(with_fit["x"], with_fit["y"], SHAPE)
    assert abs(np.median(depth[depth < 1.5]) - 0.5) < 0.1
    adu, truth = _edge_movie(rng, 60, -0.5, 2000.0)
    assert _found(predictor.predict(adu, camera=SCMOS, maps=False).localizations, truth) <= 0.1


def test_untrusted_fits_leave_the_network_detections_exactly_as_without_the_refit(
        monkeypatch):
    """When no fit is trusted the network's decisions stand: weak border candidates must not
    displace a network detection when twins from two tiles are merged (multi-tile frames)."""
    import napari_var_emitter.spotfit as spotfit
    from napari_var_emitter.inference import Predictor
    from napari_var_emitter.simulation import simulate_movie

    monkeypatch.setattr(spotfit, "MAX_REDUCED_CHI2", -1.0)
    predictor = Predictor.from_pretrained(device="cpu")
    for shape in ((70, 110), (12, 100), (15, 15)):
        movie = simulate_movie(30, shape, rng=3, density_per_um2=2.0, highres_factor=None)
        plain = predictor.predict(movie.adu, maps=False, border_fit=False).localizations
        refit = predictor.predict(movie.adu, maps=False).localizations
        np.testing.assert_array_equal(np.c_[plain["x"], plain["y"]], np.c_[refit["x"], refit["y"]])
