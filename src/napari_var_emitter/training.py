"""Training: progressive multi-scale optimisation with checkpoints, TensorBoard and DDP.

:class:`Trainer` is the one implementation behind ``var-emitter train`` and the napari
training widget. ``Trainer.events()`` is a generator of :class:`TrainEvent` (steps, epochs,
validation metrics); ``cancel()`` stops it cooperatively after writing a resumable
``last_model.pth``. Under ``torchrun`` it trains data-parallel with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); only rank 0 writes files.

Progressive training (the design's ``progressive``/``warmup_epochs``/``scale_schedule``):
the coarsest target scale trains from the start; finer scales are switched in one after
another over the warm-up epochs ('linear': each ramps its weight from 0 to 1 over its share
of the warm-up; 'step': switched on at once; 'none': all scales from the start).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .calibration import apply_calibration, calibration_steps
from .checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .dataset import TrainingData, collate_targets, training_batches
from .errors import CheckpointError, ConfigError, OutputError, VarEmitterError
from .inference import Predictor, decode_maps, resolve_device

#: consecutive steps with a non-finite loss or gradient after which training stops
MAX_BAD_STEPS = 20


class TrainingError(VarEmitterError):
    """Training cannot go on (for example the loss stays NaN)."""


@dataclass
class TrainEvent:
    """What the trainer reports: ``kind`` is step, epoch, done or cancelled; with
    ``training.calibrate`` also calibrating (``metrics``: scene, scenes), calibrated
    (``metrics``: :meth:`~.calibration.Calibration.summary`'s numbers) or
    calibration_cancelled, between the last epoch and done."""

    kind: str
    epoch: int
    step: int
    total_steps: int
    losses: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def scale_ramp(factors, epoch_float: float, cfg) -> dict:
    """Weight in [0, 1] of each target scale at a (fractional) epoch."""
    tr = cfg.training
    n = len(factors)
    if not tr.progressive or tr.scale_schedule == "none" or tr.warmup_epochs == 0 or n == 1:
        return {f: 1.0 for f in factors}
    share = tr.warmup_epochs / (n - 1)
    ramp = {factors[0]: 1.0}
    for i, f in enumerate(factors[1:], start=1):
        start = (i - 1) * share
        if tr.scale_schedule == "step":
            w = 1.0 if epoch_float >= start else 0.0
        else:
            w = float(np.clip((epoch_float - start) / share, 0.0, 1.0))
        if w > 0:
            ramp[f] = w
    return ramp


def _dist_info():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


class Trainer:
    """Train a :class:`VarEmitterNet` on a :class:`TrainingData` (see module docstring)."""

    def __init__(self, config: Config, data: TrainingData, output_dir, device="auto",
                 init=None, resume=None, log_every: int = 10, tensorboard: bool = True):
        from .losses import VarEmitterLoss
        from .model import VarEmitterNet

        self.config = config.validate()
        self.data = data
        self.output_dir = os.fspath(output_dir)
        self.world_size, self.rank, local_rank = _dist_info()
        self.distributed = self.world_size > 1
        self._owns_process_group = False
        if self.distributed and not torch.distributed.is_initialized():
            self._owns_process_group = True
            backend = "nccl" if torch.cuda.is_available() and str(device) != "cpu" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        if self.distributed and torch.cuda.is_available() and str(device) in ("auto", "cuda"):
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = resolve_device(device)
        self.is_main = self.rank == 0
        self.log_every = log_every
        self._cancel = False
        self.best_checkpoint = os.path.join(self.output_dir, "best_model.pth")
        self.last_checkpoint = os.path.join(self.output_dir, "last_model.pth")

        tr = self.config.training
        torch.manual_seed(tr.seed + self.rank)
        self.rng = np.random.default_rng(tr.seed + 1000 * self.rank)
        self.model = VarEmitterNet(self.config.model).to(self.device)
        self.factors = list(self.config.model.factors)
        self.loss_fn = VarEmitterLoss(self.config.loss, self.factors)
        self.optimizer = torch.optim.AdamW(self._parameter_groups(tr),
                                           lr=tr.learning_rate, weight_decay=tr.weight_decay)
        self.total_steps = tr.num_epochs * tr.steps_per_epoch
        #: where this run ends: the schedule's end unless training.stop_at_step comes first
        self.end_step = (min(tr.stop_at_step, self.total_steps) if tr.stop_at_step
                         else self.total_steps)
        warm = max(1, min(self.total_steps // 20, 500))

        def lr_lambda(step):
            if step < warm:
                return (step + 1) / warm
            if tr.lr_schedule == "constant":
                return 1.0
            prog = (step - warm) / max(1, self.total_steps - warm)
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.amp_dtype = self._amp_dtype(tr.mixed_precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self._batches = None  # training_batches(), started at the first step
        self.best_metric = -math.inf
        self.history: list[dict] = []
        self._bad_steps = 0
        if init is not None:
            ckpt = load_checkpoint(init)
            src = build_model_from_checkpoint(ckpt, init)
            _load_init_weights(self.model, src, ckpt["config_obj"].model, self.config.model,
                               init)
        if resume is not None:
            self._load_resume(resume)
        self.module = self.model
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # finer scales are switched off early in progressive training
                find_unused_parameters=True,
                # the VQ codebook is an EMA buffer updated inside forward: rank 0's copy is
                # broadcast before every forward so all ranks quantise with the same codes
                broadcast_buffers=True)
        self.writer = None
        if self.is_main:
            try:
                os.makedirs(self.output_dir, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.output_dir}: output folder cannot be created "
                                  f"({e.strerror or e})") from None
            _remove_stale_temporaries(self.output_dir)
            self.config.save(os.path.join(self.output_dir, "config.json"))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                try:
                    self.writer = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))
                except OSError as e:
                    raise OutputError(f"{self.output_dir}: cannot write TensorBoard logs "
                                      f"({e.strerror or e})") from None

    def _trainable_parameters(self, tr) -> list:
        """Parameters the optimiser updates; the others are frozen (no gradient computed)."""
        prefixes = tr.trainable_prefixes()
        if not prefixes:
            return list(self.model.parameters())
        chosen = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
            if p.requires_grad:
                chosen.append(p)
        if not chosen:
            raise ConfigError(f"training.trainable {tr.trainable!r} matches no parameter of "
                              "the model (names look like 'transformer.stages.2.head.weight')")
        return chosen

    def _parameter_groups(self, tr) -> list[dict]:
        """The trainable parameters as optimiser groups: those under
        ``training.lr_scale_prefixes`` at ``lr_scale`` x the learning rate, the rest at it
        (the schedule multiplies every group's rate alike)."""
        params = self._trainable_parameters(tr)
        prefixes = tr.lr_scaled_prefixes()
        if not prefixes:
            return [{"params": params}]
        chosen = {id(p) for name, p in self.model.named_parameters()
                  if any(name.startswith(pre) for pre in prefixes)}
        scaled = [p for p in params if id(p) in chosen]
        if not scaled:
            raise ConfigError(f"training.lr_scale_prefixes {tr.lr_scale_prefixes!r} matches no "
                              "trainable parameter of the model (names look like "
                              "'vqvae.encoder.stem.0.weight')")
        rest = [p for p in params if id(p) not in chosen]
        boosted = {"params": scaled, "lr": tr.learning_rate * tr.lr_scale}
        return [{"params": rest}, boosted] if rest else [boosted]

    # -- public API -------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the training loop to stop after the current step (a checkpoint is kept)."""
        self._cancel = True

    def run(self, callback=None) -> list[dict]:
        """Train to the end (or cancellation); ``callback(event)`` sees every event."""
        for ev in self.events():
            if callback is not None:
                callback(ev)
        return self.history

    def events(self):
        """Generator of :class:`TrainEvent`; the training happens while it is iterated."""
        tr = self.config.training
        try:
            while self.step < self.end_step:
                epoch = self.step // tr.steps_per_epoch
                ramp = scale_ramp(self.factors, self.step / tr.steps_per_epoch, self.config)
                losses = self._train_step(ramp)
                self.step += 1
                if self.step % self.log_every == 0 or self.step == 1:
                    self._log_scalars("train", losses, self.step)
                yield TrainEvent("step", epoch, self.step, self.end_step, losses)
                if self._cancel_requested():
                    self._save(self.last_checkpoint, {})
                    yield TrainEvent("cancelled", epoch, self.step, self.end_step, losses)
                    return
                if self.step % tr.steps_per_epoch == 0:
                    metrics = self.validate()
                    self._log_scalars("val", metrics, self.step)
                    self.history.append({"epoch": epoch + 1, "step": self.step, **metrics})
                    score = _score(metrics)
                    if self.is_main:
                        if score > self.best_metric:
                            self.best_metric = score
                            self._save(self.best_checkpoint, metrics)
                        self._save(self.last_checkpoint, metrics)
                    yield TrainEvent("epoch", epoch + 1, self.step, self.end_step, losses,
                                     metrics)
            if self.is_main and self.step % tr.steps_per_epoch and self.step == self.end_step:
                self._save(self.last_checkpoint, {})  # stopped inside an epoch (stop_at_step)
            if self.is_main and tr.calibrate:
                yield from self._calibration_events()
            yield TrainEvent("done", self.step // tr.steps_per_epoch, self.step,
                             self.end_step, {}, self.history[-1] if self.history else {})
        finally:
            if self.writer is not None:
                self.writer.flush()

    @property
    def partial_training_note(self) -> str:
        """One line when ``training.trainable`` freezes part of the model, else "": a
        checkpoint's stored config (the bundled model's last recipe phase trained only its
        8x stage) can carry such a setting into a run that meant to train everything."""
        tr = self.config.training
        if not tr.trainable_prefixes():
            return ""
        params = list(self.module.parameters())
        n_train = sum(p.numel() for p in params if p.requires_grad)
        return (f"only {n_train:,} of {sum(p.numel() for p in params):,} parameters train "
                f"(training.trainable = {tr.trainable!r}); the rest stays frozen")

    @property
    def handed_over_checkpoint(self) -> str:
        """The checkpoint a finished run hands over: best_model.pth, or last_model.pth
        when no epoch was validated."""
        return (self.best_checkpoint if os.path.isfile(self.best_checkpoint)
                else self.last_checkpoint)

    def _calibration_events(self):
        """Calibrate the handed-over checkpoint in place (``training.calibrate``), scene by
        scene; a cancel request between scenes leaves it uncalibrated."""
        tr = self.config.training
        path = self.handed_over_checkpoint
        epoch = self.step // tr.steps_per_epoch
        steps = calibration_steps(Predictor.from_checkpoint(path, device=self.device),
                                  n_frames=tr.calibration_frames)
        while True:
            if self._cancel:  # this rank's own flag: the other ranks have left the loop
                yield TrainEvent("calibration_cancelled", epoch, self.step, self.end_step)
                return
            try:
                done, total, _ = next(steps)
            except StopIteration as finished:
                cal = finished.value
                break
            yield TrainEvent("calibrating", epoch, self.step, self.end_step,
                             metrics={"scene": done, "scenes": total})
        apply_calibration(path, cal)
        summary = cal.summary()
        numbers = {"threshold": summary["threshold"], "mean_jaccard": summary["mean_jaccard"]}
        for i, axis in enumerate("xy"):
            numbers[f"sigma_scale_{axis}"] = summary["sigma_scale"][i]
            numbers[f"sigma_power_{axis}"] = summary["sigma_power"][i]
        self._log_scalars("calibration", numbers, self.step)
        yield TrainEvent("calibrated", epoch, self.step, self.end_step, metrics=numbers)

    def close(self) -> None:
        """Release the TensorBoard writer, the data workers and (when distributed) the
        process group."""
        if self._batches is not None:
            self._batches.close()  # ends DataLoader worker processes, if any
            self._batches = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.model is not self.module:
            # drop the DDP wrapper now: its reducer holds the process group, and one freed
            # at interpreter exit after the group is destroyed can abort the process (SIGABRT)
            self.model = self.module
            gc.collect()
        if self._owns_process_group and torch.distributed.is_initialized():
            # leaving with the group alive can abort the process at exit (gloo threads)
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            self._owns_process_group = False

    # -- internals --------------------------------------------------------------------
    def _cancel_requested(self) -> bool:
        flag = self._cancel
        if self.distributed:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def _amp_dtype(self, mode):
        if mode == "off":
            return None
        if self.device.type == "cuda":
            if mode == "bf16":
                return torch.bfloat16
            return torch.float16
        if mode == "bf16":
            return torch.bfloat16
        return None  # auto/fp16 on CPU: full precision (CPU fp16 autocast is slow)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, ramp) -> dict:
        tr = self.config.training
        self.model.train()
        if tr.trainable_prefixes():
            # frozen parts behave as at inference: in particular the VQ codebook's EMA must
            # not drift under heads that can no longer follow it
            for m in self.module.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        if self._batches is None:
            # workers draw from their own generators, seeded by the step so that a resumed
            # run does not replay the batches it already trained on
            self._batches = training_batches(
                self.data, tr.batch_size, self.rng, tr.num_workers,
                seed=tr.seed + 1000 * self.rank + 7919 * self.step)
        batch = next(self._batches)
        x = torch.from_numpy(batch.frames).to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        # the VQ codebook moves by EMA inside forward; keep a copy so that a step whose
        # loss turns out non-finite leaves no trace in the model (cheap: a few small buffers)
        buffers = {k: b.detach().clone() for k, b in self.module.named_buffers()}
        with self._autocast():
            if batch.labeled:
                out = self.model(x, factors=list(ramp), with_recon=True)
            else:
                out = self.model(x, factors=[], with_recon=True)
        target = collate_targets(batch, self.device) if batch.labeled else None
        total, logs = self.loss_fn(out, target, scale_ramp=ramp if batch.labeled else {})
        finite = self._all_ranks(bool(torch.isfinite(total.detach()).item()))
        if (finite or self.distributed) and total.requires_grad:
            # under DDP every rank must run backward (its gradient all-reduce is collective).
            # No gradient at all: every trainable parameter sits in a scale that progressive
            # training has not switched in yet (training.trainable); the step changes nothing
            self.scaler.scale(total).backward()
        grad_ok = finite
        if finite:
            self.scaler.unscale_(self.optimizer)
            # grad_clip 0 = no clipping, but the norm still tells whether the step is finite
            norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), tr.grad_clip if tr.grad_clip > 0 else math.inf)
            # fp16: the scaler skips inf/NaN gradients by itself and lowers its scale
            if not self.scaler.is_enabled():
                grad_ok = self._all_ranks(bool(torch.isfinite(norm).item()))
        if not grad_ok:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, b in self.module.named_buffers():
                    b.copy_(buffers[k])
            self._bad_steps += 1
            if self._bad_steps >= MAX_BAD_STEPS:
                what = "loss" if not finite else "gradient"
                raise TrainingError(
                    f"training stopped at step {self.step + 1}: the {what} was NaN or infinite "
                    f"for {self._bad_steps} steps in a row (the steps were skipped); lower "
                    "training.learning_rate, check the data, or resume from "
                    f"{self.last_checkpoint}")
            return {"loss": float(total.detach()), "skipped": 1.0,
                    "lr": self.optimizer.param_groups[0]["lr"]}
        self._bad_steps = 0
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # fp16: the scaler skips a step whose gradients overflowed (and lowers its scale);
        # the learning-rate schedule follows the steps actually taken
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale:
            self.scheduler.step()
        logs = {k: float(v) for k, v in logs.items()}
        logs["loss"] = float(total.detach())
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        return logs

    def _all_ranks(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every rank (one collective decision under DDP)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and localisation metrics (Jaccard, RMSE, efficiency) on the validation set,
        pooled and per density band of the tiles (``sparse_precision``, ...; see
        :func:`~napari_var_emitter.metrics.evaluate_by_density`)."""
        from .metrics import evaluate_by_density, evaluate_tables
        from .table import concat_tables

        self.model.eval()
        model = self.module
        bs = self.config.training.batch_size
        f_loc = self.config.model.loc_factor
        px = self.config.simulation.pixel_size_nm if self.data.simulated_source \
            else self.config.data.pixel_size_nm
        losses, truths, preds, perps = [], [], [], []
        ramp = {f: 1.0 for f in self.factors}
        images = None
        for bi, batch in enumerate(self.data.validation_batches(bs)):
            x = torch.from_numpy(batch.frames).to(self.device)
            with self._autocast():
                out = model(x, factors=self.factors if batch.labeled else [], with_recon=True)
            target = collate_targets(batch, self.device) if batch.labeled else None
            total, _ = self.loss_fn(out, target, scale_ramp=ramp if batch.labeled else {})
            losses.append(float(total))
            perps.append(float(out["vq"]["perplexity"]))
            if batch.labeled:
                tabs = decode_maps(out["maps"][f_loc], f_loc, 0.5)
                for i, (tt, pt) in enumerate(zip(batch.tables, tabs)):
                    tt = tt.copy()
                    tt["frame"] = len(truths)
                    pt["frame"] = len(truths)
                    truths.append(tt)
                    preds.append(pt)
                if bi == 0:
                    images = (batch, out)
        metrics = {"loss": float(np.mean(losses)), "perplexity": float(np.mean(perps))}
        if truths:
            ev = evaluate_tables(concat_tables(truths), concat_tables(preds),
                                 tolerance_nm=250.0, pixel_size_nm=px, n_frames=len(truths))
            for k in ("jaccard", "recall", "precision", "rmse_nm", "efficiency", "count_mae",
                      "calibration_x", "calibration_y"):
                if k in ev and ev[k] is not None:
                    metrics[k] = float(ev[k])
            th, tw = self.config.model.input_size  # every validation tile has this size
            area_um2 = th * tw * (px / 1000.0) ** 2
            metrics.update(evaluate_by_density(truths, preds, area_um2, 250.0, px))
        if self.writer is not None and images is not None:
            self._log_images(*images)
        return metrics

    def _log_scalars(self, prefix, d, step):
        if self.writer is None:
            return
        for k, v in d.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def _log_images(self, batch, out):
        """Predicted probability maps of the first validation tile next to the truth."""
        n = min(4, len(batch))
        for f, m in out["maps"].items():
            p = m["prob"][:n].float().cpu().numpy()
            t = np.zeros_like(p)
            for i in range(n):
                tab = batch.tables[i]
                j = np.clip(np.floor((tab["y"] + 0.5) * f).astype(int), 0, p.shape[1] - 1)
                k = np.clip(np.floor((tab["x"] + 0.5) * f).astype(int), 0, p.shape[2] - 1)
                t[i, j, k] = 1.0
            grid = np.concatenate([np.concatenate(list(p), 1), np.concatenate(list(t), 1)], 0)
            self.writer.add_image(f"maps/x{f}_pred_top_truth_bottom", grid[None], self.step)

    def _state(self, metrics) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.config.training.steps_per_epoch,
            "best_metric": float(self.best_metric),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "history": [{k: (int(v) if k in ("epoch", "step") else float(v))
                         for k, v in h.items()} for h in self.history],
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": self.rng.bit_generator.state,
        }

    def _save(self, path, metrics):
        if not self.is_main:
            return
        save_checkpoint(path, self.module.state_dict(), self.config, **self._state(metrics))

    def _load_resume(self, path):
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt["config_obj"].model != self.config.model:
            raise CheckpointError(path, "its model section differs from this config's")
        self.model.load_state_dict(build_model_from_checkpoint(ckpt, path).state_dict())
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.step = int(ckpt["step"])
            self.best_metric = float(ckpt["best_metric"])
            self.history = list(ckpt.get("history", []))
            torch.set_rng_state(ckpt["rng_torch"].cpu())
            if self.rank == 0:
                self.rng.bit_generator.state = ckpt["rng_numpy"]
        except KeyError as e:
            raise CheckpointError(path, f"cannot resume: the checkpoint lacks {e}") from None


def _remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files of an earlier run killed while writing (``kill -9``): atomic
    writes name them ``.tmp-<file>-*`` beside the checkpoint they were to replace."""
    prefixes = tuple(f".tmp-{name}-" for name in ("best_model.pth", "last_model.pth",
                                                   "config.json"))
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefixes):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def _score(metrics: dict) -> float:
    """Model selection: validation efficiency; without any match (efficiency undefined),
    or for reconstruction-only data, lower validation loss is better and ranks below any
    model that matched emitters."""
    eff = metrics.get("efficiency", float("nan"))
    if math.isfinite(eff):
        return eff
    loss = metrics.get("loss", float("inf"))
    return -1e6 - (loss if math.isfinite(loss) else 1e6)


#: the encoder's first convolution (the one that sees the input channels)
STEM_WEIGHT_KEY = "vqvae.encoder.stem.0.weight"


def _load_init_weights(model, src, src_cfg, cfg, path) -> None:
    """Copy ``src``'s weights into ``model`` (``--init``): same architecture, or the same
    one grown by more ``refine_blocks`` (new blocks start as the identity), by the
    ``frame_mask`` input channel and/or by more ``context_frames`` (their first-layer weights
    start at zero), so the grown model predicts exactly what ``src`` did."""
    if src_cfg == cfg:
        model.load_state_dict(src.state_dict())
        return
    same_but_grown = dataclasses.replace(src_cfg, refine_blocks=cfg.refine_blocks,
                                         frame_mask=cfg.frame_mask,
                                         context_frames=cfg.context_frames) == cfg
    if (not same_but_grown or cfg.refine_blocks < src_cfg.refine_blocks
            or (src_cfg.frame_mask and not cfg.frame_mask)
            or cfg.context_frames < src_cfg.context_frames):
        raise CheckpointError(path, "its model section differs from this config's "
                              "(fine-tuning needs the same architecture, or more "
                              "model.refine_blocks, model.context_frames, or "
                              "model.frame_mask added)")
    state = src.state_dict()
    state[STEM_WEIGHT_KEY] = _grown_stem(state[STEM_WEIGHT_KEY], src_cfg, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    grown = [k for k in missing if not k.startswith("transformer.refine.")]
    if grown or unexpected:  # cannot happen when only the growable keys differ
        raise CheckpointError(path, f"weights do not fit this model: {grown or unexpected}")


def _grown_stem(w, src_cfg, cfg):
    """The first layer's weights (out, in, k, k) for ``cfg``'s input channels: per frame two
    intensity transforms, [transform 1 of frames 0..C-1, transform 2 of frames 0..C-1, frame
    mask]; ``src``'s frames sit at the centre of the longer context, new channels get zero."""
    c_src, c_new = src_cfg.context_frames, cfg.context_frames
    out = w.new_zeros(w.shape[0], 2 * c_new + int(bool(cfg.frame_mask)), *w.shape[2:])
    shift = (c_new - c_src) // 2
    for transform in range(2):
        out[:, transform * c_new + shift:transform * c_new + shift + c_src] = \
            w[:, transform * c_src:(transform + 1) * c_src]
    if src_cfg.frame_mask:
        out[:, -1] = w[:, -1]
    return out
