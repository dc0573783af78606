"""One time-boxed training round of the bundled model on a GPU (trunk, then the 8x stage).

Usage (on the GPU machine, from the repository root)::

    python benchmarks/bundled_model/gpu_round.py --out OUT [--trunk-s 330] [--x8-s 90] \
        [--probe gpu_results.json] [--init bundled] [--recipe RECIPE.json]

A lent GPU comes for minutes, so the round is sized by time rather than by steps: the batch
size and the speed come from ``bench_gpu.py``'s training measurements (``--probe``; without
one, batch 512 with 12 data workers at an assumed 8 steps/s, below the 11.6 measured on an
H100 with 8 workers), and the number of steps is what fits ``--trunk-s`` seconds. The two
phases are those of the CPU recipe (the trunk phase's recipe is ``--recipe``, by default
``v05_e_continue.json``; then ``v03_c_x8_stage.json``; ``--x8-s 0`` leaves the 8x stage to be
trained on a CPU afterwards) at the larger batch with the CPU recipes' learning rates
(``--lr-factor`` scales them): on an H100, batch 1024 at 2.83x the rate (square-root
scaling, halved) made the trained model diverge within 265 steps (validation efficiency 22
-> 16 -> -33 by step 2,650), while the unscaled rate trained stably. The scale schedule
keeps the 8x scale off in the trunk phase exactly as on the CPU. Both phases run through
``var-emitter train`` (fp16 autocast, data simulated by worker processes); the configs they
used are written to ``OUT`` beside the checkpoints, so the round can be repeated exactly.

Export and calibrate the result on any machine afterwards (see the model card).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRUNK_RECIPE = os.path.join(HERE, "v05_e_continue.json")
X8_RECIPE = os.path.join(HERE, "v03_c_x8_stage.json")


def choose_setting(probe: str | None) -> tuple[int, int, float]:
    """(batch, num_workers, steps/s): the fastest measured batch of 256-1024 tiles."""
    if probe and os.path.exists(probe):
        with open(probe) as f:
            rows = [r for r in json.load(f).get("training", []) if 256 <= r["batch"] <= 1024]
        if rows:
            best = max(rows, key=lambda r: r["tiles_per_s"])
            return int(best["batch"]), int(best["num_workers"]), float(best["steps_per_s"])
    return 512, 12, 8.0


def phase_config(recipe: str, batch: int, workers: int, steps: int, epochs: int,
                 lr_factor: float, seed: int, out_path: str) -> str:
    """The recipe with the GPU batch, steps and learning rate; written to ``out_path``."""
    with open(recipe) as f:
        cfg = json.load(f)
    tr = cfg["training"]
    tr["learning_rate"] = tr["learning_rate"] * lr_factor
    tr["batch_size"] = batch
    tr["num_workers"] = workers
    tr["num_epochs"] = epochs
    tr["steps_per_epoch"] = max(1, steps // epochs)
    tr["seed"] = seed
    tr["stop_at_step"] = 0  # the GPU's minutes size the run; a CPU phase's hand stop does not
    with open(out_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out_path


def train(config: str, init: str, out_dir: str, limit_s: float, log_path: str,
          device: str = "cuda") -> int:
    """``var-emitter train`` on the GPU, stopped (with its checkpoints kept) at ``limit_s``."""
    cmd = [sys.executable, "-m", "napari_var_emitter", "train", "--config", config,
           "--simulate", "--init", init, "--output_dir", out_dir, "--device", device]
    print(" ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the trainer saves last_model.pth and exits
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                return -9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for checkpoints, configs and logs")
    ap.add_argument("--work", default="/tmp/gpu_round", help="training output folders")
    ap.add_argument("--trunk-s", type=float, default=330.0)
    ap.add_argument("--x8-s", type=float, default=90.0)
    ap.add_argument("--probe", default=None, help="bench_gpu.py's JSON results")
    ap.add_argument("--init", default="bundled")
    ap.add_argument("--recipe", default=TRUNK_RECIPE, help="the trunk phase's recipe")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lr-factor", type=float, default=1.0,
                    help="multiplies the recipes' learning rates (default 1: see above)")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    batch, workers, steps_per_s = choose_setting(a.probe)
    lr_factor = a.lr_factor
    # validation (256 tiles) and checkpoints take a few seconds per epoch: 10% margin
    trunk_steps = int(0.9 * a.trunk_s * steps_per_s)
    # the 8x stage computes the 320x320 maps the trunk phase skips: assume half the speed
    x8_steps = int(0.9 * a.x8_s * steps_per_s * 0.5)
    print(f"batch {batch}, {workers} workers, {steps_per_s:.2f} steps/s measured: trunk "
          f"{trunk_steps} steps, 8x stage {x8_steps} steps, lr x{lr_factor:.2f}", flush=True)
    trunk_dir, x8_dir = os.path.join(a.work, "trunk"), os.path.join(a.work, "x8")
    trunk_cfg = phase_config(a.recipe, batch, workers, trunk_steps, 10, lr_factor,
                             a.seed, os.path.join(a.out, "gpu_trunk.json"))
    t0 = time.time()
    rc = train(trunk_cfg, a.init, trunk_dir, a.trunk_s + 60, os.path.join(a.out, "trunk.log"),
               a.device)
    print(f"trunk: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    best = os.path.join(trunk_dir, "best_model.pth")
    if not os.path.exists(best):
        print("trunk phase left no checkpoint", flush=True)
        return 1
    shutil.copy(best, os.path.join(a.out, "trunk_best.pth"))
    last = os.path.join(trunk_dir, "last_model.pth")
    if os.path.exists(last):
        shutil.copy(last, os.path.join(a.out, "trunk_last.pth"))
    if a.x8_s <= 0:
        return 0
    x8_cfg = phase_config(X8_RECIPE, batch, workers, x8_steps, 2, 1.0, a.seed,
                          os.path.join(a.out, "gpu_x8.json"))
    t0 = time.time()
    rc = train(x8_cfg, best, x8_dir, a.x8_s + 40, os.path.join(a.out, "x8.log"), a.device)
    print(f"8x stage: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    last = os.path.join(x8_dir, "last_model.pth")
    if os.path.exists(last):
        shutil.copy(last, os.path.join(a.out, "x8_last.pth"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
