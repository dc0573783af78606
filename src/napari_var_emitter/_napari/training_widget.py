"""The "VAR emitter training" dock widget: fine-tune (or train) a model from napari.

Thin by design: the form becomes a :class:`~napari_var_emitter.config.Config` and a
:class:`~napari_var_emitter.dataset.TrainingData`; :class:`~napari_var_emitter.training.Trainer`
runs in a napari ``thread_worker`` and its events feed the live loss curves and validation
metrics. Cancel asks the trainer to stop after the current step (it keeps a resumable
``last_model.pth``); Resume continues from it; "Use in inference widget" hands the best
checkpoint to the inference widgets through :data:`._workers.finetuned_models`.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label,
                              PushButton, SpinBox)
from napari.layers import Image, Points
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QProgressBar, QVBoxLayout, QWidget

from ..calibration import describe_calibration
from ..camera import Camera
from ..config import FINE_TUNING
from ..errors import ConfigError, VarEmitterError
from ._workers import (TrainingControl, TrainingHistory, build_training_config,
                       failure_message, finetuned_models, simulation_for_camera, training_job)
from .camera_form import CameraForm
from .inference_widget import _scrolling
from .layers import (highres_factor_of, input_grid_of_highres, is_result_of, pixel_size_from_layer,
                     points_in_grid, table_from_points)

log = logging.getLogger(__name__)

SOURCE_FOLDERS = "TIFF + emitter folders"
SOURCE_LAYERS = "open layers (image + points)"
SOURCE_SIMULATION = "simulation (my camera and PSF)"
SOURCE_UNLABELED = "unlabeled image layer"
SOURCES = [SOURCE_FOLDERS, SOURCE_LAYERS, SOURCE_SIMULATION, SOURCE_UNLABELED]

INIT_BUNDLED = "bundled model"
INIT_SCRATCH = "scratch"

#: the canvas is redrawn at most this often (seconds) while steps stream in
REDRAW_INTERVAL_S = 0.3


def _range_row(label, lo, hi, vmin, vmax, step):
    a = FloatSpinBox(min=vmin, max=vmax, step=step, value=lo)
    b = FloatSpinBox(min=vmin, max=vmax, step=step, value=hi)
    return Container(widgets=[a, b], layout="horizontal", labels=False, label=label), a, b


def _path_or_none(value) -> str | None:
    """A FileEdit's value as a path, None when nothing was chosen."""
    p = os.fspath(value) if value is not None else ""
    return None if p in ("", ".") else p


class TrainingWidget(QWidget):
    """Dock widget that fine-tunes a VAR emitter model with live loss curves."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from ..inference import available_devices

        self.viewer = napari_viewer
        self.history = TrainingHistory()
        self._worker = None
        self._control = None
        self._last_draw = 0.0
        self._calibration_note = ""
        self.best_checkpoint: str | None = None
        self.last_checkpoint: str | None = None

        # data source
        self.source = ComboBox(label="Data", choices=SOURCES, value=SOURCE_SIMULATION)
        self.tiff_dir = FileEdit(label="TIFF folder", mode="d")
        self.emitter_dir = FileEdit(label="Emitter folder", mode="d")
        self.tiff_kind = ComboBox(label="TIFF kind", choices=["auto", "highres", "camera"],
                                  value="auto")
        self.image_layer = ComboBox(label="Image layer", choices=self._image_layers)
        self.points_layer = ComboBox(label="Emitters layer", choices=self._points_layers)
        self.sigma_row, self.sigma_lo, self.sigma_hi = _range_row(
            "PSF sigma (px)", 1.0, 1.5, 0.3, 10.0, 0.05)
        self.photons_row, self.photons_lo, self.photons_hi = _range_row(
            "Photons", 500.0, 5000.0, 1.0, 1e6, 100.0)
        self.background_row, self.background_lo, self.background_hi = _range_row(
            "Background (ph/px)", 10.0, 50.0, 0.0, 1e5, 1.0)
        self.density_row, self.density_lo, self.density_hi = _range_row(
            "Density (/um^2)", 0.1, 3.0, 0.0, 50.0, 0.1)
        # camera (simulation, and ADU -> photons of layers and camera TIFFs)
        self.camera_form = CameraForm(read_noise=True)
        (self.pixel_size, self.baseline, self.e_per_adu, self.em_gain, self.qe,
         self.read_noise) = self.camera_form.widgets
        # optimisation
        self.init = ComboBox(label="Start from", choices=[INIT_BUNDLED, INIT_SCRATCH],
                             value=INIT_BUNDLED)
        self.epochs = SpinBox(label="Epochs", min=1, max=100_000,
                              value=FINE_TUNING["num_epochs"])
        self.learning_rate = FloatSpinBox(label="Learning rate", min=1e-6, max=1.0, step=1e-5,
                                          value=FINE_TUNING["learning_rate"])
        self.batch_size = SpinBox(label="Batch size", min=1, max=4096,
                                  value=FINE_TUNING["batch_size"])
        self.steps_per_epoch = SpinBox(label="Steps per epoch", min=1, max=1_000_000,
                                       value=FINE_TUNING["steps_per_epoch"])
        self.output_dir = FileEdit(label="Output folder", mode="d",
                                   value=os.path.join(os.path.expanduser("~"), "var-emitter",
                                                      "fine-tuned"))
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.config_file = FileEdit(label="Base config (optional)", mode="r",
                                    filter="*.json")
        self.calibrate = CheckBox(text="calibrate when done", value=True)
        self.calibrate.tooltip = (
            "measure the trained model's detection threshold and uncertainty calibration on "
            "simulated movies across the operating range (about half a minute on a CPU) and "
            "store them in best_model.pth; otherwise it predicts at threshold 0.5 with raw "
            "uncertainties")
        self.start_button = PushButton(text="Start")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.resume_button = PushButton(text="Resume", enabled=False)
        self.use_button = PushButton(text="Use in inference widget", enabled=False)
        self.status = Label(value="")

        self._by_source = {
            SOURCE_FOLDERS: [self.tiff_dir, self.emitter_dir, self.tiff_kind],
            SOURCE_LAYERS: [self.image_layer, self.points_layer],
            SOURCE_SIMULATION: [self.sigma_row, self.photons_row, self.background_row,
                                self.density_row],
            SOURCE_UNLABELED: [self.image_layer],
        }
        self.form = Container(widgets=[
            self.source, self.tiff_dir, self.emitter_dir, self.tiff_kind, self.image_layer,
            self.points_layer, self.sigma_row, self.photons_row, self.background_row,
            self.density_row, self.pixel_size, self.baseline, self.e_per_adu, self.em_gain,
            self.qe, self.read_noise, self.init, self.epochs, self.learning_rate,
            self.batch_size, self.steps_per_epoch, self.output_dir, self.device,
            self.config_file, self.calibrate,
            Container(widgets=[self.start_button, self.cancel_button, self.resume_button],
                      layout="horizontal", labels=False),
            self.use_button, self.status])
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 4), tight_layout=True)
        self.ax_loss, self.ax_metrics = self.figure.subplots(2, 1)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setFixedHeight(300)
        self._setup_axes()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(_scrolling(self.form.native), stretch=1)
        layout.addWidget(self.progress)
        layout.addWidget(self.canvas)

        self.source.changed.connect(self._on_source)
        self.image_layer.changed.connect(self._prefill_from_layer)
        self.output_dir.changed.connect(self._update_resume)
        self.start_button.changed.connect(lambda: self.start())
        self.resume_button.changed.connect(lambda: self.start(resume=True))
        self.cancel_button.changed.connect(self.cancel)
        self.use_button.changed.connect(self.use_in_inference)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._refresh_layers)
        self._on_source(self.source.value)
        self._update_resume()

    # -- form ---------------------------------------------------------------------------
    def _image_layers(self, _widget=None):
        return [(ly.name, ly) for ly in self.viewer.layers
                if isinstance(ly, Image) and not is_result_of(ly) and not ly.rgb]

    def _points_layers(self, _widget=None):
        return [(ly.name, ly) for ly in self.viewer.layers
                if isinstance(ly, Points) and not is_result_of(ly)]

    def _refresh_layers(self, _event=None):
        self.image_layer.reset_choices()
        self.points_layer.reset_choices()

    def _on_source(self, value):
        shown = set(map(id, self._by_source.get(value, [])))
        for widgets in self._by_source.values():
            for w in widgets:
                w.visible = id(w) in shown

    def _prefill_from_layer(self, layer):
        if layer is None:
            return
        meta = layer.metadata or {}
        px = meta.get("camera_pixel_size_nm") or pixel_size_from_layer(layer)
        if px and highres_factor_of(layer) > 1 and "camera_pixel_size_nm" not in meta:
            px = px * highres_factor_of(layer)
        if px:
            self.pixel_size.value = float(px)
        self.camera_form.fill_camera(meta)

    def _update_resume(self, _=None):
        out = _path_or_none(self.output_dir.value)
        can = (out is not None and os.path.isfile(os.path.join(out, "last_model.pth"))
               and self._worker is None)
        self.resume_button.enabled = can

    def camera(self) -> Camera:
        """The camera described by the form (raises ConfigError on bad values)."""
        return self.camera_form.camera()

    # -- the plan of a run (GUI thread): everything read from the form and layers --------
    def _plan(self, resume: bool) -> dict:
        """Collect the form into plain values (raises VarEmitterError on bad input)."""
        source = self.source.value
        out = _path_or_none(self.output_dir.value)
        if out is None:
            raise ConfigError("choose an output folder for the checkpoints")
        plan = {"source": source, "output_dir": out, "device": self.device.value,
                "camera": self.camera(), "pixel_size_nm": float(self.pixel_size.value),
                "config_file": _path_or_none(self.config_file.value),
                "init": None, "resume": None,
                "training": {"num_epochs": int(self.epochs.value),
                             "learning_rate": float(self.learning_rate.value),
                             "batch_size": int(self.batch_size.value),
                             "steps_per_epoch": int(self.steps_per_epoch.value),
                             "calibrate": bool(self.calibrate.value)}}
        if resume:
            plan["resume"] = os.path.join(out, "last_model.pth")
            if not os.path.isfile(plan["resume"]):
                raise ConfigError(f"{plan['resume']}: nothing to resume (no last_model.pth)")
        elif self.init.value == INIT_BUNDLED:
            from ..inference import bundled_checkpoint_path

            plan["init"] = bundled_checkpoint_path()
        if source == SOURCE_FOLDERS:
            tiff_dir = _path_or_none(self.tiff_dir.value)
            emitter_dir = _path_or_none(self.emitter_dir.value)
            if tiff_dir is None or emitter_dir is None:
                raise ConfigError("choose the TIFF folder and the emitter folder")
            plan.update(tiff_dir=tiff_dir, emitter_dir=emitter_dir,
                        tiff_kind=self.tiff_kind.value)
        elif source in (SOURCE_LAYERS, SOURCE_UNLABELED):
            image = self.image_layer.value
            if image is None:
                raise ConfigError("choose an Image layer with the training frames")
            frames = image.data[0] if image.multiscale else image.data
            if frames.ndim not in (2, 3):
                raise ConfigError(f"layer {image.name!r} has {frames.ndim} dimensions; "
                                  "expected (T, Y, X) or (Y, X)")
            factor = highres_factor_of(image)
            plan.update(frames=frames, image_name=image.name, highres_factor=factor)
            if source == SOURCE_UNLABELED and factor > 1:
                raise ConfigError(f"layer {image.name!r} is a high-resolution photon image; "
                                  "unlabeled adaptation needs camera frames")
            if source == SOURCE_LAYERS:
                points = self.points_layer.value
                if points is None:
                    raise ConfigError("choose a Points layer with the ground-truth emitters")
                grid_scale, grid_translate = tuple(image.scale), tuple(image.translate)
                if factor > 1:
                    grid_scale, grid_translate = input_grid_of_highres(grid_scale,
                                                                       grid_translate, factor)
                # emitters in the camera pixels of the image (column 0 = frame for stacks)
                pts = points_in_grid(points.data, points.scale, points.translate, grid_scale,
                                     grid_translate)
                plan["table"] = table_from_points(pts, points.features)
        else:
            plan["simulation"] = simulation_for_camera(
                plan["camera"], plan["pixel_size_nm"],
                (self.sigma_lo.value, self.sigma_hi.value),
                (self.photons_lo.value, self.photons_hi.value),
                (self.background_lo.value, self.background_hi.value),
                (self.density_lo.value, self.density_hi.value))
        return plan

    # -- running ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, resume: bool = False):
        """Start (or, with ``resume``, continue) training; returns the worker or None."""
        if self.running:
            return None
        try:
            plan = self._plan(resume)
        except VarEmitterError as e:
            show_error(str(e))
            return None
        self.history = TrainingHistory()
        self._calibration_note = ""
        self._setup_axes()
        self.canvas.draw_idle()
        self._control = TrainingControl()
        # errors are shown by _on_errored (ignore_errors: not re-raised in the GUI thread)
        worker = thread_worker(training_job, ignore_errors=True)(_TrainerFactory(plan),
                                                                 self._control)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.start_button.enabled = False
        self.resume_button.enabled = False
        self.use_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.setRange(0, 0)  # busy until the first step arrives
        self.status.value = "preparing data ..."
        worker.start()
        return worker

    def cancel(self, _=None):
        """Stop after the current step; the trainer writes a resumable last_model.pth."""
        if self._control is not None:
            self._control.cancel()
            self.cancel_button.enabled = False
            self.status.value = "cancelling after this step ..."

    def _on_event(self, event):
        if not self.history.steps and event.kind == "step":  # the run's first event
            trainer = self._control.trainer if self._control is not None else None
            if trainer is not None and trainer.partial_training_note:
                show_info(trainer.partial_training_note)
        self.history.add(event)
        if event.total_steps:
            self.progress.setRange(0, int(event.total_steps))
            self.progress.setValue(int(event.step))
        if event.kind == "step":
            loss = event.losses.get("loss", float("nan"))
            self.status.value = (f"epoch {event.epoch + 1}, step {event.step}/"
                                 f"{event.total_steps}, loss {loss:.4g}")
        elif event.kind == "epoch":
            shown = ", ".join(f"{k} {event.metrics[k]:.3g}" for k in
                              ("loss", "jaccard", "rmse_nm") if k in event.metrics)
            self.status.value = f"epoch {event.epoch} validated: {shown}"
        elif event.kind == "cancelled":
            self.status.value = (f"cancelled at step {event.step}; Resume continues from "
                                 "last_model.pth")
        elif event.kind == "calibrating":
            self.status.value = (f"calibrating on simulated movies: "
                                 f"{event.metrics['scene']}/{event.metrics['scenes']}")
        elif event.kind == "calibrated":
            self._calibration_note = describe_calibration(event.metrics)
        elif event.kind == "calibration_cancelled":
            self._calibration_note = "not calibrated (cancelled; var-emitter calibrate)"
        elif event.kind == "done":
            self.status.value = "; ".join(filter(None, (f"done: {event.step} steps",
                                                         self._calibration_note)))
        now = time.monotonic()
        if event.kind != "step" or now - self._last_draw > REDRAW_INTERVAL_S:
            self._last_draw = now
            self.redraw()

    def _on_returned(self, trainer):
        self.best_checkpoint = trainer.best_checkpoint
        self.last_checkpoint = trainer.last_checkpoint
        self.redraw()
        if self.history.status == "done":
            best = trainer.handed_over_checkpoint
            if os.path.isfile(best):
                self.best_checkpoint = best
                finetuned_models.offer(best)
                self.use_button.enabled = True

    def _on_errored(self, exc):
        if isinstance(exc, VarEmitterError):
            show_error(str(exc))
        else:
            log.error("training failed", exc_info=exc)
            show_error(failure_message("training", exc))
        self.status.value = "failed"

    def _on_finished(self):
        self._worker = None
        self._control = None
        self.start_button.enabled = True
        self.cancel_button.enabled = False
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        self._update_resume()

    def use_in_inference(self, _=None):
        """Make the inference widget(s) use the best checkpoint of the finished run."""
        if not self.best_checkpoint or not os.path.isfile(self.best_checkpoint):
            show_error("no finished training run with a checkpoint yet")
            return
        finetuned_models.use(self.best_checkpoint)
        show_info(f"inference widget now uses {self.best_checkpoint}")

    # -- plot ---------------------------------------------------------------------------
    def _setup_axes(self):
        for ax in (self.ax_loss, self.ax_metrics):
            ax.clear()
        self.ax_loss.set_xlabel("step")
        self.ax_loss.set_ylabel("loss")
        self.train_line, = self.ax_loss.plot([], [], lw=1, label="training")
        self.val_line, = self.ax_loss.plot([], [], "o-", ms=3, label="validation")
        self.ax_loss.legend(loc="upper right", fontsize="small")
        self.ax_metrics.set_xlabel("epoch")
        self.ax_metrics.set_ylabel("validation")
        self.ax_metrics.set_ylim(0, 1.05)
        self.metric_lines = {}
        for name in ("jaccard", "recall", "precision"):
            self.metric_lines[name], = self.ax_metrics.plot([], [], "o-", ms=3, label=name)
        self.ax_metrics.legend(loc="lower right", fontsize="small")

    def redraw(self):
        """Update the curves from :attr:`history` and redraw the canvas."""
        steps, values = self.history.main_loss()
        self.train_line.set_data(steps, values)
        val = self.history.metrics.get("loss", [])
        self.val_line.set_data(self.history.epoch_steps[:len(val)], val)
        for name, line in self.metric_lines.items():
            series = self.history.metrics.get(name, [])
            line.set_data(self.history.epochs[:len(series)], series)
        self.ax_loss.relim()
        self.ax_loss.autoscale_view()
        finite = [v for v in list(values) + list(val) if np.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
            self.ax_loss.set_yscale("log")
        self.ax_metrics.relim()
        self.ax_metrics.autoscale_view(scaley=False)
        self.canvas.draw_idle()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.cancel()
        super().closeEvent(event)


class _TrainerFactory:
    """Builds the Config, TrainingData and Trainer of a plan (runs in the worker thread:
    reading folders and checkpoints can take a while)."""

    def __init__(self, plan: dict):
        self.plan = plan

    def base_config(self):
        from ..config import Config, load_config

        plan = self.plan
        if plan["config_file"]:
            return load_config(plan["config_file"])
        if plan["resume"] or plan["init"]:
            from ..checkpoint import load_checkpoint

            if plan["resume"]:  # the run's own configuration
                return load_checkpoint(plan["resume"])["config_obj"]
            # a fine-tune needs the checkpoint's own architecture, not its last recipe phase
            return load_checkpoint(plan["init"])["config_obj"].for_fine_tuning()
        return Config()

    def config(self):
        plan = self.plan
        base = self.base_config()
        data = None
        training = dict(plan["training"])
        if plan["source"] == SOURCE_UNLABELED:
            training["mode"] = "reconstruction"
        else:
            training["mode"] = "supervised"
        cam = plan["camera"]
        if plan["source"] in (SOURCE_FOLDERS, SOURCE_LAYERS):
            data = {"pixel_size_nm": plan["pixel_size_nm"], "baseline": cam.baseline,
                    "e_per_adu": cam.e_per_adu, "em_gain": cam.em_gain, "qe": cam.qe,
                    "read_noise": cam.read_noise}
            if plan["source"] == SOURCE_FOLDERS:
                data["tiff_kind"] = plan["tiff_kind"]
            elif plan.get("highres_factor", 1) > 1:
                data.update(tiff_kind="highres", highres_factor=int(plan["highres_factor"]))
        return build_training_config(base, training=training,
                                     simulation=plan.get("simulation"), data=data)

    def data(self, config):
        from ..dataset import TrainingData

        plan = self.plan
        source = plan["source"]
        if source == SOURCE_FOLDERS:
            return TrainingData.from_folders(plan["tiff_dir"], plan["emitter_dir"], config)
        if source == SOURCE_SIMULATION:
            return TrainingData.simulated(config)
        frames = np.asarray(plan["frames"])
        if source == SOURCE_UNLABELED:
            return TrainingData.unlabeled(frames, config, camera=plan["camera"],
                                          name=plan["image_name"])
        if plan.get("highres_factor", 1) > 1:
            return self._highres_pair(frames, plan["table"], config)
        return TrainingData.from_arrays(frames, plan["table"], config, camera=plan["camera"],
                                        name=plan["image_name"])

    def _highres_pair(self, frames, table, config):
        """A high-resolution photon image and its emitters go through the same path as a
        training file pair (binning, camera-noise augmentation): written to the output
        folder as ``layer_data/train_tiff`` + ``train_emitters`` and read back."""
        from ..dataset import TrainingData
        from ..io.emitters import write_emitter_h5
        from ..io.tiff import write_tiff

        root = os.path.join(self.plan["output_dir"], "layer_data")
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.plan["image_name"])
        tiff_dir = os.path.join(root, "train_tiff")
        emitter_dir = os.path.join(root, "train_emitters")
        for d in (tiff_dir, emitter_dir):
            os.makedirs(d, exist_ok=True)
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
        f = int(self.plan["highres_factor"])
        px = float(self.plan["pixel_size_nm"])
        write_tiff(os.path.join(tiff_dir, stem + ".tif"), np.asarray(frames, np.float32),
                   pixel_size_nm=px / f)
        write_emitter_h5(os.path.join(emitter_dir, stem + ".h5"), table, px)
        return TrainingData.from_folders(tiff_dir, emitter_dir, config)

    def __call__(self):
        from ..training import Trainer

        plan = self.plan
        config = self.config()
        data = self.data(config)
        return Trainer(config, data, plan["output_dir"], device=plan["device"],
                       init=None if plan["resume"] else plan["init"], resume=plan["resume"])
