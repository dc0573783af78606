"""Background jobs of the widgets and the state both widgets share.

The generators here run inside napari ``thread_worker`` threads: each ``yield`` hands a
progress event to the GUI thread and is also where a Cancel (``worker.quit()``) takes
effect, so the core generators (``Predictor.predict_iter``, ``Trainer.events``) are passed
through unchanged. No Qt here: the widgets wrap these generators.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

from psygnal import Signal

from ..inference import run_to_end  # noqa: F401 (re-exported for the widgets and tests)


class FinetunedModels:
    """Registry of fine-tuned checkpoints shared by the training and inference widgets.

    The training widget calls :meth:`offer` when a run ends with a new best checkpoint and
    :meth:`use` when the user presses "Use in inference widget"; inference widgets listen
    to :attr:`offered` / :attr:`use_requested`.
    """

    offered = Signal(str)
    use_requested = Signal(str)

    def __init__(self):
        self.latest: str | None = None

    def offer(self, path) -> None:
        """Record ``path`` as the last fine-tuned model."""
        self.latest = os.fspath(path)
        self.offered.emit(self.latest)

    def use(self, path=None) -> None:
        """Ask inference widgets to switch to ``path`` (default: the last fine-tuned model)."""
        if path is not None:
            self.offer(path)
        if self.latest is None:
            raise ValueError("no fine-tuned model yet")
        self.use_requested.emit(self.latest)


#: the registry both widgets see (one per Python process, like the viewer's plugins)
finetuned_models = FinetunedModels()


class PredictorCache:
    """Keeps the last loaded predictor so repeated runs skip loading the checkpoint.

    The key includes the checkpoint's modification time, so a checkpoint rewritten by a
    training run is loaded afresh.
    """

    def __init__(self):
        self._key = None
        self._predictor = None
        self._lock = threading.Lock()

    @staticmethod
    def key(checkpoint: str | None, device: str):
        if checkpoint is None:
            return (None, None, device)
        path = os.path.abspath(os.fspath(checkpoint))
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        return (path, mtime, device)

    def get(self, checkpoint: str | None, device: str):
        """The predictor of ``checkpoint`` (None: the bundled model) on ``device``."""
        from .. import inference

        key = self.key(checkpoint, device)
        with self._lock:
            if key != self._key or self._predictor is None:
                if checkpoint is None:
                    predictor = inference.Predictor.from_pretrained(device=device)
                else:
                    predictor = inference.Predictor.from_checkpoint(checkpoint, device=device)
                self._key, self._predictor = key, predictor
            return self._predictor


class WorkerError(Exception):
    """A ``RuntimeError`` from a widget's job (torch raises them: out of memory, shapes),
    carried out of the worker as another type (the original is ``__cause__``).

    superqt takes a ``RuntimeError`` leaving a worker for a sign that the worker itself was
    deleted, and then emits neither ``errored`` nor ``finished``: the widget would show the
    job running for ever, with no error."""


def reports_runtime_errors(job):
    """Decorator for the job generators: a ``RuntimeError`` inside is re-raised as
    :class:`WorkerError`, so the worker reports it."""
    @functools.wraps(job)
    def wrapped(*args, **kwargs):
        try:
            return (yield from job(*args, **kwargs))
        except RuntimeError as e:
            raise WorkerError(f"{type(e).__name__}: {e}") from e
    return wrapped


def failure_message(what: str, exc: BaseException) -> str:
    """The line a widget shows for an unexpected error of its job (``what``: "training",
    "inference"), naming the original exception."""
    if isinstance(exc, WorkerError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{what} failed: {type(exc).__name__}: {exc}"


@reports_runtime_errors
def prediction_job(load_predictor, stack, predict_kwargs: dict, render=None):
    """Generator for the inference worker.

    Loads the predictor (``load_predictor()``), yields the predictor's progress events and
    returns ``(result, super_resolution_image_or_None)``. ``render(result)`` optionally
    renders the super-resolution image in this thread, after the last batch.
    """
    predictor = load_predictor()
    result = yield from predictor.predict_iter(stack, **predict_kwargs)
    image = render(result) if render is not None else None
    return result, image


@dataclass
class TrainingControl:
    """Shared between the GUI thread and the training thread: the running trainer and a
    cancel request made before the trainer existed."""

    trainer: object = None
    cancel_requested: bool = False

    def cancel(self) -> None:
        """Ask the trainer to stop (it writes a resumable checkpoint first)."""
        self.cancel_requested = True
        if self.trainer is not None:
            self.trainer.cancel()


@reports_runtime_errors
def training_job(make_trainer, control: TrainingControl):
    """Generator for the training worker: builds the trainer (data loading happens here,
    off the GUI thread), then yields each of its events and returns the trainer."""
    trainer = make_trainer()
    control.trainer = trainer
    if control.cancel_requested:
        trainer.cancel()
    try:
        yield from trainer.events()
    finally:
        trainer.close()
    return trainer


@dataclass
class TrainingHistory:
    """Loss curves and validation metrics accumulated from training events."""

    steps: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)  # name -> list aligned with steps
    epochs: list = field(default_factory=list)
    epoch_steps: list = field(default_factory=list)  # training step at each epoch's end
    metrics: dict = field(default_factory=dict)  # name -> list aligned with epochs
    last_step: int = 0
    total_steps: int = 0
    status: str = ""

    def add(self, event) -> None:
        """Record one ``TrainEvent``."""
        self.total_steps = int(getattr(event, "total_steps", 0) or self.total_steps)
        self.status = getattr(event, "kind", "")
        if event.kind == "step":
            self.last_step = int(event.step)
            self.steps.append(int(event.step))
            n = len(self.steps)
            for name, value in (event.losses or {}).items():
                series = self.losses.setdefault(name, [])
                # a term that appears late (progressive scales) is padded with NaN so every
                # series stays aligned with ``steps``
                series.extend([float("nan")] * (n - 1 - len(series)))
                series.append(float(value))
        elif event.kind == "epoch":
            self.epochs.append(int(event.epoch))
            self.epoch_steps.append(int(event.step))
            n = len(self.epochs)
            for name, value in (event.metrics or {}).items():
                series = self.metrics.setdefault(name, [])
                series.extend([float("nan")] * (n - 1 - len(series)))
                series.append(float(value))

    def main_loss(self) -> tuple[list, list]:
        """``(steps, values)`` of the total training loss (the ``loss`` or ``total`` term
        when present, else the first one logged)."""
        if not self.losses:
            return [], []
        name = next((k for k in ("loss", "total") if k in self.losses), next(iter(self.losses)))
        values = self.losses[name]
        return self.steps[:len(values)], values


def build_training_config(base, training=None, simulation=None, data=None):
    """A validated :class:`~napari_var_emitter.config.Config`: ``base`` with the given
    section values replaced (the widget's fields); bad values raise ``ConfigError``."""
    from ..config import Config

    d = base.to_dict()
    for section, values in (("training", training), ("simulation", simulation),
                            ("data", data)):
        if values:
            d[section] = {**d[section], **values}
    return Config.from_dict(d)


def simulation_for_camera(camera, pixel_size_nm, sigma_px, photons, background, density):
    """``simulation`` section values that simulate the user's own camera and PSF.

    The camera's parameters become one-point ranges, EM gain on (``emccd_fraction`` 1) only
    for an EMCCD; PSF width, photons, background and density are the user's ranges.
    """
    emccd = camera.em_gain > 1
    values = {
        "pixel_size_nm": float(pixel_size_nm),
        "sigma_px": [float(v) for v in sigma_px],
        "photons": [float(v) for v in photons],
        "background": [float(v) for v in background],
        "density_per_um2": [float(v) for v in density],
        "emccd_fraction": 1.0 if emccd else 0.0,
        "e_per_adu": [float(camera.e_per_adu)] * 2,
        "baseline": [float(camera.baseline)] * 2,
        "read_noise": [float(camera.read_noise)] * 2,
        "qe": [float(camera.qe)] * 2,
    }
    if emccd:
        values["em_gain"] = [float(camera.em_gain)] * 2
    return values
