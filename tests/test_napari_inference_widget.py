"""The inference dock widget in a real (Xvfb) napari viewer.

The model here is a tiny network with random weights (``untrained_checkpoint``): it runs
every code path of the widget, so these tests check structure (layers, geometry, files,
cancel, errors), not detection quality.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_var_emitter._napari import inference_widget as IW
from napari_var_emitter._napari._workers import finetuned_models
from napari_var_emitter._napari.layers import RESULT_KEY

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 120_000


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-var-emitter",
                                                     "VAR emitter inference")
    assert isinstance(widget, IW.InferenceWidget)
    return widget


def _sparse_input(viewer, n_frames=12, scale=(1.0, 1.0, 1.0), translate=(0.0, 0.0, 0.0)):
    """The sparse sample, first ``n_frames`` frames, as the input layer."""
    viewer.open_sample("napari-var-emitter", "sparse")
    sample = viewer.layers["sparse emitters"]
    layer = viewer.add_image(np.asarray(sample.data[:n_frames]), name="sparse input",
                             scale=scale, translate=translate, metadata=dict(sample.metadata))
    return layer


def _use_checkpoint(widget, path, batch_size=64):
    widget.model_source.value = IW.MODEL_CHECKPOINT
    widget.checkpoint.value = str(path)
    widget.device.value = "cpu"
    widget.batch_size.value = batch_size


def _wait(qtbot, widget, timeout=RUN_TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def _run_and_cancel_after(qtbot, widget, n_events):
    """Run, press Cancel once ``n_events`` progress events arrived, wait; the events seen."""
    seen = []

    def on_progress(event):
        seen.append(event)
        if len(seen) == n_events:
            widget.cancel()

    worker = widget.run()
    worker.yielded.connect(on_progress)
    _wait(qtbot, widget)
    assert widget.status.value == "cancelled"
    return seen


def _result_layers(viewer):
    return [ly for ly in viewer.layers if RESULT_KEY in ly.metadata]


def test_dock_widget_prefills_from_the_layer(viewer_with_plugin):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    layer = _sparse_input(viewer)
    widget.image.value = layer
    assert widget.pixel_size.value == 100.0
    assert widget.baseline.value == 100.0
    assert widget.e_per_adu.value == 2.0
    assert widget.qe.value == 0.9
    assert widget.em_gain.value == 1.0
    # result layers and RGB images are not offered as inputs
    names = [name for name, _ in widget._image_layers()]
    assert "sparse input" in names and "sparse emitters" in names
    # the batch follows the device: the command line's defaults (no GPU on CI: 64)
    widget.batch_size.value = 7
    widget.device.value = "cpu"
    assert widget.batch_size.value == 64


def test_inference_run_makes_aligned_layers_and_replaces_them(viewer_with_plugin, qtbot,
                                                              untrained_checkpoint, tmp_path):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    s_in, t_in = (1.0, 0.1, 0.1), (0.0, 2.0, -1.0)
    layer = _sparse_input(viewer, n_frames=12, scale=s_in, translate=t_in)
    widget.image.value = layer
    _use_checkpoint(widget, untrained_checkpoint)
    # the model's calibrated threshold by default; unticked, the user's own
    assert widget.model_threshold.value and not widget.threshold.enabled
    widget.model_threshold.value = False
    assert widget.threshold.enabled
    widget.threshold.value = 0.3
    progress = []
    worker = widget.run()
    assert worker is not None and widget.running
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    worker.yielded.connect(progress.append)
    _wait(qtbot, widget)
    assert progress and progress[-1].done == 12 and progress[-1].total == 12
    assert widget.status.value.startswith("done") and widget.status.value.endswith("0.3")
    assert widget.threshold.value == pytest.approx(0.3)  # the user's own, kept

    results = {ly.name: ly for ly in _result_layers(viewer)}
    expected = {f"VAR sparse input probability x{f}" for f in (2, 4, 8)} | {
        "VAR sparse input uncertainty_x x2", "VAR sparse input uncertainty_y x2",
        "VAR sparse input super-resolution", "VAR sparse input peaks"}
    assert set(results) == expected
    for f in (2, 4, 8):
        ly = results[f"VAR sparse input probability x{f}"]
        assert ly.data.shape == (12, 40 * f, 40 * f)
        np.testing.assert_array_equal(ly.scale, [1.0, 0.1 / f, 0.1 / f])
        expect_t = [0.0, 2.0 + 0.1 * (0.5 / f - 0.5), -1.0 + 0.1 * (0.5 / f - 0.5)]
        np.testing.assert_allclose(ly.translate, expect_t, rtol=0, atol=1e-15)
        frame = np.asarray(ly.data[3])
        assert np.isfinite(frame).all() and frame.min() >= 0 and frame.max() <= 1
    unc = results["VAR sparse input uncertainty_x x2"]
    np.testing.assert_array_equal(unc.scale, [1.0, 0.05, 0.05])
    sr = results["VAR sparse input super-resolution"]
    assert sr.data.shape == (400, 400)  # 10 nm render pixels over 100 nm pixels
    np.testing.assert_allclose(sr.scale, [0.01, 0.01])
    np.testing.assert_allclose(sr.translate, [2.0 + 0.1 * (0.05 - 0.5),
                                              -1.0 + 0.1 * (0.05 - 0.5)], atol=1e-15)
    peaks = results["VAR sparse input peaks"]
    np.testing.assert_array_equal(peaks.scale, s_in)
    np.testing.assert_array_equal(peaks.translate, t_in)
    n = len(widget.last_run.result.localizations)
    assert len(peaks.data) == n
    if n:
        assert peaks.data.shape[1] == 3
        assert set(peaks.features.columns) >= {"prob", "photons", "uncertainty_x_nm",
                                               "uncertainty_y_nm", "frame"}
        assert peaks.data[:, 0].min() >= 0 and peaks.data[:, 0].max() <= 11
        assert (peaks.features["prob"] >= 0.3).all()
    assert peaks.metadata["pixel_size_nm"] == 100.0

    # the maps are read lazily from the temporary predictions.h5
    assert hasattr(results["VAR sparse input probability x8"].data, "dask")
    first_h5 = widget.last_run.maps_h5
    assert os.path.isfile(first_h5)

    # screenshot of one map: not blank
    for ly in viewer.layers:
        ly.visible = ly.name == "VAR sparse input probability x2"
    viewer.dims.set_point(0, 3)
    prob = results["VAR sparse input probability x2"]
    lo, hi = np.percentile(np.asarray(prob.data[3]), [1, 99])
    prob.contrast_limits = (float(lo), float(max(hi, lo + 1e-6)))
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 0

    # exports of the last run
    csv = widget.export(tmp_path / "locs.csv", "csv")
    hdf = widget.export(tmp_path / "locs.hdf5", "hdf5")
    h5 = widget.export(tmp_path / "pred.h5", "h5")
    assert all(os.path.isfile(p) for p in csv + hdf + h5)
    from napari_var_emitter.io.emitters import read_emitters

    table, _ = read_emitters(csv[0], pixel_size_nm=100.0)
    assert len(table) == n
    import yaml

    info = yaml.safe_load(open(hdf[1]).read())  # the Picasso yaml says how they were made
    assert info["Border refit"] is True and info["Symmetry averaging"] is False
    import h5py

    with h5py.File(h5[0], "r") as fh:
        assert fh["maps/x8/probability"].shape == (12, 320, 320)

    # a second run replaces the layers (no pile-up) and frees the first run's files
    n_layers = len(viewer.layers)
    widget.show_super_resolution.value = False
    widget.run()
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers - 1
    assert sorted(ly.name for ly in _result_layers(viewer)) == sorted(
        expected - {"VAR sparse input super-resolution"})
    assert not os.path.exists(first_h5)


def test_cancel_leaves_no_layers_and_the_widget_usable(viewer_with_plugin, qtbot,
                                                       untrained_checkpoint):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    layer = _sparse_input(viewer, n_frames=200)
    widget.image.value = layer
    _use_checkpoint(widget, untrained_checkpoint, batch_size=9)  # one frame per batch
    widget.show_uncertainty.value = False
    seen = [e.done for e in _run_and_cancel_after(qtbot, widget, 1)]
    # stopped early: the worker quits at its next yield after cancel(); events it yielded
    # before the GUI thread got to handle the first one may still arrive (more under load)
    assert seen[-1] < 200 and len(seen) < 100
    assert _result_layers(viewer) == []
    # the partial predictions.h5 was removed with its run folder
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(widget._tmp_root) for f in fs]
    assert leftovers == []
    assert widget.run_button.enabled and not widget.cancel_button.enabled

    # usable again: a short run completes
    short = viewer.add_image(np.asarray(layer.data[:4]), name="short",
                             metadata=dict(layer.metadata))
    widget.image.value = short
    widget.run()
    _wait(qtbot, widget)
    assert widget.status.value.startswith("done")
    assert "VAR short peaks" in [ly.name for ly in viewer.layers]


def test_errors_are_notified_and_the_widget_stays_usable(viewer_with_plugin, qtbot, tmp_path,
                                                         monkeypatch, untrained_checkpoint):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    messages = []
    monkeypatch.setattr(IW, "show_error", messages.append)
    layer = _sparse_input(viewer, n_frames=3)
    widget.image.value = layer
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    _use_checkpoint(widget, bad)
    widget.run()
    _wait(qtbot, widget)
    assert len(messages) == 1 and "bad.pth" in messages[0]
    assert widget.status.value == "failed"
    assert _result_layers(viewer) == []

    # torch's own errors are RuntimeErrors (out of memory, ...), which superqt would take for
    # a deleted worker and swallow, leaving the widget running for ever: they are reported
    from napari_var_emitter.inference import Predictor

    def out_of_memory(self, *args, **kwargs):
        yield from ()
        raise RuntimeError("CUDA out of memory (simulated)")

    _use_checkpoint(widget, untrained_checkpoint)
    with monkeypatch.context() as m:
        m.setattr(Predictor, "predict_iter", out_of_memory)
        widget.run()
        _wait(qtbot, widget)
    assert messages[-1] == "inference failed: RuntimeError: CUDA out of memory (simulated)"
    assert widget.status.value == "failed" and widget.run_button.enabled
    assert _result_layers(viewer) == []

    # no fine-tuned model yet: refused before any thread starts
    monkeypatch.setattr(widget, "_finetuned_path", None)
    widget.model_source.value = IW.MODEL_FINETUNED
    assert widget.run() is None
    assert "fine-tuned" in messages[-1]

    # a 4-D layer is refused with a message
    viewer.add_image(np.zeros((2, 2, 16, 16), np.uint16), name="4d")
    widget.image.value = viewer.layers["4d"]
    _use_checkpoint(widget, untrained_checkpoint)
    assert widget.run() is None
    assert "4 dimensions" in messages[-1]

    # and a good run still works
    widget.image.value = layer
    widget.run()
    _wait(qtbot, widget)
    assert widget.status.value.startswith("done")


def test_single_frame_input(viewer_with_plugin, qtbot, untrained_checkpoint):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    viewer.open_sample("napari-var-emitter", "sparse")
    frame = viewer.add_image(np.asarray(viewer.layers["sparse emitters"].data[5]),
                             name="one frame", metadata={"pixel_size_nm": 100.0})
    widget.image.value = frame
    _use_checkpoint(widget, untrained_checkpoint)
    widget.baseline.value = 100.0
    widget.e_per_adu.value = 2.0
    widget.show_super_resolution.value = False
    widget.run()
    _wait(qtbot, widget)
    prob = viewer.layers["VAR one frame probability x4"]
    assert prob.data.shape == (160, 160)
    np.testing.assert_array_equal(prob.translate, [-0.375, -0.375])
    peaks = viewer.layers["VAR one frame peaks"]
    assert peaks.ndim == 2


def test_fine_tuned_model_is_offered_to_the_widget(viewer_with_plugin, untrained_checkpoint):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    assert widget.model_source.value == IW.MODEL_BUNDLED
    finetuned_models.use(str(untrained_checkpoint))
    assert widget.model_source.value == IW.MODEL_FINETUNED
    assert widget._checkpoint_for_run() == str(untrained_checkpoint)
    # explicitly shown / hidden (isVisible also depends on the dock being on screen)
    assert not widget.finetuned_label.native.isHidden()
    assert widget.checkpoint.native.isHidden()


def test_lazily_opened_tiff_runs_through_the_widget(viewer_with_plugin, qtbot, tmp_path,
                                                    monkeypatch, untrained_checkpoint):
    from napari_var_emitter._napari import reader
    from napari_var_emitter._napari.sample_data import sparse_emitters
    from napari_var_emitter.io.tiff import write_tiff

    adu = sparse_emitters()[0][0][:10]
    path = tmp_path / "movie.tif"
    write_tiff(path, adu, pixel_size_nm=107.0)
    monkeypatch.setattr(reader, "LAZY_THRESHOLD_BYTES", 0)
    messages = []
    monkeypatch.setattr(IW, "show_error", messages.append)
    viewer = viewer_with_plugin
    [layer] = viewer.open(str(path), plugin="napari-var-emitter")
    assert hasattr(layer.data, "dask") and layer.data.shape == (10, 40, 40)
    widget = _dock(viewer)
    widget.image.value = layer
    assert widget.pixel_size.value == 107.0
    _use_checkpoint(widget, untrained_checkpoint)
    widget.show_maps.value = False
    widget.show_uncertainty.value = False
    widget.run()
    _wait(qtbot, widget)
    assert messages == []
    assert widget.status.value.startswith("done")
    assert [ly.name for ly in _result_layers(viewer)] == ["VAR movie super-resolution",
                                                          "VAR movie peaks"]
    assert not widget.export_maps_button.enabled  # no maps this time


def _bundled_checkpoint():
    from napari_var_emitter.inference import bundled_checkpoint_path

    return bundled_checkpoint_path()


@pytest.mark.skipif(not os.path.isfile(_bundled_checkpoint()),
                    reason="no bundled model in this checkout yet (weights/*.pth)")
def test_bundled_model_finds_the_sparse_emitters(viewer_with_plugin, qtbot):
    from napari_var_emitter.metrics import evaluate_tables

    viewer = viewer_with_plugin
    widget = _dock(viewer)
    viewer.open_sample("napari-var-emitter", "sparse")
    widget.image.value = viewer.layers["sparse emitters"]
    widget.model_source.value = IW.MODEL_BUNDLED
    widget.device.value = "cpu"
    for box in (widget.show_maps, widget.show_uncertainty, widget.show_super_resolution):
        box.value = False
    widget.run()
    _wait(qtbot, widget, timeout=300_000)
    assert widget.status.value.startswith("done")
    # the greyed-out threshold box shows the model's calibrated threshold that was used
    from napari_var_emitter.inference import Predictor

    calibrated = Predictor.from_pretrained(device="cpu").default_threshold
    assert widget.status.value.endswith(f"threshold {calibrated:.3g}")
    assert widget.threshold.value == pytest.approx(calibrated)
    # the PSF width the fits measured (what a user reads to choose a threshold)
    width = float(widget.status.value.split("PSF sigma ")[1].split(" px")[0])
    assert width == pytest.approx(widget.last_run.result.psf_sigma_px, abs=0.005)
    assert 0.8 < width < 2.0
    truth_layer = viewer.layers["sparse emitters ground truth"]
    peaks = viewer.layers["VAR sparse emitters peaks"]
    from napari_var_emitter._napari.layers import table_from_points

    truth = table_from_points(truth_layer.data, truth_layer.features)
    found = table_from_points(peaks.data, peaks.features)
    # a usable bundled model: the count within 25 % and most emitters matched (250 nm)
    assert abs(len(found) - len(truth)) <= 0.25 * len(truth)
    scores = evaluate_tables(truth, found, tolerance_nm=250.0, pixel_size_nm=100.0)
    assert scores["jaccard"] >= 0.7, scores
    found_first = found

    # the same with the 8 orientations averaged: its own calibrated threshold, as good
    widget.tta.value = True
    widget.run()
    _wait(qtbot, widget, timeout=300_000)
    tta_threshold = Predictor.from_pretrained(device="cpu").calibration_for(tta=True)["threshold"]
    assert widget.status.value.endswith(f"threshold {tta_threshold:.3g}")
    peaks = viewer.layers["VAR sparse emitters peaks"]
    found = table_from_points(peaks.data, peaks.features)
    tta_scores = evaluate_tables(truth, found, tolerance_nm=250.0, pixel_size_nm=100.0)
    assert tta_scores["jaccard"] >= scores["jaccard"] - 0.02, (scores, tta_scores)

    # the border refit (on by default) keeps weak spots cut by the border; unticked, every
    # peak is at the network's threshold again. With the pair fit unticked too, no peak
    # carries a fitted PSF width (only the two fits report one)
    widget.tta.value = False
    assert widget.border_fit.value and (found_first["prob"] < calibrated).any()
    assert widget.pair_fit.value and np.isfinite(found_first["sigma"]).any()
    widget.border_fit.value = False
    widget.pair_fit.value = False
    widget.run()
    _wait(qtbot, widget, timeout=300_000)
    peaks = viewer.layers["VAR sparse emitters peaks"]
    plain = table_from_points(peaks.data, peaks.features)
    assert len(plain) > 0.75 * len(truth) and (plain["prob"] >= calibrated - 1e-6).all()
    assert np.isnan(plain["sigma"]).all()


def test_20000_frame_stack_opens_lazily_and_runs_with_progress_and_cancel(
        viewer_with_plugin, qtbot, tmp_path, untrained_checkpoint):
    """Issue 6: a 20,000-frame 64x64 stack (164 MB) is opened without loading it, the run
    reports progress against the whole stack, and Cancel stops it."""
    import tifffile

    path = tmp_path / "long.tif"
    tifffile.imwrite(path, shape=(20_000, 64, 64), dtype=np.uint16, photometric="minisblack")
    frames = tifffile.memmap(path)
    rng = np.random.default_rng(0)
    for t0 in range(0, len(frames), 2_000):
        frames[t0:t0 + 2_000] = rng.poisson(20, (2_000, 64, 64))
    frames.flush()
    del frames
    viewer = viewer_with_plugin
    [layer] = viewer.open(str(path), plugin="napari-var-emitter")
    assert hasattr(layer.data, "dask") and layer.data.shape == (20_000, 64, 64)
    widget = _dock(viewer)
    widget.image.value = layer
    _use_checkpoint(widget, untrained_checkpoint, batch_size=32)
    for box in (widget.show_maps, widget.show_uncertainty):
        box.value = False
    events = _run_and_cancel_after(qtbot, widget, 3)
    done = [e.done for e in events]
    assert all(e.total == 20_000 for e in events)
    assert done == sorted(done) and done[0] > 0 and done[-1] < 20_000  # moving, then stopped
    assert _result_layers(viewer) == []
    assert widget.run_button.enabled
