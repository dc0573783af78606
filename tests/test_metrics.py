"""Matching, SMLM-challenge metrics and Cramer-Rao bounds on hand-made, checkable cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_var_emitter.camera import Camera
from napari_var_emitter.metrics import (
    crlb_for_table,
    crlb_mortensen,
    crlb_pixelwise,
    crlb_rmse_nm,
    efficiency,
    evaluate_tables,
    match_frame,
    match_tables,
)
from napari_var_emitter.table import empty_table, make_table


def _greedy(truth, pred, tol):
    """Nearest-pair-first matching, the approach optimal matching must beat."""
    d = np.hypot(*(truth[:, None, :] - pred[None, :, :]).transpose(2, 0, 1))
    pairs, used_t, used_p = [], set(), set()
    for k in np.argsort(d, axis=None):
        i, j = np.unravel_index(k, d.shape)
        if d[i, j] <= tol and i not in used_t and j not in used_p:
            pairs.append((i, j))
            used_t.add(i)
            used_p.add(j)
    return pairs


# ------------------------------------------------------------------------------------------
# matching
def test_optimal_matching_beats_greedy_on_a_swap():
    # P1 is closest to T2, but taking that pair leaves T1 and P2 500 nm apart
    truth = np.array([[0.0, 0.0], [300.0, 0.0]])
    pred = np.array([[200.0, 0.0], [500.0, 0.0]])
    assert len(_greedy(truth, pred, 250.0)) == 1
    ti, pi = match_frame(truth, pred, 250.0)
    assert list(zip(ti.tolist(), pi.tolist())) == [(0, 0), (1, 1)]


def test_matching_minimises_distance_among_maximal_matchings():
    truth = np.array([[0.0, 0.0], [100.0, 0.0]])
    pred = np.array([[90.0, 0.0], [10.0, 0.0]])
    ti, pi = match_frame(truth, pred, 250.0)
    assert list(zip(ti.tolist(), pi.tolist())) == [(0, 1), (1, 0)]


def test_tolerance_edge_and_empty_sets():
    truth = np.array([[0.0, 0.0]])
    assert len(match_frame(truth, np.array([[150.0, 200.0]]), 250.0)[0]) == 1  # exactly 250
    assert len(match_frame(truth, np.array([[150.0, 200.001]]), 250.0)[0]) == 0
    assert len(match_frame(np.zeros((0, 2)), truth, 250.0)[0]) == 0
    assert len(match_frame(truth, np.zeros((0, 2)), 250.0)[1]) == 0


def test_out_of_tolerance_pairs_never_displace_valid_ones():
    rng = np.random.default_rng(7)
    for _ in range(200):
        truth = rng.uniform(0, 1000, size=(rng.integers(1, 9), 2))
        pred = rng.uniform(0, 1000, size=(rng.integers(1, 9), 2))
        ti, pi = match_frame(truth, pred, 250.0)
        d = np.hypot(*(truth[ti] - pred[pi]).T)
        assert (d <= 250.0).all()
        # never fewer matches than greedy finds
        assert len(ti) >= len(_greedy(truth, pred, 250.0))


def test_match_tables_keeps_frames_apart():
    truth = make_table([0, 1], [5.0, 5.0], [5.0, 5.0])
    pred = make_table([1, 0], [5.1, 20.0], [5.0, 5.0])
    ti, pi = match_tables(truth, pred, 250.0, 100.0)
    assert list(zip(ti.tolist(), pi.tolist())) == [(1, 0)]


# ------------------------------------------------------------------------------------------
# evaluate_tables
def test_efficiency_example_from_the_challenge():
    assert efficiency(0.80, 25.0) == pytest.approx(100 - math.sqrt(20 ** 2 + 25 ** 2))
    assert round(efficiency(0.80, 25.0)) == 68


def test_evaluate_tables_hand_made_case():
    px = 100.0
    # 8 matches each off by (15, 20) nm -> lateral RMSE exactly 25 nm; 1 FP, 1 FN -> JI 0.8
    tx = np.arange(8) * 10.0
    truth = make_table(frame=[0] * 4 + [2] * 4 + [5], x=np.append(tx, 50.0),
                       y=np.append(np.full(8, 3.0), 30.0))
    pred = make_table(frame=[0] * 4 + [2] * 4 + [6], x=np.append(tx + 0.15, 1.0),
                      y=np.append(np.full(8, 3.2), 1.0))
    r = evaluate_tables(truth, pred, tolerance_nm=250.0, pixel_size_nm=px)
    assert (r["tp"], r["fp"], r["fn"], r["n_true"], r["n_pred"]) == (8, 1, 1, 9, 9)
    assert r["jaccard"] == pytest.approx(0.8)
    assert r["recall"] == pytest.approx(8 / 9) and r["precision"] == pytest.approx(8 / 9)
    assert r["rmse_nm"] == pytest.approx(25.0)
    assert r["rmse_x_nm"] == pytest.approx(15.0) and r["rmse_y_nm"] == pytest.approx(20.0)
    assert r["bias_x_nm"] == pytest.approx(15.0) and r["bias_y_nm"] == pytest.approx(20.0)
    assert r["efficiency"] == pytest.approx(efficiency(0.8, 25.0))
    # frames 0, 2, 5, 6: counts equal in 0 and 2, off by one in 5 and 6
    assert r["count_mae"] == pytest.approx(0.5)
    # with 10 frames the 6 empty frames (both tables) count as exact
    r10 = evaluate_tables(truth, pred, pixel_size_nm=px, n_frames=10)
    assert r10["count_mae"] == pytest.approx(2 / 10)
    # plain numbers only: the CLI prints the dict as JSON
    json.dumps(r)
    assert all(type(v) in (int, float) for v in r.values())


def test_recall_of_emitters_at_the_frame_border():
    # a 40x30 frame: borders at -0.5 and 39.5 (x), -0.5 and 29.5 (y); the band is 1 px wide
    # in the band: x=-0.3 (0.2 px in), x=39.2 (0.3), y=29.0 (0.5), x=0.4 (0.9 px in);
    # outside it: x=0.7 (1.2 px in: the band is measured from the pixel's outer edge, not
    # its centre), x=10.0, x=5.0, and x=-0.7 (outside the frame: not a border spot)
    truth = make_table(frame=[0] * 8, x=[-0.3, 39.2, 20.0, 0.4, 0.7, 10.0, 5.0, -0.7],
                       y=[15.0, 15.0, 29.0, 5.0, 25.0, 15.0, 10.0, 20.0])
    # found: x=-0.3 and x=0.4 (border), x=10.0 and x=0.7 (inner)
    pred = make_table(frame=[0] * 4, x=[-0.2, 0.45, 10.1, 0.75], y=[15.0, 5.0, 15.0, 25.0])
    r = evaluate_tables(truth, pred, pixel_size_nm=100.0, image_shape=(30, 40))
    assert r["n_true_border"] == 4
    assert r["recall_border"] == pytest.approx(2 / 4)
    assert r["recall"] == pytest.approx(4 / 8)
    # without the frame size the border is unknown
    assert "recall_border" not in evaluate_tables(truth, pred, pixel_size_nm=100.0)


def test_scores_per_density_band_of_the_tiles():
    from napari_var_emitter.metrics import evaluate_by_density

    area = 4.0  # um^2 per tile
    empty = make_table([], [], [])
    # a sparse tile (one emitter = 0.25/um^2, found, plus a false detection), an empty tile
    # with a false detection (sparse: 0 per um^2), and a dense tile (8 emitters = 2/um^2,
    # 6 found)
    sparse_t = make_table([0], [10.0], [10.0])
    sparse_p = make_table([0, 0], [10.1, 30.0], [10.0, 30.0])
    empty_p = make_table([3], [5.0], [5.0])
    dense_t = make_table([0] * 8, np.arange(8) * 4.0 + 2, np.full(8, 20.0))
    dense_p = dense_t[:6].copy()
    r = evaluate_by_density([sparse_t, empty, dense_t], [sparse_p, empty_p, dense_p], area)
    assert r["sparse_tiles"] == 2 and r["dense_tiles"] == 1 and "medium_tiles" not in r
    # sparse band: 1 TP, 2 FP, 0 FN; the pooled score would hide them behind the dense tile
    assert r["sparse_jaccard"] == pytest.approx(1 / 3)
    assert r["sparse_precision"] == pytest.approx(1 / 3) and r["sparse_recall"] == 1.0
    assert r["dense_recall"] == pytest.approx(6 / 8) and r["dense_precision"] == 1.0
    # pooled over all tiles the false detections hardly show: 7 TP, 2 FP, 2 FN
    tiles_t = [sparse_t, empty, dense_t]
    tiles_p = [sparse_p, empty_p, dense_p]
    for k, (t, p) in enumerate(zip(tiles_t, tiles_p)):
        t["frame"], p["frame"] = k, k
    pooled = evaluate_tables(np.concatenate(tiles_t), np.concatenate(tiles_p))
    assert pooled["jaccard"] == pytest.approx(7 / 11)


def test_evaluate_tables_empty_inputs():
    truth = make_table([0, 1], [1.0, 2.0], [1.0, 2.0])
    r = evaluate_tables(truth, empty_table(0))
    assert (r["tp"], r["fn"], r["fp"]) == (0, 2, 0)
    assert r["jaccard"] == 0.0 and r["recall"] == 0.0
    assert math.isnan(r["precision"]) and math.isnan(r["rmse_nm"])
    assert r["count_mae"] == pytest.approx(1.0)
    r0 = evaluate_tables(empty_table(0), empty_table(0), n_frames=4)
    assert r0["n_true"] == 0 and math.isnan(r0["jaccard"]) and r0["count_mae"] == 0.0


def test_calibration_of_predicted_uncertainty():
    rng = np.random.default_rng(11)
    n = 4000
    x = rng.uniform(0, 40, n)
    y = rng.uniform(0, 40, n)
    frame = np.arange(n)  # one emitter per frame: matching is unambiguous
    sig_x, sig_y = rng.uniform(0.05, 0.3, n), rng.uniform(0.05, 0.3, n)
    truth = make_table(frame, x, y)
    pred_x = x + rng.normal(0, sig_x)
    pred_y = y + rng.normal(0, sig_y)
    honest = make_table(frame, pred_x, pred_y, unc_x=sig_x, unc_y=sig_y)
    r = evaluate_tables(truth, honest, pixel_size_nm=100.0)
    assert r["calibration_x"] == pytest.approx(1.0, abs=0.05)
    assert r["calibration_y"] == pytest.approx(1.0, abs=0.05)
    overconfident = make_table(frame, pred_x, pred_y, unc_x=sig_x / 2, unc_y=sig_y / 2)
    r2 = evaluate_tables(truth, overconfident, pixel_size_nm=100.0)
    assert r2["calibration_x"] == pytest.approx(2.0, abs=0.1)
    # without uncertainties there is nothing to calibrate
    r3 = evaluate_tables(truth, make_table(frame, pred_x, pred_y), pixel_size_nm=100.0)
    assert math.isnan(r3["calibration_x"])


# ------------------------------------------------------------------------------------------
# Cramer-Rao bounds (Mortensen et al. 2010: sigma 130 nm, a 100 nm, N 1000, b 20)
def test_mortensen_closed_form():
    assert crlb_mortensen(1000, 20, 130, 100) == pytest.approx(6.43, abs=0.01)
    assert crlb_mortensen(1000, 20, 130, 100, emccd=True) == pytest.approx(9.09, abs=0.01)
    # no background: sigma_a / sqrt(N)
    assert crlb_mortensen(1000, 0, 130, 100) == pytest.approx(
        math.sqrt((130 ** 2 + 100 ** 2 / 12) / 1000))
    v = crlb_mortensen(np.array([1000, 4000]), 20, 130, 100)
    assert v.shape == (2,) and v[1] < v[0] / 1.9


def test_pixelwise_fisher_agrees_with_mortensen():
    sx, sy = crlb_pixelwise(1000, 20, 1.3, shape=(15, 15))
    assert sx * 100 == pytest.approx(6.43, abs=0.02) and sy == pytest.approx(sx)
    ex, _ = crlb_pixelwise(1000, 20, 1.3, shape=(15, 15), emccd=True)
    assert ex * 100 == pytest.approx(9.09, abs=0.02)
    assert ex / sx == pytest.approx(math.sqrt(2))
    # Gaussian read noise r adds r^2 to each pixel's variance, like r^2 more background
    rx, _ = crlb_pixelwise(1000, 20, 1.3, read_noise_e=3.0)
    assert rx == pytest.approx(crlb_pixelwise(1000, 29, 1.3)[0], rel=1e-9)


def test_truncated_psf_at_the_frame_edge():
    centre = crlb_pixelwise(1000, 20, 1.3, shape=(15, 15))[0]
    # 0.2 px from the left edge (which is at x = -0.5)
    edge_x, edge_y = crlb_pixelwise(1000, 20, 1.3, shape=(15, 15), x0=-0.3, y0=7.0)
    assert 1.8 < edge_x / centre < 2.6
    assert 1.0 < edge_y / centre < edge_x / centre


def test_crlb_for_table_and_camera():
    t = make_table([0, 0, 1], x=[20.0, -0.3, 5.0], y=[20.0, 20.0, 5.0],
                   photons=[1000.0, 1000.0, np.nan], sigma=[1.3, 1.3, 1.3],
                   background=[20.0, 20.0, 20.0])
    free = crlb_for_table(t, 100.0)
    assert free[0, 0] == pytest.approx(6.43, abs=0.02)
    assert free[1, 0] == pytest.approx(free[0, 0], rel=1e-5)  # no image: no edge
    assert np.isnan(free[2]).all()  # no photon count: no bound
    edged = crlb_for_table(t, 100.0, shape=(40, 40))
    assert edged[0, 0] == pytest.approx(free[0, 0], rel=1e-6)
    assert edged[1, 0] / edged[0, 0] > 1.8
    mort = crlb_for_table(t, 100.0, method="mortensen")
    assert mort[0, 0] == pytest.approx(6.43, abs=0.01)
    em = crlb_for_table(t, 100.0, camera=Camera(em_gain=300.0))
    assert em[0, 0] == pytest.approx(9.09, abs=0.02)
    half_qe = crlb_for_table(t, 100.0, qe=0.5)
    assert half_qe[0, 0] == pytest.approx(crlb_pixelwise(500, 10, 1.3)[0] * 100)
    lateral = crlb_rmse_nm(t[:1], 100.0)
    assert lateral == pytest.approx(math.sqrt(2) * free[0, 0])


def test_evaluate_reports_crlb_of_matched_emitters():
    rng = np.random.default_rng(3)
    n = 50
    truth = make_table(np.arange(n), rng.uniform(5, 35, n), rng.uniform(5, 35, n),
                       photons=np.full(n, 1000.0), sigma=np.full(n, 1.3),
                       background=np.full(n, 20.0))
    pred = make_table(np.arange(n), truth["x"] + 0.1, truth["y"])
    r = evaluate_tables(truth, pred, camera=Camera(), image_shape=(40, 40))
    assert r["crlb_rmse_nm"] == pytest.approx(math.sqrt(2) * 6.43, abs=0.05)
    json.dumps(r)
