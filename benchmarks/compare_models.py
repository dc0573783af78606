"""Compare checkpoints on many small, independently drawn movies (a generalisation check).

The main benchmark (``run_benchmarks.py``) uses one fixed movie per scenario. Its sparse
movie holds few distinct emitters, which blink over many frames, so one edge emitter can
move its Jaccard by a hundredth. Here every movie is a fresh draw from the operating
range: photons, background, PSF sigma, sCMOS or EMCCD. The scores pool all movies, per
density::

    python benchmarks/compare_models.py --densities 0.15,0.5,1 bundled runs/candidate.pth

``bundled`` means ``Predictor.from_pretrained()``. Every checkpoint sees the same movies.
``--tta`` adds a row per checkpoint with symmetry averaging (``predict --tta``);
``--no-border-fit-too`` one without the border refit (``predict --no-border-fit``),
``--no-pair-fit-too`` one without the pair split (``predict --no-pair-fit``).
``--photons``, ``--background``, ``--sigma`` and ``--camera`` fix what is otherwise drawn per
movie, e.g. the benchmark's sparse scenario as many independent movies::

    python benchmarks/compare_models.py --densities 0.15 --movies 80 --frames 25 \
        --photons 500 5000 --background 10 50 --sigma 1.0 1.5 --camera scmos bundled

``--margin 0`` draws emitters only inside the frame (the default, 1 px, lets emitters outside
it light the border pixels). "border recall" is the recall of the true emitters within 1 px
of the border (:func:`~napari_var_emitter.metrics.evaluate_tables`).
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_var_emitter.camera import Camera
from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import evaluate_tables
from napari_var_emitter.simulation import simulate_movie
from napari_var_emitter.table import concat_tables
from run_benchmarks import EMCCD, SCMOS  # the benchmark's own two cameras (same folder)

CAMERAS = (SCMOS, EMCCD)


def draw_movie(rng, density: float, n_frames: int, camera: Camera, photons=None,
               background=None, sigma=None, margin_px: float = 1.0, mean_on: float = 3.0):
    """One movie with its own photons (a 5x range inside 200-10,000), background (a smooth
    map spanning part of 5-150 photons/px) and PSF sigma (0.8-2.0 px), unless given.
    The draws happen either way, so fixing one range leaves the emitters' positions as
    they were. ``margin_px``: emitters are drawn up to this far outside the frame (they
    light its border pixels; 0: only inside, as some simulators do). ``mean_on``: the
    fluorophores' mean on-time in frames (1: consecutive frames nearly independent)."""
    ph0 = float(np.exp(rng.uniform(np.log(200), np.log(2000))))
    s0 = float(rng.uniform(0.8, 1.8))
    bg = (float(rng.uniform(5, 50)), float(rng.uniform(60, 150)))
    return simulate_movie(n_frames, (40, 40), rng=rng, density_per_um2=density,
                          photons=photons or (ph0, 5 * ph0), background=background or bg,
                          sigma_px=sigma or (s0, s0 + 0.2), camera=camera, highres_factor=None,
                          margin_px=margin_px, mean_on_frames=mean_on)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint files or 'bundled'")
    ap.add_argument("--densities", default="0.15,0.5,1", help="emitters/um^2, comma-separated")
    ap.add_argument("--movies", type=int, default=40, help="movies per density")
    ap.add_argument("--frames", type=int, default=30, help="frames per movie")
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--photons", type=float, nargs=2, metavar=("LO", "HI"),
                    help="photons per emitter (default: a 5x range drawn per movie)")
    ap.add_argument("--background", type=float, nargs=2, metavar=("LO", "HI"),
                    help="background photons/px (default: drawn per movie)")
    ap.add_argument("--sigma", type=float, nargs=2, metavar=("LO", "HI"),
                    help="PSF sigma in pixels (default: drawn per movie)")
    ap.add_argument("--camera", choices=("both", "scmos", "emccd"), default="both",
                    help="sCMOS and EMCCD alternate by default")
    ap.add_argument("--margin", type=float, default=1.0,
                    help="emitters up to this many px outside the frame (0: inside only)")
    ap.add_argument("--mean-on", type=float, default=3.0,
                    help="mean on-time of the fluorophores in frames (default 3; 1: "
                         "consecutive frames nearly independent)")
    ap.add_argument("--no-border-fit-too", action="store_true",
                    help="also a row per checkpoint without the border refit")
    ap.add_argument("--no-pair-fit-too", action="store_true",
                    help="also a row per checkpoint without the pair split")
    ap.add_argument("--tta", action="store_true",
                    help="also score each checkpoint with symmetry averaging (row 'NAME +tta')")
    a = ap.parse_args(argv)
    cameras = {"both": CAMERAS, "scmos": CAMERAS[:1], "emccd": CAMERAS[1:]}[a.camera]
    predictors = []
    for c in a.checkpoints:
        p = Predictor.from_pretrained() if c == "bundled" else Predictor.from_checkpoint(c)
        predictors += [(c, p, {})]
        if a.no_border_fit_too:
            predictors.append((c + " -border fit", p, {"border_fit": False}))
        if a.no_pair_fit_too:
            predictors.append((c + " -pair fit", p, {"pair_fit": False}))
        if a.tta:
            predictors.append((c + " +tta", p, {"tta": True}))
    print("| density | checkpoint | Jaccard | recall | precision | RMSE nm | efficiency "
          "| calib. x/y | border recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for density in (float(v) for v in a.densities.split(",")):
        truth, locs = [], [[] for _ in predictors]
        for k in range(a.movies):
            rng = np.random.default_rng(a.seed + k)
            cam = cameras[k % len(cameras)]
            movie = draw_movie(rng, density, a.frames, cam, a.photons and tuple(a.photons),
                               a.background and tuple(a.background), a.sigma and tuple(a.sigma),
                               a.margin, a.mean_on)
            t = movie.table_in_view()
            t["frame"] += k * a.frames  # one long pooled movie
            truth.append(t)
            for i, (_, p, options) in enumerate(predictors):
                loc = p.predict(movie.adu, camera=cam, maps=False, **options).localizations
                loc["frame"] += k * a.frames
                locs[i].append(loc)
        for (c, _, _), found in zip(predictors, locs):
            ev = evaluate_tables(concat_tables(truth), concat_tables(found), 250.0, 100.0,
                                 image_shape=(40, 40))
            print(f"| {density:g} | {c} | {ev['jaccard']:.3f} | {ev['recall']:.3f} | "
                  f"{ev['precision']:.3f} | {ev['rmse_nm']:.1f} | {ev['efficiency']:.1f} | "
                  f"{ev['calibration_x']:.2f}/{ev['calibration_y']:.2f} | "
                  f"{ev['recall_border']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
