"""The training API (:class:`~napari_var_emitter.training.Trainer`) on a tiny model.

Everything runs on the CPU with a model of a few thousand parameters on 16x16 tiles, so each
test takes a second or two; what is checked is the training *machinery* (events, progressive
scales, checkpoints, exact resume, cancellation, NaN guard, mixed precision, unlabeled data).
Whether the real model learns to localise is checked end to end in test_cli_predict_train.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_var_emitter.checkpoint import load_checkpoint
from napari_var_emitter.config import Config
from napari_var_emitter.errors import ConfigError
from napari_var_emitter.dataset import TrainingData
from napari_var_emitter.training import MAX_BAD_STEPS, Trainer, TrainingError, scale_ramp


def tiny_config(**training) -> Config:
    """16x16 tiles, factors 2/4/8, a few thousand parameters; ``training`` overrides."""
    tr = {"num_epochs": 2, "batch_size": 4, "steps_per_epoch": 3, "val_samples": 8,
          "warmup_epochs": 1, "seed": 3}
    tr.update(training)
    return Config.from_dict({
        "model": {"input_size": [16, 16], "target_sizes": [[32, 32], [64, 64], [128, 128]],
                  "base_channels": 8, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
                  "patch_size": 4, "codebook_size": 16, "code_dim": 8, "vq_scales": [1, 2, 4]},
        "training": tr,
        "simulation": {"frame_size": [16, 16], "density_per_um2": [0.5, 2.0]},
    })


def make_trainer(tmp_path, cfg=None, data=None, **kw) -> Trainer:
    cfg = cfg or tiny_config()
    kw.setdefault("tensorboard", False)
    return Trainer(cfg, data or TrainingData.simulated(cfg), tmp_path, device="cpu", **kw)


def state(trainer_or_module) -> dict:
    m = getattr(trainer_or_module, "module", trainer_or_module)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# -- progressive scale schedule ------------------------------------------------------------

def test_scale_ramp_switches_finer_scales_in_linearly_over_the_warmup():
    cfg = tiny_config(warmup_epochs=4)
    f = [2, 4, 8]
    # two finer scales share the 4 warm-up epochs: x4 ramps over [0, 2), x8 over [2, 4)
    assert scale_ramp(f, 0.0, cfg) == {2: 1.0}
    assert scale_ramp(f, 0.5, cfg) == {2: 1.0, 4: 0.25}
    assert scale_ramp(f, 1.0, cfg) == {2: 1.0, 4: 0.5}
    assert scale_ramp(f, 2.0, cfg) == {2: 1.0, 4: 1.0}
    assert scale_ramp(f, 3.0, cfg) == {2: 1.0, 4: 1.0, 8: 0.5}
    assert scale_ramp(f, 4.0, cfg) == {2: 1.0, 4: 1.0, 8: 1.0}
    assert scale_ramp(f, 100.0, cfg) == {2: 1.0, 4: 1.0, 8: 1.0}
    # weights never decrease and stay in [0, 1]
    prev = {}
    for e in np.linspace(0, 5, 51):
        r = scale_ramp(f, float(e), cfg)
        assert all(0 < w <= 1 for w in r.values())
        assert all(r.get(k, 0) >= v for k, v in prev.items())
        prev = r


def test_scale_ramp_step_none_and_not_progressive():
    f = [2, 4, 8]
    step = tiny_config(warmup_epochs=4, scale_schedule="step")
    assert scale_ramp(f, 0.0, step) == {2: 1.0, 4: 1.0}
    assert scale_ramp(f, 1.9, step) == {2: 1.0, 4: 1.0}
    assert scale_ramp(f, 2.0, step) == {2: 1.0, 4: 1.0, 8: 1.0}
    every = {2: 1.0, 4: 1.0, 8: 1.0}
    assert scale_ramp(f, 0.0, tiny_config(scale_schedule="none")) == every
    assert scale_ramp(f, 0.0, tiny_config(progressive=False)) == every
    assert scale_ramp(f, 0.0, tiny_config(warmup_epochs=0)) == every


# -- events, checkpoints, TensorBoard -----------------------------------------------------

def test_events_report_steps_epochs_and_done_and_write_checkpoints(tmp_path):
    cfg = tiny_config(num_epochs=2, steps_per_epoch=3, warmup_epochs=1)
    tr = make_trainer(tmp_path, cfg, tensorboard=True, log_every=1)
    events = list(tr.events())
    tr.close()
    kinds = [e.kind for e in events]
    assert kinds == ["step"] * 3 + ["epoch"] + ["step"] * 3 + ["epoch", "done"]
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.total_steps == 6 for e in events)
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    # progressive: the first step trains only the coarse scale, x8 joins after the warm-up
    assert "count/x2" in steps[0].losses and "count/x8" not in steps[0].losses
    assert "count/x8" in steps[-1].losses
    for e in steps:
        assert math.isfinite(e.losses["loss"]) and e.losses["lr"] > 0
    for e in (ev for ev in events if ev.kind == "epoch"):
        for key in ("loss", "perplexity", "jaccard", "recall", "count_mae"):
            assert key in e.metrics, key
        assert 0 <= e.metrics["jaccard"] <= 1
        # the validation tiles are also scored per density band, every tile in one band
        bands = [b for b in ("sparse", "medium", "dense") if f"{b}_tiles" in e.metrics]
        assert bands and sum(e.metrics[f"{b}_tiles"] for b in bands) == cfg.training.val_samples
        for b in bands:
            assert 0 <= e.metrics[f"{b}_jaccard"] <= 1
    assert events[-1].metrics["step"] == 6
    assert len(tr.history) == 2

    for name in ("best_model.pth", "last_model.pth"):
        raw = torch.load(tmp_path / name, weights_only=True)  # plain data: no code inside
        assert raw["step"] in (3, 6) and raw["config"]["model"]["embed_dim"] == 16
        assert "package_version" in raw and "metrics" in raw
    last = load_checkpoint(tmp_path / "last_model.pth")
    assert last["step"] == 6 and last["epoch"] == 2
    assert (tmp_path / "config.json").exists()
    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/count/x2", "train/loc/x2", "train/recon",
                "train/vq_perplexity", "val/loss", "val/jaccard", "val/perplexity"):
        assert tag in tags, (tag, sorted(tags))
    assert [s.step for s in acc.Scalars("val/loss")] == [3, 6]
    assert any(t.startswith("maps/x2") for t in acc.Tags()["images"])


def test_bf16_mixed_precision_on_cpu_trains(tmp_path):
    cfg = tiny_config(mixed_precision="bf16", num_epochs=1, steps_per_epoch=3)
    tr = make_trainer(tmp_path, cfg)
    assert tr.amp_dtype == torch.bfloat16
    before = state(tr)
    events = list(tr.events())
    losses = [e.losses["loss"] for e in events if e.kind == "step"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all("skipped" not in e.losses for e in events if e.kind == "step")
    after = state(tr)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# -- NaN guard -----------------------------------------------------------------------------

def test_nan_loss_step_is_skipped_without_touching_the_model(tmp_path):
    cfg = tiny_config(num_epochs=1, steps_per_epoch=3)
    tr = make_trainer(tmp_path, cfg)
    real_loss = tr.loss_fn
    calls = []

    def nan_on_second_call(out, target, scale_ramp=None):
        total, logs = real_loss(out, target, scale_ramp=scale_ramp)
        calls.append(1)
        return (total * float("nan"), logs) if len(calls) == 2 else (total, logs)

    tr.loss_fn = nan_on_second_call
    gen = tr.events()
    first = next(gen)
    snapshot = state(tr)  # parameters *and* buffers (the VQ codebook moves by EMA)
    lr_before = tr.optimizer.param_groups[0]["lr"]
    second = next(gen)
    assert second.kind == "step" and second.losses.get("skipped") == 1.0
    after = state(tr)
    for k in snapshot:
        assert torch.equal(snapshot[k], after[k]), f"{k} changed on a skipped step"
    assert tr.optimizer.param_groups[0]["lr"] == lr_before
    third = next(gen)
    assert "skipped" not in third.losses and math.isfinite(third.losses["loss"])
    assert first.kind == "step"
    rest = list(gen)
    assert rest[-1].kind == "done"


def test_persistent_nan_stops_training_with_a_clear_error(tmp_path):
    cfg = tiny_config(num_epochs=10, steps_per_epoch=10)
    tr = make_trainer(tmp_path, cfg)
    real_loss = tr.loss_fn
    tr.loss_fn = lambda out, target, scale_ramp=None: (
        real_loss(out, target, scale_ramp=scale_ramp)[0] * float("inf") * 0.0, {})
    seen = []
    with pytest.raises(TrainingError, match="NaN or infinite") as info:
        for ev in tr.events():
            seen.append(ev)
    steps = [e for e in seen if e.kind == "step"]
    assert len(steps) == MAX_BAD_STEPS - 1  # every step before the last was skipped
    assert all(e.losses.get("skipped") == 1.0 for e in steps)
    assert "\n" not in str(info.value) and "learning_rate" in str(info.value)


# -- cancellation and exact resume ---------------------------------------------------------

def _run(trainer, cancel_at=None):
    for ev in trainer.events():
        if cancel_at is not None and ev.kind == "step" and ev.step == cancel_at:
            trainer.cancel()
    return ev


def test_cancel_leaves_a_resumable_checkpoint_and_resume_is_exact(tmp_path):
    cfg = tiny_config(num_epochs=2, steps_per_epoch=4, warmup_epochs=1)
    torch.manual_seed(123)  # unrelated global state must not matter: the trainer seeds itself
    full = make_trainer(tmp_path / "full", cfg)
    assert _run(full).kind == "done"
    reference = state(full)

    part = make_trainer(tmp_path / "part", cfg)
    last = _run(part, cancel_at=5)  # mid-epoch, after one validation
    assert last.kind == "cancelled" and last.step == 5
    ckpt = load_checkpoint(tmp_path / "part" / "last_model.pth")
    assert ckpt["step"] == 5
    for key in ("optimizer", "scheduler", "rng_torch", "rng_numpy", "history"):
        assert key in ckpt
    torch.manual_seed(999)
    np.random.seed(999)
    resumed = make_trainer(tmp_path / "resumed", cfg,
                           resume=tmp_path / "part" / "last_model.pth")
    assert resumed.step == 5
    assert _run(resumed).kind == "done"
    got = state(resumed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.allclose(got[k].float(), reference[k].float(), rtol=1e-5, atol=1e-6), k
    assert len(resumed.history) == len(full.history) == 2
    for a, b in zip(resumed.history, full.history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, nan_ok=True), k


def test_stop_at_step_ends_the_run_where_a_cancel_would_with_the_full_schedule(tmp_path):
    """A recipe can describe a phase that was stopped by hand (training.stop_at_step): the
    run ends at that step with a checkpoint, on the full schedule's learning rate."""
    cancelled = make_trainer(tmp_path / "cancelled", tiny_config(num_epochs=3, steps_per_epoch=4))
    assert _run(cancelled, cancel_at=6).kind == "cancelled"
    stopped = make_trainer(tmp_path / "stopped",
                           tiny_config(num_epochs=3, steps_per_epoch=4, stop_at_step=6))
    assert stopped.end_step == 6 and stopped.total_steps == 12
    events = list(stopped.events())
    assert events[-1].kind == "done" and events[-1].step == 6
    assert [e.kind for e in events].count("epoch") == 1
    assert {e.total_steps for e in events} == {6}  # progress bars count to the stop
    ckpt = load_checkpoint(tmp_path / "stopped" / "last_model.pth")
    assert ckpt["step"] == 6
    want, got = state(cancelled), state(stopped)
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-5, atol=1e-6), k
    assert (stopped.optimizer.param_groups[0]["lr"]
            == pytest.approx(cancelled.optimizer.param_groups[0]["lr"]))
    with pytest.raises(ConfigError, match="stop_at_step"):
        tiny_config(stop_at_step=-1)


def test_calibrate_stores_a_threshold_in_the_handed_over_checkpoint(tmp_path):
    """training.calibrate: a finished run measures best_model.pth's threshold and
    uncertainties (scene by scene, as `var-emitter calibrate` does) and the predictor then
    uses them; a cancel during the calibration leaves the trained model uncalibrated."""
    from napari_var_emitter.calibration import THRESHOLD_GRID, default_scenes
    from napari_var_emitter.inference import Predictor

    cfg = tiny_config(num_epochs=1, steps_per_epoch=2, calibrate=True, calibration_frames=2)
    tr = make_trainer(tmp_path / "cal", cfg, tensorboard=True)
    events = list(tr.events())
    tr.close()
    kinds = [e.kind for e in events]
    n = len(default_scenes())
    assert kinds == ["step", "step", "epoch"] + ["calibrating"] * n + ["calibrated", "done"]
    assert [e.metrics["scene"] for e in events if e.kind == "calibrating"] == list(
        range(1, n + 1))
    numbers = events[-2].metrics
    stored = load_checkpoint(tmp_path / "cal" / "best_model.pth")["calibration"]
    assert stored["threshold"] == numbers["threshold"] and numbers["threshold"] in THRESHOLD_GRID
    assert stored["sigma_power"] == [numbers["sigma_power_x"], numbers["sigma_power_y"]]
    assert stored["tta"]["threshold"] in THRESHOLD_GRID
    predictor = Predictor.from_checkpoint(tmp_path / "cal" / "best_model.pth", device="cpu")
    assert predictor.default_threshold == numbers["threshold"]
    assert "calibration" not in load_checkpoint(tmp_path / "cal" / "last_model.pth")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "cal" / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("calibration/threshold")[0].value == pytest.approx(numbers["threshold"])

    stopped = make_trainer(tmp_path / "stopped", cfg)
    kinds = []
    for ev in stopped.events():
        kinds.append(ev.kind)
        if ev.kind == "calibrating":
            stopped.cancel()
    assert kinds[-3:] == ["calibrating", "calibration_cancelled", "done"]
    assert "calibration" not in load_checkpoint(tmp_path / "stopped" / "best_model.pth")
    with pytest.raises(ConfigError, match="calibration_frames"):
        tiny_config(calibration_frames=0)


def test_init_starts_a_fine_tune_from_given_weights(tmp_path):
    cfg = tiny_config(num_epochs=1, steps_per_epoch=2)
    first = make_trainer(tmp_path / "a", cfg)
    _run(first)
    tuned = make_trainer(tmp_path / "b", cfg, init=tmp_path / "a" / "last_model.pth")
    assert tuned.step == 0
    loaded = state(tuned)
    for k, v in state(first).items():
        assert torch.equal(loaded[k], v), k


def test_init_grows_a_trained_model_by_refine_blocks_without_changing_its_output(tmp_path):
    from napari_var_emitter.errors import CheckpointError

    cfg = tiny_config(num_epochs=1, steps_per_epoch=2)
    first = make_trainer(tmp_path / "a", cfg)
    _run(first)
    d = cfg.to_dict()
    grown_cfg = Config.from_dict({**d, "model": {**d["model"], "refine_blocks": 2}})
    grown = make_trainer(tmp_path / "b", grown_cfg, init=tmp_path / "a" / "last_model.pth")
    assert len(grown.module.transformer.refine) == 2
    x = torch.rand(2, 1, 16, 16) * 40 + 10
    with torch.no_grad():
        a = first.module.eval()(x, with_recon=False)["maps"]
        b = grown.module.eval()(x, with_recon=False)["maps"]
    for f in a:  # new blocks start as the identity
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    _run(grown)  # and they learn
    assert any(p.abs().sum() > 0 for n, p in grown.module.named_parameters()
               if n.startswith("transformer.refine.") and n.endswith("conv2.weight"))
    # a model cannot be shrunk, nor changed otherwise
    with pytest.raises(CheckpointError, match="refine_blocks"):
        make_trainer(tmp_path / "c", cfg, init=tmp_path / "b" / "last_model.pth")
    wider = Config.from_dict({**d, "model": {**d["model"], "base_channels": 12}})
    with pytest.raises(CheckpointError, match="differs"):
        make_trainer(tmp_path / "d", wider, init=tmp_path / "a" / "last_model.pth")


def test_init_grows_a_trained_model_by_the_frame_mask_without_changing_its_output(tmp_path):
    from napari_var_emitter.errors import CheckpointError
    from napari_var_emitter.training import STEM_WEIGHT_KEY

    cfg = tiny_config(num_epochs=1, steps_per_epoch=2)
    first = make_trainer(tmp_path / "a", cfg)
    _run(first)
    d = cfg.to_dict()
    masked_cfg = Config.from_dict({**d, "model": {**d["model"], "frame_mask": True}})
    masked = make_trainer(tmp_path / "b", masked_cfg, init=tmp_path / "a" / "last_model.pth")
    w = masked.module.state_dict()[STEM_WEIGHT_KEY]
    assert w.shape[1] == first.module.state_dict()[STEM_WEIGHT_KEY].shape[1] + 1
    x = torch.rand(2, 1, 16, 16) * 40 + 10
    with torch.no_grad():
        a = first.module.eval()(x, with_recon=False)["maps"]
        b = masked.module.eval()(x, with_recon=False)["maps"]
    for f in a:  # the mask's weights start at zero
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    _run(masked)  # and they learn: the border pixels now see where the frame ends
    assert masked.module.state_dict()[STEM_WEIGHT_KEY][:, -1].abs().sum() > 0
    # a model with the mask cannot lose it
    with pytest.raises(CheckpointError, match="frame_mask"):
        make_trainer(tmp_path / "c", cfg, init=tmp_path / "b" / "last_model.pth")

def test_init_grows_a_trained_model_by_context_frames_without_changing_its_output(tmp_path):
    from napari_var_emitter.errors import CheckpointError
    from napari_var_emitter.training import STEM_WEIGHT_KEY

    cfg = tiny_config(num_epochs=1, steps_per_epoch=2)
    first = make_trainer(tmp_path / "a", cfg)
    _run(first)
    d = cfg.to_dict()
    ctx_cfg = Config.from_dict({**d, "model": {**d["model"], "context_frames": 3},
                                "simulation": {**d["simulation"], "mean_on_frames": [1, 6],
                                               "missing_context_fraction": 0.2}})
    grown = make_trainer(tmp_path / "b", ctx_cfg, init=tmp_path / "a" / "last_model.pth")
    w = grown.module.state_dict()[STEM_WEIGHT_KEY]
    assert w.shape[1] == 6  # two intensity transforms of three frames
    x = torch.rand(2, 3, 16, 16) * 40 + 10
    with torch.no_grad():
        a = first.module.eval()(x[:, 1:2], with_recon=False)["maps"]
        b = grown.module.eval()(x, with_recon=False)["maps"]
    for f in a:  # the neighbouring frames' weights start at zero: only the centre counts
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    _run(grown)  # and they learn to use the neighbours
    w = grown.module.state_dict()[STEM_WEIGHT_KEY]
    assert w[:, [0, 2, 3, 5]].abs().sum() > 0
    # a context cannot be shrunk
    with pytest.raises(CheckpointError, match="context_frames"):
        make_trainer(tmp_path / "c", cfg, init=tmp_path / "b" / "last_model.pth")


def test_trainable_prefixes_train_one_part_and_freeze_the_rest(tmp_path):
    cfg = tiny_config(num_epochs=1, steps_per_epoch=3, warmup_epochs=0,
                      trainable="transformer.stages.2")
    trainer = make_trainer(tmp_path, cfg)
    n_all = sum(p.numel() for p in trainer.module.parameters())
    n_stage = sum(p.numel() for name, p in trainer.module.named_parameters()
                  if name.startswith("transformer.stages.2."))
    assert trainer.partial_training_note.startswith(f"only {n_stage:,} of {n_all:,} parameters")
    assert "'transformer.stages.2'" in trainer.partial_training_note
    assert make_trainer(tmp_path / "all", tiny_config()).partial_training_note == ""
    before = state(trainer)
    _run(trainer)
    # parameters and buffers (the VQ codebook's EMA) outside the trained part stay put
    changed = {k for k, v in state(trainer).items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("transformer.stages.2.") for k in changed), changed
    assert "transformer.stages.2.head.bias" in changed
    with pytest.raises(ConfigError, match="matches no parameter"):
        make_trainer(tmp_path / "bad", tiny_config(trainable="no.such.layer"))


def test_a_trainable_part_waits_for_progressive_training_to_switch_its_scale_in(tmp_path):
    """Training only the 8x stage while progressive training has not yet switched the 8x
    scale in: those steps have nothing to train (no gradient at all) and change nothing; the
    stage trains once its scale is in the loss."""
    cfg = tiny_config(num_epochs=2, steps_per_epoch=2, warmup_epochs=2,
                      trainable="transformer.stages.2")
    trainer = make_trainer(tmp_path, cfg)
    stage = {k: v for k, v in state(trainer).items() if k.startswith("transformer.stages.2.")}
    for ev in trainer.events():
        if ev.kind != "step":
            continue
        now = {k: v for k, v in state(trainer).items() if k in stage}
        moved = any(not torch.equal(now[k], stage[k]) for k in stage)
        # x8 joins the loss from epoch 1.5 (the 4th step's ramp): not before
        assert moved == (ev.step >= 4), ev.step
        assert math.isfinite(ev.losses["loss"])
    assert ev.kind == "done"


def test_lr_scale_prefixes_train_their_parameters_at_a_multiple_of_the_rate(tmp_path):
    from napari_var_emitter.training import STEM_WEIGHT_KEY

    cfg = tiny_config(num_epochs=1, steps_per_epoch=3, warmup_epochs=0,
                      lr_scale_prefixes="vqvae.encoder.stem.0", lr_scale=10.0)
    trainer = make_trainer(tmp_path, cfg)
    groups = trainer.optimizer.param_groups
    stem = trainer.module.state_dict(keep_vars=True)[STEM_WEIGHT_KEY]
    assert [len(g["params"]) for g in groups][1] == 2  # the first conv's weight and bias
    assert any(p is stem for p in groups[1]["params"])
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    _run(trainer)  # the schedule keeps the ratio
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    with pytest.raises(ConfigError, match="lr_scale_prefixes"):
        make_trainer(tmp_path / "bad", tiny_config(lr_scale_prefixes="no.such.layer"))
    with pytest.raises(ConfigError, match="lr_scale"):
        tiny_config(lr_scale=0.0)


# -- other data sources --------------------------------------------------------------------

def test_training_from_arrays_reports_localisation_metrics(tmp_path):
    from napari_var_emitter.camera import Camera
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(12, (24, 24), 5, 1.0, camera=Camera(baseline=100, e_per_adu=2),
                           highres_factor=None)
    cfg = tiny_config(num_epochs=1, steps_per_epoch=2)
    data = TrainingData.from_arrays(movie.adu, movie.table, cfg,
                                    camera=Camera(baseline=100, e_per_adu=2))
    assert data.n_frames == 12
    ev = _run(make_trainer(tmp_path, cfg, data=data))
    assert ev.kind == "done" and "jaccard" in ev.metrics


def test_reconstruction_only_training_on_unlabeled_frames_reduces_the_loss(tmp_path):
    from napari_var_emitter.camera import Camera
    from napari_var_emitter.simulation import simulate_movie

    movie = simulate_movie(16, (32, 32), 2, 2.0, camera=Camera(baseline=100, e_per_adu=2),
                           highres_factor=None)
    cfg = tiny_config(num_epochs=4, steps_per_epoch=10, learning_rate=3e-3, val_samples=16)
    data = TrainingData.unlabeled(movie.adu, cfg, camera=Camera(baseline=100, e_per_adu=2))
    assert not data.labeled
    tr = make_trainer(tmp_path, cfg, data=data)
    events = list(tr.events())
    steps = [e.losses for e in events if e.kind == "step"]
    # only the reconstruction and VQ terms exist: no emitter maps are trained
    assert "recon" in steps[0] and not any(k.startswith(("count", "loc")) for k in steps[0])
    val = [e.metrics["loss"] for e in events if e.kind == "epoch"]
    first = np.mean([s["recon"] for s in steps[:5]])
    last = np.mean([s["recon"] for s in steps[-5:]])
    assert last < 0.7 * first, (first, last)
    assert val[-1] < val[0], val
    assert (tmp_path / "best_model.pth").exists() and (tmp_path / "last_model.pth").exists()


def test_data_workers_feed_training_and_are_released(tmp_path):
    """num_workers > 0 draws batches in worker processes: training runs, different workers
    give different batches, and close() ends the processes."""
    import multiprocessing

    from napari_var_emitter.dataset import training_batches

    cfg = tiny_config(num_epochs=1, steps_per_epoch=4, num_workers=2)
    data = TrainingData.simulated(cfg)
    stream = training_batches(data, 4, np.random.default_rng(0), num_workers=2, seed=5)
    first, second = next(stream), next(stream)
    assert first.frames.shape == (4, 1, 16, 16) and len(first.tables) == 4
    assert not np.array_equal(first.frames, second.frames)
    stream.close()

    trainer = make_trainer(tmp_path, cfg, data)
    events = list(trainer.events())
    assert events[-1].kind == "done" and trainer.step == 4
    assert multiprocessing.active_children()  # the loader's workers are still up...
    trainer.close()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_negative_num_workers_is_a_config_error():
    with pytest.raises(ConfigError, match="num_workers"):
        tiny_config(num_workers=-1).validate()
