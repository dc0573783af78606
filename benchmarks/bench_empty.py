"""False detections on frames without emitters (a controlled test).

Sparse movies have many empty frames: at 0.15 emitters/um^2 one 40x40 frame in eleven holds
no emitter (Poisson, 2.4 on average). Every detection there is false, so a model that
reports its brightest noise peaks on empty frames loses precision exactly where the other
frames make it easy. Here each row is a set of 40x40 frames of background and camera noise
only, and the figure is false detections per 100 frames::

    python benchmarks/bench_empty.py bundled runs/candidate.pth

Rows: flat backgrounds of 5-200 photons/px on the benchmark's sCMOS and EMCCD cameras, smooth
backgrounds spanning 10-50 photons/px (as the benchmark's movies) and steeper ones (5-50,
20-200: a 10x rise across the frame), a new random map every :data:`FRAMES_PER_MAP` frames,
and a camera with many electrons per ADU whose frames are a few grey levels only. ``bundled`` means
``Predictor.from_pretrained()``; every checkpoint sees the same frames.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from napari_var_emitter.camera import Camera
from napari_var_emitter.inference import Predictor
from napari_var_emitter.simulation import smooth_background
from run_benchmarks import EMCCD, SCMOS  # the benchmark's own two cameras (same folder)

SHAPE = (40, 40)
#: an sCMOS-like camera with many electrons per ADU: low backgrounds become a few grey levels
COARSE = replace(SCMOS, e_per_adu=20.0)

#: (row label, camera, background: photons/px or (min, max) of a smooth map)
CONDITIONS = (
    ("sCMOS, 5 photons/px", SCMOS, 5.0),
    ("sCMOS, 20 photons/px", SCMOS, 20.0),
    ("sCMOS, 50 photons/px", SCMOS, 50.0),
    ("sCMOS, 200 photons/px", SCMOS, 200.0),
    ("sCMOS, smooth 10-50 photons/px", SCMOS, (10.0, 50.0)),
    ("sCMOS, smooth 5-50 photons/px", SCMOS, (5.0, 50.0)),
    ("sCMOS, smooth 20-200 photons/px", SCMOS, (20.0, 200.0)),
    ("EMCCD, smooth 10-100 photons/px", EMCCD, (10.0, 100.0)),
    ("EMCCD, 20 photons/px", EMCCD, 20.0),
    ("EMCCD, 100 photons/px", EMCCD, 100.0),
    ("20 e-/ADU without EM gain, 20 photons/px", COARSE, 20.0),
)


#: smooth backgrounds: frames per random map (one map would test one blob or gradient only)
FRAMES_PER_MAP = 10


def empty_frames(rng, n: int, camera: Camera, background) -> np.ndarray:
    """``n`` frames (ADU) of background and camera noise only; ``background``: photons/px or
    the (min, max) of smooth maps, a new one every :data:`FRAMES_PER_MAP` frames."""
    if np.ndim(background):
        maps = [smooth_background(SHAPE, rng, *background)
                for _ in range(0, n, FRAMES_PER_MAP)]
        expected = np.repeat(np.stack(maps), FRAMES_PER_MAP, axis=0)[:n]
    else:
        expected = np.full((n, *SHAPE), float(background), np.float32)
    return camera.photons_to_adu(expected.astype(np.float32), rng)


def false_detection_rows(predictors: dict, n: int, seed: int) -> list:
    """Markdown rows: false detections per 100 empty frames, one column per checkpoint."""
    rows = []
    for k, (label, camera, background) in enumerate(CONDITIONS):
        adu = empty_frames(np.random.default_rng([seed, k]), n, camera, background)
        cells = [f"{100.0 * len(p.predict(adu, camera=camera, maps=False).localizations) / n:.1f}"
                 for p in predictors.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="'bundled' or checkpoint paths")
    ap.add_argument("--frames", type=int, default=200, help="frames per condition")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    predictors = {c: (Predictor.from_pretrained() if c == "bundled"
                      else Predictor.from_checkpoint(c)) for c in a.checkpoints}
    print("| empty frames | " + " | ".join(predictors) + " |")
    print("|---|" + "---|" * len(predictors))
    for row in false_detection_rows(predictors, a.frames, a.seed):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
