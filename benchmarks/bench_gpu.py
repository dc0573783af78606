"""GPU speed: model throughput, ``predict`` end to end, and training steps per second.

Run on a machine with a CUDA GPU (BENCHMARKS.md: an H100 in session 5, an H200 in session 11)::

    python benchmarks/bench_gpu.py [--out gpu_results.md] [--quick]

Four measurements, each with the bundled model's architecture and 40x40 frames:

1. *Model only*: ``forward(frames, factors=[loc_factor])`` under ``inference_mode``, fp32
   and fp16 autocast, several batch sizes (best of a few timed batches, after warm-up).
2. *predict in one process*: :meth:`Predictor.predict` (ADU -> photons, tiling, decoding,
   merging, the table) on a simulated movie, ``maps=False``, at several ``batch_size``;
   frames/s after a warm-up call, and the GPU's peak allocated memory.
3. *predict end to end*: ``var-emitter predict --no-maps --no-figures --device cuda`` as a
   separate process on a 20-frame and an N-frame TIFF (start-up = Python, torch, CUDA and
   model loading; measured like the CPU benchmark in ``run_benchmarks.py``).
4. *training*: steps/s and tiles/s of :class:`Trainer` (fp16 autocast, the bundled recipe's
   losses and scales) at several batch sizes, with batches simulated in the training process
   or by ``num_workers`` data workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_benchmarks as rb  # noqa: E402 - sibling module: camera, measured runs

RECIPE = os.path.join(HERE, "bundled_model", "v05_e_continue.json")


DEVICE = "cuda"  # --device cpu runs the same measurements on a CPU (a smoke test)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if DEVICE == "cuda" else float("nan")


def model_only(batches, repeats: int) -> list[dict]:
    """Frames/s of the localisation forward pass at each batch size, fp32 and fp16."""
    from napari_var_emitter.inference import Predictor

    pred = Predictor.from_pretrained(device=DEVICE)
    model, cfg = pred.model.eval(), pred.config.model
    rows = []
    for precision in ("fp32", "fp16"):
        for b in batches:
            x = 100 + 10 * torch.randn(b, cfg.context_frames, 40, 40, device=DEVICE)
            ctx = (torch.autocast(DEVICE, dtype=torch.float16) if precision == "fp16"
                   else torch.autocast(DEVICE, enabled=False))
            _reset_peak()
            with torch.inference_mode(), ctx:
                for _ in range(3):
                    model(x, factors=[cfg.loc_factor], with_recon=False)
                _sync()
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(x, factors=[cfg.loc_factor], with_recon=False)
                    _sync()
                    best = min(best, time.perf_counter() - t0)
            rows.append({"precision": precision, "batch": b, "fps": b / best,
                         "gpu_peak_mb": _peak_mb()})
            print(f"model only {precision} batch {b}: {b / best:,.0f} frames/s", flush=True)
    return rows


def predict_in_process(adu: np.ndarray, batches) -> list[dict]:
    """Frames/s of Predictor.predict(maps=False) on the whole movie at each batch size, with
    and without the border refit and the pair split (they run on the GPU too)."""
    from napari_var_emitter.inference import Predictor

    pred = Predictor.from_pretrained(device=DEVICE)
    cam = rb.SCMOS
    rows = []
    for b in batches:
        for fits in (True, False):
            options = dict(camera=cam, maps=False, batch_size=b, border_fit=fits, pair_fit=fits)
            pred.predict(adu[:max(b, 256)], **options)  # warm-up
            _sync()
            _reset_peak()
            t0 = time.perf_counter()
            res = pred.predict(adu, **options)
            _sync()
            dt = time.perf_counter() - t0
            rows.append({"batch": b, "fits": fits, "frames": len(adu),
                         "fps": len(adu) / dt, "locs": len(res.localizations),
                         "gpu_peak_mb": _peak_mb()})
            print(f"predict batch {b}, border refit and pair fit {'on' if fits else 'off'}: "
                  f"{len(adu) / dt:,.0f} frames/s ({len(res.localizations)} localisations)",
                  flush=True)
    return rows


def predict_end_to_end(adu: np.ndarray, n_frames: int, batches, workdir: str) -> list[dict]:
    """``var-emitter predict --no-maps --no-figures --device cuda`` on 20 and n frames."""
    from napari_var_emitter.io.tiff import write_tiff

    reps = -(-n_frames // len(adu))
    stack = np.concatenate([adu] * reps)[:n_frames] if reps > 1 else adu[:n_frames]
    rows = []
    tifs = {}
    for n in (20, n_frames):
        tifs[n] = os.path.join(workdir, f"speed_{n}.tif")
        write_tiff(tifs[n], stack[:n])
    for b in batches:
        runs = {}
        for n in (20, n_frames):
            out = os.path.join(workdir, f"out_{n}_{b}")
            cmd = rb.cli_command(tifs[n], out, None, rb.SCMOS) + [
                "--device", DEVICE, "--batch-size", str(b)]
            r = rb.run_measured(cmd, os.path.join(workdir, f"e2e_{n}_{b}.log"), poll_s=0.02)
            if r["rc"] != 0:
                with open(os.path.join(workdir, f"e2e_{n}_{b}.log")) as f:
                    print(f.read()[-3000:], flush=True)
            runs[n] = r
        small, big = runs[20], runs[n_frames]
        dt = big["wall_s"] - small["wall_s"]
        row = {"batch": b, "frames": n_frames, "wall_s": big["wall_s"],
               "startup_s": small["wall_s"], "fps_end_to_end": n_frames / big["wall_s"],
               "fps_after_startup": (n_frames - 20) / dt if dt > 0 else float("nan"),
               "peak_rss_mb": big["peak_rss_mb"], "rc": big["rc"]}
        rows.append(row)
        print(f"end to end batch {b}, {n_frames} frames: {row['wall_s']:.2f} s "
              f"({row['fps_end_to_end']:,.0f} frames/s; {row['fps_after_startup']:,.0f} after "
              f"a {small['wall_s']:.1f} s start-up), peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
    return rows


def training_speed(settings, steps: int, workdir: str) -> list[dict]:
    """Steps/s of the bundled recipe's training at (batch, num_workers) settings."""
    from napari_var_emitter.config import load_config
    from napari_var_emitter.dataset import TrainingData
    from napari_var_emitter.training import Trainer

    rows = []
    for batch, workers in settings:
        cfg = load_config(RECIPE)
        cfg.training.batch_size = batch
        cfg.training.num_workers = workers
        cfg.training.steps_per_epoch = 10 ** 6  # no validation inside the timed steps
        cfg.training.num_epochs = 1
        trainer = Trainer(cfg, TrainingData.simulated(cfg), os.path.join(workdir, "t"),
                          device=DEVICE, tensorboard=False)
        _reset_peak()
        warm = 5
        t0 = None
        for ev in trainer.events():
            if ev.step == warm:
                _sync()
                t0 = time.perf_counter()
            if ev.step == warm + steps:
                _sync()
                break
        dt = time.perf_counter() - t0
        trainer.close()
        row = {"batch": batch, "num_workers": workers, "steps_per_s": steps / dt,
               "tiles_per_s": steps * batch / dt,
               "gpu_peak_mb": _peak_mb()}
        rows.append(row)
        print(f"train batch {batch}, {workers} workers: {row['steps_per_s']:.2f} steps/s, "
              f"{row['tiles_per_s']:,.0f} tiles/s, GPU peak {row['gpu_peak_mb']:,.0f} MB",
              flush=True)
        del trainer
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"GPU: {m['gpu']} ({m['gpu_memory_gb']:.0f} GB), torch {m['torch']}, CUDA "
             f"{m['cuda']}, {m['cpus']} CPU cores; command: `{res['command']}`", "",
             "| model only | batch | frames/s | GPU peak MB |", "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['batch']} | {r['fps']:,.0f} | {r['gpu_peak_mb']:,.0f} |"
              for r in res["model_only"]]
    lines += ["", "| Predictor.predict, maps off | batch | border refit, pair fit | frames | "
              "frames/s | GPU peak MB |", "|---|---|---|---|---|---|"]
    lines += [f"| in one process | {r['batch']} "
              f"| {'on' if r.get('fits', r.get('border_fit', True)) else 'off'} "
              f"| {r['frames']} | {r['fps']:,.0f} | {r['gpu_peak_mb']:,.0f} |"
              for r in res["predict"]]
    lines += ["", "| `predict --no-maps --no-figures` | batch | frames | wall s | frames/s | "
              "frames/s after start-up | start-up s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| end to end | {r['batch']} | {r['frames']} | {r['wall_s']:.2f} | "
              f"{r['fps_end_to_end']:,.0f} | {r['fps_after_startup']:,.0f} | "
              f"{r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} |" for r in res["end_to_end"]]
    lines += ["", "| training (fp16) | batch | data workers | steps/s | tiles/s | GPU peak MB |",
              "|---|---|---|---|---|---|"]
    lines += [f"| bundled recipe | {r['batch']} | {r['num_workers']} | {r['steps_per_s']:.2f} "
              f"| {r['tiles_per_s']:,.0f} | {r['gpu_peak_mb']:,.0f} |" for r in res["training"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_results.md")
    ap.add_argument("--frames", type=int, default=20000, help="frames for predict (default "
                    "20,000: 2,000 simulated frames repeated)")
    ap.add_argument("--e2e-frames", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--train-settings", default=None,
                    help="training settings to time as BATCHxWORKERS,... (e.g. 512x12; "
                    "default: 256x0,256x8,512x8,1024x12, or 64x0,64x2 with --quick)")
    ap.add_argument("--sections", default="model,predict,end_to_end,training",
                    help="comma-separated subset of the four measurements")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU on this machine", file=sys.stderr)
        return 2
    from napari_var_emitter.simulation import simulate_movie

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu, mem = props.name, props.total_memory / 1e9
    else:
        gpu, mem = "none (CPU run)", 0.0
    res = {"machine": {"gpu": gpu, "gpu_memory_gb": mem,
                       "torch": torch.__version__, "cuda": torch.version.cuda,
                       "cpus": os.cpu_count(), "python": platform.python_version()},
           "command": "python benchmarks/bench_gpu.py " + " ".join(argv or sys.argv[1:])}
    movie = simulate_movie(2000, (40, 40), rng=2000, density_per_um2=1.0,
                           camera=rb.SCMOS, highres_factor=None)
    reps = -(-a.frames // 2000)
    adu = np.concatenate([movie.adu] * reps)[:a.frames]
    quick = a.quick
    sections = set(a.sections.split(","))
    res["model_only"] = res["predict"] = res["end_to_end"] = res["training"] = []
    if "model" in sections:
        res["model_only"] = model_only((256, 1024) if quick else (256, 1024, 4096),
                                       5 if quick else 20)
    if "predict" in sections:
        res["predict"] = predict_in_process(adu, (64, 1024) if quick else (64, 1024, 8192))
    with tempfile.TemporaryDirectory() as work:
        if "end_to_end" in sections:
            res["end_to_end"] = predict_end_to_end(movie.adu, a.e2e_frames, (64, 1024), work)
        if "training" in sections:
            settings = ([(64, 0), (64, 2)] if quick else
                        [(256, 0), (256, 8), (512, 8), (1024, 12)])
            if a.train_settings:
                settings = [tuple(int(v) for v in s.split("x"))
                            for s in a.train_settings.split(",")]
            res["training"] = training_speed(settings, a.train_steps, work)
    text = report(res)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
