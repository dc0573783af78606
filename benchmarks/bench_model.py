"""Measure the model's fast-path inference speed and cost on 40x40 tiles (CPU).

Usage: ``PYTHONPATH=src python benchmarks/bench_model.py [--batch 64] [--repeats 20]
[--threads N] [--malloc-tuned]``. Prints frames/s of ``forward(frames, factors=[loc_factor],
with_recon=False)`` under ``torch.inference_mode`` (the localisation path), GFLOP per frame
(torch's FLOP counter), the parameter count, and the cost of the full forward with all
factors and reconstruction.

``--malloc-tuned`` raises glibc's mmap/trim thresholds first (``mallopt``) so that freed
large tensors are reused instead of being returned to the OS and page-faulted in again;
on the 2-core VM used here that made the full forward ~2x faster.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_var_emitter.config import ModelConfig
from napari_var_emitter.model import VarEmitterNet, count_parameters


def gflop_per_frame(model, frames, **kw) -> float:
    """Forward GFLOP per frame counted by torch (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(frames, **kw)
    return counter.get_total_flops() / frames.shape[0] / 1e9


def frames_per_second(model, frames, repeats: int, **kw) -> float:
    """Best-of-``repeats`` throughput (frames/s) after two warm-up batches."""
    with torch.inference_mode():
        for _ in range(2):
            model(frames, **kw)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(frames, **kw)
            best = min(best, time.perf_counter() - t0)
    return frames.shape[0] / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--malloc-tuned", action="store_true")
    ap.add_argument("--default-config", action="store_true",
                    help="the default ModelConfig instead of the bundled model's architecture")
    args = ap.parse_args()
    if args.malloc_tuned:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 GiB
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: 2 GiB
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.default_config:
        cfg = ModelConfig()
        model = VarEmitterNet(cfg).eval()
    else:  # the shipped model (weights do not change the cost, the architecture does)
        from napari_var_emitter.inference import Predictor

        pred = Predictor.from_pretrained(device="cpu")
        model, cfg = pred.model.eval(), pred.config.model
    frames = 100 + 10 * torch.randn(args.batch, cfg.context_frames, args.size, args.size)
    fast = dict(factors=[cfg.loc_factor], with_recon=False)
    print(f"threads {torch.get_num_threads()}, params {count_parameters(model):,}")
    print(f"fast path: {gflop_per_frame(model, frames, **fast):.3f} GFLOP/frame, "
          f"{frames_per_second(model, frames, args.repeats, **fast):.0f} frames/s "
          f"(batch {args.batch}, {args.size}x{args.size})")
    print(f"full forward (all factors + recon): {gflop_per_frame(model, frames):.3f} GFLOP/frame, "
          f"{frames_per_second(model, frames, max(3, args.repeats // 4)):.0f} frames/s")


if __name__ == "__main__":
    main()
