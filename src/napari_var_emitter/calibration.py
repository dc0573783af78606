"""Post-hoc calibration of a trained model: its detection threshold and uncertainties.

Training leaves numbers that held-out data decide better than the loss does:

- **the detection threshold**: the decoder reports a detection when the probability it
  attributes to one candidate (summed over a window of one input pixel's radius, shared
  with overlapping candidates; :func:`~.inference.decode_maps`) reaches it. 0.5 is the
  natural choice for a perfectly calibrated probability; a model that spreads a little
  probability onto noise does better a bit higher, one that is under-confident a bit lower.
- **the uncertainty scale**: the predicted sigmas are trained to be calibrated, but the
  decoder's estimate (a probability-weighted mean over several map pixels) is not exactly
  the one the loss sees. One factor per axis corrects that (the analogue of temperature
  scaling for a regressor): the median over the scenes of each scene's
  ``std((estimate - truth) / sigma)`` over its matched detections. Each scene weighs the
  same, as in the threshold choice; pooled over all detections, the crowded scenes (most
  detections, and the largest ratios: misassigned neighbours) set the scale, and sparse
  scenes got sigmas 20-30 % too large.
- **the uncertainty power**: the predicted sigmas also span too narrow a range. Crowded
  and dim scenes, whose sigmas are large, were overconfident (v0.8: std of error / sigma
  1.2 at 5 emitters/um^2) while sparse and bright ones were underconfident (0.9). So the
  calibrated sigma is ``scale * ref * (sigma / ref) ** power``, per axis. ``ref`` is the
  median predicted sigma of the matched detections, so ``scale`` keeps its meaning at a
  typical sigma. ``power`` is the value of :data:`POWER_GRID` that makes the scenes'
  ``std(error / sigma)`` most alike: the least squared deviation of their logarithms from
  their median. ``power`` 1 is the plain scale.

:func:`calibrate` measures them on freshly simulated movies spread over the operating range
(their seeds are not the benchmark's), :func:`apply_calibration` stores them in a
checkpoint. :class:`~.inference.Predictor` uses the stored threshold when none is given and
maps its uncertainties through :func:`calibrated_sigma` with the stored scale, power and
reference. Nothing here changes a weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .camera import Camera

#: thresholds tried (the decoder's integrated probability is capped at 1)
THRESHOLD_GRID = tuple(np.round(np.arange(0.30, 0.951, 0.025), 3))

#: exponents tried for the uncertainty power
POWER_GRID = tuple(np.round(np.arange(0.7, 1.801, 0.05), 2))

#: cameras of the calibration movies: an sCMOS and an EMCCD as users record them
CALIBRATION_CAMERAS = (
    Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5),
    Camera(baseline=100.0, e_per_adu=20.0, em_gain=200.0, qe=0.9, read_noise=50.0),
)


@dataclass(frozen=True)
class CalibrationScene:
    """One calibration movie's conditions (photons, background: per emitter / per pixel)."""

    density: float
    photons: tuple = (300.0, 8000.0)
    background: tuple = (10.0, 100.0)
    sigma_px: tuple = (0.9, 1.8)
    scene: str = "uniform"
    camera: int = 0  # index into CALIBRATION_CAMERAS


def default_scenes() -> list[CalibrationScene]:
    """Scenes spanning the operating range: sparse to dense, dim, wide/narrow PSF, EMCCD,
    filaments. Each gets the same weight in the threshold choice."""
    return [
        CalibrationScene(0.1), CalibrationScene(0.5), CalibrationScene(1.0),
        CalibrationScene(2.0), CalibrationScene(3.5), CalibrationScene(5.0),
        CalibrationScene(1.0, photons=(200.0, 800.0), background=(40.0, 150.0)),
        CalibrationScene(1.0, sigma_px=(1.6, 2.0)),
        CalibrationScene(1.0, sigma_px=(0.8, 1.0)),
        CalibrationScene(1.0, camera=1),
        CalibrationScene(0.2, camera=1),
        CalibrationScene(1.5, scene="filaments"),
    ]


@dataclass
class Calibration:
    """What :func:`calibrate` measured; ``to_checkpoint()`` is what a checkpoint stores."""

    threshold: float
    sigma_scale: tuple
    mean_jaccard: float
    mean_jaccard_at_0_5: float
    per_scene: list = field(default_factory=list)
    n_frames: int = 0
    seed: int = 0
    #: per axis: calibrated sigma = scale * ref * (sigma / ref) ** power
    sigma_power: tuple = (1.0, 1.0)
    sigma_reference_px: tuple = (1.0, 1.0)
    #: the same measured with symmetry averaging (``tta=True``; see :mod:`.symmetry`)
    tta: "Calibration | None" = None

    def to_checkpoint(self) -> dict:
        """Plain data (``torch.load(weights_only=True)`` reads it back)."""
        d = asdict(self)
        for key in ("sigma_scale", "sigma_power", "sigma_reference_px"):
            d[key] = [float(v) for v in getattr(self, key)]
        if self.tta is not None:
            d["tta"] = self.tta.to_checkpoint()
        return d

    def summary(self) -> dict:
        """The headline numbers (what ``var-emitter calibrate`` prints), without the
        per-scene detail."""
        d = {"threshold": self.threshold, "sigma_scale": list(self.sigma_scale),
             "sigma_power": list(self.sigma_power),
             "sigma_reference_px": list(self.sigma_reference_px),
             "mean_jaccard": self.mean_jaccard, "mean_jaccard_at_0_5": self.mean_jaccard_at_0_5}
        if self.tta is not None:
            d["tta"] = self.tta.summary()
        return d


def calibrate(predictor, n_frames: int = 60, shape=(40, 40), seed: int = 20261126,
              scenes: list[CalibrationScene] | None = None, tolerance_nm: float = 250.0,
              log=None, tta: bool = True) -> Calibration:
    """Choose the detection threshold (best mean Jaccard over ``scenes``) and the per-axis
    uncertainty scale of ``predictor`` on freshly simulated movies.

    The predictor runs once per movie at the lowest threshold of :data:`THRESHOLD_GRID`:
    the decoder's candidates do not depend on the threshold, so the detections at any higher
    threshold are exactly those whose probability reaches it. Its own stored calibration is
    ignored (the raw model is measured). With ``tta`` the same movies are also localised
    with symmetry averaging (8x the time) and that mode's calibration is in ``.tta``.
    ``log(message)`` hears of each finished scene.
    """
    steps = calibration_steps(predictor, n_frames, shape, seed, scenes, tolerance_nm, tta)
    while True:
        try:
            done, total, scene = next(steps)
        except StopIteration as finished:
            return finished.value
        if log is not None:
            log(f"calibration scene {done}/{total}: {scene}")


def calibration_steps(predictor, n_frames: int = 60, shape=(40, 40), seed: int = 20261126,
                      scenes: list[CalibrationScene] | None = None,
                      tolerance_nm: float = 250.0, tta: bool = True):
    """:func:`calibrate` as a generator: yields ``(scenes done, scenes, scene)`` after each
    movie and returns the :class:`Calibration` (``StopIteration.value``), so a GUI worker
    can report progress and stop between scenes."""
    from .simulation import simulate_movie

    scenes = default_scenes() if scenes is None else list(scenes)
    rng = np.random.default_rng(seed)
    modes = (False, True) if tta else (False,)
    runs = {mode: [] for mode in modes}
    for i, sc in enumerate(scenes):
        cam = CALIBRATION_CAMERAS[sc.camera]
        movie = simulate_movie(n_frames, shape, rng=rng, density_per_um2=sc.density,
                               photons=sc.photons, background=sc.background,
                               sigma_px=sc.sigma_px, camera=cam, scene=sc.scene,
                               highres_factor=None)
        truth = movie.table_in_view()
        for mode in modes:
            # the network's own probabilities and uncertainties are calibrated: no border
            # refit or pair split (their rows would not follow the threshold, and they have
            # their own errors)
            res = predictor.predict(movie.adu, camera=cam, maps=False, calibrated=False,
                                    threshold=float(THRESHOLD_GRID[0]), tta=mode,
                                    border_fit=False, pair_fit=False)
            runs[mode].append((truth, res.localizations))
        yield i + 1, len(scenes), sc
    cals = {}
    for mode in modes:
        cal = calibration_from_runs(runs[mode], tolerance_nm)
        cal.per_scene = [{"scene": asdict(sc), **row} for sc, row in zip(scenes, cal.per_scene)]
        cal.n_frames, cal.seed = int(n_frames), int(seed)
        cals[mode] = cal
    cals[False].tta = cals.get(True)
    return cals[False]


def calibration_from_runs(runs, tolerance_nm: float = 250.0,
                          pixel_size_nm: float = 100.0) -> Calibration:
    """The calibration from ``runs``, a list of ``(truth, localisations)`` tables (input px)
    whose localisations were decoded at a threshold no higher than ``THRESHOLD_GRID[0]``:
    the threshold with the best mean Jaccard, then per axis the uncertainty power (the
    module docstring) and the median over the runs of the std of ``(estimate - truth) /
    uncertainty`` over each run's detections matched at that threshold."""
    # imported here: every Predictor imports this module, and scipy.optimize (matching)
    # would add half a second to each `predict` start-up
    from .metrics import match_tables

    px = float(pixel_size_nm)

    def jaccard(truth, pred):
        ti, _ = match_tables(truth, pred, tolerance_nm, px)
        tp = len(ti)
        return tp / max(1, len(truth) + len(pred) - tp)

    table = np.array([[jaccard(truth, locs[locs["prob"] >= t]) for t in THRESHOLD_GRID]
                      for truth, locs in runs])
    mean = table.mean(axis=0)
    best = int(np.argmax(mean))
    threshold = float(THRESHOLD_GRID[best])
    errors = {"x": [], "y": []}  # per axis, per run: (error, uncertainty) of the matches
    for truth, locs in runs:
        sel = locs[locs["prob"] >= threshold]
        ti, pi = match_tables(truth, sel, tolerance_nm, px)
        for axis in ("x", "y"):
            err = sel[axis][pi] - truth[axis][ti]
            unc = sel["unc_" + axis][pi]
            ok = np.isfinite(unc) & (unc > 0)
            errors[axis].append((err[ok], unc[ok]))
    ratios = {axis: [e / u for e, u in errors[axis]] for axis in errors}
    scale, power, reference = [], [], []
    for axis in ("x", "y"):
        p, ref, s = _uncertainty_power_and_scale(errors[axis])
        power.append(p)
        reference.append(ref)
        scale.append(s)
    at_half = int(np.argmin(np.abs(np.asarray(THRESHOLD_GRID) - 0.5)))
    # per scene: Jaccard at the chosen threshold and at 0.5, and std(error / sigma) per axis
    # before (raw) the scale is applied
    per_scene = [{"jaccard": float(table[i, best]), "jaccard_at_0_5": float(table[i, at_half]),
                  "raw_calibration": [_spread(ratios["x"][i]), _spread(ratios["y"][i])]}
                 for i in range(len(runs))]
    return Calibration(threshold=threshold, sigma_scale=tuple(scale),
                       mean_jaccard=float(mean[best]), mean_jaccard_at_0_5=float(mean[at_half]),
                       per_scene=per_scene, sigma_power=tuple(power),
                       sigma_reference_px=tuple(reference))


def _spread(r) -> float:
    """std of ``r``, NaN for fewer than two values or none spread."""
    return float(np.std(r)) if len(r) > 1 and np.std(r) > 0 else float("nan")


def _uncertainty_power_and_scale(runs) -> tuple[float, float, float]:
    """``(power, ref, scale)`` of one axis from ``runs``, a list of (error, uncertainty)
    arrays of matched detections (the module docstring's rule; (1, 1, 1) without data)."""
    runs = [(e, u) for e, u in runs if len(e) > 1]
    if not runs:
        return 1.0, 1.0, 1.0
    ref = float(np.median(np.concatenate([u for _, u in runs])))

    def per_run(power):
        v = np.array([_spread(e / (ref * (u / ref) ** power)) for e, u in runs])
        return v[np.isfinite(v)]

    def unevenness(power):
        logs = np.log(per_run(power))
        return float(np.sum((logs - np.median(logs)) ** 2)) if len(logs) else np.inf

    power = min(POWER_GRID, key=lambda p: (unevenness(p), abs(p - 1.0)))
    stds = per_run(power)
    scale = float(np.median(stds)) if len(stds) else 1.0
    return float(power), ref, scale


def calibrated_sigma(sigma, scale: float, power: float = 1.0, reference: float = 1.0):
    """The calibrated uncertainty ``scale * reference * (sigma / reference) ** power``
    (numpy or torch; ``power`` 1: exactly ``scale * sigma``)."""
    if power == 1.0:
        return sigma * scale
    return (scale * reference) * (sigma / reference) ** power


def describe_calibration(metrics: dict) -> str:
    """One line for the numbers of a training run's ``calibrated`` event (threshold,
    ``sigma_scale_x/y``, ``sigma_power_x/y``)."""
    m = metrics
    return (f"calibrated: threshold {m['threshold']:.3f}, uncertainty scale "
            f"{m['sigma_scale_x']:.2f} / {m['sigma_scale_y']:.2f}, power "
            f"{m['sigma_power_x']:.2f} / {m['sigma_power_y']:.2f}")


def apply_calibration(checkpoint_path, calibration: Calibration, out_path=None) -> None:
    """Store ``calibration`` in a checkpoint (in place, or as ``out_path``), atomically."""
    from .checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    cfg = ckpt.pop("config_obj")
    model = ckpt.pop("model")
    for key in ("format", "package_version", "config"):
        ckpt.pop(key, None)
    ckpt["calibration"] = calibration.to_checkpoint()
    save_checkpoint(out_path or checkpoint_path, model, cfg, **ckpt)


def calibration_from_checkpoint(ckpt: dict) -> dict:
    """``{"threshold": float | None, "sigma_scale": (sx, sy), "sigma_power": (px, py),
    "sigma_reference_px": (rx, ry), "tta": {...} | None}`` of a loaded checkpoint (an
    uncalibrated one gives threshold None and scale, power and reference (1, 1); one
    calibrated before the power existed, power 1; ``tta`` is the same for symmetry
    averaging, None when not measured); bad values are ignored."""
    cal = ckpt.get("calibration") or {}
    out = _threshold_and_uncertainty(cal)
    tta = cal.get("tta")
    out["tta"] = _threshold_and_uncertainty(tta) if isinstance(tta, dict) else None
    return out


def _threshold_and_uncertainty(cal: dict) -> dict:
    threshold = cal.get("threshold")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        threshold = None
    scale = _positive_pair(cal.get("sigma_scale")) or (1.0, 1.0)
    power = _positive_pair(cal.get("sigma_power"))
    reference = _positive_pair(cal.get("sigma_reference_px"))
    if power is None or reference is None:  # absent or bad (one without the other): scale only
        power = reference = (1.0, 1.0)
    return {"threshold": None if threshold is None else float(threshold), "sigma_scale": scale,
            "sigma_power": power, "sigma_reference_px": reference}


def _positive_pair(values) -> tuple | None:
    """Two finite positive floats from ``values``; None when absent or not such a pair."""
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
        return None
    return pair
