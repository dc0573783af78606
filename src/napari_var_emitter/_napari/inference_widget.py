"""The "VAR emitter inference" dock widget: run a model over an Image layer.

Thin by design: it collects the user's choices, runs
:meth:`~napari_var_emitter.inference.Predictor.predict_iter` in a napari ``thread_worker``
(progress in napari's activity panel, Cancel effective after the current batch) and shows
the :class:`~napari_var_emitter.inference.PredictionResult` as layers built by
:func:`.layers.result_layer_data`. Maps stream into a temporary ``predictions.h5`` and are
shown lazily, so long stacks do not fill the memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label,
                              PushButton, SpinBox)
from napari.layers import Image, Layer
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QScrollArea, QVBoxLayout, QWidget

from ..camera import Camera
from ..errors import ConfigError, OutputError, VarEmitterError
from ..io.atomic import atomic_path
from ._workers import PredictorCache, failure_message, finetuned_models, prediction_job
from .camera_form import CameraForm
from .layers import InputGeometry, is_result_of, pixel_size_from_layer, result_layer_data

log = logging.getLogger(__name__)

MODEL_BUNDLED = "bundled model"
MODEL_CHECKPOINT = "checkpoint file"
MODEL_FINETUNED = "last fine-tuned model"

#: above this estimated size (GiB) of the temporary maps file the user is warned
MAPS_WARN_GIB = 4.0
#: disk per input pixel of the streamed maps (x2, x4, x8; float16, gzip), with some margin
MAP_BYTES_PER_INPUT_PIXEL = 250


class _Run:
    """One finished prediction: its result, its layers' names and its temporary files."""

    def __init__(self, input_name, result, run_dir, maps_h5, layer_names):
        self.input_name = input_name
        self.result = result
        self.run_dir = run_dir
        self.maps_h5 = maps_h5
        self.layer_names = layer_names

    def close(self):
        """Close the lazily read maps file and delete the temporary folder."""
        _close_maps(self.result)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _close_maps(result):
    """Close the HDF5 file behind lazily read maps (h5py datasets), if any."""
    for per_factor in (getattr(result, "maps", None) or {}).values():
        for arr in per_factor.values():
            file = getattr(arr, "file", None)
            if file is not None:
                try:
                    file.close()
                except Exception:  # noqa: BLE001 - closing an already closed file
                    pass
                return


def _scrolling(widget) -> QScrollArea:
    """``widget`` in a scroll area, so a tall form never forces the window's height."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setWidget(widget)
    # scroll vertically only: the dock is as wide as the form needs
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setMinimumWidth(widget.sizeHint().width()
                         + area.verticalScrollBar().sizeHint().width() + 4)
    return area


def _drive(job):
    """The worker's generator: hands the job's events through and returns its value."""
    return (yield from job)


class InferenceWidget(QWidget):
    """Dock widget that localises emitters in an Image layer with a VAR emitter model."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from ..inference import available_devices, default_batch_size, resolve_device

        self.viewer = napari_viewer
        self._predictors = PredictorCache()
        self._worker = None
        self._job = None
        self._pending = None  # (geometry, run_dir, maps_h5, outputs) of the running job
        self._runs: dict[str, _Run] = {}
        self.last_run: _Run | None = None
        self._finetuned_path = finetuned_models.latest
        self._tmp_root = tempfile.mkdtemp(prefix="var-emitter-napari-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmp_root, True)

        self.image = ComboBox(label="Image layer", choices=self._image_layers)
        self.model_source = ComboBox(label="Model", value=MODEL_BUNDLED,
                                     choices=[MODEL_BUNDLED, MODEL_CHECKPOINT, MODEL_FINETUNED])
        self.checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pth", visible=False)
        self.finetuned_label = Label(label="Fine-tuned", value=self._finetuned_text(),
                                     visible=False)
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.camera_form = CameraForm()
        self.pixel_size, self.baseline, self.e_per_adu, self.em_gain, self.qe = \
            self.camera_form.widgets
        self.model_threshold = CheckBox(text="model's calibrated threshold", value=True)
        # the guidance measured in BENCHMARKS.md (session 15), by what the status line shows
        self.threshold = FloatSpinBox(
            label="Threshold", min=0.01, max=1.0, step=0.05, value=0.5, enabled=False,
            tooltip="detection probability a localisation needs. Higher: fewer false "
                    "detections, more misses. 0.5 suits a wide PSF (the status line's PSF "
                    "sigma 1.5 px or more) or sparse emitters; keep the model's own on "
                    "crowded frames and filaments")
        self.threshold.native.setDecimals(3)  # calibrated thresholds come in steps of 0.025
        # 64 frames per pass on a CPU, 1024 on a GPU (the command line's defaults)
        self.batch_size = SpinBox(label="Batch size", min=1, max=4096,
                                  value=default_batch_size(resolve_device("auto")))
        self.tta = CheckBox(text="average 8 orientations (more accurate, 8x slower)",
                            value=False)
        self.border_fit = CheckBox(text="refit spots at the frame border", value=True,
                                   tooltip="a maximum-likelihood fit decides whether a spot "
                                           "cut by the frame border has its centre inside")
        self.pair_fit = CheckBox(text="split merged pairs (two-spot fit)", value=True,
                                 tooltip="a detection whose light two close emitters "
                                         "describe much better is reported as both")
        self.show_maps = CheckBox(text="probability maps", value=True)
        self.show_peaks = CheckBox(text="peaks (Points)", value=True)
        self.show_uncertainty = CheckBox(text="uncertainty maps", value=True)
        self.show_super_resolution = CheckBox(text="super-resolution image", value=True)
        self.render_px = FloatSpinBox(label="Render pixel (nm)", min=1.0, max=1000.0, step=1.0,
                                      value=10.0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.export_csv_button = PushButton(text="Export localisations (ThunderSTORM CSV)",
                                            enabled=False)
        self.export_hdf5_button = PushButton(text="Export localisations (Picasso HDF5)",
                                             enabled=False)
        self.export_maps_button = PushButton(text="Export predictions (HDF5)", enabled=False)

        self.form = Container(widgets=[
            self.image, self.model_source, self.checkpoint, self.finetuned_label, self.device,
            self.pixel_size, self.baseline, self.e_per_adu, self.em_gain, self.qe,
            self.model_threshold, self.threshold, self.batch_size, self.tta, self.border_fit,
            self.pair_fit, self.show_maps,
            self.show_peaks,
            self.show_uncertainty, self.show_super_resolution, self.render_px,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                      labels=False),
            self.status, self.export_csv_button, self.export_hdf5_button,
            self.export_maps_button])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(_scrolling(self.form.native))

        self.image.changed.connect(self._prefill_from_layer)
        self.model_source.changed.connect(self._on_model_source)
        self.device.changed.connect(
            lambda d: setattr(self.batch_size, "value", default_batch_size(resolve_device(d))))
        self.model_threshold.changed.connect(
            lambda on: setattr(self.threshold, "enabled", not on))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.export_csv_button.changed.connect(lambda: self._ask_and_export("csv"))
        self.export_hdf5_button.changed.connect(lambda: self._ask_and_export("hdf5"))
        self.export_maps_button.changed.connect(lambda: self._ask_and_export("h5"))
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._refresh_layers)
        finetuned_models.offered.connect(self._on_model_offered)
        finetuned_models.use_requested.connect(self.use_checkpoint)
        self._prefill_from_layer(self.image.value)

    # -- form ---------------------------------------------------------------------------
    def _image_layers(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and not is_result_of(layer)
                and not getattr(layer, "rgb", False)]

    def _refresh_layers(self, _event=None):
        self.image.reset_choices()

    def _prefill_from_layer(self, layer):
        """Pixel size and camera from the layer's metadata (or scale), where present."""
        if layer is None:
            return
        px = pixel_size_from_layer(layer)
        if px is not None:
            self.pixel_size.value = px
        self.camera_form.fill_camera(layer.metadata)

    def _on_model_source(self, value):
        self.checkpoint.visible = value == MODEL_CHECKPOINT
        self.finetuned_label.visible = value == MODEL_FINETUNED

    def _finetuned_text(self):
        return self._finetuned_path or "none yet: train one in 'VAR emitter training'"

    def _on_model_offered(self, path):
        try:
            self._finetuned_path = path
            self.finetuned_label.value = self._finetuned_text()
        except RuntimeError:  # the Qt side of this widget is gone
            finetuned_models.offered.disconnect(self._on_model_offered)

    def use_checkpoint(self, path):
        """Switch the model to a fine-tuned checkpoint (called by the training widget)."""
        try:
            self._finetuned_path = os.fspath(path)
            self.finetuned_label.value = self._finetuned_text()
            self.model_source.value = MODEL_FINETUNED
        except RuntimeError:
            finetuned_models.use_requested.disconnect(self.use_checkpoint)

    def _checkpoint_for_run(self):
        """Checkpoint path of the chosen model (None = the bundled model)."""
        source = self.model_source.value
        if source == MODEL_BUNDLED:
            return None
        if source == MODEL_FINETUNED:
            if not self._finetuned_path:
                raise ConfigError("no fine-tuned model yet: train one in the "
                                  "'VAR emitter training' widget first")
            return self._finetuned_path
        path = os.fspath(self.checkpoint.value)
        if not path or os.path.isdir(path):
            raise ConfigError("choose a checkpoint file (.pth) for the model")
        return path

    def camera(self) -> Camera:
        """The camera described by the form (raises ConfigError on bad values)."""
        return self.camera_form.camera()

    # -- running ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self, _=None):
        """Start a prediction on the chosen layer (no-op while one runs)."""
        if self.running:
            return None
        layer = self.image.value
        try:
            if layer is None:
                raise ConfigError("choose an Image layer to analyse")
            try:
                geometry = InputGeometry.from_layer(layer)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            geometry.pixel_size_nm = float(self.pixel_size.value)
            camera = self.camera()
            checkpoint = self._checkpoint_for_run()
        except VarEmitterError as e:
            show_error(str(e))
            return None
        outputs = {"maps": bool(self.show_maps.value), "peaks": bool(self.show_peaks.value),
                   "uncertainty": bool(self.show_uncertainty.value),
                   "super_resolution": bool(self.show_super_resolution.value)}
        want_maps = outputs["maps"] or outputs["uncertainty"]
        if want_maps:
            h, w = geometry.frame_shape
            # compressed maps at x2, x4 and x8 take ~120 bytes per input pixel (measured at
            # 1 emitter/um^2; NaN where no emitter compresses away), allow for denser data
            gib = geometry.n_frames * h * w * MAP_BYTES_PER_INPUT_PIXEL / 2**30
            if gib > MAPS_WARN_GIB:
                show_warning(f"the maps of {layer.name} need about {gib:.0f} GiB in the "
                             f"temporary folder {self._tmp_root}; untick 'probability maps' "
                             "and 'uncertainty maps' to get the localisations only")
        run_dir = tempfile.mkdtemp(prefix="run-", dir=self._tmp_root)
        maps_h5 = os.path.join(run_dir, "predictions.h5") if want_maps else None
        predict_kwargs = dict(camera=camera, pixel_size_nm=geometry.pixel_size_nm,
                              threshold=(None if self.model_threshold.value
                                         else float(self.threshold.value)),
                              batch_size=int(self.batch_size.value), maps=want_maps,
                              maps_h5=maps_h5, name=layer.name, tta=bool(self.tta.value),
                              border_fit=bool(self.border_fit.value),
                              pair_fit=bool(self.pair_fit.value))
        render = None
        if outputs["super_resolution"]:
            render = _SuperResolution(geometry.frame_shape, geometry.pixel_size_nm,
                                      float(self.render_px.value))
        device = self.device.value
        predictors = self._predictors
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        self._job = prediction_job(lambda: predictors.get(checkpoint, device), data,
                                   predict_kwargs, render)
        self._pending = (geometry, run_dir, maps_h5, outputs)
        # errors are shown by _on_errored (ignore_errors: not re-raised in the GUI thread)
        worker = thread_worker(_drive, progress={"total": geometry.n_frames,
                                                 "desc": f"VAR emitter: {layer.name}"},
                               ignore_errors=True)(self._job)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"running on {layer.name} ..."
        worker.start()
        return worker

    def cancel(self, _=None):
        """Stop the running prediction after its current batch; nothing is added."""
        if self._worker is not None:
            self.status.value = "cancelling ..."
            self.cancel_button.enabled = False
            self._worker.quit()

    def _on_progress(self, event):
        if self._pending is None:  # a late event of a finished run
            return
        done, total = int(getattr(event, "done", 0)), int(getattr(event, "total", 0))
        n_locs = getattr(event, "n_localizations", None)
        extra = f", {n_locs} localisations" if n_locs is not None else ""
        # the label first: updating napari's progress bar can process pending events,
        # among them this run's result, whose "done" must not be overwritten
        self.status.value = f"frame {done}/{total}{extra}"
        pbar = getattr(self._worker, "pbar", None)
        if pbar is not None and total > 0:
            # the worker counted one step per yield; show frames instead
            if pbar.total != total:
                pbar.total = total
            if done > pbar.n:
                pbar.update(done - pbar.n)

    def _on_returned(self, value):
        result, super_resolution = value
        geometry, run_dir, maps_h5, outputs = self._pending
        try:
            tuples = result_layer_data(result, geometry, show_maps=outputs["maps"],
                                       show_peaks=outputs["peaks"],
                                       show_uncertainty=outputs["uncertainty"],
                                       super_resolution=super_resolution)
            # every layer is made before any is added: a failure adds none
            new_layers = [Layer.create(data, kwargs, kind) for data, kwargs, kind in tuples]
        except Exception as e:  # noqa: BLE001 - shown to the user, widget stays usable
            log.exception("could not build the result layers")
            _close_maps(result)
            shutil.rmtree(run_dir, ignore_errors=True)
            show_error(f"could not show the results: {e}")
            return
        self._remove_results(geometry.name)
        for layer in new_layers:
            self.viewer.add_layer(layer)
        run = _Run(geometry.name, result, run_dir, maps_h5, [ly.name for ly in new_layers])
        self._runs[geometry.name] = run
        self.last_run = run
        n = len(result.localizations)
        psf = result.psf_summary()
        self.status.value = (f"done: {n} localisations in {geometry.n_frames} frame(s), "
                             f"{psf + ', ' if psf else ''}threshold {result.threshold:.3g}")
        if self.model_threshold.value:  # show the calibrated threshold that was used
            self.threshold.value = result.threshold
        self.export_csv_button.enabled = True
        self.export_hdf5_button.enabled = True
        self.export_maps_button.enabled = maps_h5 is not None

    def _remove_results(self, input_name):
        """Remove the result layers of a previous run on the same input and its files."""
        for layer in [ly for ly in self.viewer.layers if is_result_of(ly, input_name)]:
            self.viewer.layers.remove(layer)
        old = self._runs.pop(input_name, None)
        if old is not None:
            if self.last_run is old:
                self.last_run = None
            old.close()

    def _on_errored(self, exc):
        if isinstance(exc, VarEmitterError):
            show_error(str(exc))
        else:
            log.error("inference failed", exc_info=exc)
            show_error(failure_message("inference", exc))
        self.status.value = "failed"
        self._discard_pending()

    def _on_aborted(self):
        # the job is suspended at a yield; closing it lets the predictor delete its
        # partial predictions.h5
        if self._job is not None:
            try:
                self._job.close()
            except ValueError:  # still executing: it is closed when collected
                pass
        self.status.value = "cancelled"
        self._discard_pending()

    def _discard_pending(self):
        if self._pending is not None:
            shutil.rmtree(self._pending[1], ignore_errors=True)

    def _on_finished(self):
        self._worker = None
        self._job = None
        self._pending = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    # -- export ---------------------------------------------------------------------------
    def _ask_and_export(self, kind):
        if self.last_run is None:
            show_error("run the model first")
            return
        filters = {"csv": "ThunderSTORM CSV (*.csv)", "hdf5": "Picasso HDF5 (*.hdf5)",
                   "h5": "Predictions HDF5 (*.h5)"}
        default = {"csv": "localizations.csv", "hdf5": "localizations.hdf5",
                   "h5": "predictions.h5"}[kind]
        path, _ = QFileDialog.getSaveFileName(self, "Export", default, filters[kind])
        if not path:
            return
        try:
            written = self.export(path, kind)
        except VarEmitterError as e:
            show_error(str(e))
            return
        show_info(f"saved {', '.join(written)}")

    def export(self, path, kind: str) -> list[str]:
        """Export the last run: ``kind`` "csv" (ThunderSTORM), "hdf5" (Picasso + yaml) or
        "h5" (a copy of predictions.h5). Returns the written paths."""
        from ..io.emitters import write_picasso_hdf5, write_thunderstorm_csv
        from ..outputs import picasso_settings

        run = self.last_run
        if run is None:
            raise ConfigError("run the model first")
        path = os.fspath(path)
        result = run.result
        t, h, w = result.shape
        if kind == "csv":
            write_thunderstorm_csv(path, result.localizations, result.pixel_size_nm)
            return [path]
        if kind == "hdf5":
            write_picasso_hdf5(path, result.localizations, result.pixel_size_nm, width=w,
                               height=h, n_frames=t, extra_info=picasso_settings(result))
            return [path, os.path.splitext(path)[0] + ".yaml"]
        if kind == "h5":
            if run.maps_h5 is None or not os.path.exists(run.maps_h5):
                raise ConfigError("this run computed no maps (tick 'probability maps' or "
                                  "'uncertainty maps' and run again)")
            with atomic_path(path) as tmp:
                try:
                    shutil.copyfile(run.maps_h5, tmp)
                except OSError as e:
                    raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
            return [path]
        raise ValueError(f"unknown export kind {kind!r}")

    # -- teardown -------------------------------------------------------------------------
    def shutdown(self):
        """Stop a running job and delete the temporary files (the widget is closing)."""
        if self._worker is not None:
            self._worker.quit()
        for run in list(self._runs.values()):
            run.close()
        self._runs.clear()
        self.last_run = None
        self._finalizer()

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)


class _SuperResolution:
    """Renders the super-resolution image in the worker thread after the last batch."""

    def __init__(self, frame_shape, pixel_size_nm, render_px_nm):
        self.frame_shape = frame_shape
        self.pixel_size_nm = pixel_size_nm
        self.render_px_nm = render_px_nm

    def __call__(self, result):
        from ..inference import render_super_resolution

        return render_super_resolution(result.localizations, self.frame_shape,
                                       self.pixel_size_nm, render_px_nm=self.render_px_nm)
