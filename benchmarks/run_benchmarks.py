"""Benchmark the model against Picasso and the Cramer-Rao bound across the operating range.

One command simulates every scenario with fixed seeds, localises it with our model and with
Picasso (the classical peer, its threshold tuned on the truth for its best Jaccard), scores
both with :func:`napari_var_emitter.metrics.evaluate_tables` (250 nm tolerance) and writes a
markdown report::

    nice -n 10 python benchmarks/run_benchmarks.py --checkpoint CKPT --out benchmarks/results.md

Without ``--checkpoint`` the bundled model (``Predictor.from_pretrained()``) is measured.
``--quick`` uses few frames (for tests), ``--skip-picasso`` leaves the peer out,
``--scenarios a,b`` picks scenarios (names in :data:`SCENARIOS`), ``--no-speed`` skips the
end-to-end ``var-emitter predict`` timing of a 2,000-frame stack. See benchmarks/README.md.

How things are measured
-----------------------
- Ours: one fresh Python process per scenario loads the model and runs
  ``Predictor.predict(adu, camera=..., maps=False)`` on the ADU movie: frames/s is the
  whole call (ADU -> photons, tiling, network, decoding) after a warm-up call on a few
  frames; peak memory is the process's own high-water mark ``VmHWM`` (torch, model,
  movie included).
- Picasso: one long-lived worker (``peer_picasso.py --serve`` under the peers venv, numba
  compiled once before any timing). Per scenario it localises once at a low net-gradient
  floor; since Picasso keeps the local maxima whose net gradient exceeds the threshold and
  fits each spot on its own, the result at any higher threshold is exactly the subset with
  ``net_gradient > threshold``, so the threshold is tuned on the truth over a fine grid for
  free. The worker then localises again at the best threshold: that run gives frames/s and
  peak memory (psutil polling of the worker during the call).
- CRLB: the exact pixelwise Fisher bound of the true emitters each method matched (edge
  truncation, the true camera's excess noise and read noise); RMSE/CRLB compares both
  lateral quantities.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from napari_var_emitter.camera import Camera

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_PYTHON = "/work/venv-peers/bin/python"
EXTERNAL_DIR_CANDIDATES = (
    os.path.join(HERE, "..", "..", "shared", "data", "deepstorm_demo1_training"),
    "/work/shared/data/deepstorm_demo1_training",
)
TOLERANCE_NM = 250.0

#: net-gradient thresholds tried for Picasso, in photon units (converted to ADU per camera:
#: Picasso identifies on raw counts); geometric, fine enough that the optimum is not missed
PICASSO_NG_GRID_PHOTONS = tuple(float(v) for v in np.geomspace(3.0, 10000.0, 45))


#: the package's camera model (frozen dataclass), used for simulation and inference alike
CameraSpec = Camera


def describe_camera(cam: Camera) -> str:
    """Short human-readable summary of a camera for the report."""
    kind = f"EMCCD g={cam.em_gain:g}" if cam.em_gain > 1 else "sCMOS"
    return (f"{kind}, {cam.e_per_adu:g} e-/ADU, baseline {cam.baseline:g}, "
            f"QE {cam.qe:g}, read {cam.read_noise:g} e-")


SCMOS = CameraSpec(baseline=100.0, e_per_adu=0.5, em_gain=1.0, qe=0.9, read_noise=1.5)
EMCCD = CameraSpec(baseline=100.0, e_per_adu=20.0, em_gain=200.0, qe=0.9, read_noise=50.0)


@dataclass(frozen=True)
class Scenario:
    """One benchmark scenario: how its movie is made and how it is analysed."""

    name: str
    title: str
    n_frames: int = 200
    shape: tuple = (40, 40)
    density: float = 1.0
    photons: tuple = (500.0, 5000.0)
    background: tuple = (10.0, 50.0)
    sigma_px: tuple = (1.0, 1.5)
    camera: CameraSpec = SCMOS
    scene: str = "uniform"
    seed: int = 0
    #: camera given at inference (None: the true one): robustness to misstated parameters
    infer_camera: CameraSpec | None = None
    #: reuse the movie of this scenario (robustness runs analyse the same frames)
    movie_of: str | None = None
    #: externally made data: a folder with a TIFF and its ThunderSTORM ground truth
    external: bool = False
    quick_frames: int = 10

    @property
    def analysis_camera(self) -> CameraSpec:
        return self.infer_camera or self.camera


def _scenarios() -> dict:
    base = Scenario(name="", title="")
    medium = replace(base, name="medium", title="1 emitter/um^2", seed=1002)
    items = [
        replace(base, name="sparse", title="sparse, 0.15 emitters/um^2", density=0.15, seed=1001,
                n_frames=1000, quick_frames=20),
        medium,
        replace(base, name="dense", title="3 emitters/um^2", density=3.0, seed=1003),
        replace(base, name="dim", title="dim: 200-600 photons, background 50-100",
                photons=(200.0, 600.0), background=(50.0, 100.0), seed=1004),
        replace(base, name="wide_psf", title="wide PSF, sigma 1.8-2.0 px", sigma_px=(1.8, 2.0),
                seed=1005),
        replace(base, name="narrow_psf", title="narrow PSF, sigma 0.8-0.9 px",
                sigma_px=(0.8, 0.9), seed=1006),
        replace(base, name="emccd", title="EMCCD (gain 200, 20 e-/ADU, read noise 50 e-)",
                camera=EMCCD, seed=1007),
        replace(base, name="large_frame", title="large frame 150x203 (not a multiple of 40)",
                n_frames=20, shape=(150, 203), seed=1008, quick_frames=2),
        replace(base, name="filaments", title="filaments 64x64 (locally dense)", shape=(64, 64),
                scene="filaments", density=1.0, seed=1009),
        replace(medium, name="robust_eadu_x2", title="1/um^2, e-/ADU stated 2x too high",
                infer_camera=replace(SCMOS, e_per_adu=SCMOS.e_per_adu * 2), movie_of="medium"),
        replace(medium, name="robust_eadu_x0.5", title="1/um^2, e-/ADU stated 2x too low",
                infer_camera=replace(SCMOS, e_per_adu=SCMOS.e_per_adu * 0.5),
                movie_of="medium"),
        replace(medium, name="robust_baseline_+10%", title="1/um^2, baseline stated 10% high",
                infer_camera=replace(SCMOS, baseline=SCMOS.baseline * 1.1), movie_of="medium"),
        replace(medium, name="robust_baseline_-10%", title="1/um^2, baseline stated 10% low",
                infer_camera=replace(SCMOS, baseline=SCMOS.baseline * 0.9), movie_of="medium"),
        replace(base, name="external_deepstorm",
                title="external: ThunderSTORM-simulated Deep-STORM demo 1 (64x64, very dense)",
                n_frames=20, shape=(64, 64), camera=CameraSpec(), external=True,
                quick_frames=20),
    ]
    return {s.name: s for s in items}


SCENARIOS = _scenarios()


# ------------------------------------------------------------------------------------------
# data
@dataclass
class Prepared:
    """A scenario's movie on disk and its ground truth in memory."""

    scenario: Scenario
    movie_path: str
    truth: np.ndarray
    shape: tuple
    pixel_size_nm: float = 100.0
    note: str = ""


def find_external_dir() -> str | None:
    """The Deep-STORM demo folder (ThunderSTORM-simulated stack + CSV truth) when present."""
    for d in EXTERNAL_DIR_CANDIDATES:
        d = os.path.abspath(d)
        if (os.path.isfile(os.path.join(d, "ArtificialDataset_demo1.tif"))
                and os.path.isfile(os.path.join(d, "positions_demo1.csv"))):
            return d
    return None


def prepare(scen: Scenario, workdir: str, quick: bool, cache: dict) -> Prepared | None:
    """Simulate (or load) the scenario's movie, save it as .npy; None when unavailable."""
    if scen.external:
        return _prepare_external(scen, workdir)
    key = scen.movie_of or scen.name
    if key in cache:
        p = cache[key]
        return Prepared(scen, p.movie_path, p.truth, p.shape, p.pixel_size_nm)
    from napari_var_emitter.simulation import simulate_movie

    src = SCENARIOS[key] if scen.movie_of else scen
    n = min(src.quick_frames, src.n_frames) if quick else src.n_frames
    movie = simulate_movie(n, src.shape, rng=src.seed, density_per_um2=src.density,
                           photons=src.photons, background=src.background,
                           sigma_px=src.sigma_px, camera=src.camera, scene=src.scene,
                           highres_factor=None)
    path = os.path.join(workdir, f"{key}.npy")
    np.save(path, movie.adu)
    p = Prepared(scen, path, movie.table_in_view(), tuple(movie.adu.shape),
                 movie.pixel_size_nm)
    cache[key] = p
    return p


def _prepare_external(scen: Scenario, workdir: str) -> Prepared | None:
    from napari_var_emitter.io.emitters import read_emitters
    from napari_var_emitter.io.tiff import open_stack

    d = find_external_dir()
    if d is None:
        return None
    with open_stack(os.path.join(d, "ArtificialDataset_demo1.tif")) as st:
        adu = np.asarray(st[:])
    truth, _ = read_emitters(os.path.join(d, "positions_demo1.csv"), pixel_size_nm=100.0)
    path = os.path.join(workdir, f"{scen.name}.npy")
    np.save(path, adu)
    return Prepared(scen, path, truth, tuple(adu.shape), 100.0, note=d)


# ------------------------------------------------------------------------------------------
# our model: one worker process per scenario
def _peak_rss_self_mb() -> float:
    """Peak RSS of this process's own address space (``VmHWM``), MB.

    ``ru_maxrss`` would also count the parent's RSS at fork time (kept across ``exec``).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours_worker(job_path: str) -> int:
    """Entry of the per-scenario worker process (see the module docstring)."""
    import torch

    from napari_var_emitter.camera import Camera
    from napari_var_emitter.inference import Predictor, reuse_freed_memory

    with open(job_path) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    pred = (Predictor.from_checkpoint(job["checkpoint"], device=job["device"])
            if job["checkpoint"] else Predictor.from_pretrained(device=job["device"]))
    load_s = time.perf_counter() - t0
    if pred.device.type == "cpu":
        reuse_freed_memory()  # as `var-emitter predict` does
    adu = np.load(job["movie"])
    camera = Camera(**job["camera"])
    kw = dict(camera=camera, pixel_size_nm=job["pixel_size_nm"], maps=False,
              batch_size=job["batch_size"], threshold=job["threshold"],
              tta=bool(job.get("tta")))
    rss_before = _peak_rss_self_mb()
    pred.predict(adu[: min(len(adu), 8)], **kw)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    result = pred.predict(adu, **kw)
    elapsed = time.perf_counter() - t0
    np.save(job["out"], result.localizations)
    info = {"time_s": elapsed, "n_frames": int(adu.shape[0]), "load_s": load_s,
            "peak_rss_mb": _peak_rss_self_mb(),
            "rss_after_load_mb": rss_before, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "device": str(pred.device),
            "model_id": pred.model_id, "n_locs": int(len(result.localizations))}
    with open(job["out"] + ".json", "w") as f:
        json.dump(info, f)
    return 0


def run_ours(prep: Prepared, workdir: str, checkpoint: str | None, device: str,
             batch_size: int, threshold: float, tta: bool = False) -> tuple[np.ndarray, dict]:
    """Run our model on a prepared scenario in a fresh process; (locs, timing info)."""
    tag = prep.scenario.name.replace("%", "pct").replace("+", "p")
    job = {"checkpoint": checkpoint, "device": device, "movie": prep.movie_path,
           "camera": asdict(prep.scenario.analysis_camera), "pixel_size_nm": prep.pixel_size_nm,
           "batch_size": batch_size, "threshold": threshold, "tta": tta,
           "out": os.path.join(workdir, f"ours_{tag}.npy")}
    job_path = os.path.join(workdir, f"ours_{tag}.job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_ours-worker", job_path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"our model failed on {prep.scenario.name}: " + " | ".join(tail))
    with open(job["out"] + ".json") as f:
        info = json.load(f)
    return np.load(job["out"]), info


# ------------------------------------------------------------------------------------------
# Picasso: a long-lived worker under the peers venv
class PicassoWorker:
    """``peer_picasso.py --serve`` in the peers venv; one JSON line per job."""

    def __init__(self, python: str, log_path: str):
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "peer_picasso.py"), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1)
        self.hello = self._read_reply()
        if not self.hello.get("ok"):
            raise RuntimeError(f"Picasso worker failed to start: {self.hello}")

    def _read_reply(self) -> dict:
        # libraries may print to stdout; the reply is the next line that is a JSON object
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"Picasso worker exited (see {self._log.name})")
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue

    def run(self, job: dict) -> dict:
        """Send one job and wait for its reply (raises on a failed job)."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self._read_reply()
        if not reply.get("ok"):
            raise RuntimeError(f"Picasso failed: {reply.get('error')}")
        return reply

    def close(self) -> None:
        """End the worker (EOF on its stdin) and wait for it."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck worker is killed
            self.proc.kill()
        self._log.close()


def load_peer_locs(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``peer_picasso.py``'s .npz: (LOC_DTYPE table, net gradients, meta dict).

    Picasso's x, y are pixels with integer = pixel centre (our convention); ``sx, sy`` (PSF
    sigma, px) become ``sigma`` (their mean), ``lpx, lpy`` (Picasso's own CRLB-based
    precision, px) become ``unc_x, unc_y``, ``bg`` the background.
    """
    from napari_var_emitter.table import empty_table

    with np.load(path, allow_pickle=False) as z:
        cols = {k: z[k] for k in z.files}
    meta = json.loads(str(cols.pop("meta"))) if "meta" in cols else {}
    n = len(cols["frame"])
    t = empty_table(n)
    t["frame"] = cols["frame"].astype(np.int64)
    for ours, theirs in (("x", "x"), ("y", "y"), ("photons", "photons"), ("background", "bg"),
                         ("unc_x", "lpx"), ("unc_y", "lpy")):
        if theirs in cols:
            t[ours] = cols[theirs]
    if "sx" in cols and "sy" in cols:
        t["sigma"] = (cols["sx"] + cols["sy"]) / 2.0
    ng = cols.get("net_gradient", np.full(n, np.nan))
    return t, np.asarray(ng, dtype=np.float64), meta


def adu_per_photon(cam: CameraSpec) -> float:
    """Mean ADU per incident photon of a camera (Picasso's net gradient is in ADU)."""
    return cam.qe * cam.em_gain / cam.e_per_adu


def run_picasso(worker: PicassoWorker, prep: Prepared, workdir: str) -> tuple[np.ndarray, dict]:
    """Tune Picasso's net-gradient threshold on the truth, then time it at the best one."""
    from napari_var_emitter.metrics import evaluate_tables

    scen = prep.scenario
    cam = scen.analysis_camera
    tag = scen.name.replace("%", "pct").replace("+", "p")
    scale = adu_per_photon(cam)
    grid = [g * scale for g in PICASSO_NG_GRID_PHOTONS]
    base = {"input": prep.movie_path, "camera": asdict(cam), "pixel_size_nm": prep.pixel_size_nm,
            "box": 7, "method": "gaussmle"}
    floor_out = os.path.join(workdir, f"picasso_{tag}_floor.npz")
    worker.run({**base, "min_net_gradient": grid[0] * 0.999, "out": floor_out})
    all_locs, ng, _ = load_peer_locs(floor_out)
    best = None
    for thr in grid:
        sel = all_locs[ng > thr]
        r = evaluate_tables(prep.truth, sel, TOLERANCE_NM, prep.pixel_size_nm,
                            n_frames=prep.shape[0])
        ji = r["jaccard"] if np.isfinite(r["jaccard"]) else -1.0
        if best is None or ji > best[0]:
            best = (ji, thr)
    best_out = os.path.join(workdir, f"picasso_{tag}.npz")
    reply = worker.run({**base, "min_net_gradient": best[1], "out": best_out})
    locs, _, meta = load_peer_locs(best_out)
    info = {"time_s": reply["time_s"], "n_frames": reply["n_frames"],
            "peak_rss_mb": reply["peak_rss_mb"], "min_net_gradient_adu": best[1],
            "min_net_gradient_photons": best[1] / scale, "grid_adu": [grid[0], grid[-1]],
            "grid_size": len(grid), "n_locs": len(locs)}
    if best[1] in (grid[0], grid[-1]):
        info["note"] = "best threshold at the end of the grid"
    return locs, info


# ------------------------------------------------------------------------------------------
# end-to-end command-line speed
def _proc_tree(pid: int) -> list:
    """``pid`` and its descendants (Linux ``/proc/PID/task/TID/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_breakdown_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB summed over a process tree.

    File-backed pages are mostly memory-mapped input (the TIFF) and shared libraries: the
    kernel can drop them at any time, unlike anonymous memory.
    """
    anon = filed = 0.0
    for p in _proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) / 1024.0
                    elif line.startswith("RssFile:"):
                        filed += int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return anon, filed


def run_measured(cmd: list, log_path: str, env=None, poll_s: float = 0.5) -> dict:
    """Run a command; return its wall time, exit code and peak resident memory.

    Linux starts a child's ``ru_maxrss`` at the RSS its parent had when it forked (the
    high-water mark of the old address space survives ``exec``), so ``os.wait4`` on a child
    of this large process overstates small children. GNU ``/usr/bin/time`` is a tiny
    process: the maximum RSS it reports (``%M``) is the command's own. Without it, ``wait4``
    is used and the result says so. Every ``poll_s`` seconds the process tree's anonymous and
    file-backed RSS are sampled too (``/proc/PID/status``): ``anon_peak_mb``,
    ``file_peak_mb``, and ``anon_half_mb`` / ``anon_end_mb`` (the anonymous peak over the
    first half of the run and over the whole run: equal when memory is flat in time).
    """
    time_bin = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    rss_path = log_path + ".maxrss"
    full = [time_bin, "-f", "%M", "-o", rss_path, *cmd] if time_bin else list(cmd)
    samples = []
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            samples.append((time.perf_counter() - t0, *_rss_breakdown_mb(proc.pid)))
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_mb, method = usage.ru_maxrss / 1024.0, "wait4 ru_maxrss (includes the parent's RSS)"
    if time_bin:
        try:
            with open(rss_path) as f:
                kb = [ln for ln in f.read().split() if ln.isdigit()]
            peak_mb, method = int(kb[-1]) / 1024.0, "GNU time %M"
        except (OSError, IndexError):
            pass
    res = {"wall_s": wall, "peak_rss_mb": peak_mb, "rc": proc.returncode, "rss_method": method}
    if samples:
        ts = np.array(samples)
        half = ts[ts[:, 0] <= wall / 2]
        res.update(anon_peak_mb=float(ts[:, 1].max()), file_peak_mb=float(ts[:, 2].max()),
                   anon_half_mb=float(half[:, 1].max()) if len(half) else float("nan"),
                   anon_end_mb=float(ts[:, 1].max()), n_samples=len(ts))
    return res


def cli_command(tiff: str, out_dir: str, checkpoint: str | None, cam: CameraSpec,
                maps: bool = False, figures: bool = False) -> list:
    """The ``var-emitter predict`` command line for one stack (console script if installed)."""
    exe = shutil.which("var-emitter")
    cmd = [exe] if exe else [sys.executable, "-m", "napari_var_emitter"]
    cmd += ["predict", tiff, "--output_dir", out_dir, "--baseline", str(cam.baseline),
            "--e-per-adu", str(cam.e_per_adu), "--em-gain", str(cam.em_gain), "--qe", str(cam.qe),
            "--overwrite"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    if not maps:
        cmd.append("--no-maps")
    if not figures:
        cmd.append("--no-figures")
    return cmd


def run_speed(n_frames: int, workdir: str, checkpoint: str | None, log,
              tta: bool = False) -> dict:
    """``var-emitter predict --no-maps --no-figures`` of an ``n_frames`` 40x40 stack, and of
    a 20-frame stack of the same scene (start-up cost: Python, torch, model loading)."""
    from napari_var_emitter.io.tiff import write_tiff
    from napari_var_emitter.simulation import simulate_movie

    cam = SCMOS
    movie = simulate_movie(n_frames, (40, 40), rng=2000, density_per_um2=1.0,
                           camera=cam, highres_factor=None)
    res = {"n_frames": n_frames, "runs": []}
    for n in (20, n_frames):
        tif = os.path.join(workdir, f"speed_{n}.tif")
        write_tiff(tif, movie.adu[:n])
        out = os.path.join(workdir, f"speed_out_{n}")
        cmd = cli_command(tif, out, checkpoint, cam) + (["--tta"] if tta else [])
        r = run_measured(cmd, os.path.join(workdir, f"speed_{n}.log"))
        r.update(n_frames=n, command=" ".join(shlex.quote(c) for c in cmd))
        if r["rc"] != 0:
            with open(os.path.join(workdir, f"speed_{n}.log")) as f:
                r["error"] = f.read().strip().splitlines()[-1:] or ["?"]
        log(f"  predict {n} frames: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB,"
            f" rc {r['rc']}")
        res["runs"].append(r)
    small, big = res["runs"]
    if small["rc"] == 0 and big["rc"] == 0:
        res["fps_end_to_end"] = n_frames / big["wall_s"]
        dt = big["wall_s"] - small["wall_s"]
        res["fps_after_startup"] = (n_frames - 20) / dt if dt > 0 else float("nan")
        res["startup_s"] = small["wall_s"] - 20 * dt / max(n_frames - 20, 1)
    return res


# ------------------------------------------------------------------------------------------
# report
def machine_info() -> dict:
    """CPU, cores, memory, Python/torch versions and the load average at this moment."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = float("nan")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = int(line.split()[1]) / 2 ** 20
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gb": mem_gb,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}


def checkpoint_info(path: str | None) -> dict:
    """Which weights were measured: path, size, sha256 prefix, training step and metrics."""
    import hashlib

    from napari_var_emitter.checkpoint import load_checkpoint
    from napari_var_emitter.inference import bundled_checkpoint_path

    p = path or bundled_checkpoint_path()
    info = {"path": p, "bundled": path is None}
    try:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        info["sha256"] = h.hexdigest()[:12]
        info["size_mb"] = os.path.getsize(p) / 2 ** 20
        ck = load_checkpoint(p)
        info["step"] = ck.get("step")
        info["epoch"] = ck.get("epoch")
        info["val_metrics"] = ck.get("metrics", {})
        from napari_var_emitter.calibration import calibration_from_checkpoint

        info["calibration"] = calibration_from_checkpoint(ck)
        info["mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(p)).isoformat(
            timespec="seconds")
    except Exception as e:  # noqa: BLE001 - informative only
        info["error"] = str(e)
    return info


def _f(v, fmt="{:.3f}") -> str:
    if v is None:
        return "-"
    try:
        if isinstance(v, float) and not math.isfinite(v):
            return "n/a"
    except TypeError:
        pass
    return fmt.format(v)


def _cal(v) -> str:
    """A calibration figure; a few near-zero predicted sigmas can make it astronomical."""
    if v is not None and isinstance(v, float) and math.isfinite(v) and v > 100:
        return "> 100"
    return _f(v, "{:.2f}")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> list:
    return [_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows] + [""]


def _ratio(a, b):
    try:
        return a / b if (b and math.isfinite(a) and math.isfinite(b)) else float("nan")
    except TypeError:
        return float("nan")


def build_report(results: list, speed: dict | None, meta: dict) -> str:
    """The markdown report: machine, command, one table per metric group, targets."""
    m = meta["machine"]
    ck = meta["checkpoint"]
    L = ["# napari-var-emitter benchmark results", ""]
    L.append(f"Generated {meta['date']} in {meta['runtime_s'] / 60:.1f} min"
             + (" (**quick mode: few frames, numbers are not meaningful**)" if meta["quick"]
                else "") + ".")
    L.append("")
    L.append("Command:")
    L.append("")
    L.append("```")
    L.append(meta["command"])
    L.append("```")
    L.append("")
    L.append("## Machine and software")
    L.append("")
    L.append(f"- CPU: {m['cpu']}, {m['nproc']} cores (nproc), {m['mem_gb']:.0f} GB RAM; "
             f"{m['platform']}")
    L.append(f"- Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads"
             f"{', CUDA available' if m['cuda'] else ', CPU only'}); device `{meta['device']}`")
    L.append(f"- Load average (1 min) at start / end: {meta['load_start']:.2f} / "
             f"{meta['load_end']:.2f}. Other processes sharing these cores slow both methods"
             " down; frames/s are only comparable within one run.")
    w = f"- Model: `{ck['path']}`" + (" (bundled)" if ck.get("bundled") else "")
    if "sha256" in ck:
        w += (f", sha256 {ck['sha256']}..., {ck['size_mb']:.1f} MB, training step "
              f"{ck.get('step')} (epoch {ck.get('epoch')}), written {ck.get('mtime')}")
    if "error" in ck:
        w += f" ({ck['error']})"
    L.append(w)
    cal = meta["checkpoint"].get("calibration") or {}
    if meta.get("tta") and isinstance(cal.get("tta"), dict):
        cal = cal["tta"]  # symmetry averaging has its own calibration
    if meta["threshold"] is not None:
        thr = f"{meta['threshold']} (given)"
    elif cal.get("threshold"):
        power = cal.get("sigma_power") or (1.0, 1.0)
        if tuple(power) == (1.0, 1.0):
            unc = (f"uncertainties x {cal['sigma_scale'][0]:.3f} / {cal['sigma_scale'][1]:.3f} "
                   "in x / y")
        else:
            ref = cal["sigma_reference_px"]
            unc = ("uncertainties s -> scale * ref * (s / ref) ** power with scale "
                   f"{cal['sigma_scale'][0]:.3f} / {cal['sigma_scale'][1]:.3f}, power "
                   f"{power[0]:.2f} / {power[1]:.2f}, ref {ref[0]:.3f} / {ref[1]:.3f} px in "
                   "x / y")
        thr = (f"{cal['threshold']} (the model's calibrated threshold; {unc}, from "
               "`var-emitter calibrate` on its own simulated scenes, not these)")
    else:
        thr = "0.5 (uncalibrated model)"
    tta = ", tta=True" if meta.get("tta") else ""
    L.append(f"- Our model: `Predictor.predict(..., maps=False{tta})`, threshold {thr}, batch "
             f"{meta['batch_size']}; one fresh process per scenario.")
    if meta.get("picasso"):
        p = meta["picasso"]
        L.append(f"- Picasso {p.get('picasso_version')} (`picassosr`, separate venv "
                 f"`{meta['peer_python']}`): `localize_frames`, `gaussmle`, box 7, camera "
                 f"parameters given; numba warm-up {p.get('compile_s', float('nan')):.1f} s "
                 "(excluded from timing). Its `Min. Net Gradient` is tuned per scenario on the "
                 f"truth for its best Jaccard over {len(PICASSO_NG_GRID_PHOTONS)} geometric "
                 f"values ({PICASSO_NG_GRID_PHOTONS[0]:g}-{PICASSO_NG_GRID_PHOTONS[-1]:g} "
                 "photon-equivalents, converted to ADU per camera).")
    else:
        L.append(f"- Picasso: not run ({meta.get('picasso_skip_reason', 'skipped')}).")
    L.append(f"- Evaluation: `metrics.evaluate_tables`, optimal matching per frame, "
             f"{TOLERANCE_NM:g} nm tolerance; truth = emitters inside the field of view. "
             "Efficiency = 100 - sqrt((100 (1-JI))^2 + (RMSE/nm)^2). CRLB: exact pixelwise "
             "Fisher bound (x, y, photons, background unknown; edge truncation; EMCCD excess "
             "noise, read noise) of the matched true emitters, lateral. Calibration = std of "
             "(error / predicted sigma) per axis (1 = calibrated, > 1 overconfident).")
    L.append("")

    ok = [r for r in results if "error" not in r]
    has_peer = any(r.get("picasso") for r in ok)

    L += ["## Scenarios", ""]
    rows = []
    for r in results:
        s = r["scenario"]
        cam = describe_camera(s.camera)
        if s.infer_camera is not None:
            cam += f"; **stated at inference: {describe_camera(s.infer_camera)}**"
        if s.external:
            rows.append([s.name, s.title, r.get("n_frames", "-"),
                         "x".join(map(str, r.get("shape", ("-",))[1:])),
                         f"~{r.get('truth_per_frame', float('nan')):.0f} per frame",
                         "(from file)", "50 (offset)", "~1.07-1.11",
                         "photons in (baseline 0, 1 e-/ADU)", "-"])
            continue
        rows.append([s.name, s.title, r.get("n_frames", "-"),
                     f"{s.shape[0]}x{s.shape[1]}", f"{s.density:g}/um^2 ({s.scene})",
                     f"{s.photons[0]:g}-{s.photons[1]:g}",
                     f"{s.background[0]:g}-{s.background[1]:g}",
                     f"{s.sigma_px[0]:g}-{s.sigma_px[1]:g}", cam, s.seed])
    L += _table(["name", "what", "frames", "H x W", "density", "photons", "background [ph/px]",
                 "PSF sigma [px]", "camera", "seed"], rows)
    L.append("Photons per emitter per frame are log-uniform in the range; the background is a "
             "smooth random map spanning its range. 100 nm pixels.")
    L.append("")
    problems = [f"- **{r['scenario'].name} failed**: {r['error']}" for r in results
                if "error" in r]
    problems += [f"- Picasso failed on {r['scenario'].name}: {r['picasso_error']}"
                 for r in results if "picasso_error" in r]
    if problems:
        L += problems + [""]

    def both(r, key, fmt="{:.3f}"):
        o = r["ours"].get(key)
        p = r["picasso"].get(key) if r.get("picasso") else None
        return [_f(o, fmt), _f(p, fmt) if has_peer else None]

    def cells(vals):
        return [v for v in vals if v is not None]

    L += ["## Detection", ""]
    hdr = ["scenario", "true emitters", "JI ours"] + (["JI Picasso"] if has_peer else []) + \
        ["recall ours", "precision ours", "border recall ours"] + \
        (["recall Picasso", "precision Picasso", "border recall Picasso",
          "Picasso min. net gradient [ADU]"] if has_peer else [])
    rows = []
    for r in ok:
        row = [r["scenario"].name, r["n_true"], *cells(both(r, "jaccard")),
               _f(r["ours"]["recall"]), _f(r["ours"]["precision"]),
               _f(r["ours"].get("recall_border"))]
        if has_peer:
            pk = r.get("picasso") or {}
            pi = r.get("picasso_info", {})
            ng = _f(pi.get("min_net_gradient_adu"), "{:.0f}")
            if pi.get("note"):
                ng += " (end of grid)"
            row += [_f(pk.get("recall")), _f(pk.get("precision")),
                    _f(pk.get("recall_border")), ng]
        rows.append(row)
    L += _table(hdr, rows)
    L.append("Border recall: recall of the true emitters within 1 px of the frame border "
             "(spots the border cuts; about a tenth of a 40x40 frame).")
    L.append("")

    L += ["## Localisation accuracy", ""]
    hdr = ["scenario", "RMSE ours [nm]"] + (["RMSE Picasso [nm]"] if has_peer else []) + \
        ["CRLB ours-matched [nm]", "RMSE/CRLB ours"] + \
        (["CRLB Picasso-matched [nm]", "RMSE/CRLB Picasso"] if has_peer else []) + \
        ["efficiency ours"] + (["efficiency Picasso"] if has_peer else [])
    rows = []
    for r in ok:
        o = r["ours"]
        p = r.get("picasso") or {}
        row = [r["scenario"].name, _f(o["rmse_nm"], "{:.1f}")]
        if has_peer:
            row.append(_f(p.get("rmse_nm"), "{:.1f}"))
        row += [_f(o.get("crlb_rmse_nm"), "{:.1f}"),
                _f(_ratio(o["rmse_nm"], o.get("crlb_rmse_nm")), "{:.2f}")]
        if has_peer:
            row += [_f(p.get("crlb_rmse_nm"), "{:.1f}"),
                    _f(_ratio(p.get("rmse_nm"), p.get("crlb_rmse_nm")), "{:.2f}")]
        row.append(_f(o["efficiency"], "{:.1f}"))
        if has_peer:
            row.append(_f(p.get("efficiency"), "{:.1f}"))
        rows.append(row)
    L += _table(hdr, rows)
    L.append("RMSE is lateral, sqrt(mean(dx^2 + dy^2)), over matched pairs; CRLB the same "
             "lateral quantity for an efficient unbiased estimator on the same emitters.")
    L.append("")

    L += ["## Counting", ""]
    hdr = ["scenario", "true per frame", "count error ours"] + \
        (["count error Picasso", "ours / Picasso"] if has_peer else [])
    rows = []
    for r in ok:
        o = r["ours"]
        p = r.get("picasso") or {}
        row = [r["scenario"].name, _f(r["n_true"] / max(r["n_frames"], 1), "{:.1f}"),
               _f(o["count_mae"], "{:.2f}")]
        if has_peer:
            row += [_f(p.get("count_mae"), "{:.2f}"),
                    _f(_ratio(o["count_mae"], p.get("count_mae")), "{:.2f}")]
        rows.append(row)
    L += _table(hdr, rows)
    L.append("Count error = mean over frames of |n_predicted - n_true| (count_mae).")
    L.append("")

    L += ["## Uncertainty calibration", ""]
    hdr = ["scenario", "ours x", "ours y", "median predicted sigma ours [nm]"] + \
        (["Picasso x (lpx)", "Picasso y (lpy)"] if has_peer else [])
    rows = []
    for r in ok:
        o = r["ours"]
        p = r.get("picasso") or {}
        row = [r["scenario"].name, _cal(o["calibration_x"]), _cal(o["calibration_y"]),
               _f(r.get("median_unc_nm"), "{:.1f}")]
        if has_peer:
            row += [_cal(p.get("calibration_x")), _cal(p.get("calibration_y"))]
        rows.append(row)
    L += _table(hdr, rows)
    L.append("std of (predicted - true) / predicted 1-sigma over matches: 1 is calibrated, "
             "> 1 overconfident, < 1 underconfident. Picasso's lpx/lpy are its own "
             "CRLB-based precision estimates, shown for reference.")
    L.append("")

    L += ["## Speed and memory (localisation only, per scenario)", ""]
    hdr = ["scenario", "frames", "frames/s ours", "peak RSS ours [MB]"] + \
        (["frames/s Picasso", "peak RSS Picasso [MB]"] if has_peer else [])
    rows = []
    for r in ok:
        ti = r["ours_info"]
        row = [r["scenario"].name, r["n_frames"], _f(ti["n_frames"] / ti["time_s"], "{:.0f}"),
               _f(ti["peak_rss_mb"], "{:.0f}")]
        if has_peer:
            pi = r.get("picasso_info") or {}
            row += [_f(pi["n_frames"] / pi["time_s"], "{:.0f}") if pi else "-",
                    _f(pi.get("peak_rss_mb"), "{:.0f}")]
        rows.append(row)
    L += _table(hdr, rows)
    L.append("Ours: `Predictor.predict` end to end on the in-memory ADU movie (ADU -> photons, "
             "tiling, network, decoding), after a warm-up call, with freed memory kept for reuse "
             "as `var-emitter predict` does (`reuse_freed_memory`); peak RSS = `VmHWM` of the "
             "fresh worker process (Python + torch + model + movie). Picasso: "
             "`localize_frames` at the tuned threshold (identification + gaussmle fit), numba "
             "already compiled; peak RSS = psutil polling of its long-lived worker during the "
             "call (Python + numba + pandas + movie).")
    L.append("")

    robust = [r for r in ok if r["scenario"].movie_of]
    ref = next((r for r in ok if r["scenario"].name == "medium"), None)
    if robust and ref is not None:
        L += ["## Robustness to misstated camera parameters (same frames as `medium`)", ""]
        hdr = ["scenario", "JI ours", "change vs medium"] + \
            (["JI Picasso", "change vs medium (Picasso)"] if has_peer else []) + \
            ["RMSE ours [nm]"]
        rows = []
        for r in robust:
            row = [r["scenario"].name, _f(r["ours"]["jaccard"]),
                   _f(r["ours"]["jaccard"] - ref["ours"]["jaccard"], "{:+.3f}")]
            if has_peer:
                p = r.get("picasso") or {}
                pr = ref.get("picasso") or {}
                row += [_f(p.get("jaccard")),
                        _f(p.get("jaccard", float("nan")) - pr.get("jaccard", float("nan")),
                           "{:+.3f}")]
            row.append(_f(r["ours"]["rmse_nm"], "{:.1f}"))
            rows.append(row)
        L += _table(hdr, rows)
        L.append("Picasso identifies on raw ADU with its threshold retuned on the truth per "
                 "scenario, so a misstated camera changes only its photon counts.")
        L.append("")

    if speed is not None:
        L += ["## End to end: `var-emitter predict --no-maps --no-figures`", ""]
        rows = []
        for run in speed["runs"]:
            rows.append([run["n_frames"], _f(run["wall_s"], "{:.2f}"),
                         _f(run["n_frames"] / run["wall_s"], "{:.0f}"),
                         _f(run["peak_rss_mb"], "{:.0f}"), run["rc"]])
        L += _table(["frames (40x40, 1/um^2, sCMOS)", "wall [s]", "frames/s end to end",
                     "peak RSS [MB]", "exit code"], rows)
        if "fps_end_to_end" in speed:
            L.append(f"- {speed['n_frames']} frames: **{speed['fps_end_to_end']:.0f} frames/s "
                     f"end to end** (process start, torch import, model load, TIFF read, "
                     f"inference, CSV/HDF5 writing); {speed['fps_after_startup']:.0f} frames/s "
                     f"after the start-up cost of about {speed['startup_s']:.1f} s (from the "
                     "difference of the two runs).")
        if speed.get("picasso_fps"):
            L.append(f"- Picasso on the same {speed['n_frames']} frames (localize_frames, "
                     f"threshold tuned on `medium`, in-memory, numba warm): "
                     f"{speed['picasso_fps']:.0f} frames/s.")
        L.append(f"- Peak RSS: {speed['runs'][-1].get('rss_method', '?')} of the `predict` "
                 "process.")
        L.append(f"- Command: `{speed['runs'][-1]['command']}`")
        L.append("")

    L += targets_section(ok, speed, has_peer)
    return "\n".join(L) + "\n"


def targets_section(ok: list, speed: dict | None, has_peer: bool) -> list:
    """Issue 5's targets, each with the measured figure and met / missed."""
    by = {r["scenario"].name: r for r in ok}
    rows = []

    def add(what, measured, met):
        rows.append([what, measured, "met" if met else "**missed**"])

    def o(name, key):
        return by[name]["ours"].get(key, float("nan"))

    def p(name, key):
        return (by[name].get("picasso") or {}).get(key, float("nan"))

    if "sparse" in by:
        add("sparse: Jaccard >= 0.99", _f(o("sparse", "jaccard")), o("sparse", "jaccard") >= 0.99)
        q = _ratio(o("sparse", "rmse_nm"), o("sparse", "crlb_rmse_nm"))
        add("sparse: RMSE <= 1.15 x CRLB", _f(q, "{:.2f}x"), q <= 1.15)
        cx, cy = o("sparse", "calibration_x"), o("sparse", "calibration_y")
        add("sparse: calibration in [0.85, 1.2]", f"{_f(cx, '{:.2f}')} / {_f(cy, '{:.2f}')}",
            0.85 <= cx <= 1.2 and 0.85 <= cy <= 1.2)
    if "medium" in by:
        add("1/um^2: Jaccard >= 0.95", _f(o("medium", "jaccard")), o("medium", "jaccard") >= 0.95)
        add("1/um^2: efficiency >= 85", _f(o("medium", "efficiency"), "{:.1f}"),
            o("medium", "efficiency") >= 85)
    if "dense" in by:
        add("3/um^2: Jaccard >= 0.85", _f(o("dense", "jaccard")), o("dense", "jaccard") >= 0.85)
        add("3/um^2: efficiency >= 70", _f(o("dense", "efficiency"), "{:.1f}"),
            o("dense", "efficiency") >= 70)
        if has_peer:
            q = _ratio(o("dense", "count_mae"), p("dense", "count_mae"))
            add("3/um^2: count error <= 0.4 x Picasso's", _f(q, "{:.2f}x"), q <= 0.4)
    if "filaments" in by:
        add("filaments: Jaccard >= 0.80", _f(o("filaments", "jaccard")),
            o("filaments", "jaccard") >= 0.80)
    if has_peer:
        for name in ("dim", "wide_psf", "narrow_psf", "emccd", "large_frame",
                     "external_deepstorm"):
            if name in by and by[name].get("picasso"):
                ji, pji = o(name, "jaccard"), p(name, "jaccard")
                ef, pef = o(name, "efficiency"), p(name, "efficiency")
                add(f"{name}: Jaccard and efficiency above Picasso",
                    f"JI {_f(ji)} vs {_f(pji)}, eff {_f(ef, '{:.1f}')} vs {_f(pef, '{:.1f}')}",
                    ji > pji and (ef > pef or (math.isfinite(ef) and not math.isfinite(pef))))
    if "medium" in by:
        for r in ok:
            if r["scenario"].movie_of == "medium":
                d = r["ours"]["jaccard"] - by["medium"]["ours"]["jaccard"]
                add(f"{r['scenario'].name}: Jaccard drop <= 0.05", _f(d, "{:+.3f}"), d >= -0.05)
    if speed is not None and "fps_end_to_end" in speed:
        add(f"predict --no-maps --no-figures, {speed['n_frames']} frames: >= 300 frames/s",
            _f(speed["fps_end_to_end"], "{:.0f}"), speed["fps_end_to_end"] >= 300)
    if not rows:
        return []
    return (["## Issue 5 targets (this run)", ""]
            + _table(["target", "measured", "status"], rows)
            + ["Peers' published reference figures (Spotiflow, DECODE-like net) are in "
               "field-notes; only Picasso is rerun here.", ""])


# ------------------------------------------------------------------------------------------
def evaluate(prep: Prepared, locs) -> dict:
    """Metrics of one method on one scenario (with the CRLB under the true camera)."""
    from napari_var_emitter.metrics import evaluate_tables

    return evaluate_tables(prep.truth, locs, TOLERANCE_NM, prep.pixel_size_nm,
                           n_frames=prep.shape[0], camera=prep.scenario.camera,
                           image_shape=prep.shape[1:])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="model checkpoint (.pth); default: the bundled model")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"),
                    help="markdown report to write (default benchmarks/results.md)")
    ap.add_argument("--json", default=None, help="also write the raw numbers as JSON here")
    ap.add_argument("--quick", action="store_true", help="few frames per scenario (for tests)")
    ap.add_argument("--skip-picasso", action="store_true", help="do not run the peer")
    ap.add_argument("--peer-python", default=None,
                    help=f"python of the peers venv with picassosr (default {DEFAULT_PEER_PYTHON}"
                         " when it exists)")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated subset of: " + ", ".join(SCENARIOS).replace("%", "%%"))
    ap.add_argument("--no-speed", action="store_true",
                    help="skip the end-to-end `var-emitter predict` timing")
    ap.add_argument("--speed-frames", type=int, default=None,
                    help="frames of the end-to-end speed stack (default 2000; 60 with --quick)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tta", action="store_true",
                    help="our model with symmetry averaging (predict --tta; 8x slower)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="detection threshold (default: the model's calibrated one, else 0.5)")
    ap.add_argument("--workdir", default=None, help="keep intermediate files here")
    ap.add_argument("--_ours-worker", dest="ours_worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.ours_worker:
        return _ours_worker(a.ours_worker)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    names = list(SCENARIOS) if not a.scenarios else [s.strip() for s in a.scenarios.split(",")
                                                     if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        sys.stderr.write(f"error: unknown scenario(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SCENARIOS)}\n")
        return 2
    if a.checkpoint and not os.path.isfile(a.checkpoint):
        sys.stderr.write(f"error: {a.checkpoint}: no such checkpoint file\n")
        return 2
    checkpoint = os.path.abspath(a.checkpoint) if a.checkpoint else None

    def log(msg):
        print(msg, flush=True)

    workdir = a.workdir or tempfile.mkdtemp(prefix="var-emitter-bench-")
    os.makedirs(workdir, exist_ok=True)
    if not checkpoint:
        ck_info = checkpoint_info(None)
    else:
        # a training run may replace the file while we run: every process reads one snapshot
        snapshot = os.path.join(workdir, "model_snapshot.pth")
        shutil.copyfile(checkpoint, snapshot)
        ck_info = {**checkpoint_info(snapshot), "path": checkpoint}
        checkpoint = snapshot
    meta = {"command": "python " + " ".join(shlex.quote(x) for x in [
                os.path.relpath(os.path.abspath(__file__)), *(argv if argv is not None
                                                              else sys.argv[1:])]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": a.quick, "threshold": a.threshold, "batch_size": a.batch_size,
            "device": a.device, "machine": machine_info(), "checkpoint": ck_info,
            "tta": a.tta,
            "load_start": load_start}

    worker = None
    peer_python = a.peer_python or (DEFAULT_PEER_PYTHON if os.path.exists(DEFAULT_PEER_PYTHON)
                                    else None)
    if a.skip_picasso:
        meta["picasso_skip_reason"] = "--skip-picasso"
    elif not peer_python or not os.path.exists(peer_python):
        meta["picasso_skip_reason"] = ("no peers venv: python3 -m venv /work/venv-peers && "
                                       "/work/venv-peers/bin/pip install picassosr")
    else:
        log(f"starting Picasso worker ({peer_python}); numba compiles first ...")
        try:
            worker = PicassoWorker(peer_python, os.path.join(workdir, "picasso_worker.log"))
            meta["picasso"] = worker.hello
            meta["peer_python"] = peer_python
            log(f"  ready (compile {worker.hello.get('compile_s', 0):.1f} s)")
        except Exception as e:  # noqa: BLE001 - report and go on without the peer
            meta["picasso_skip_reason"] = f"Picasso worker failed: {e}"
            log(f"  {meta['picasso_skip_reason']}")
            worker = None

    results = []
    cache = {}
    try:
        for name in names:
            scen = SCENARIOS[name]
            t0 = time.perf_counter()
            prep = prepare(scen, workdir, a.quick, cache)
            if prep is None:
                log(f"{name}: skipped (external data not found)")
                continue
            r = {"scenario": scen, "n_frames": prep.shape[0], "shape": prep.shape,
                 "n_true": int(len(prep.truth)),
                 "truth_per_frame": len(prep.truth) / max(prep.shape[0], 1)}
            try:
                locs, info = run_ours(prep, workdir, checkpoint, a.device, a.batch_size,
                                      a.threshold, a.tta)
                r["ours"] = evaluate(prep, locs)
                r["ours_info"] = info
                unc = np.sqrt((locs["unc_x"] ** 2 + locs["unc_y"] ** 2) / 2.0)
                unc = unc[np.isfinite(unc)]
                r["median_unc_nm"] = float(np.median(unc) * prep.pixel_size_nm) if len(unc) \
                    else float("nan")
                if worker is not None:
                    try:
                        plocs, pinfo = run_picasso(worker, prep, workdir)
                        r["picasso"] = evaluate(prep, plocs)
                        r["picasso_info"] = pinfo
                    except RuntimeError as e:
                        r["picasso_error"] = str(e)
                        log(f"  Picasso failed on {name}: {e}")
            except Exception as e:  # noqa: BLE001 - one failed scenario must not end the run
                r["error"] = f"{type(e).__name__}: {e}"
            results.append(r)
            if "error" in r:
                log(f"{name}: FAILED {r['error']}")
            else:
                msg = (f"{name}: JI {r['ours']['jaccard']:.3f} RMSE {r['ours']['rmse_nm']:.1f} nm"
                       f" ({r['ours_info']['n_frames'] / r['ours_info']['time_s']:.0f} frames/s)")
                if r.get("picasso"):
                    msg += (f" | Picasso JI {r['picasso']['jaccard']:.3f} RMSE "
                            f"{r['picasso']['rmse_nm']:.1f} nm")
                log(msg + f" [{time.perf_counter() - t0:.0f} s]")

        speed = None
        if not a.no_speed:
            n = a.speed_frames or (60 if a.quick else 2000)
            log(f"end-to-end speed: var-emitter predict on {n} frames ...")
            speed = run_speed(n, workdir, checkpoint, log, a.tta)
            if worker is not None:
                ref = next((r for r in results if r["scenario"].name == "medium"
                            and r.get("picasso_info")), None)
                if ref is not None:
                    try:
                        tif_npy = os.path.join(workdir, "speed_movie.npy")
                        from napari_var_emitter.io.tiff import open_stack

                        with open_stack(os.path.join(workdir, f"speed_{n}.tif")) as st:
                            np.save(tif_npy, np.asarray(st[:]))
                        rep = worker.run({"input": tif_npy, "camera": asdict(SCMOS),
                                          "pixel_size_nm": 100.0, "box": 7,
                                          "method": "gaussmle",
                                          "min_net_gradient":
                                              ref["picasso_info"]["min_net_gradient_adu"],
                                          "out": os.path.join(workdir, "picasso_speed.npz")})
                        speed["picasso_fps"] = rep["n_frames"] / rep["time_s"]
                        log(f"  Picasso on the same frames: {speed['picasso_fps']:.0f} frames/s")
                    except RuntimeError as e:
                        log(f"  Picasso speed run failed: {e}")
    finally:
        if worker is not None:
            worker.close()

    meta["runtime_s"] = time.perf_counter() - t_start
    meta["load_end"] = os.getloadavg()[0]
    report = build_report(results, speed, meta)
    from napari_var_emitter.io.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_text(a.out, report)
    if a.json:
        raw = {"meta": meta, "speed": speed,
               "results": [{**{k: v for k, v in r.items() if k != "scenario"},
                            "scenario": asdict(r["scenario"])} for r in results]}
        atomic_write_text(a.json, json.dumps(raw, indent=1, default=_json_default))
    log(f"report written to {a.out} ({meta['runtime_s'] / 60:.1f} min)")
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any("error" in r for r in results) else 0


def _json_default(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
