"""The command line end to end: simulate -> train -> predict -> evaluate, and torchrun.

One module-scoped pipeline trains a small model for about a minute on the CPU, with the
original design's flags on ``simulate``'s ``train_tiff/`` + ``train_emitters/``; the tests
then check what training wrote, that the model localises (Jaccard > 0.5 on a fresh 96x130
simulated stack) and that ``predict`` writes every output of the contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml

from napari_var_emitter.checkpoint import load_checkpoint
from napari_var_emitter.cli import main

# single-threaded torch in every child process: on a CPU shared with other jobs OpenMP's
# barrier waits make small multi-threaded ops up to 100x slower (measured here)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CSV_HEADER = ('"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]",'
              '"offset [photon]","bkgstd [photon]","uncertainty [nm]","prob",'
              '"uncertainty_x [nm]","uncertainty_y [nm]"')

# sparse, bright, sCMOS-like: the easy regime a minute of CPU training must handle
CAMERA = ["--baseline", "100", "--e-per-adu", "0.5"]
SCENE = ["--sigma", "1.0", "1.5", "--photons", "1000", "5000", "--background", "10", "30",
         "--density", "0.6", "--read-noise", "1.5", *CAMERA]

# a small model on 24x24 tiles (maps 48/96/192); about 600 steps of batch 16 on one core
SMALL_CONFIG = {
    "model": {"input_size": [24, 24], "target_sizes": [[48, 48], [96, 96], [192, 192]],
              "base_channels": 16, "embed_dim": 32, "num_heads": 2, "num_layers": 1,
              "codebook_size": 32, "vq_scales": [1, 2, 3, 6]},
    # warmup_epochs > num_epochs: mostly the localisation scale (x2) trains in this minute
    "training": {"num_epochs": 4, "steps_per_epoch": 150, "batch_size": 16,
                 "learning_rate": 0.004, "warmup_epochs": 100, "val_samples": 128},
    "data": {"pixel_size_nm": 100.0, "highres_factor": 8},
}


def run_cli(*args, timeout=300, env=None):
    """``python -m napari_var_emitter ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "napari_var_emitter", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """simulate (training data and a 96x130 test stack) -> train with the design's flags."""
    root = tmp_path_factory.mktemp("pipeline")
    ok(run_cli("simulate", "--out", root / "train", "--frames", 60, "--size", 64, 64,
               *SCENE, "--seed", 3))
    ok(run_cli("simulate", "--out", root / "test", "--frames", 10, "--size", 96, 130,
               *SCENE, "--seed", 11))
    cfg = root / "config.json"
    cfg.write_text(json.dumps(SMALL_CONFIG))
    train = ok(run_cli("train", "--config", cfg, "--tiff_dir", root / "train" / "train_tiff",
                       "--emitter_dir", root / "train" / "train_emitters",
                       "--output_dir", root / "model", "--device", "cpu", timeout=400))
    ok(run_cli("predict", root / "test" / "inference_tiff" / "sim.tif",
               "--checkpoint", root / "model" / "best_model.pth", "--config", cfg,
               "--output_dir", root / "pred", "--device", "cpu", "--batch_size", 64, *CAMERA))
    return {"root": root, "train_stdout": train.stdout, "pred": root / "pred" / "sim"}


def test_train_with_design_flags_writes_checkpoints_config_and_tensorboard(pipeline):
    model = pipeline["root"] / "model"
    assert {"best_model.pth", "last_model.pth", "config.json", "tensorboard"} <= set(
        os.listdir(model))
    assert not [n for n in os.listdir(model) if n.startswith(".tmp")]
    for name in ("best_model.pth", "last_model.pth"):
        ckpt = torch.load(model / name, weights_only=True)  # tensors and plain data only
        assert ckpt["config"]["model"]["input_size"] == [24, 24]
        assert isinstance(ckpt["model"], dict) and ckpt["package_version"]
    last = torch.load(model / "last_model.pth", weights_only=True)
    assert last["step"] == 600 and last["epoch"] == 4 and len(last["history"]) == 4
    saved = json.loads((model / "config.json").read_text())
    assert saved["model"]["input_size"] == [24, 24] and saved["training"]["num_epochs"] == 4
    assert "epoch 4:" in pipeline["train_stdout"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [n for n in os.listdir(model / "tensorboard") if n.startswith("events.out")]
    assert events
    acc = EventAccumulator(str(model / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/count/x2", "train/loc/x2", "train/unc/x2",
                "train/recon", "train/vq_perplexity", "val/loss", "val/jaccard", "val/rmse_nm",
                "val/efficiency", "val/perplexity"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(acc.Scalars("val/jaccard")) == 4
    assert any(t.startswith("maps/") for t in acc.Tags()["images"])


def test_a_minute_of_training_localises_sparse_emitters(pipeline):
    root = pipeline["root"]
    r = ok(run_cli("evaluate", "--truth", root / "test" / "ground_truth" / "sim.csv",
                   "--pred", pipeline["pred"] / "localizations.csv", "--frames", 10))
    res = json.loads(r.stdout)
    print("end-to-end:", {k: res[k] for k in ("jaccard", "recall", "precision", "rmse_nm",
                                                "efficiency")})
    assert res["jaccard"] > 0.5, res
    assert res["rmse_nm"] < 60, res


def test_predict_writes_every_output_of_the_contract(pipeline):
    out = pipeline["pred"]
    names = set(os.listdir(out))
    expected = {"localizations.csv", "localizations.hdf5", "localizations.yaml",
                "predictions.h5", "input.png", "probability_x2.png", "probability_x4.png",
                "probability_x8.png", "peaks.png", "uncertainty.png", "super_resolution.png"}
    assert expected <= names, sorted(names)
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # no partial folders
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0700
    for png in (n for n in names if n.endswith(".png")):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = (out / "localizations.csv").read_text().splitlines()
    assert lines[0] == CSV_HEADER
    rows = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    n = len(rows)
    assert n > 100
    assert np.array_equal(rows[:, 0], np.arange(1, n + 1))  # id 1-based
    assert rows[:, 1].min() >= 1 and rows[:, 1].max() <= 10  # frames 1-based
    assert rows[:, 2].max() <= 130 * 100 + 100 and rows[:, 3].max() <= 96 * 100 + 100
    # prob above the threshold, except spots at the border that the border refit kept (from
    # a third of it; within a pixel or two of the border, with a fitted sigma)
    depth_nm = np.minimum.reduce([rows[:, 2], rows[:, 3], 13000 - rows[:, 2], 9600 - rows[:, 3]])
    weak = rows[:, 9] < 0.5
    assert np.all((rows[:, 9] >= 0.5 / 3) & (rows[:, 9] <= 1))
    assert np.all(depth_nm[weak] < 200) and np.isfinite(rows[weak, 4]).all()

    with h5py.File(out / "localizations.hdf5", "r") as fh:
        locs = fh["locs"][...]
    for field, kind in (("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"),
                        ("sx", "f4"), ("sy", "f4"), ("bg", "f4"), ("lpx", "f4"), ("lpy", "f4")):
        assert locs.dtype[field] == np.dtype(kind), field
    assert len(locs) == n and locs["frame"].max() <= 9
    meta = yaml.safe_load((out / "localizations.yaml").read_text())
    assert (meta["Width"], meta["Height"], meta["Frames"], meta["Pixelsize"]) == (130, 96, 10,
                                                                                  100.0)
    # how they were made, for whoever opens them in Picasso later
    assert meta["Detection threshold"] == 0.5 and meta["Model"]
    assert (meta["Symmetry averaging"], meta["Border refit"], meta["Pair fit"]) == (False, True,
                                                                                    True)

    with h5py.File(out / "predictions.h5", "r") as fh:
        assert sorted(fh["maps"]) == ["x2", "x4", "x8"]
        for f in (2, 4, 8):
            g = fh[f"maps/x{f}"]
            assert sorted(g) == sorted(["probability", "offset_x", "offset_y",
                                        "uncertainty_x", "uncertainty_y", "photons"])
            for name in g:
                ds = g[name]
                assert ds.shape == (10, f * 96, f * 130), (f, name)
                assert ds.chunks is not None and ds.compression == "gzip"
            p = g["probability"][3]
            assert 0 <= p.min() and p.max() <= 1
        # the localisation scale (the one this short training taught) shows the emitters
        assert fh["maps/x2/probability"][3].max() > 0.5
        assert len(fh["localizations"]) == n
        for key in ("model_id", "config", "camera", "pixel_size_nm", "package_version"):
            assert key in fh.attrs, key
        assert json.loads(fh.attrs["camera"])["baseline"] == 100.0
        assert json.loads(fh.attrs["config"])["model"]["input_size"] == [24, 24]
        assert fh.attrs["pixel_size_nm"] == 100.0


def test_input_dir_with_a_corrupt_file_finishes_the_good_ones(untrained_checkpoint, tmp_path,
                                                             capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.tif", "c.tif"):
        tifffile.imwrite(inputs / name, rng.poisson(20, (3, 20, 24)).astype(np.uint16),
                         photometric="minisblack")
    (inputs / "b.tif").write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    code = main(["predict", "--input_dir", str(inputs), "--output_dir", str(out),
                 "--checkpoint", str(untrained_checkpoint), "--device", "cpu", "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "b.tif" in err[0], err
    assert sorted(os.listdir(out)) == ["a", "c"]  # nothing at all for the bad input
    for stem in ("a", "c"):
        assert {"localizations.csv", "localizations.hdf5", "predictions.h5"} <= set(
            os.listdir(out / stem))


def test_train_unlabeled_adapts_by_reconstruction_only(tmp_path, capsys):
    from napari_var_emitter.camera import Camera
    from napari_var_emitter.simulation import simulate_movie

    frames = tmp_path / "frames"
    frames.mkdir()
    movie = simulate_movie(16, (32, 32), 4, 2.0, camera=Camera(baseline=100, e_per_adu=2),
                           highres_factor=None)
    tifffile.imwrite(frames / "user_data.tif", movie.adu, photometric="minisblack")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "model": {"input_size": [16, 16], "target_sizes": [[32, 32], [64, 64], [128, 128]],
                  "base_channels": 8, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                  "codebook_size": 16, "code_dim": 8, "vq_scales": [1, 2, 4]},
        "training": {"num_epochs": 4, "batch_size": 4, "steps_per_epoch": 10,
                     "val_samples": 16, "learning_rate": 0.003},
        "data": {"baseline": 100.0, "e_per_adu": 2.0}}))
    code = main(["train", "--config", str(cfg), "--unlabeled", "--tiff_dir", str(frames),
                 "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    ckpt = torch.load(tmp_path / "out" / "last_model.pth", weights_only=True)
    losses = [h["loss"] for h in ckpt["history"]]  # validation: reconstruction + VQ terms
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert "jaccard" not in ckpt["history"][-1]  # no labels, no localisation metrics


def test_fine_tuning_the_bundled_model_needs_no_config_and_trains_its_localisation_path(
        tmp_path, capsys):
    """`train --init bundled` alone: the weights fix the architecture, and the run trains the
    whole model (not the bundled checkpoint's last recipe phase, which froze all but the 8x
    stage, so the 2x maps that every localisation comes from would never change)."""
    from napari_var_emitter.config import FINE_TUNING
    from napari_var_emitter.inference import bundled_checkpoint_path

    out = tmp_path / "ft"
    code = main(["train", "--simulate", "--init", "bundled", "--output_dir", str(out),
                 "--epochs", "1", "--steps_per_epoch", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    bundled = load_checkpoint(bundled_checkpoint_path())
    tuned = load_checkpoint(out / "last_model.pth")
    assert tuned["config_obj"].model == bundled["config_obj"].model
    assert tuned["config_obj"].simulation == bundled["config_obj"].simulation
    tr = tuned["config_obj"].training
    assert tr.trainable == "" and tr.learning_rate == FINE_TUNING["learning_rate"]
    assert (tr.num_epochs, tr.steps_per_epoch) == (1, 2)  # the command's overrides
    for name in ("transformer.stages.0.head.weight", "vqvae.encoder.stem.0.weight"):
        assert not torch.equal(tuned["model"][name], bundled["model"][name]), name


TORCHRUN_SCRIPT = textwrap.dedent('''
    """Run `var-emitter train` under torchrun; then compare every rank's model."""
    import hashlib, json, os, sys
    import torch
    import torch.distributed as dist
    from napari_var_emitter import cli, training

    torch.set_num_threads(1)
    # the group is this script's (it compares ranks after training), not the Trainer's
    dist.init_process_group("gloo")
    captured = {}
    digests = []
    original_init = training.Trainer.__init__

    def record_buffers(module, args):
        # DDP broadcasts rank 0's buffers before each forward: record what every training
        # step used (validation calls the bare module in eval mode)
        if module.training:
            digests.append(hashlib.sha256(b"".join(
                b.detach().cpu().numpy().tobytes() for b in module.buffers())).hexdigest())

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        captured["trainer"] = self
        self.module.register_forward_pre_hook(record_buffers)

    training.Trainer.__init__ = init
    code = cli.main(sys.argv[2:])
    trainer = captured["trainer"]
    rank, world = dist.get_rank(), dist.get_world_size()
    params = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    all_digests = [None] * world
    dist.all_gather_object(all_digests, digests)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"code": code, "world": world, "step": trainer.step,
                   "max_param_diff": max(float((g - params).abs().max()) for g in gathered),
                   "n_forward": len(digests),
                   "buffers_in_sync": all(d == digests for d in all_digests),
                   "distributed": trainer.distributed}, fh)
    dist.barrier()
    dist.destroy_process_group()
    # as `var-emitter train` does under torchrun: no interpreter teardown, where gloo's
    # threads can abort the process (SIGABRT) after everything above has been written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


def _ddp_config(tmp_path, **training):
    """A tiny 16x16 model's config.json for the torchrun tests; ``training`` overrides."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "model": {"input_size": [16, 16], "target_sizes": [[32, 32], [64, 64], [128, 128]],
                  "base_channels": 8, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                  "codebook_size": 16, "code_dim": 8, "vq_scales": [1, 2, 4]},
        "training": {"batch_size": 4, "warmup_epochs": 1, **training},
        "simulation": {"frame_size": [16, 16]}}))
    return cfg


def test_var_emitter_train_under_torchrun_exits_cleanly(tmp_path):
    """The real command line (not a wrapper script) under torchrun: exit status 0 and one
    set of checkpoints written by rank 0, which alone calibrates the best one (--calibrate)
    while the other rank waits."""
    cfg = _ddp_config(tmp_path, num_epochs=1, steps_per_epoch=2, val_samples=4,
                      calibration_frames=2)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "napari_var_emitter", "train", "--config", str(cfg), "--simulate",
         "--output_dir", str(out), "--device", "cpu", "--calibrate"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert load_checkpoint(out / "last_model.pth")["step"] == 2
    assert (out / "best_model.pth").exists() and (out / "config.json").exists()
    threshold = load_checkpoint(out / "best_model.pth")["calibration"]["threshold"]
    assert r.stdout.count("calibrated: threshold") == 1
    assert f"calibrated: threshold {threshold:.3f}" in r.stdout


def test_torchrun_two_cpu_processes_keep_parameters_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(TORCHRUN_SCRIPT)
    cfg = _ddp_config(tmp_path, num_epochs=2, steps_per_epoch=3, val_samples=8)
    out = tmp_path / "out"
    results = tmp_path / "results"
    results.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(results), "train", "--config", str(cfg), "--simulate",
         "--output_dir", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    ranks = [json.loads((results / f"rank{i}.json").read_text()) for i in range(2)]
    for res in ranks:
        assert res["code"] == 0 and res["world"] == 2 and res["distributed"]
        assert res["step"] == 6 and res["n_forward"] == 6
        # gradients all-reduced, same optimiser: bit-identical parameters on both ranks
        assert res["max_param_diff"] == 0.0, res
        # and the VQ codebook (EMA buffers) every step used was the same on both ranks
        assert res["buffers_in_sync"], res
    # only rank 0 writes: one set of outputs, one TensorBoard run
    assert {"best_model.pth", "last_model.pth", "config.json", "tensorboard"} <= set(
        os.listdir(out))
    assert len(os.listdir(out / "tensorboard")) == 1
    torch.load(out / "last_model.pth", weights_only=True)


def test_predict_under_torchrun_splits_inputs_between_ranks(tmp_path, untrained_checkpoint):
    """Two processes share the inputs: each input is predicted once, completely, and the
    result is the same as a single process's."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        tifffile.imwrite(inputs / f"{name}.tif", rng.poisson(20, (4, 32, 32)).astype(np.uint16),
                         photometric="minisblack")
    common = ["predict", "--input_dir", str(inputs), "--checkpoint", str(untrained_checkpoint),
              "--device", "cpu", "--no-figures"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "napari_var_emitter", *common, "--output_dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    for name in ("a", "b", "c"):
        files = {"localizations.csv", "localizations.hdf5", "localizations.yaml",
                 "predictions.h5"}
        assert files == set(os.listdir(tmp_path / "ddp" / name)), name
        assert ((tmp_path / "ddp" / name / "localizations.csv").read_text()
                == (tmp_path / "one" / name / "localizations.csv").read_text())
    assert not [p for p in (tmp_path / "ddp").rglob(".*")]  # no partial files left


def test_predict_tta_records_the_mode_and_uses_the_symmetry_average(tmp_path,
                                                                      untrained_checkpoint):
    """--tta: the maps in predictions.h5 are the average over the 8 orientations, and the
    file says which mode made them."""
    import h5py

    from napari_var_emitter.inference import Predictor

    stack = np.random.default_rng(4).poisson(20, (3, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    common = ["predict", str(tmp_path / "s.tif"), "--checkpoint", str(untrained_checkpoint),
              "--device", "cpu", "--no-figures"]
    assert main([*common, "--output_dir", str(tmp_path / "tta"), "--tta"]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "plain")]) == 0
    with h5py.File(tmp_path / "tta" / "s" / "predictions.h5") as f, \
            h5py.File(tmp_path / "plain" / "s" / "predictions.h5") as g:
        assert f.attrs["tta"] and not g.attrs["tta"]
        tta_prob = f["maps/x2/probability"][:]
        assert not np.allclose(tta_prob, g["maps/x2/probability"][:])
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    expected = pred.predict(stack, tta=True).maps[2]["probability"]
    np.testing.assert_allclose(tta_prob, np.asarray(expected), atol=1e-5)


def test_predict_without_the_fits_is_recorded_and_reproduces_the_plain_network(tmp_path,
                                                                              capsys):
    """--no-border-fit --no-pair-fit: predictions.h5 says so, and the table is the network's
    own decoding (the bundled model on frames with spots cut by the border, where the two
    differ). Only the fits measure the PSF width that the summary line reports."""
    import h5py

    from napari_var_emitter.camera import Camera
    from napari_var_emitter.inference import Predictor
    from napari_var_emitter.io.emitters import read_emitters
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(12, (40, 40), rng=21, density_per_um2=2.0, background=20.0,
                           highres_factor=None, camera=Camera())
    tifffile.imwrite(tmp_path / "s.tif", movie.adu, photometric="minisblack")
    common = ["predict", str(tmp_path / "s.tif"), "--device", "cpu", "--no-figures"]
    assert main([*common, "--output_dir", str(tmp_path / "plain"), "--no-border-fit",
                 "--no-pair-fit"]) == 0
    plain_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*common, "--output_dir", str(tmp_path / "fit")]) == 0
    fit_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "PSF sigma" not in plain_line
    width = float(fit_line.split("PSF sigma ")[1].split(" px")[0])
    assert 1.0 < width < 1.6  # the simulator's default PSF, sigma 1.0-1.5 px
    with h5py.File(tmp_path / "plain" / "s" / "predictions.h5") as f, \
            h5py.File(tmp_path / "fit" / "s" / "predictions.h5") as g:
        assert not f.attrs["border_fit"] and g.attrs["border_fit"]
        assert not f.attrs["pair_fit"] and g.attrs["pair_fit"]
    plain, _ = read_emitters(str(tmp_path / "plain" / "s" / "localizations.csv"), 100.0)
    fitted, _ = read_emitters(str(tmp_path / "fit" / "s" / "localizations.csv"), 100.0)
    network = Predictor.from_pretrained(device="cpu").predict(
        movie.adu, maps=False, border_fit=False, pair_fit=False).localizations
    assert len(plain) == len(network)
    np.testing.assert_allclose(np.sort(plain["x"]), np.sort(network["x"]), atol=1e-3)
    assert not np.array_equal(np.sort(plain["x"]), np.sort(fitted["x"]))
