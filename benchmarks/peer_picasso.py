"""Run Picasso, the classical peer, on a movie and write its localisations to an .npz file.

This script runs under the *peers* virtual environment, not the project's own: ``picassosr``
pins ``pandas<3`` and must stay out of the main environment::

    python3 -m venv /work/venv-peers && /work/venv-peers/bin/pip install picassosr

It imports neither torch nor ``napari_var_emitter``; ``run_benchmarks.py`` calls it with
``--peer-python`` and reads its output with ``run_benchmarks.load_peer_locs``.

Picasso is used as its users run it: identification by net gradient (``Min. Net Gradient``
in ADU, box 7) on the raw frames, then ``gaussmle`` fitting with the camera's parameters
(``picasso.localize.localize_frames``, Picasso 0.11). Its x, y are pixels with integer =
pixel centre, the project's own convention, so no conversion is needed.

Modes
-----
- one movie: ``--input MOVIE.(tif|npy) --out LOCS.npz --min-net-gradient NG
  [--baseline ADU --e-per-adu X --em-gain G --qe Q --pixel-size NM --box 7]``
- ``--serve``: a long-lived worker. Each stdin line is a JSON job
  ``{"input", "out", "camera": {baseline, e_per_adu, em_gain, qe}, "pixel_size_nm",
  "min_net_gradient", "box", "method"}``; each reply is one JSON line on stdout. Numba
  compiles Picasso's kernels once per process (about 20 s), so one worker serves every
  scenario of a benchmark.
- ``--convert-locs LOCS.hdf5 --out LOCS.npz``: read a Picasso locs file with
  ``picasso.io.load_locs`` and write the same .npz (used to test the parsing path).

The .npz holds float64 columns ``x, y, photons, sx, sy, bg, lpx, lpy, net_gradient``, an
int64 ``frame`` column, and ``meta`` (a JSON string: Picasso version, threshold, timing).

Timing excludes numba's first compilation: the worker first localises a small synthetic
movie (warm-up) and only then times real jobs (identification + fit, ADU in, locs out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

COLUMNS = ("x", "y", "photons", "sx", "sy", "bg", "lpx", "lpy", "net_gradient")


def picasso_version() -> str:
    """The installed picassosr version (``unknown`` when the metadata is missing)."""
    try:
        from importlib.metadata import version

        return version("picassosr")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return "unknown"


def read_movie(path: str) -> np.ndarray:
    """A (T, H, W) movie from a .npy or TIFF file (a 2-D image is one frame)."""
    if path.lower().endswith(".npy"):
        movie = np.load(path)
    else:
        import tifffile

        movie = tifffile.imread(path)
    movie = np.asarray(movie)
    if movie.ndim == 2:
        movie = movie[None]
    if movie.ndim != 3:
        raise ValueError(f"{path}: expected a (T, H, W) movie, got shape {movie.shape}")
    return movie


def camera_info(camera: dict, pixel_size_nm: float) -> dict:
    """Picasso's camera dictionary from the contract's camera parameters.

    Picasso's ``Sensitivity`` is electrons per ADU (the contract's ``e_per_adu``), ``Gain``
    the EM gain (1 without one); it ignores ``Qe`` when converting (its photons are
    photoelectrons) but the key must be there.
    """
    return {
        "Baseline": float(camera.get("baseline", 0.0)),
        "Sensitivity": float(camera.get("e_per_adu", 1.0)),
        "Gain": float(camera.get("em_gain", 1.0)),
        "Qe": float(camera.get("qe", 1.0)),
        "Pixelsize": float(pixel_size_nm),
    }


def localize(movie: np.ndarray, camera: dict, pixel_size_nm: float, min_net_gradient: float,
             box: int = 7, method: str = "gaussmle"):
    """Picasso identification + fit on an in-memory movie; returns its locs table."""
    from picasso import localize as plocalize

    params = {"Min. Net Gradient": float(min_net_gradient), "Box Size": int(box)}
    return plocalize.localize_frames(movie, None, params,
                                     camera_info=camera_info(camera, pixel_size_nm),
                                     fitting_method=method)


def locs_to_columns(locs) -> dict:
    """Plain numpy columns (``frame`` int64, the rest float64) from a Picasso locs table.

    Accepts a pandas DataFrame (Picasso >= 0.10) or a numpy record array (older Picasso);
    ``net_gradient`` is NaN when the table has none (e.g. locs loaded from an HDF5 file
    written by another program).
    """
    names = list(locs.columns) if hasattr(locs, "columns") else list(locs.dtype.names)
    n = len(locs)
    cols = {"frame": np.asarray(locs["frame"], dtype=np.int64).reshape(n)}
    for name in COLUMNS:
        if name in names:
            cols[name] = np.asarray(locs[name], dtype=np.float64).reshape(n)
        else:
            cols[name] = np.full(n, np.nan)
    return cols


def write_npz(path: str, cols: dict, meta: dict) -> None:
    """Write the columns and a JSON ``meta`` string atomically (temp file, then rename)."""
    tmp = f"{path}.partial-{os.getpid()}.npz"
    np.savez(tmp, meta=np.array(json.dumps(meta)), **cols)
    os.replace(tmp, path)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (psutil polling,
    every 5 ms, in a thread; Picasso's own worker threads share the process)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        return False


def warm_up(method: str = "gaussmle", box: int = 7) -> float:
    """Compile Picasso's numba kernels on a small synthetic movie; returns the seconds spent.

    The movie has bright spots, so identification *and* the chosen fit are compiled.
    """
    rng = np.random.default_rng(0)
    t, h, w = 4, 32, 32
    yy, xx = np.mgrid[0:h, 0:w]
    movie = np.empty((t, h, w), np.float64)
    for k in range(t):
        img = np.full((h, w), 20.0)
        for cy, cx in ((10.3, 11.6), (21.2, 20.4)):
            img += 2000.0 / (2 * np.pi * 1.3 ** 2) * np.exp(
                -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.3 ** 2))
        movie[k] = rng.poisson(img)
    t0 = time.perf_counter()
    localize(movie.astype(np.uint16), {}, 100.0, 200.0, box, method)
    return time.perf_counter() - t0


def run_job(job: dict) -> dict:
    """Localise one movie as a job dict describes; write the .npz; return the reply dict."""
    movie = read_movie(job["input"])
    camera = job.get("camera", {})
    px = float(job.get("pixel_size_nm", 100.0))
    ng = float(job["min_net_gradient"])
    box = int(job.get("box", 7))
    method = job.get("method", "gaussmle")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        locs = localize(movie, camera, px, ng, box, method)
        elapsed = time.perf_counter() - t0
    cols = locs_to_columns(locs)
    meta = {"picasso_version": picasso_version(), "min_net_gradient": ng, "box": box,
            "method": method, "time_s": elapsed, "n_frames": int(movie.shape[0]),
            "shape": list(movie.shape), "peak_rss_mb": mem.peak_mb, "camera": camera,
            "pixel_size_nm": px}
    write_npz(job["out"], cols, meta)
    return {"ok": True, "out": job["out"], "n_locs": int(len(cols["frame"])), **meta}


def serve(method: str, box: int) -> int:
    """JSON-lines worker: warm up once, then one reply line per job line until EOF."""
    global _REPLY_STREAM
    # libraries print notices to stdout; keep stdout for the replies alone
    _REPLY_STREAM = sys.stdout
    sys.stdout = sys.stderr
    compile_s = warm_up(method, box)
    _reply({"ok": True, "ready": True, "compile_s": compile_s,
            "picasso_version": picasso_version(), "rss_mb": _rss_mb()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            reply = run_job(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the caller, worker keeps serving
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        _reply(reply)
    return 0


_REPLY_STREAM = None


def _reply(obj: dict) -> None:
    out = _REPLY_STREAM or sys.stdout
    out.write(json.dumps(obj) + "\n")
    out.flush()


def convert_locs(path: str, out: str) -> dict:
    """Picasso locs HDF5 (+ yaml) -> the .npz layout; returns the meta written."""
    from picasso import io as pio

    loaded = pio.load_locs(path)
    locs = loaded[0] if isinstance(loaded, tuple) else loaded
    cols = locs_to_columns(locs)
    meta = {"picasso_version": picasso_version(), "source": os.path.abspath(path)}
    write_npz(out, cols, meta)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", help="movie (.tif or .npy, ADU)")
    ap.add_argument("--out", help="output .npz")
    ap.add_argument("--min-net-gradient", type=float, default=5000.0)
    ap.add_argument("--box", type=int, default=7)
    ap.add_argument("--method", default="gaussmle")
    ap.add_argument("--baseline", type=float, default=0.0)
    ap.add_argument("--e-per-adu", type=float, default=1.0)
    ap.add_argument("--em-gain", type=float, default=1.0)
    ap.add_argument("--qe", type=float, default=1.0)
    ap.add_argument("--pixel-size", type=float, default=100.0)
    ap.add_argument("--serve", action="store_true", help="JSON-lines worker on stdin/stdout")
    ap.add_argument("--convert-locs", metavar="LOCS.hdf5",
                    help="convert a Picasso locs file to the .npz layout")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="single-movie mode: time including numba compilation")
    a = ap.parse_args(argv)
    if a.serve:
        return serve(a.method, a.box)
    if not a.out:
        ap.error("--out is required")
    if a.convert_locs:
        convert_locs(a.convert_locs, a.out)
        return 0
    if not a.input:
        ap.error("--input is required (or --serve / --convert-locs)")
    if not a.no_warm_up:
        warm_up(a.method, a.box)
    reply = run_job({"input": a.input, "out": a.out, "min_net_gradient": a.min_net_gradient,
                     "box": a.box, "method": a.method, "pixel_size_nm": a.pixel_size,
                     "camera": {"baseline": a.baseline, "e_per_adu": a.e_per_adu,
                                "em_gain": a.em_gain, "qe": a.qe}})
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
