"""Movies from a second, photon-by-photon simulator (a check against our own simulator).

The package's simulator renders each spot as an erf-integrated Gaussian and draws the camera
noise from the expected image. An outside evaluator's simulator will differ in such
details. This one follows the recipe of Picasso's `simulate` module: every photon of an
emitter is drawn as a Gaussian sample around it and binned into pixels
(``numpy.histogram2d``, pixel ``i`` spanning ``[i, i + 1)`` from the frame's corner), the
background is flat, each frame's emitters are drawn afresh (no blinking), only inside the
frame, and the camera is applied to photon counts (QE thinning, EM gain, read noise,
rounding to ADU). Ground truth is converted to the package's pixel-centre convention. The
same conditions are also simulated by the package's own simulator (no emitters outside the
frame) for comparison::

    python benchmarks/bench_photon_sim.py bundled runs/candidate.pth
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_var_emitter.camera import Camera
from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import evaluate_tables
from napari_var_emitter.simulation import simulate_movie
from napari_var_emitter.table import empty_table
from run_benchmarks import EMCCD, SCMOS  # the benchmark's own two cameras (same folder)

PHOTONS = (500.0, 5000.0)
SIGMA_PX = (1.0, 1.5)


def photon_movie(rng, n_frames: int, shape, density: float, background: float,
                 camera: Camera):
    """ADU frames (T, H, W) and their ground truth (package convention), photon by photon."""
    h, w = shape
    frames = np.zeros((n_frames, h, w), np.int64)
    rows = []
    edges = (np.arange(h + 1), np.arange(w + 1))
    for f in range(n_frames):
        n = rng.poisson(density * h * w * 0.01)  # 100 nm pixels: 0.01 um^2 each
        x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)  # from the frame's corner
        photons = np.exp(rng.uniform(np.log(PHOTONS[0]), np.log(PHOTONS[1]), n))
        sigma = rng.uniform(*SIGMA_PX, n)
        for i in range(n):
            k = rng.poisson(photons[i])
            hist, _, _ = np.histogram2d(rng.normal(y[i], sigma[i], k),
                                        rng.normal(x[i], sigma[i], k), bins=edges)
            frames[f] += hist.astype(np.int64)
            rows.append((f, x[i] - 0.5, y[i] - 0.5, photons[i], sigma[i]))
    electrons = (rng.binomial(frames, camera.qe)
                 + rng.poisson(background * camera.qe, frames.shape)).astype(float)
    if camera.is_emccd:
        pos = electrons > 0
        electrons[pos] = rng.gamma(electrons[pos], camera.em_gain)
    electrons += rng.normal(0.0, camera.read_noise, frames.shape)
    adu = np.clip(np.rint(camera.baseline + electrons / camera.e_per_adu), 0, 65535)
    truth = empty_table(len(rows))
    if rows:
        a = np.asarray(rows)
        for j, name in enumerate(("frame", "x", "y", "photons", "sigma")):
            truth[name] = a[:, j]
    return adu.astype(np.uint16), truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="'bundled' or checkpoint paths")
    ap.add_argument("--sizes", default="40,32,64", help="square frame sides, comma-separated")
    ap.add_argument("--densities", default="0.15,1,3", help="emitters/um^2, comma-separated")
    ap.add_argument("--frames", type=int, default=150, help="frames per movie (x3 when sparse)")
    ap.add_argument("--background", type=float, default=30.0, help="photons per pixel")
    ap.add_argument("--camera", choices=("scmos", "emccd"), default="scmos")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    camera = SCMOS if a.camera == "scmos" else EMCCD
    predictors = [(c, Predictor.from_pretrained() if c == "bundled"
                   else Predictor.from_checkpoint(c)) for c in a.checkpoints]
    print("| frame | density | simulator | checkpoint | Jaccard | recall | precision | RMSE nm "
          "| bias x/y nm | calib. x/y |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in a.sizes.split(",")):
        for density in (float(d) for d in a.densities.split(",")):
            n = a.frames * (3 if density < 0.5 else 1)
            rng = np.random.default_rng([a.seed, size, int(density * 1000)])
            movies = {"photons": photon_movie(rng, n, (size, size), density, a.background,
                                              camera)}
            own = simulate_movie(n, (size, size), rng=rng, density_per_um2=density,
                                 photons=PHOTONS, background=a.background, sigma_px=SIGMA_PX,
                                 camera=camera, highres_factor=None, margin_px=0.0)
            movies["package"] = (own.adu, own.table_in_view())
            for sim, (adu, truth) in movies.items():
                for name, pred in predictors:
                    locs = pred.predict(adu, camera=camera, maps=False).localizations
                    r = evaluate_tables(truth, locs, image_shape=(size, size), n_frames=n,
                                        camera=camera)
                    print(f"| {size}x{size} | {density:g} | {sim} | {name} | {r['jaccard']:.3f} "
                          f"| {r['recall']:.3f} | {r['precision']:.3f} | {r['rmse_nm']:.1f} | "
                          f"{r['bias_x_nm']:+.1f}/{r['bias_y_nm']:+.1f} | "
                          f"{r['calibration_x']:.2f}/{r['calibration_y']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
