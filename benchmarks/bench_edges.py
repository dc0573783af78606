"""Detection of single emitters by their distance from the frame border (a controlled test).

A spot near the border of a frame is cut by it: at the border pixel's centre about a third of
its light is outside the frame. Uniform movies hold few such spots, so their recall hardly
moves the benchmark's Jaccard; here they are measured on their own. Every frame (40x40,
sCMOS, flat background) holds one emitter at a fixed distance from a random side of the
frame, or anywhere in the interior (``interior`` column), at a fixed number of photons::

    python benchmarks/bench_edges.py bundled runs/candidate.pth

``--no-border-fit-too`` adds a row per checkpoint without the border refit
(``predict --no-border-fit``).

Distances are measured from the outer edge of the border pixels (0 = on the border, 0.5 = at
the centre of the border pixel). A detection within 250 nm counts. Negative distances put
the emitter outside the frame: it only lights the border pixels, and a detection near it
is false (an evaluation with ground truth inside the frame would leave it out). There the
figure in parentheses is the share of frames with such a false detection. ``bundled`` means
``Predictor.from_pretrained()``; every checkpoint sees the same frames.
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_var_emitter.camera import Camera
from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import match_tables
from napari_var_emitter.simulation import render_expected
from napari_var_emitter.table import empty_table

SHAPE = (40, 40)
CAMERA = Camera(baseline=100.0, e_per_adu=0.5, em_gain=1.0, qe=0.9, read_noise=1.5)
#: negative: outside the frame (the spot lights the border pixels; a detection is false)
DISTANCES_PX = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def edge_frames(rng, n: int, distance, photons: float, background: float, sigma=(1.0, 1.5)):
    """``n`` frames (ADU) with one emitter each, ``distance`` px inside a random side of the
    frame (None: uniform over the interior, at least 8 px from the border), and its table."""
    h, w = SHAPE
    t = empty_table(n)
    t["frame"] = np.arange(n)
    if distance is None:
        x, y = rng.uniform(8, w - 9, n), rng.uniform(8, h - 9, n)
    else:
        along = rng.uniform(3, min(h, w) - 4, n)
        side = rng.integers(0, 4, n)
        near = -0.5 + distance
        x = np.select([side == 0, side == 1], [near, w - 1 - near], along)
        y = np.select([side == 2, side == 3], [near, h - 1 - near], along)
    t["x"], t["y"] = x, y
    t["photons"] = photons
    t["sigma"] = rng.uniform(sigma[0], sigma[1], n)
    t["background"] = background
    adu = CAMERA.photons_to_adu(render_expected(t, n, SHAPE, 1, background), rng)
    return adu, t


def recall_table(predictors: dict, photons, background: float, n: int, seed: int) -> list:
    """Markdown rows: recall per (checkpoint, photons) and distance; ``predictors`` maps a
    row name to a (predictor, ``predict`` keyword arguments) pair."""
    columns = [*DISTANCES_PX, None]
    rows = []
    for ph in photons:
        frames = [edge_frames(np.random.default_rng([seed, int(ph), k]), n, d, ph, background)
                  for k, d in enumerate(columns)]
        for name, (pred, options) in predictors.items():
            cells = []
            for d, (adu, truth) in zip(columns, frames):
                locs = pred.predict(adu, camera=CAMERA, maps=False, **options).localizations
                ti, _ = match_tables(truth, locs, 250.0, 100.0)
                # outside the frame: the share of frames with a (false) detection near it
                cells.append(f"{len(ti) / n:.2f}" if d is None or d >= 0 else
                             f"({len(ti) / n:.2f})")
            rows.append(f"| {name} | {ph:g} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="'bundled' or checkpoint paths")
    ap.add_argument("--photons", type=float, nargs="+", default=[500.0, 1000.0, 2000.0])
    ap.add_argument("--background", type=float, default=30.0, help="photons per pixel")
    ap.add_argument("--frames", type=int, default=200, help="frames per distance")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-border-fit-too", action="store_true",
                    help="also a row per checkpoint without the border refit")
    a = ap.parse_args(argv)
    predictors = {}
    for c in a.checkpoints:
        pred = Predictor.from_pretrained() if c == "bundled" else Predictor.from_checkpoint(c)
        predictors[c] = (pred, {})
        if a.no_border_fit_too:
            predictors[c + " -border fit"] = (pred, {"border_fit": False})
    head = " | ".join(f"{d:g} px" for d in DISTANCES_PX) + " | interior"
    print(f"| model | photons | {head} |")
    print("|---|---|" + "---|" * (len(DISTANCES_PX) + 1))
    for row in recall_table(predictors, a.photons, a.background, a.frames, a.seed):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
