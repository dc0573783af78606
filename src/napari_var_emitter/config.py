"""One validated configuration shared by the command line, training, inference and GUI.

``config.json`` has the sections of the original design (``model``, ``training``, ``loss``)
plus ``simulation`` (on-the-fly training data) and ``data`` (how training files are read).
Every key has a default, unknown keys and wrong types are errors (``ConfigError``), and
:func:`load_config` / :meth:`Config.save` round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of :class:`~napari_var_emitter.model.VarEmitterNet` (design keys first)."""

    input_size: list = field(default_factory=lambda: [40, 40])
    target_sizes: list = field(default_factory=lambda: [[80, 80], [160, 160], [320, 320]])
    base_channels: int = 32
    embed_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    patch_size: int = 4  # input pixels per transformer token (40x40 tile -> 10x10 tokens)
    codebook_size: int = 256
    code_dim: int = 32  # length of the VQ code vectors (tokens are projected to it)
    vq_scales: list = field(default_factory=lambda: [1, 2, 5, 10])  # token-map sides, VAR residual
    use_quantization: bool = True
    loc_factor: int = 2  # upsampling factor whose maps localisations are decoded from
    context_frames: int = 1  # consecutive frames seen by the encoder (odd)
    # residual conv blocks at native resolution before the scale heads (sub-pixel precision);
    # zero-initialised, so a trained model can be grown by --init into one with more blocks
    refine_blocks: int = 0
    # feed the encoder a constant channel of ones, zero-padded by its convolutions like the
    # image: after normalisation the image's own zero padding looks like background, so
    # without it the first layers cannot tell "no light beyond this pixel" from "the frame
    # ends here" (the cue that decides whether a spot cut by the border has its centre
    # inside); its weights start at zero, so --init can grow a trained model by it. It marks
    # the tile's edge: inner tile cuts of a large frame count as edges too (each tile keeps
    # only detections away from them). Off in the bundled model (session 8 measured no gain)
    frame_mask: bool = False

    def validate(self):
        _positive_pair(self.input_size, "model.input_size")
        if not self.target_sizes:
            raise ConfigError("model.target_sizes must list at least one size")
        prev = 1
        for ts in self.target_sizes:
            _positive_pair(ts, "model.target_sizes")
            fy, fx = ts[0] / self.input_size[0], ts[1] / self.input_size[1]
            if fy != fx or fy != int(fy) or int(fy) < 2:
                raise ConfigError(
                    f"model.target_sizes entry {ts} is not an integer multiple (>= 2) of "
                    f"model.input_size {self.input_size} with the same factor on both axes")
            if int(fy) <= prev:
                raise ConfigError("model.target_sizes must grow strictly (e.g. 80, 160, 320)")
            prev = int(fy)
        for name in ("base_channels", "embed_dim", "num_heads", "patch_size", "codebook_size",
                     "code_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ConfigError("model.num_layers must be >= 0")
        if self.embed_dim % self.num_heads:
            raise ConfigError("model.embed_dim must be divisible by model.num_heads")
        if self.input_size[0] % self.patch_size or self.input_size[1] % self.patch_size:
            raise ConfigError("model.input_size must be a multiple of model.patch_size")
        if not self.vq_scales or any(int(s) < 1 for s in self.vq_scales):
            raise ConfigError("model.vq_scales must be positive token-map sides")
        if self.loc_factor not in self.factors:
            raise ConfigError(f"model.loc_factor {self.loc_factor} is not one of the target "
                              f"factors {self.factors}")
        if self.context_frames < 1 or self.context_frames % 2 == 0:
            raise ConfigError("model.context_frames must be an odd number >= 1")
        if self.refine_blocks < 0:
            raise ConfigError(f"model.refine_blocks must be >= 0, got {self.refine_blocks}")

    @property
    def factors(self) -> list[int]:
        """Upsampling factors of the target scales (2, 4, 8 for 80/160/320 from 40)."""
        return [int(ts[0] // self.input_size[0]) for ts in self.target_sizes]


@dataclass
class TrainingConfig:
    """Optimisation settings (design keys: num_epochs, batch_size, progressive, warmup_epochs)."""

    num_epochs: int = 100
    batch_size: int = 16
    progressive: bool = True
    warmup_epochs: int = 20
    scale_schedule: str = "linear"
    steps_per_epoch: int = 100
    learning_rate: float = 6e-4
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # auto | off | fp16 | bf16
    val_fraction: float = 0.1
    val_samples: int = 256
    seed: int = 0
    #: processes drawing training batches ahead of the model (0: drawn in the training
    #: process, which keeps --resume exact); a few help a GPU when data is simulated
    num_workers: int = 0
    mode: str = "supervised"  # supervised | reconstruction (unlabeled frames)
    #: comma-separated parameter-name prefixes to train, the rest frozen ("" = train all),
    #: e.g. "transformer.stages.2" (the 8x stage) when fine-tuning one part of a model
    trainable: str = ""
    #: comma-separated parameter-name prefixes trained at ``lr_scale`` x the learning rate,
    #: e.g. "vqvae.encoder.stem.0" after ``train --init`` grew a model by context frames:
    #: their first-layer weights start at zero and move slowly at a fine-tuning rate
    lr_scale_prefixes: str = ""
    lr_scale: float = 1.0
    #: end the run at this step (0: at the schedule's end, num_epochs x steps_per_epoch);
    #: the learning-rate schedule keeps its full length, so a recipe can describe a phase
    #: that was stopped early, and a rerun stops where it did
    stop_at_step: int = 0
    #: when training ends, measure the detection threshold and uncertainty calibration of
    #: the model it hands over (best_model.pth) on simulated movies across the operating
    #: range and store them in it, as ``var-emitter calibrate`` does: a trained or
    #: fine-tuned checkpoint otherwise predicts at threshold 0.5 with raw uncertainties
    calibrate: bool = False
    #: frames per calibration movie (12 movies; 60 take about half a minute on a CPU)
    calibration_frames: int = 60

    def trainable_prefixes(self) -> list[str]:
        """:attr:`trainable` as a list of prefixes (empty: every parameter trains)."""
        return _prefixes(self.trainable)

    def lr_scaled_prefixes(self) -> list[str]:
        """:attr:`lr_scale_prefixes` as a list of prefixes."""
        return _prefixes(self.lr_scale_prefixes)

    def validate(self):
        for name in ("num_epochs", "batch_size", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ConfigError("training.warmup_epochs must be >= 0")
        if self.scale_schedule not in ("linear", "step", "none"):
            raise ConfigError("training.scale_schedule must be 'linear', 'step' or 'none'")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError("training.lr_schedule must be 'cosine' or 'constant'")
        if not self.learning_rate > 0:
            raise ConfigError("training.learning_rate must be > 0")
        if not self.lr_scale > 0:
            raise ConfigError("training.lr_scale must be > 0")
        if self.stop_at_step < 0:
            raise ConfigError(f"training.stop_at_step must be >= 0 (0: run the whole schedule), "
                              f"got {self.stop_at_step}")
        if self.calibration_frames < 1:
            raise ConfigError(f"training.calibration_frames must be >= 1, "
                              f"got {self.calibration_frames}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("training.weight_decay and training.grad_clip must be >= 0")
        if self.mixed_precision not in ("auto", "off", "fp16", "bf16"):
            raise ConfigError("training.mixed_precision must be auto, off, fp16 or bf16")
        if self.num_workers < 0:
            raise ConfigError(f"training.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("training.val_fraction must be in [0, 1)")
        if self.mode not in ("supervised", "reconstruction"):
            raise ConfigError("training.mode must be 'supervised' or 'reconstruction'")


@dataclass
class LossConfig:
    """Loss weights (design keys) and choices."""

    count_weight: float = 1.0
    loc_weight: float = 1.0
    recon_weight: float = 0.1
    uncertainty_weight: float = 0.5
    scale_weights: list = field(default_factory=lambda: [1.0, 0.5, 0.25])
    loc_mode: str = "gmm"  # gmm (DECODE-like mixture likelihood) | l2
    vq_weight: float = 0.25  # commitment loss of the vector quantiser
    photon_weight: float = 0.1
    background_weight: float = 0.1
    # the background term per pixel in noise units: "mse" (squared) or "huber" (squared
    # within one noise unit, linear beyond: a few dense tiles whose background is hard to
    # tell from overlapping spots no longer dominate a batch's gradient)
    background_loss: str = "mse"
    # gmm mode: whether the mixture likelihood also trains the sigmas. The mixture wants
    # each pixel's component as wide as that pixel's own error; the decoder reports the
    # windowed mean, which is more precise, so with both terms on the sigmas the uncertainty
    # term cannot make them calibrated. false: only the uncertainty term moves them.
    loc_trains_sigma: bool = True
    # how the localisation and uncertainty terms average over a batch: "emitter" (every true
    # emitter counts once, so dense tiles dominate: with densities uniform in 0-5 /um^2 only
    # 1 % of the emitters are in tiles sparser than 0.5 /um^2) or "frame" (the mean over each
    # tile's emitters, then over tiles: sparse tiles weigh as much as dense ones)
    emitter_weighting: str = "emitter"

    def validate(self):
        for name in ("count_weight", "loc_weight", "recon_weight", "uncertainty_weight",
                     "vq_weight", "photon_weight", "background_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"loss.{name} must be a number >= 0, got {v!r}")
        if any((not isinstance(w, (int, float))) or w < 0 for w in self.scale_weights):
            raise ConfigError("loss.scale_weights must be numbers >= 0")
        if self.loc_mode not in ("gmm", "l2"):
            raise ConfigError("loss.loc_mode must be 'gmm' or 'l2'")
        if self.background_loss not in ("mse", "huber"):
            raise ConfigError("loss.background_loss must be 'mse' or 'huber', got "
                              f"{self.background_loss!r}")
        if self.emitter_weighting not in ("emitter", "frame"):
            raise ConfigError("loss.emitter_weighting must be 'emitter' or 'frame', got "
                              f"{self.emitter_weighting!r}")


@dataclass
class SimulationConfig:
    """Ranges drawn per training sample for on-the-fly simulation (camera units as contract)."""

    frame_size: list = field(default_factory=lambda: [40, 40])
    pixel_size_nm: float = 100.0
    sigma_px: list = field(default_factory=lambda: [0.8, 2.0])
    photons: list = field(default_factory=lambda: [200.0, 10000.0])
    background: list = field(default_factory=lambda: [5.0, 200.0])
    density_per_um2: list = field(default_factory=lambda: [0.0, 5.0])
    filament_fraction: float = 0.3
    emccd_fraction: float = 0.5
    em_gain: list = field(default_factory=lambda: [50.0, 300.0])
    e_per_adu: list = field(default_factory=lambda: [0.5, 50.0])
    baseline: list = field(default_factory=lambda: [0.0, 400.0])
    read_noise: list = field(default_factory=lambda: [0.5, 80.0])
    qe: list = field(default_factory=lambda: [0.7, 0.95])
    # mean on-time of a fluorophore in frames: one value, or a [low, high] range drawn
    # log-uniform per training sample (a model with a context of frames should not learn one
    # dye's kinetics: at 1 frame consecutive frames are nearly independent)
    mean_on_frames: float | list = 3.0
    edge_margin_px: float = 1.0  # emitters may lie this far outside the frame
    # share of a uniform scene's emitters drawn in the band within edge_band_px of the frame
    # border (either side of it) instead of anywhere: half-cut spots are rare in uniform
    # draws (10 % of a 40x40 tile lies within 1 px of its border), so a model sees too few
    edge_fraction: float = 0.0
    edge_band_px: float = 2.0
    # share of samples with no emitter at all (background and camera noise only): with the
    # density uniform in its range they are rare, and a model that seldom sees an empty frame
    # reports its brightest noise peaks there (sparse movies have many empty frames)
    empty_fraction: float = 0.0
    # share of samples whose background spans a ratio between its darkest and brightest pixel
    # drawn log-uniform in [1, steep_background_ratio] (a broad blob or a gradient over the
    # whole tile), instead of at most +-70 % around its level: trained with +-70 % only, the
    # model (v0.6) reported 2.6 noise peaks per empty frame (up to 13) on the bright side of
    # a background rising 10x across the frame (out-of-focus light, an illumination spot)
    steep_background_fraction: float = 0.0
    steep_background_ratio: float = 10.0
    # with model.context_frames > 1: share of samples in which a neighbouring frame is
    # replaced by a copy of the centre frame (one side or both, equally often), as prediction
    # does at a movie's first and last frame and for a single image; a model never shown
    # this would read the copied noise as an emitter that stays on
    missing_context_fraction: float = 0.0

    def validate(self):
        _positive_pair(self.frame_size, "simulation.frame_size")
        if not self.pixel_size_nm > 0:
            raise ConfigError("simulation.pixel_size_nm must be > 0")
        for name in ("sigma_px", "photons", "background", "density_per_um2", "em_gain",
                     "e_per_adu", "baseline", "read_noise", "qe"):
            _range(getattr(self, name), f"simulation.{name}")
        if self.sigma_px[0] <= 0 or self.e_per_adu[0] <= 0 or self.qe[0] <= 0 or self.qe[1] > 1:
            raise ConfigError("simulation sigma_px, e_per_adu and qe must be positive (qe <= 1)")
        for name in ("filament_fraction", "emccd_fraction", "edge_fraction", "empty_fraction",
                     "steep_background_fraction", "missing_context_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"simulation.{name} must be in [0, 1]")
        on = self.mean_on_frames
        if isinstance(on, (list, tuple)):
            if not _numeric_nested(list(on)):
                raise ConfigError(f"simulation.mean_on_frames must be numbers, got {on!r}")
            _range(on, "simulation.mean_on_frames")
            if not on[0] >= 1:
                raise ConfigError("simulation.mean_on_frames must be >= 1")
        elif isinstance(on, bool) or not isinstance(on, (int, float)) or not on >= 1:
            raise ConfigError("simulation.mean_on_frames must be a number >= 1 or a "
                              "[low, high] range")
        if not self.steep_background_ratio >= 1:
            raise ConfigError("simulation.steep_background_ratio must be >= 1")
        if not self.edge_margin_px >= 0:
            raise ConfigError("simulation.edge_margin_px must be >= 0")
        if not 0 < self.edge_band_px <= min(self.frame_size) / 2:
            raise ConfigError("simulation.edge_band_px must be > 0 and at most half the "
                              "frame's smaller side")


@dataclass
class DataConfig:
    """How training files are interpreted (never guessed silently)."""

    tiff_kind: str = "auto"  # auto | highres | camera ; auto = from the emitter file / sizes
    pixel_size_nm: float = 100.0  # camera pixel size
    highres_factor: int = 8  # high-resolution TIFF pixels per camera pixel
    baseline: float = 0.0
    e_per_adu: float = 1.0
    em_gain: float = 1.0
    qe: float = 1.0
    read_noise: float = 0.0
    # camera applied to high-resolution (photon) TIFFs after binning; ranges like simulation
    augment_camera: bool = True

    def validate(self):
        if self.tiff_kind not in ("auto", "highres", "camera"):
            raise ConfigError("data.tiff_kind must be 'auto', 'highres' or 'camera'")
        if not self.pixel_size_nm > 0 or self.highres_factor < 1:
            raise ConfigError("data.pixel_size_nm must be > 0 and data.highres_factor >= 1")
        if self.e_per_adu <= 0 or self.em_gain < 1 or not 0 < self.qe <= 1 or self.read_noise < 0:
            raise ConfigError("data camera parameters out of range (e_per_adu > 0, em_gain >= 1,"
                              " 0 < qe <= 1, read_noise >= 0)")


@dataclass
class Config:
    """The whole configuration (the content of ``config.json``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "Config":
        """Check every section; raises :class:`ConfigError`. Returns ``self``."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if len(self.loss.scale_weights) != len(self.model.target_sizes):
            raise ConfigError(
                f"loss.scale_weights has {len(self.loss.scale_weights)} entries but "
                f"model.target_sizes has {len(self.model.target_sizes)}")
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically."""
        from .io.atomic import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """Build and validate from a nested dict; unknown keys or wrong types are errors."""
        return _from_dict(cls, d, source).validate()

    def for_fine_tuning(self) -> "Config":
        """The configuration a fine-tune of a model trained with this one starts from
        (``train --init`` without ``--config``, the training widget's "Start from"): the
        same architecture, losses, training distribution and data settings, and a fresh
        ``training`` section, :data:`FINE_TUNING`'s values over the defaults.

        A trained checkpoint's own training section describes its last recipe phase, which
        can be anything but a fine-tune: the bundled model's last phase trained only the 8x
        stage (``training.trainable``), which no localisation comes from.
        """
        d = self.to_dict()
        d["training"] = dataclasses.asdict(TrainingConfig(**FINE_TUNING))
        return Config.from_dict(d)


#: ``training`` values of a fine-tune (:meth:`Config.for_fine_tuning`, and the training
#: widget's defaults): a few CPU minutes, every scale trained from the start (the scales of
#: a trained model need no warm-up), at a low learning rate: fine-tuning the bundled model to
#: a wide PSF, 5e-5 kept its other conditions closer to where they were than 2e-4 did
#: (BENCHMARKS.md, session 16)
FINE_TUNING = {"num_epochs": 10, "steps_per_epoch": 100, "batch_size": 16,
               "learning_rate": 5e-5, "progressive": False}


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a ``config.json``; any problem is a one-line :class:`ConfigError`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return Config.from_dict(d, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _from_dict(cls, d, where):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in section "
                          f"'{where}' (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        label = f"{where}.{key}" if where != "config" else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, key)
        else:
            kwargs[key] = _coerce(value, hint, label)
    return cls(**kwargs)


def _coerce(value, hint, label):
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
        return value
    if hint is list:
        if not isinstance(value, list) or not _numeric_nested(value):
            raise ConfigError(f"{label} must be a list of numbers, got {value!r}")
        return value
    return value


def _numeric_nested(v):
    if isinstance(v, list):
        return all(_numeric_nested(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_pair(v, label):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or any(not isinstance(a, int) or isinstance(a, bool) or a < 1 for a in v)):
        raise ConfigError(f"{label} must be two positive integers [H, W], got {v!r}")


def _prefixes(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _range(v, label):
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not v[0] <= v[1] or v[0] < 0:
        raise ConfigError(f"{label} must be [min, max] with 0 <= min <= max, got {v!r}")
