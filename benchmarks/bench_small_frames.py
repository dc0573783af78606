"""Frames smaller than the network's 40x40 tile (a controlled test).

A user's region of interest can be smaller than a tile. Each N x N movie here is the
top-left corner of a 40x40 movie (1 emitter/um^2, 500-5,000 photons, a smooth background of
10-50 photons/px, the benchmark's sCMOS camera), so every size sees the same emitters and
background slope; the truth is the emitters inside the crop. The whole 40x40 frame is the
reference row::

    python benchmarks/bench_small_frames.py bundled runs/candidate.pth

``bundled`` means ``Predictor.from_pretrained()``; every checkpoint sees the same frames.
"""

from __future__ import annotations

import argparse

from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import evaluate_tables
from napari_var_emitter.simulation import simulate_movie
from run_benchmarks import SCMOS  # the benchmark's own camera (same folder)

SIZES = (40, 32, 24, 23, 21, 19, 17, 15, 13, 12, 11)


def corner(movie, n: int):
    """The top-left ``n x n`` crop of ``movie``'s frames (ADU) and its ground truth."""
    t = movie.table
    inside = (t["x"] >= -0.5) & (t["x"] < n - 0.5) & (t["y"] >= -0.5) & (t["y"] < n - 0.5)
    return movie.adu[:, :n, :n], t[inside]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="'bundled' or checkpoint paths")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    movie = simulate_movie(a.frames, (40, 40), rng=a.seed, density_per_um2=1.0,
                           photons=(500.0, 5000.0), background=(10.0, 50.0), camera=SCMOS,
                           highres_factor=None)
    print("| model | frame | true emitters | Jaccard | recall | precision | RMSE nm |")
    print("|---|---|---|---|---|---|---|")
    for c in a.checkpoints:
        pred = Predictor.from_pretrained() if c == "bundled" else Predictor.from_checkpoint(c)
        for n in SIZES:
            adu, truth = corner(movie, n)
            locs = pred.predict(adu, camera=SCMOS, maps=False).localizations
            r = evaluate_tables(truth, locs, image_shape=(n, n), n_frames=a.frames)
            print(f"| {c} | {n}x{n} | {r['n_true']} | {r['jaccard']:.3f} | {r['recall']:.3f} | "
                  f"{r['precision']:.3f} | {r['rmse_nm']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
