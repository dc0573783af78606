"""The training dock widget in a real (Xvfb) napari viewer, with a tiny model config."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_var_emitter._napari import training_widget as TW
from napari_var_emitter._napari._workers import finetuned_models
from napari_var_emitter.config import load_config

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 180_000


@pytest.fixture
def tiny_config_file(tmp_path, tiny_model_config):
    path = tmp_path / "tiny_config.json"
    tiny_model_config.save(path)
    return path


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-var-emitter", "VAR emitter training")
    assert isinstance(widget, TW.TrainingWidget)
    return widget


def _setup(widget, config_file, out_dir, epochs=2, steps=2, batch=4, calibrate=False):
    widget.init.value = TW.INIT_SCRATCH
    widget.calibrate.value = calibrate
    widget.config_file.value = str(config_file)
    widget.output_dir.value = str(out_dir)
    widget.device.value = "cpu"
    widget.epochs.value = epochs
    widget.steps_per_epoch.value = steps
    widget.batch_size.value = batch


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def test_simulated_fine_tune_updates_the_curves(viewer_with_plugin, qtbot, tiny_config_file,
                                                tmp_path, monkeypatch):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    errors = []
    monkeypatch.setattr(TW, "show_error", errors.append)
    widget.source.value = TW.SOURCE_SIMULATION
    # only the simulation fields are shown for this source
    assert not widget.sigma_row.native.isHidden() and widget.tiff_dir.native.isHidden()
    assert widget.calibrate.value  # a fine-tuned model is calibrated unless unticked
    config = load_config(tiny_config_file)
    config.training.calibration_frames = 2  # 12 tiny movies
    config.save(tmp_path / "calibrated_config.json")
    _setup(widget, tmp_path / "calibrated_config.json", tmp_path / "run", calibrate=True)
    worker = widget.start()
    assert worker is not None and widget.running
    _wait(qtbot, widget)
    assert errors == []
    h = widget.history
    assert h.status == "done"
    assert h.steps == [1, 2, 3, 4]
    steps, values = h.main_loss()
    assert len(values) == 4 and np.isfinite(values).all()
    xdata, ydata = widget.train_line.get_data()
    assert list(xdata) == [1, 2, 3, 4] and len(ydata) == 4
    assert h.epochs == [1, 2] and len(widget.val_line.get_data()[0]) == 2
    assert "jaccard" in h.metrics and len(widget.metric_lines["jaccard"].get_data()[0]) == 2
    assert widget.progress.value() == 4 and widget.progress.maximum() == 4
    assert os.path.isfile(tmp_path / "run" / "last_model.pth")
    assert widget.best_checkpoint == str(tmp_path / "run" / "best_model.pth")
    assert os.path.isfile(widget.best_checkpoint)
    # calibrated when done: the threshold the status shows is the one the model now carries
    from napari_var_emitter.checkpoint import load_checkpoint

    threshold = load_checkpoint(widget.best_checkpoint)["calibration"]["threshold"]
    assert widget.status.value.startswith("done: 4 steps; calibrated: threshold ")
    assert f"threshold {threshold:.3f}" in widget.status.value
    # the simulation matched the form's camera
    saved = load_config(tmp_path / "run" / "config.json")
    assert saved.model.input_size == [16, 16]
    assert saved.training.num_epochs == 2 and saved.training.steps_per_epoch == 2
    assert saved.simulation.e_per_adu == [1.0, 1.0] and saved.simulation.emccd_fraction == 0.0
    # the new model goes to the inference widget
    assert finetuned_models.latest == widget.best_checkpoint
    assert widget.use_button.enabled
    _, inference = viewer.window.add_plugin_dock_widget("napari-var-emitter",
                                                        "VAR emitter inference")
    widget.use_in_inference()
    from napari_var_emitter._napari.inference_widget import MODEL_FINETUNED

    assert inference.model_source.value == MODEL_FINETUNED
    assert inference._checkpoint_for_run() == widget.best_checkpoint


def test_cancel_keeps_a_resumable_checkpoint(viewer_with_plugin, qtbot, tiny_config_file,
                                             tmp_path):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    widget.source.value = TW.SOURCE_SIMULATION
    _setup(widget, tiny_config_file, tmp_path / "run", epochs=3, steps=2)

    def cancel_after_first_step(event):
        if event.kind == "step" and event.step == 1:
            widget.cancel()

    worker = widget.start()
    worker.yielded.connect(cancel_after_first_step)
    _wait(qtbot, widget)
    h = widget.history
    assert h.status == "cancelled"
    # stopped before the end (6 steps); the worker may have run a step or two ahead of
    # the GUI thread that handled the first event
    assert h.steps[-1] < 6
    assert os.path.isfile(tmp_path / "run" / "last_model.pth")
    assert widget.resume_button.enabled and widget.start_button.enabled
    assert not widget.use_button.enabled
    stopped_at = h.steps[-1]

    widget.start(resume=True)
    _wait(qtbot, widget)
    h = widget.history
    assert h.status == "done"
    assert h.steps[0] == stopped_at + 1 and h.steps[-1] == 6


def test_training_from_the_training_pair_sample(viewer_with_plugin, qtbot, tiny_config_file, tmp_path,
                                   monkeypatch):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    errors = []
    monkeypatch.setattr(TW, "show_error", errors.append)
    viewer.open_sample("napari-var-emitter", "training_pair")
    widget.source.value = TW.SOURCE_LAYERS
    widget.image_layer.value = viewer.layers["training pair 8x photons"]
    widget.points_layer.value = viewer.layers["training pair ground truth"]
    assert widget.pixel_size.value == 100.0  # the camera pixel, not the 12.5 nm of the image
    _setup(widget, tiny_config_file, tmp_path / "pair", epochs=1, steps=2)
    widget.start()
    _wait(qtbot, widget)
    assert errors == []
    assert widget.history.status == "done" and widget.history.steps == [1, 2]
    # the 8x photon image went through the training-file path (binning + camera noise)
    assert os.listdir(tmp_path / "pair" / "layer_data" / "train_tiff") == [
        "training_pair_8x_photons.tif"]


def test_training_from_camera_frames_and_unlabeled(viewer_with_plugin, qtbot,
                                                   tiny_config_file, tmp_path, monkeypatch):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    errors = []
    monkeypatch.setattr(TW, "show_error", errors.append)
    widget.source.value = TW.SOURCE_LAYERS
    # camera frames and emitters (the sparse sample) go through from_arrays
    viewer.open_sample("napari-var-emitter", "sparse")
    widget.image_layer.value = viewer.layers["sparse emitters"]
    widget.points_layer.value = viewer.layers["sparse emitters ground truth"]
    assert widget.baseline.value == 100.0 and widget.e_per_adu.value == 2.0
    _setup(widget, tiny_config_file, tmp_path / "arrays", epochs=1, steps=2)
    widget.start()
    _wait(qtbot, widget)
    assert errors == []
    assert widget.history.status == "done"

    # unlabeled frames: reconstruction-only adaptation
    widget.source.value = TW.SOURCE_UNLABELED
    _setup(widget, tiny_config_file, tmp_path / "unlabeled", epochs=1, steps=2)
    widget.start()
    _wait(qtbot, widget)
    assert errors == []
    assert widget.history.status == "done"
    assert load_config(tmp_path / "unlabeled" / "config.json").training.mode == "reconstruction"


def test_fine_tuning_the_bundled_model_trains_all_of_it(viewer_with_plugin, tmp_path):
    """"Start from: bundled model" keeps its architecture but not its last recipe phase's
    training section (which froze all but the 8x stage); the form's values apply."""
    from napari_var_emitter.checkpoint import load_checkpoint
    from napari_var_emitter.config import FINE_TUNING
    from napari_var_emitter.inference import bundled_checkpoint_path

    widget = _dock(viewer_with_plugin)
    widget.source.value = TW.SOURCE_SIMULATION
    assert widget.init.value == TW.INIT_BUNDLED
    assert (widget.epochs.value, widget.learning_rate.value) == (
        FINE_TUNING["num_epochs"], FINE_TUNING["learning_rate"])
    widget.output_dir.value = str(tmp_path / "ft")
    widget.epochs.value = 3
    config = TW._TrainerFactory(widget._plan(resume=False)).config()
    bundled = load_checkpoint(bundled_checkpoint_path())["config_obj"]
    assert bundled.training.trainable  # the recipe's last phase: the 8x stage alone
    assert config.model == bundled.model
    assert config.training.trainable == "" and config.training.num_epochs == 3
    assert config.training.calibrate and not config.training.progressive


def test_bad_input_is_reported(viewer_with_plugin, qtbot, tiny_config_file, tmp_path,
                               monkeypatch):
    viewer = viewer_with_plugin
    widget = _dock(viewer)
    errors = []
    monkeypatch.setattr(TW, "show_error", errors.append)
    widget.source.value = TW.SOURCE_FOLDERS
    _setup(widget, tiny_config_file, tmp_path / "run")
    assert widget.start() is None  # no folders chosen
    assert "folder" in errors[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    widget.tiff_dir.value = str(empty)
    widget.emitter_dir.value = str(empty)
    widget.start()
    _wait(qtbot, widget)
    assert "no .tif" in errors[-1] and widget.history.status == ""
    assert widget.start_button.enabled

    # a RuntimeError (what torch raises, e.g. out of memory) ends the run with a message,
    # not with a widget that shows it running for ever (superqt swallows RuntimeErrors)
    def out_of_memory(self):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(TW._TrainerFactory, "__call__", out_of_memory)
    widget.source.value = TW.SOURCE_SIMULATION
    widget.start()
    _wait(qtbot, widget)
    assert errors[-1] == "training failed: RuntimeError: out of memory (simulated)"
    assert widget.status.value == "failed" and widget.start_button.enabled
    widget.source.value = TW.SOURCE_LAYERS
    assert widget.start() is None  # no layers open
    assert "Image layer" in errors[-1]


def test_a_base_config_that_freezes_part_of_the_model_is_announced(
        viewer_with_plugin, qtbot, tiny_config_file, tmp_path, monkeypatch):
    """A base config can carry training.trainable (the bundled config.json beside the weights
    does: its last recipe phase trained only the 8x stage); the user is told at the start."""
    widget = _dock(viewer_with_plugin)
    infos = []
    monkeypatch.setattr(TW, "show_info", infos.append)
    config = load_config(tiny_config_file)
    config.training.trainable = "transformer.stages.2"
    config.save(tmp_path / "partial.json")
    widget.source.value = TW.SOURCE_SIMULATION
    _setup(widget, tmp_path / "partial.json", tmp_path / "run", epochs=1, steps=2)
    widget.start()
    _wait(qtbot, widget)
    assert widget.history.status == "done"
    assert len(infos) == 1 and "training.trainable = 'transformer.stages.2'" in infos[0]
