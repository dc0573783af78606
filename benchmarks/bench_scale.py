"""Scale: peak memory and frames/s of ``var-emitter predict`` on 1,000 to 20,000 frames.

Issue 6 asks that a 20,000-frame 64x64 stack runs through ``predict --no-maps`` and through
``predict`` with maps in under 2 GB of resident memory, flat in the number of frames::

    nice -n 10 python benchmarks/bench_scale.py [--checkpoint CKPT] \
        [--out benchmarks/scale_results.md]

The script simulates the stack itself (1 emitter/um^2, the benchmark's sCMOS camera; chunks
of 1,000 frames with their own seeds, streamed into a TIFF so the stack is never whole in
memory) in a temporary folder that is deleted at the end (never committed). Each size runs
as its own ``var-emitter predict`` process; its wall time and peak resident memory (the
maximum RSS GNU ``/usr/bin/time`` reports for it, see ``run_benchmarks.run_measured``) are
recorded.

Maps at every scale are large: ``T * (4 + 16 + 64) * H * W * 6`` float32 values for factors
2/4/8, i.e. about 8.3 MB per 64x64 frame before compression (165 GB for 20,000 frames).
Before each maps run the script measures the maps' cost on a short probe (seconds and
compressed bytes per frame) and skips sizes whose estimated disk use exceeds 80% of the free
space or whose estimated time exceeds ``--max-maps-minutes``, saying so in the report.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_benchmarks as rb  # noqa: E402 - sibling module: shared camera and runners

LIMIT_MB = 2048.0


class SimulatedStack:
    """A (T, H, W) uint16 ADU stack simulated lazily, one chunk of frames at a time.

    Frame ``i`` belongs to chunk ``i // chunk``, simulated with seed ``seed + chunk index``;
    only the current chunk is held in memory. Indexable by int (what ``write_tiff`` needs).
    """

    def __init__(self, n_frames: int, shape=(64, 64), seed: int = 6000, chunk: int = 1000,
                 density: float = 1.0, camera: rb.CameraSpec = rb.SCMOS):
        self.shape = (int(n_frames), int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.uint16)
        self.seed, self.chunk, self.density, self.camera = seed, chunk, density, camera
        self._k = None
        self._frames = None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        from napari_var_emitter.simulation import simulate_movie

        i = int(i)
        k = i // self.chunk
        if k != self._k:
            n = min(self.chunk, self.shape[0] - k * self.chunk)
            movie = simulate_movie(n, self.shape[1:], rng=self.seed + k,
                                   density_per_um2=self.density, camera=self.camera,
                                   highres_factor=None)
            self._k, self._frames = k, movie.adu
        return self._frames[i - k * self.chunk]


def make_stacks(sizes: list, workdir: str, shape, log) -> dict:
    """Write one TIFF per size (the first N frames of the same simulated acquisition)."""
    from napari_var_emitter.io.tiff import write_tiff

    paths = {}
    for n in sorted(sizes):
        path = os.path.join(workdir, f"scale_{n}.tif")
        t0 = time.perf_counter()
        write_tiff(path, SimulatedStack(n, shape), pixel_size_nm=100.0)
        log(f"  wrote {n} frames ({os.path.getsize(path) / 2 ** 20:.0f} MB) in "
            f"{time.perf_counter() - t0:.0f} s")
        paths[n] = path
    return paths


def maps_factors(checkpoint: str | None) -> list:
    """The upsampling factors whose maps ``predict`` writes (from the checkpoint's config)."""
    from napari_var_emitter.checkpoint import load_checkpoint
    from napari_var_emitter.inference import bundled_checkpoint_path

    ck = load_checkpoint(checkpoint or bundled_checkpoint_path())
    return list(ck["config_obj"].model.factors)


def run_predict(tif: str, workdir: str, checkpoint, maps: bool, tag: str) -> dict:
    """One ``var-emitter predict`` process; wall time, peak RSS, output size."""
    out = os.path.join(workdir, f"out_{tag}")
    cmd = rb.cli_command(tif, out, checkpoint, rb.SCMOS, maps=maps, figures=False)
    log_path = os.path.join(workdir, f"{tag}.log")
    r = rb.run_measured(cmd, log_path)
    r["out_mb"] = _du_mb(out)
    if r["rc"] != 0:
        with open(log_path) as f:
            lines = f.read().strip().splitlines()
        r["error"] = lines[-1] if lines else f"exit code {r['rc']}"
    shutil.rmtree(out, ignore_errors=True)
    return r


def _du_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--out", default=os.path.join(HERE, "scale_results.md"))
    ap.add_argument("--frames", default="1000,5000,20000",
                    help="stack sizes for predict --no-maps (comma-separated)")
    ap.add_argument("--maps-frames", default="1000,5000,20000",
                    help="stack sizes for predict with maps (each subject to the disk and "
                         "time estimates)")
    ap.add_argument("--max-maps-minutes", type=float, default=30.0,
                    help="skip a maps run whose estimated time exceeds this")
    ap.add_argument("--probe-frames", type=int, default=50,
                    help="frames of the maps probe used for the estimates")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    ap.add_argument("--workdir", default=None, help="keep the stacks here (default: temp, "
                                                    "deleted at the end)")
    a = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    checkpoint = os.path.abspath(a.checkpoint) if a.checkpoint else None
    sizes = [int(s) for s in a.frames.split(",") if s.strip()]
    map_sizes = [int(s) for s in a.maps_frames.split(",") if s.strip()]
    workdir = a.workdir or tempfile.mkdtemp(prefix="var-emitter-scale-")
    os.makedirs(workdir, exist_ok=True)
    ck_info = rb.checkpoint_info(checkpoint)
    if checkpoint:
        # a training run may replace the file meanwhile: every run reads one snapshot
        snapshot = os.path.join(workdir, "model_snapshot.pth")
        shutil.copyfile(checkpoint, snapshot)
        ck_info = {**rb.checkpoint_info(snapshot), "path": checkpoint}
        checkpoint = snapshot
    shape = tuple(a.size)
    factors = maps_factors(checkpoint)
    raw_maps_per_frame = sum(f * f for f in factors) * shape[0] * shape[1] * 6 * 4
    try:
        log(f"simulating stacks {sorted(set(sizes + map_sizes + [a.probe_frames]))} of "
            f"{shape[0]}x{shape[1]} in {workdir}")
        stacks = make_stacks(sorted(set(sizes + map_sizes + [a.probe_frames])), workdir, shape,
                             log)
        rows = []
        for n in sizes:
            log(f"predict --no-maps, {n} frames ...")
            r = run_predict(stacks[n], workdir, checkpoint, False, f"nomaps_{n}")
            r.update(n=n, maps=False)
            log(f"  {r['wall_s']:.1f} s, {n / r['wall_s']:.0f} frames/s, peak RSS "
                f"{r['peak_rss_mb']:.0f} MB, rc {r['rc']}")
            rows.append(r)

        skipped = []
        if map_sizes:
            log(f"maps probe: {a.probe_frames} frames ...")
            probe = run_predict(stacks[a.probe_frames], workdir, checkpoint, True, "probe")
            probe.update(n=a.probe_frames, maps=True, probe=True)
            rows.append(probe)
            s_per_frame = probe["wall_s"] / a.probe_frames
            mb_per_frame = probe["out_mb"] / a.probe_frames
            log(f"  {probe['wall_s']:.1f} s, {mb_per_frame:.2f} MB/frame on disk, peak RSS "
                f"{probe['peak_rss_mb']:.0f} MB")
            for n in map_sizes:
                free_mb = shutil.disk_usage(workdir).free / 2 ** 20
                est_mb = mb_per_frame * n * 1.1
                est_min = s_per_frame * n / 60.0
                if probe["rc"] != 0:
                    skipped.append((n, "the maps probe failed"))
                    continue
                if est_mb > 0.8 * free_mb:
                    skipped.append((n, f"estimated output {est_mb / 1024:.1f} GB > 80% of the "
                                       f"{free_mb / 1024:.0f} GB free"))
                    continue
                if est_min > a.max_maps_minutes:
                    skipped.append((n, f"estimated {est_min:.0f} min > --max-maps-minutes "
                                       f"{a.max_maps_minutes:g}"))
                    continue
                log(f"predict with maps, {n} frames (estimated {est_min:.1f} min, "
                    f"{est_mb / 1024:.1f} GB) ...")
                r = run_predict(stacks[n], workdir, checkpoint, True, f"maps_{n}")
                r.update(n=n, maps=True)
                log(f"  {r['wall_s']:.1f} s, {n / r['wall_s']:.1f} frames/s, peak RSS "
                    f"{r['peak_rss_mb']:.0f} MB, output {r['out_mb']:.0f} MB, rc {r['rc']}")
                rows.append(r)
        report = build_report(rows, skipped, {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "runtime_s": time.perf_counter() - t_start, "load_start": load_start,
            "load_end": os.getloadavg()[0], "shape": shape, "factors": factors,
            "raw_maps_per_frame": raw_maps_per_frame,
            "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__)),
                                             *(argv if argv is not None else sys.argv[1:])]),
            "machine": rb.machine_info(), "checkpoint": ck_info,
            "predict_command": " ".join(rb.cli_command("STACK.tif", "OUT", a.checkpoint,
                                                       rb.SCMOS, maps=False))})
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    from napari_var_emitter.io.atomic import atomic_write_text

    atomic_write_text(a.out, report)
    log(f"report written to {a.out}")
    bad = [r for r in rows if r["rc"] != 0 or r["peak_rss_mb"] > LIMIT_MB]
    return 1 if bad else 0


def build_report(rows: list, skipped: list, meta: dict) -> str:
    """Markdown: one table of runs, the flatness check, skipped maps runs and why."""
    m = meta["machine"]
    ck = meta["checkpoint"]
    h, w = meta["shape"]
    rss_method = rows[0].get("rss_method", "?") if rows else "?"
    L = ["# Scale: `var-emitter predict` on long stacks", ""]
    L.append(f"Generated {meta['date']} in {meta['runtime_s'] / 60:.1f} min with "
             f"`{meta['command']}`.")
    L.append("")
    L.append(f"- Machine: {m['cpu']}, {m['nproc']} cores, {m['mem_gb']:.0f} GB RAM; torch "
             f"{m['torch']} ({m['torch_threads']} threads). Load average (1 min) at start / end "
             f"{meta['load_start']:.2f} / {meta['load_end']:.2f}: other processes on these cores "
             "slow every run.")
    L.append(f"- Model: `{ck['path']}`" + (f", training step {ck.get('step')}"
                                          if "step" in ck else ""))
    L.append(f"- Stacks: {h}x{w} uint16, 1 emitter/um^2, sCMOS camera, simulated in chunks of "
             "1,000 frames into a temporary folder (deleted afterwards).")
    L.append(f"- Command per run: `{meta['predict_command']}` (maps runs without "
             "`--no-maps`); each run is a fresh process; peak RSS = its maximum resident set "
             f"size ({rss_method}); frames/s = "
             "frames / wall time of the whole process (start-up, model load, TIFF read, "
             "inference, writing).")
    L.append(f"- Maps written: factors {meta['factors']}, "
             f"{meta['raw_maps_per_frame'] / 2 ** 20:.1f} MB per frame before compression.")
    L.append("")
    hdr = ["run", "frames", "wall [s]", "frames/s", "marginal frames/s", "peak RSS [MB]",
           f"< {LIMIT_MB:.0f} MB", "anonymous: peak in 1st half / whole run [MB]",
           "file-backed peak [MB]", "output [MB]", "exit code"]
    out = []
    for maps in (False, True):
        prev = None
        for r in sorted((r for r in rows if r["maps"] == maps), key=lambda r: r["n"]):
            marginal = "-"
            if prev is not None and r["rc"] == 0 and prev["rc"] == 0 and r["n"] > prev["n"]:
                dt = r["wall_s"] - prev["wall_s"]
                marginal = f"{(r['n'] - prev['n']) / dt:.1f}" if dt > 0 else "n/a"
            name = ("predict with maps" + (" (probe)" if r.get("probe") else "")) if maps \
                else "predict --no-maps"
            out.append([name, r["n"], f"{r['wall_s']:.1f}", f"{r['n'] / r['wall_s']:.1f}",
                        marginal, f"{r['peak_rss_mb']:.0f}",
                        "yes" if r["peak_rss_mb"] < LIMIT_MB else "**no**",
                        f"{r.get('anon_half_mb', float('nan')):.0f} / "
                        f"{r.get('anon_end_mb', float('nan')):.0f}",
                        f"{r.get('file_peak_mb', float('nan')):.0f}",
                        f"{r['out_mb']:.0f}", r["rc"]])
            prev = r
    L += rb._table(hdr, out)
    L.append("Marginal frames/s: extra frames / extra wall time against the previous, smaller "
             "run (start-up cost removed). Anonymous / file-backed: the process's RSS split "
             "as `/proc/PID/status` gives it (RssAnon / RssFile), sampled every 0.5 s; "
             "file-backed pages are the memory-mapped input TIFF and shared libraries, which "
             "the kernel can drop under memory pressure. Anonymous memory that is higher over "
             "the whole run than in its first half grows with the frames processed.")
    L.append("")
    for maps in (False, True):
        rs = [r for r in rows if r["maps"] == maps and r["rc"] == 0]
        if len(rs) >= 2:
            lo, hi = min(rs, key=lambda r: r["n"]), max(rs, key=lambda r: r["n"])
            growth = hi["peak_rss_mb"] - lo["peak_rss_mb"]
            L.append(f"- {'With maps' if maps else 'No maps'}: peak RSS {lo['peak_rss_mb']:.0f} MB "
                     f"at {lo['n']} frames, {hi['peak_rss_mb']:.0f} MB at {hi['n']} frames "
                     f"({growth:+.0f} MB for {hi['n'] / lo['n']:.0f}x the frames).")
    for n, why in skipped:
        L.append(f"- Maps at {n} frames not run: {why}.")
    failed = [r for r in rows if r["rc"] != 0]
    for r in failed:
        L.append(f"- **{'maps' if r['maps'] else 'no-maps'} run at {r['n']} frames failed**: "
                 f"{r.get('error')}")
    L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
