"""The GPU paths: CUDA training with fp16 / bf16 autocast, CUDA inference, the CLI on a GPU.

Every test here is skipped on a machine without CUDA (CI has none); they run where a GPU is
(``python -m pytest tests/test_cuda.py``), and the results of the last such run are quoted in
BENCHMARKS.md. What they check is what a user on a GPU relies on: mixed-precision training
gives finite losses and a checkpoint that loads on a CPU, and the GPU finds the same
emitters at the same places as the CPU (fp16 inference may not move them measurably).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_var_emitter.checkpoint import load_checkpoint
from napari_var_emitter.dataset import TrainingData
from napari_var_emitter.inference import Predictor
from napari_var_emitter.metrics import match_tables
from napari_var_emitter.simulation import simulate_movie
from napari_var_emitter.training import Trainer

from test_training import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float16), ("fp16", torch.float16),
                                              ("bf16", torch.bfloat16)])
def test_mixed_precision_training_on_the_gpu_gives_a_checkpoint_that_loads_on_a_cpu(
        tmp_path, precision, dtype):
    cfg = tiny_config(num_epochs=2, steps_per_epoch=4, mixed_precision=precision,
                      num_workers=2)
    trainer = Trainer(cfg, TrainingData.simulated(cfg), tmp_path, device="cuda",
                      tensorboard=False)
    assert trainer.device.type == "cuda" and trainer.amp_dtype == dtype
    # the gradient scaler is needed (and used) for fp16 only
    assert trainer.scaler.is_enabled() == (dtype == torch.float16)
    events = list(trainer.events())
    trainer.close()
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 8 and all(np.isfinite(e.losses["loss"]) for e in steps)
    assert not any(e.losses.get("skipped") for e in steps[1:])
    assert np.isfinite(events[-1].metrics["loss"])
    ckpt = load_checkpoint(tmp_path / "last_model.pth")
    assert ckpt["step"] == 8
    cpu = Predictor.from_checkpoint(tmp_path / "last_model.pth", device="cpu")
    assert next(cpu.model.parameters()).device.type == "cpu"
    res = cpu.predict(np.full((2, 16, 16), 10.0, np.float32), maps=False)
    assert res.localizations.dtype.names  # a table, whatever an 8-step model finds


def test_gpu_and_cpu_find_the_same_emitters_at_the_same_places():
    """fp16 inference on the GPU against fp32 on the CPU, bundled model, multi-tile frames."""
    movie = simulate_movie(40, (64, 96), rng=11, density_per_um2=1.0, highres_factor=None)
    cpu = Predictor.from_pretrained(device="cpu").predict(movie.adu, maps=False)
    gpu = Predictor.from_pretrained(device="cuda").predict(movie.adu, maps=False,
                                                           batch_size=256)
    a, b = cpu.localizations, gpu.localizations
    assert len(a) > 300
    assert abs(len(a) - len(b)) <= 0.01 * len(a)
    ti, pi = match_tables(a, b, tolerance_nm=50.0)[:2]
    assert len(ti) >= 0.99 * len(a)
    dxy = np.hypot(a["x"][ti] - b["x"][pi], a["y"][ti] - b["y"][pi])
    assert np.median(dxy) < 0.005 and np.percentile(dxy, 99) < 0.05  # pixels
    rel = np.abs(a["photons"][ti] / b["photons"][pi] - 1)
    assert np.median(rel) < 0.01
    assert np.all(np.isfinite(b["unc_x"])) and np.all(b["unc_x"] > 0)


def test_gpu_maps_match_the_cpu_maps():
    movie = simulate_movie(4, (40, 40), rng=12, density_per_um2=1.0, highres_factor=None)
    cpu = Predictor.from_pretrained(device="cpu").predict(movie.adu)
    gpu = Predictor.from_pretrained(device="cuda").predict(movie.adu)
    for f in (2, 4, 8):
        p, q = np.asarray(cpu.maps[f]["probability"]), np.asarray(gpu.maps[f]["probability"])
        assert p.shape == q.shape == (4, 40 * f, 40 * f)
        # fp16 on the GPU: a few pixels move by ~0.02 (seen: 0.022), the maps as a whole not
        assert np.max(np.abs(p - q)) < 0.05 and np.mean(np.abs(p - q)) < 1e-3
        assert abs(p.sum() - q.sum()) < 0.01 * p.sum()


def test_cli_predict_on_the_gpu_writes_every_output(tmp_path):
    from napari_var_emitter.io.tiff import write_tiff

    movie = simulate_movie(30, (40, 40), rng=13, density_per_um2=1.0, highres_factor=None)
    tif = tmp_path / "movie.tif"
    write_tiff(tif, movie.adu)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "napari_var_emitter", "predict", str(tif),
                        "--output_dir", str(out), "--device", "cuda", "--batch-size", "512",
                        "--no-figures"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = {p.name for p in (out / "movie").iterdir()}
    assert {"localizations.csv", "localizations.hdf5", "predictions.h5"} <= names, names


def test_spot_fits_on_the_gpu_match_the_cpu():
    """The border refit runs on the network's device (float64): same fits there."""
    from napari_var_emitter.camera import Camera
    from napari_var_emitter.spotfit import fit_spots

    cam = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
    movie = simulate_movie(50, (40, 40), rng=12, density_per_um2=0.3, camera=cam,
                           highres_factor=None)
    frames = cam.adu_to_photons(movie.adu)
    t = movie.table_in_view()
    args = (t["frame"], t["x"] + 0.2, t["y"] - 0.2, t["photons"] / 2, np.full(len(t), 20.0), cam)
    cpu = fit_spots(frames, *args)
    gpu = fit_spots(torch.from_numpy(frames).cuda(), *args)
    assert len(t) > 20
    np.testing.assert_allclose(gpu.x, cpu.x, atol=1e-6)
    np.testing.assert_allclose(gpu.se_photons, cpu.se_photons, rtol=1e-6)


def test_pair_splits_on_the_gpu_match_the_cpu():
    """The pair fit runs on the network's device too: the same detections are split."""
    from napari_var_emitter.camera import Camera
    from napari_var_emitter.inference import Predictor
    from napari_var_emitter.pairsplit import split_merged_pairs

    cam = Camera(baseline=100.0, e_per_adu=0.5, qe=0.9, read_noise=1.5)
    movie = simulate_movie(60, (40, 40), rng=13, density_per_um2=1.0, sigma_px=(0.8, 0.9),
                           camera=cam, highres_factor=None)
    frames = cam.adu_to_photons(movie.adu)
    table = Predictor.from_pretrained(device="cpu").predict(
        movie.adu, camera=cam, maps=False, pair_fit=False).localizations
    cpu = split_merged_pairs(table, frames, cam)
    gpu = split_merged_pairs(table, frames, cam, device="cuda")
    assert len(cpu) > len(table) and len(gpu) == len(cpu)
    np.testing.assert_allclose(gpu["x"], cpu["x"], atol=1e-6)
