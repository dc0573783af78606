"""Map a model's accuracy across the operating range, one condition at a time.

The main benchmark (``run_benchmarks.py``) has one movie per scenario; ``compare_models.py``
pools many movies per density. This script answers a user's question instead: *how well
does the model do on frames like mine, and which detection threshold suits them?* Each
row fixes one condition (PSF width, photons, background or density) and draws the others
per movie from the operating range, as ``compare_models.py`` does (both cameras
alternate, emitters up to 1 px outside the frame). Every row is scored at each threshold
of ``--thresholds`` (the first should be the model's calibrated one)::

    python benchmarks/operating_range.py --movies 16 --thresholds 0.35,0.5 bundled

Prints a markdown table: Jaccard, recall, precision, lateral RMSE and efficiency per row
and threshold, and the median PSF width the spot fits found (``sigma`` of the
localisations), which is what a user can read off their own data to pick a row.
"""

from __future__ import annotations

import argparse

import numpy as np

from compare_models import CAMERAS, draw_movie  # the same draws (same folder)
from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import evaluate_tables
from napari_var_emitter.table import concat_tables

#: (label, density per um^2, photons, background, PSF sigma); None: drawn per movie
ROWS = (
    ("PSF sigma 0.8-1.0 px", 1.0, None, None, (0.8, 1.0)),
    ("PSF sigma 1.0-1.4 px", 1.0, None, None, (1.0, 1.4)),
    ("PSF sigma 1.4-1.7 px", 1.0, None, None, (1.4, 1.7)),
    ("PSF sigma 1.7-2.0 px", 1.0, None, None, (1.7, 2.0)),
    ("photons 200-600", 1.0, (200.0, 600.0), None, None),
    ("photons 600-2,000", 1.0, (600.0, 2000.0), None, None),
    ("photons 2,000-10,000", 1.0, (2000.0, 10000.0), None, None),
    ("background 5-20 ph/px", 1.0, None, (5.0, 20.0), None),
    ("background 20-80 ph/px", 1.0, None, (20.0, 80.0), None),
    ("background 80-200 ph/px", 1.0, None, (80.0, 200.0), None),
    ("0.15 emitters/um^2", 0.15, None, None, None),
    ("0.5 emitters/um^2", 0.5, None, None, None),
    ("2 emitters/um^2", 2.0, None, None, None),
    ("3 emitters/um^2", 3.0, None, None, None),
    ("5 emitters/um^2", 5.0, None, None, None),
    ("dim and wide: 200-600 photons, sigma 1.4-2.0 px", 1.0, (200.0, 600.0), None, (1.4, 2.0)),
)


def score_row(predictor: Predictor, row, thresholds, movies: int, frames: int, seed: int):
    """Evaluation dicts (one per threshold) and the median fitted PSF width of one row."""
    _, density, photons, background, sigma = row
    truth, found = [], [[] for _ in thresholds]
    widths = []
    for k in range(movies):
        rng = np.random.default_rng(seed + k)
        cam = CAMERAS[k % len(CAMERAS)]
        movie = draw_movie(rng, density, frames, cam, photons, background, sigma)
        t = movie.table_in_view()
        t["frame"] += k * frames  # one long pooled movie
        truth.append(t)
        for i, th in enumerate(thresholds):
            loc = predictor.predict(movie.adu, camera=cam, maps=False, threshold=th).localizations
            if i == 0:
                widths.append(loc["sigma"])
            loc["frame"] += k * frames
            found[i].append(loc)
    evs = [evaluate_tables(concat_tables(truth), concat_tables(f), 250.0, 100.0,
                           image_shape=(40, 40)) for f in found]
    w = np.concatenate(widths)
    return evs, float(np.nanmedian(w)) if np.isfinite(w).any() else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint file or 'bundled'")
    ap.add_argument("--movies", type=int, default=16, help="movies per row")
    ap.add_argument("--frames", type=int, default=25, help="frames per movie")
    ap.add_argument("--seed", type=int, default=900)
    ap.add_argument("--thresholds", default="0.35,0.5",
                    help="detection thresholds, comma-separated (first: the calibrated one)")
    ap.add_argument("--rows", default="",
                    help="only the rows whose label contains one of these, separated by ';' "
                         "(labels hold commas), e.g. 'PSF sigma 1.7;photons 200-'")
    a = ap.parse_args(argv)
    thresholds = [float(v) for v in a.thresholds.split(",")]
    wanted = [w.strip() for w in a.rows.split(";") if w.strip()]
    rows = [r for r in ROWS if not wanted or any(w in r[0] for w in wanted)]
    p = (Predictor.from_pretrained() if a.checkpoint == "bundled"
         else Predictor.from_checkpoint(a.checkpoint))
    print("| condition | fitted PSF sigma [px] | threshold | Jaccard | recall | precision "
          "| RMSE [nm] | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        evs, width = score_row(p, row, thresholds, a.movies, a.frames, a.seed)
        for th, ev in zip(thresholds, evs):
            print(f"| {row[0]} | {width:.2f} | {th:g} | {ev['jaccard']:.3f} | "
                  f"{ev['recall']:.3f} | {ev['precision']:.3f} | {ev['rmse_nm']:.1f} | "
                  f"{ev['efficiency']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
