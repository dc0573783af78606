"""Post-hoc calibration: the threshold and uncertainty scale a checkpoint carries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_var_emitter.calibration import (THRESHOLD_GRID, CalibrationScene, apply_calibration,
                                            calibrate, calibrated_sigma, calibration_from_runs)
from napari_var_emitter.checkpoint import load_checkpoint
from napari_var_emitter.cli import main
from napari_var_emitter.inference import Predictor, bundled_checkpoint_path
from napari_var_emitter.simulation import simulate_movie
from napari_var_emitter.table import make_table


def synthetic_run(rng, n_frames=50, per_frame=4, err_px=0.05, unc_px=0.1, fp_prob=0.55):
    """Truth, and detections: every emitter found (prob 0.9, error ``err_px`` per axis,
    claimed uncertainty ``unc_px``) plus one false positive per frame at ``fp_prob``."""
    n = n_frames * per_frame
    frame = np.repeat(np.arange(n_frames), per_frame)
    x, y = rng.uniform(2, 38, n), rng.uniform(2, 38, n)
    truth = make_table(frame, x, y)
    det = make_table(frame, x + rng.normal(0, err_px, n), y + rng.normal(0, err_px, n),
                     prob=np.full(n, 0.9), unc_x=np.full(n, unc_px), unc_y=np.full(n, unc_px))
    # false positives far (> 250 nm) from every emitter: corners are kept free
    fp = make_table(np.arange(n_frames), np.full(n_frames, 0.5), np.full(n_frames, 0.5),
                    prob=np.full(n_frames, fp_prob), unc_x=np.full(n_frames, unc_px),
                    unc_y=np.full(n_frames, unc_px))
    keep = (x > 4) | (y > 4)
    return truth[keep], np.concatenate([det[keep], fp])


def test_threshold_rejects_false_positives_and_scale_fixes_overcautious_sigmas():
    rng = np.random.default_rng(0)
    runs = [synthetic_run(rng), synthetic_run(rng, fp_prob=0.6)]
    cal = calibration_from_runs(runs)
    # above both false-positive levels, below the true detections
    assert 0.6 < cal.threshold <= 0.9
    assert cal.mean_jaccard == pytest.approx(1.0)
    assert cal.mean_jaccard_at_0_5 < 0.85
    # claimed 0.1 px for a true 0.05 px error: the scale halves the uncertainties
    assert cal.sigma_scale == pytest.approx((0.5, 0.5), rel=0.1)


def test_every_scene_weighs_the_same_in_the_uncertainty_scale():
    # two sparse scenes whose sigmas are twice too large, and one crowded scene with ten
    # times their detections whose sigmas are half too small: pooled, the crowded scene
    # would set the scale (about 1.7); per scene, the typical scene does (0.5)
    rng = np.random.default_rng(1)
    runs = [synthetic_run(rng), synthetic_run(rng),
            synthetic_run(rng, n_frames=200, per_frame=10, err_px=0.2, unc_px=0.1)]
    cal = calibration_from_runs(runs)
    assert cal.sigma_scale == pytest.approx((0.5, 0.5), rel=0.1)
    assert [r["raw_calibration"][0] for r in cal.per_scene] == pytest.approx([0.5, 0.5, 2.0],
                                                                              rel=0.1)


def test_uncertainty_power_spreads_sigmas_that_span_too_narrow_a_range():
    """Errors that grow as sigma^1.5 (what v0.8 does between sparse and crowded scenes):
    one scale leaves the scenes at std(error / sigma) 0.7 and 1.4; the power makes every
    scene calibrated."""
    rng = np.random.default_rng(2)
    uncs = (0.05, 0.1, 0.2)
    runs = [synthetic_run(rng, n_frames=150, unc_px=u, err_px=0.1 * (u / 0.1) ** 1.5)
            for u in uncs]
    raw = [r["raw_calibration"][0] for r in calibration_from_runs(runs).per_scene]
    assert raw == pytest.approx([0.71, 1.0, 1.41], rel=0.1)
    cal = calibration_from_runs(runs)
    assert cal.sigma_power == pytest.approx((1.5, 1.5), abs=0.1)
    assert cal.sigma_reference_px == pytest.approx((0.1, 0.1))  # the median uncertainty
    for (truth, locs), u in zip(runs, uncs):
        ti, pi = match_tables_of(truth, locs[locs["prob"] >= cal.threshold])
        for i, axis in enumerate("xy"):
            sigma = calibrated_sigma(np.full(len(pi), u), cal.sigma_scale[i], cal.sigma_power[i],
                                     cal.sigma_reference_px[i])
            err = locs[locs["prob"] >= cal.threshold][axis][pi] - truth[axis][ti]
            assert np.std(err / sigma) == pytest.approx(1.0, rel=0.1)
    # sigmas already calibrated need no power
    flat = [synthetic_run(rng, n_frames=150, unc_px=u, err_px=u) for u in uncs]
    assert calibration_from_runs(flat).sigma_power == pytest.approx((1.0, 1.0), abs=0.1)


def match_tables_of(truth, locs):
    from napari_var_emitter.metrics import match_tables

    return match_tables(truth, locs, 250.0, 100.0)


def test_calibration_is_stored_in_the_checkpoint_and_used_by_the_predictor(tmp_path):
    src = bundled_checkpoint_path()
    out = tmp_path / "calibrated.pth"
    cal = calibrate(Predictor.from_checkpoint(src, device="cpu"), n_frames=8,
                    scenes=[CalibrationScene(0.5), CalibrationScene(2.0)])
    assert cal.threshold in THRESHOLD_GRID and len(cal.per_scene) == 2
    apply_calibration(src, cal, out)
    # weights untouched, calibration readable with weights_only
    raw = torch.load(out, weights_only=True)
    assert raw["calibration"]["threshold"] == cal.threshold
    before, after = load_checkpoint(src)["model"], load_checkpoint(out)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    pred = Predictor.from_checkpoint(out, device="cpu")
    assert pred.default_threshold == cal.threshold
    stack = simulate_movie(4, (40, 40), rng=1, density_per_um2=1.0, photons=(2000, 5000),
                           highres_factor=None).adu
    used = pred.predict(stack, maps=False).localizations
    raw_res = pred.predict(stack, maps=False, threshold=cal.threshold, calibrated=False)
    raw_locs = raw_res.localizations
    assert len(used) == len(raw_locs) > 0
    np.testing.assert_allclose(used["x"], raw_locs["x"])
    for i, axis in enumerate("xy"):  # the decoded uncertainties are calibrated
        expected = calibrated_sigma(raw_locs["unc_" + axis], cal.sigma_scale[i],
                                    cal.sigma_power[i], cal.sigma_reference_px[i])
        np.testing.assert_allclose(used["unc_" + axis], expected, rtol=1e-5)

    # symmetry averaging has its own calibration, stored beside the plain one and used by
    # predict(tta=True)
    assert cal.tta is not None and cal.tta.threshold in THRESHOLD_GRID
    assert raw["calibration"]["tta"]["threshold"] == cal.tta.threshold
    assert pred.calibration_for(tta=True)["threshold"] == cal.tta.threshold
    with_tta = pred.predict(stack, maps=False, tta=True)
    raw_tta = pred.predict(stack, maps=False, tta=True, threshold=cal.tta.threshold,
                           calibrated=False).localizations
    assert with_tta.threshold == cal.tta.threshold
    np.testing.assert_allclose(
        with_tta.localizations["unc_x"],
        calibrated_sigma(raw_tta["unc_x"], cal.tta.sigma_scale[0], cal.tta.sigma_power[0],
                         cal.tta.sigma_reference_px[0]), rtol=1e-5)


def test_calibrate_command_writes_a_copy_and_reports_json(tmp_path, capsys):
    out = tmp_path / "cal.pth"
    code = main(["calibrate", "--checkpoint", bundled_checkpoint_path(), "--out", str(out),
                 "--frames", "3", "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["checkpoint"] == str(out) and 0 < report["threshold"] <= 1
    assert Predictor.from_checkpoint(out).default_threshold == report["threshold"]
    assert main(["calibrate", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(out), "--frames", "0"]) == 2


def test_bad_stored_calibration_is_ignored(untrained_checkpoint, tmp_path):
    ckpt = torch.load(untrained_checkpoint, weights_only=True)
    ckpt["calibration"] = {"threshold": 7.0, "sigma_scale": [float("nan"), 1.0]}
    path = tmp_path / "odd.pth"
    torch.save(ckpt, path)
    pred = Predictor.from_checkpoint(path, device="cpu")
    assert pred.default_threshold == 0.5 and pred.calibration["sigma_scale"] == (1.0, 1.0)
    # a power without its reference (or a bad one) would rescale every sigma: ignored
    for cal in ({"sigma_scale": [0.9, 0.9], "sigma_power": [1.3, 1.3]},
                {"sigma_scale": [0.9, 0.9], "sigma_power": [1.3, -1.0],
                 "sigma_reference_px": [0.2, 0.2]}):
        ckpt["calibration"] = cal
        torch.save(ckpt, path)
        got = Predictor.from_checkpoint(path, device="cpu").calibration
        assert got["sigma_scale"] == (0.9, 0.9)
        assert got["sigma_power"] == got["sigma_reference_px"] == (1.0, 1.0)
    ckpt["calibration"] = {"sigma_scale": [0.9, 0.8], "sigma_power": [1.3, 1.2],
                           "sigma_reference_px": [0.2, 0.25]}
    torch.save(ckpt, path)
    got = Predictor.from_checkpoint(path, device="cpu").calibration
    assert (got["sigma_power"], got["sigma_reference_px"]) == ((1.3, 1.2), (0.2, 0.25))
    ckpt["calibration"] = {"threshold": 7.0, "sigma_scale": [float("nan"), 1.0]}
    torch.save(ckpt, path)
    pred = Predictor.from_checkpoint(path, device="cpu")
    # a checkpoint calibrated before symmetry averaging existed: the plain values serve both
    assert pred.calibration["tta"] is None
    assert pred.calibration_for(tta=True) == pred.calibration_for(tta=False)
