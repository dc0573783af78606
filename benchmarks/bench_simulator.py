"""Throughput of the simulator: movies and on-the-fly training batches, in frames per second.

Prints a markdown table (one row per density) followed by the exact command and the machine,
ready to paste into BENCHMARKS.md::

    PYTHONPATH=src python benchmarks/bench_simulator.py
    PYTHONPATH=src python benchmarks/bench_simulator.py --densities 1 --seconds 5 --size 64 64
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

from napari_var_emitter.camera import Camera
from napari_var_emitter.config import SimulationConfig
from napari_var_emitter.simulation import sample_training_batch, simulate_movie

# the SMLM-challenge 2016 EMCCD (field notes): exercises the EM-gain path of the camera
CHALLENGE_CAMERA = Camera(baseline=100.0, e_per_adu=45.0, em_gain=300.0, qe=0.9, read_noise=74.4)


def rate(step, items_per_call: int, seconds: float, rounds: int = 5) -> float:
    """Items per second of ``step()``: the best of ``rounds`` rounds of ``seconds/rounds`` each.

    The cores are shared with other processes; the best round is the least disturbed one
    (as ``timeit`` reports the minimum).
    """
    step()  # warm-up
    best = 0.0
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter()
        while True:
            step()
            n += items_per_call
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / rounds:
                break
        best = max(best, n / elapsed)
    return best


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def n_cpus() -> int:
    """CPU cores this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 1.0, 5.0],
                   help="emitters per um^2 (one table row each)")
    p.add_argument("--size", type=int, nargs=2, default=[40, 40], metavar=("H", "W"))
    p.add_argument("--pixel-size", type=float, default=100.0, help="nm")
    p.add_argument("--frames", type=int, default=200, help="frames per simulated movie")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context-frames", type=int, default=3,
                   help="context frames of the second training-batch column")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="time per measurement (split into 5 rounds; the best round counts)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    h, w = args.size
    c = args.context_frames
    print(f"| density (/um^2) | simulate_movie frames/s (ADU only) | simulate_movie frames/s "
          f"(+ 8x photons) | sample_training_batch frames/s (C=1) | sample_training_batch "
          f"samples/s (C={c}) |")
    print("|---|---|---|---|---|")
    for d in args.densities:
        def movie(factor):
            return lambda: simulate_movie(args.frames, (h, w), rng, density_per_um2=d,
                                          pixel_size_nm=args.pixel_size,
                                          camera=CHALLENGE_CAMERA, highres_factor=factor)

        sim = SimulationConfig(frame_size=[h, w], pixel_size_nm=args.pixel_size,
                               density_per_um2=[d, d])
        movie_fps = rate(movie(None), args.frames, args.seconds)
        movie_hr_fps = rate(movie(8), args.frames, args.seconds)
        batch_fps = rate(lambda: sample_training_batch(sim, args.batch_size, rng, 1),
                         args.batch_size, args.seconds)
        batch_ctx = rate(lambda: sample_training_batch(sim, args.batch_size, rng, c),
                         args.batch_size, args.seconds)
        print(f"| {d:g} | {movie_fps:,.0f} | {movie_hr_fps:,.0f} | {batch_fps:,.0f} | "
              f"{batch_ctx:,.0f} |")
    print()
    print(f"{h}x{w} px frames, {args.pixel_size:g} nm pixels; movies of {args.frames} frames "
          f"(EMCCD camera, smooth background), training batches of {args.batch_size} with the "
          f"default SimulationConfig ranges (density fixed per row); best of 5 rounds "
          f"(wall clock).")
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"Command: `PYTHONPATH=src python {cmd}`")
    print(f"Machine: {n_cpus()} CPU cores ({cpu_model()}), Python {platform.python_version()}, "
          f"numpy {np.__version__}; load average before/after: {load0} / "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (the cores are shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
