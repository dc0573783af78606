"""The ``var-emitter`` command line: simulate, train, predict, evaluate.

Options accept ``--snake_case`` (as the original design's scripts) and ``--kebab-case``.
A bad input or option ends with exit code 2 and one line ``error: ...`` on stderr naming the
file and the problem; Ctrl-C ends with exit code 130 after cleaning up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile

from . import __version__
from .errors import Cancelled, VarEmitterError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def _opt(p, name, **kw):
    """Add an option under both its kebab-case and snake_case spellings."""
    kebab = "--" + name.replace("_", "-")
    snake = "--" + name.replace("-", "_")
    names = [kebab] if kebab == snake else [kebab, snake]
    p.add_argument(*names, dest=name.replace("-", "_"), **kw)


def _camera_opts(p, with_read_noise=False):
    _opt(p, "baseline", type=float, default=0.0, help="camera offset in ADU (default 0)")
    _opt(p, "e-per-adu", type=float, default=1.0, help="electrons per ADU (default 1)")
    _opt(p, "em-gain", type=float, default=1.0, help="EM gain (1 = no EM register)")
    _opt(p, "qe", type=float, default=1.0, help="quantum efficiency (default 1)")
    if with_read_noise:
        _opt(p, "read-noise", type=float, default=0.0, help="read noise in electrons rms")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``var-emitter`` (all sub-commands)."""
    p = _Parser(prog="var-emitter", description="VAR-style deep emitter localisation for SMLM")
    p.add_argument("--version", action="version", version=f"napari-var-emitter {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="simulate SMLM frames in the design's data layout")
    _opt(s, "out", required=True, help="output folder")
    _opt(s, "name", default="sim", help="file stem (default sim)")
    _opt(s, "frames", type=int, default=100)
    _opt(s, "size", type=int, nargs=2, default=[40, 40], metavar=("H", "W"))
    _opt(s, "pixel-size", type=float, default=100.0, help="camera pixel size in nm")
    _opt(s, "density", type=float, default=1.0, help="active emitters per um^2 per frame")
    _opt(s, "photons", type=float, nargs=2, default=[500.0, 5000.0], metavar=("MIN", "MAX"))
    _opt(s, "background", type=float, nargs=2, default=[10.0, 30.0], metavar=("MIN", "MAX"))
    _opt(s, "sigma", type=float, nargs=2, default=[1.0, 1.5], metavar=("MIN", "MAX"),
         help="PSF sigma range in camera pixels")
    _opt(s, "mean-on-frames", type=float, default=3.0)
    _opt(s, "scene", choices=["uniform", "filaments"], default="uniform")
    _camera_opts(s, with_read_noise=True)
    _opt(s, "highres-factor", type=int, default=8)
    _opt(s, "seed", type=int, default=0)

    t = sub.add_parser("train", help="train or fine-tune a model")
    _opt(t, "config", help="config.json (defaults when omitted)")
    _opt(t, "tiff_dir", help="training TIFFs (the design's train_tiff/)")
    _opt(t, "emitter_dir", help="emitter files with the same stems (train_emitters/)")
    _opt(t, "simulate", action="store_true", help="train on on-the-fly simulated frames")
    _opt(t, "unlabeled", action="store_true",
         help="--tiff_dir holds unlabeled frames: reconstruction-only adaptation")
    _opt(t, "output_dir", required=True)
    _opt(t, "device", default="auto", help="auto, cpu, cuda or mps")
    _opt(t, "init", help="start from these weights (fine-tune); 'bundled' = the shipped model")
    _opt(t, "resume", help="continue exactly from this checkpoint (last_model.pth)")
    _opt(t, "epochs", type=int, help="override training.num_epochs")
    _opt(t, "steps_per_epoch", type=int, help="override training.steps_per_epoch")
    _opt(t, "calibrate", action="store_true",
         help="when training ends, calibrate best_model.pth's threshold and uncertainties "
              "(training.calibrate; as 'var-emitter calibrate' does)")

    r = sub.add_parser("predict", help="localise emitters in TIFF stacks")
    r.add_argument("inputs", nargs="*", help="input TIFF files")
    _opt(r, "input_dir", help="folder of input TIFFs")
    _opt(r, "output_dir", required=True)
    _opt(r, "checkpoint", help="model checkpoint (default: the bundled model)")
    _opt(r, "config", help="config.json beside the checkpoint (checked for consistency)")
    _opt(r, "batch_size", type=int, default=None,
         help="frames per forward pass (default 64 on a CPU, 1024 on a GPU, where larger "
              "batches are 2.3x faster)")
    _opt(r, "device", default="auto")
    _opt(r, "pixel-size", type=float, default=None, help="nm (default: from the TIFF or 100)")
    _camera_opts(r)
    _opt(r, "threshold", type=float, default=None,
         help="detection probability threshold (default: the model's calibrated one, else 0.5)")
    _opt(r, "tta", action="store_true",
         help="average the network over the 8 symmetries of each tile: lower RMSE in every "
              "benchmark scene, higher Jaccard except on very crowded frames, 8x slower "
              "(test-time augmentation, with its own calibration)")
    _opt(r, "no-border-fit", action="store_true",
         help="report spots at the frame border as the network places them, without the "
              "maximum-likelihood refit that decides whether their centre is inside the frame")
    _opt(r, "no-pair-fit", action="store_true",
         help="report every detection as the network does, without the two-spot fit that "
              "splits a detection whose light is two close emitters")
    _opt(r, "no-maps", action="store_true", help="skip predictions.h5 (fast path)")
    _opt(r, "no-figures", action="store_true", help="skip the PNG figures")
    _opt(r, "overwrite", action="store_true", help="redo inputs whose outputs are complete")
    _opt(r, "sample", choices=["sparse", "dense", "filaments"], default=None,
         help="also localise this built-in simulated sample (written with its ground truth "
              "to OUT/sample_NAME.tif and OUT/sample_NAME_truth.csv; its camera is used)")

    c = sub.add_parser("calibrate", help="measure a checkpoint's detection threshold and "
                       "uncertainty scale on simulated movies and store them in it (for plain "
                       "prediction and for --tta)")
    _opt(c, "checkpoint", required=True, help="checkpoint to calibrate")
    _opt(c, "out", default=None, help="write the calibrated copy here (default: in place)")
    _opt(c, "frames", type=int, default=60, help="frames per calibration movie (12 movies)")
    _opt(c, "seed", type=int, default=20261126)
    _opt(c, "device", default="auto")

    e = sub.add_parser("evaluate", help="compare localisations with the ground truth")
    _opt(e, "truth", required=True, help="ground truth: ThunderSTORM CSV or emitter H5")
    _opt(e, "pred", required=True, help="our localizations.csv")
    _opt(e, "tolerance-nm", type=float, default=250.0)
    _opt(e, "pixel-size", type=float, default=None,
         help="nm (default: the pixel size stored with the truth or the localisations, as a "
              "Picasso .yaml's Pixelsize, else 100; positions in nm do not depend on it, the "
              "CRLB does)")
    _opt(e, "frames", type=int, default=None, help="number of frames (counts empty frames)")
    _opt(e, "image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
         help="frame size in pixels: edge emitters get their larger CRLB, and the recall of "
              "the emitters within 1 px of the frame border is reported (recall_border)")
    _opt(e, "em-gain", type=float, default=1.0, help="> 1: EMCCD (excess noise 2) in the CRLB")
    _opt(e, "qe", type=float, default=1.0, help="quantum efficiency for the CRLB")
    _opt(e, "read-noise", type=float, default=0.0, help="read noise (e-) for the CRLB")
    return p


def main(argv=None) -> int:
    """Entry point of ``var-emitter``; returns the exit code."""
    args = build_parser().parse_args(argv)
    code = _dispatch(args)
    if argv is None and args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's worker threads can still be alive while the interpreter
        # shuts down, and tearing them down then aborts the process ("terminate called
        # without an active exception", SIGABRT about one run in ten here), which torchrun
        # reports as a failed run. Everything is written and closed by now (checkpoints
        # atomically, the TensorBoard writer, the process group): leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(args) -> int:
    """Run the chosen subcommand; errors become one line on stderr and an exit code."""
    try:
        code = {"simulate": cmd_simulate, "train": cmd_train, "predict": cmd_predict,
                "calibrate": cmd_calibrate, "evaluate": cmd_evaluate}[args.command](args)
        sys.stdout.flush()  # a pipe buffers stdout: a reader gone early shows up here
        return code
    except VarEmitterError as e:
        if isinstance(e, Cancelled):
            sys.stderr.write(f"error: {e}\n")
            return 130
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:  # `var-emitter evaluate ... | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a process ended by SIGPIPE


# -- simulate ------------------------------------------------------------------------------
def cmd_simulate(a) -> int:
    from .camera import Camera
    from .simulation import simulate_movie, write_simulation

    cam = Camera(baseline=a.baseline, e_per_adu=a.e_per_adu, em_gain=a.em_gain, qe=a.qe,
                 read_noise=a.read_noise)
    if a.frames < 1:
        raise VarEmitterError(f"--frames must be >= 1, got {a.frames}")
    if a.highres_factor < 1:
        raise VarEmitterError(f"--highres-factor must be >= 1, got {a.highres_factor}")
    movie = simulate_movie(a.frames, tuple(a.size), a.seed, a.density, a.pixel_size,
                           tuple(a.photons), tuple(a.background), tuple(a.sigma), cam,
                           a.mean_on_frames, a.scene, highres_factor=a.highres_factor)
    paths = write_simulation(a.out, a.name, movie)
    n = len(movie.table_in_view())
    print(f"simulated {a.frames} frames of {a.size[0]}x{a.size[1]} px, {n} emitters in view")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return 0


# -- train ---------------------------------------------------------------------------------
def cmd_train(a) -> int:
    from .calibration import describe_calibration
    from .checkpoint import load_checkpoint
    from .config import Config, load_config
    from .dataset import TrainingData
    from .inference import bundled_checkpoint_path
    from .training import Trainer

    init = bundled_checkpoint_path() if a.init == "bundled" else a.init
    if a.config:
        cfg = load_config(a.config)
    elif a.resume:
        # continuing a run: its own configuration (saved in the checkpoint) is the default
        cfg = load_checkpoint(a.resume)["config_obj"]
    elif init:
        # a fine-tune: the weights fix the architecture; the training section starts afresh
        cfg = load_checkpoint(init)["config_obj"].for_fine_tuning()
    else:
        cfg = Config().validate()
    if a.epochs is not None or a.steps_per_epoch is not None or a.calibrate:
        d = cfg.to_dict()
        if a.epochs is not None:
            d["training"]["num_epochs"] = a.epochs
        if a.steps_per_epoch is not None:
            d["training"]["steps_per_epoch"] = a.steps_per_epoch
        if a.calibrate:
            d["training"]["calibrate"] = True
        cfg = Config.from_dict(d)
    if a.simulate:
        if a.tiff_dir or a.emitter_dir:
            raise VarEmitterError("give either --simulate or --tiff_dir/--emitter_dir, not both")
        data = TrainingData.simulated(cfg)
    elif a.unlabeled:
        if not a.tiff_dir:
            raise VarEmitterError("--unlabeled needs --tiff_dir")
        data = _unlabeled_folder(a.tiff_dir, cfg)
    else:
        if not (a.tiff_dir and a.emitter_dir):
            raise VarEmitterError("give --tiff_dir and --emitter_dir, or --simulate")
        data = TrainingData.from_folders(a.tiff_dir, a.emitter_dir, cfg)
    trainer = Trainer(cfg, data, a.output_dir, device=a.device, init=init, resume=a.resume)

    def stop(signum, frame):  # SIGINT / SIGTERM: finish the step, write last_model.pth
        trainer.cancel()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _progress_bar(trainer.end_step, trainer.step, trainer.is_main)
    say = bar.write if bar is not None else print  # a line above the progress bar
    if trainer.is_main and trainer.partial_training_note:
        say(trainer.partial_training_note)
    cancelled = False
    try:
        for ev in trainer.events():
            if ev.kind == "step" and bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ev.losses.get('loss', float('nan')):.3g}")
            elif ev.kind == "epoch" and trainer.is_main:
                m = ev.metrics
                msg = (f"epoch {ev.epoch}: val loss {m.get('loss', float('nan')):.4g}"
                       + (f", jaccard {m['jaccard']:.3f}, rmse {m['rmse_nm']:.1f} nm, "
                          f"efficiency {m['efficiency']:.1f}" if "jaccard" in m else "")
                       + (f"; sparse tiles: jaccard {m['sparse_jaccard']:.3f}, precision "
                          f"{m['sparse_precision']:.3f}" if "sparse_jaccard" in m else ""))
                say(msg)
            elif ev.kind == "calibrating" and ev.metrics["scene"] == 1:
                say(f"calibrating {trainer.handed_over_checkpoint} on "
                    f"{ev.metrics['scenes']} simulated movies ...")
            elif ev.kind == "calibrated":
                say(describe_calibration(ev.metrics))
            elif ev.kind == "calibration_cancelled":
                say("calibration interrupted: the model is trained but not calibrated "
                    f"(var-emitter calibrate --checkpoint {trainer.handed_over_checkpoint})")
            elif ev.kind == "cancelled":
                cancelled = True
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        trainer.close()
    if cancelled:
        sys.stderr.write(f"error: training interrupted at step {trainer.step}; resume with "
                         f"--resume {trainer.last_checkpoint}\n")
        return 130
    if trainer.is_main:
        print(f"best model: {trainer.best_checkpoint}")
    return 0


def _unlabeled_folder(tiff_dir, cfg):
    import numpy as np

    from .camera import Camera
    from .dataset import TrainingData
    from .errors import InputFileError
    from .io.tiff import open_stack

    files = sorted(f for f in os.listdir(tiff_dir) if f.lower().endswith((".tif", ".tiff")))
    if not files:
        raise InputFileError(tiff_dir, "no .tif/.tiff files in this folder")
    frames = []
    for f in files:
        with open_stack(os.path.join(tiff_dir, f)) as st:
            frames.append(np.asarray(st[:], np.float32))
    d = cfg.data
    cam = Camera(baseline=d.baseline, e_per_adu=d.e_per_adu, em_gain=d.em_gain, qe=d.qe)
    return TrainingData.unlabeled(np.concatenate(frames), cfg, camera=cam, name=tiff_dir)


def _progress_bar(total, start, show):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("VAR_EMITTER_PROGRESS") != "1")


# -- predict -------------------------------------------------------------------------------
def cmd_predict(a) -> int:
    """``var-emitter predict``; an output folder it created stays only if something is in it
    (under torchrun the ranks share the folder, so it is left alone)."""
    created = (not os.path.exists(a.output_dir)
               and int(os.environ.get("WORLD_SIZE", "1")) == 1)
    try:
        return _cmd_predict(a)
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(a.output_dir)  # fails (and keeps it) unless it is empty


def _cmd_predict(a) -> int:
    from .camera import Camera
    from .config import load_config
    from .errors import ConfigError, InputFileError
    from .inference import Predictor, process_device, reuse_freed_memory

    inputs = list(a.inputs)
    if a.sample:
        inputs.append(_write_sample(a))
    if a.input_dir:
        if not os.path.isdir(a.input_dir):
            raise InputFileError(a.input_dir, "no such folder")
        inputs += sorted(os.path.join(a.input_dir, f) for f in os.listdir(a.input_dir)
                         if f.lower().endswith((".tif", ".tiff")))
        if not inputs:
            raise InputFileError(a.input_dir, "no .tif/.tiff files in this folder")
    if not inputs:
        raise ConfigError("no input: give TIFF files or --input_dir")
    if a.batch_size is not None and a.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {a.batch_size}")
    if a.threshold is not None and not 0 < a.threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {a.threshold}")
    _check_pixel_size(a.pixel_size)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in inputs]
    seen = {}
    for p, stem in zip(inputs, stems):
        if stem in seen:
            raise ConfigError(f"{seen[stem]} and {p} share the file name {stem!r}; their "
                              f"outputs in {os.path.join(a.output_dir, stem)} would collide")
        seen[stem] = p
    for p in inputs:
        if not os.path.isfile(p):
            raise InputFileError(p, "no such file")
    camera = Camera(baseline=a.baseline, e_per_adu=a.e_per_adu, em_gain=a.em_gain, qe=a.qe)
    _check_writable(a.output_dir)
    device = process_device(a.device)  # under torchrun: one GPU per rank
    predictor = (Predictor.from_checkpoint(a.checkpoint, device=device) if a.checkpoint
                 else Predictor.from_pretrained(device=device))
    if predictor.device.type == "cpu":
        reuse_freed_memory()
    if a.config:
        cfg = load_config(a.config)
        if cfg.model != predictor.config.model:
            raise ConfigError(f"{a.config}: its model section does not match the checkpoint's")
    # several processes (torchrun) split the inputs between them; no process pool here
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    mine = list(zip(inputs, stems))[rank::world]
    failures = 0
    with _Interrupts() as interrupts:
        for path, stem in mine:
            interrupts.check()
            try:
                _predict_one(a, predictor, camera, path, stem, interrupts)
            except VarEmitterError as e:
                if len(mine) > 1 and not isinstance(e, Cancelled):
                    # one bad input among many: report it, finish the others, exit 2 at the end
                    sys.stderr.write(f"error: {e}\n")
                    failures += 1
                    continue
                raise
    if a.sample and rank == 0:
        _report_sample(a)
    return 2 if failures else 0


def _report_sample(a):
    """One line comparing the sample's localisations with its ground truth."""
    from .io.emitters import read_emitters
    from .metrics import evaluate_tables

    stem = f"sample_{a.sample}"
    locs = os.path.join(a.output_dir, stem, "localizations.csv")
    if not os.path.exists(locs):
        return
    truth, _ = read_emitters(os.path.join(a.output_dir, stem + "_truth.csv"), pixel_size_nm=100.0)
    pred, _ = read_emitters(locs, pixel_size_nm=100.0)
    ev = evaluate_tables(truth, pred, 250.0, 100.0)
    print(f"sample '{a.sample}' vs its ground truth: Jaccard {ev['jaccard']:.3f}, "
          f"recall {ev['recall']:.3f}, precision {ev['precision']:.3f}, "
          f"RMSE {ev['rmse_nm']:.1f} nm, efficiency {ev['efficiency']:.1f}")


def _write_sample(a) -> str:
    """Simulate a built-in sample into the output folder; its camera becomes the camera."""
    from .io.emitters import write_thunderstorm_csv
    from .io.tiff import write_tiff
    from .samples import make_sample

    _check_writable(a.output_dir)
    movie = make_sample(a.sample)
    path = os.path.join(a.output_dir, f"sample_{a.sample}.tif")
    write_tiff(path, movie.adu, pixel_size_nm=movie.pixel_size_nm)
    write_thunderstorm_csv(os.path.join(a.output_dir, f"sample_{a.sample}_truth.csv"),
                           movie.table_in_view(), movie.pixel_size_nm)
    cam = movie.camera
    a.baseline, a.e_per_adu, a.em_gain, a.qe = cam.baseline, cam.e_per_adu, cam.em_gain, cam.qe
    print(f"sample '{a.sample}': {path} (ground truth beside it)")
    return path


def _predict_one(a, predictor, camera, path, stem, interrupts) -> None:
    """Localise one input into ``OUT/STEM/``: written in a hidden temporary folder that is
    renamed into place only when every output is complete (or removed on any failure)."""
    from .inference import default_batch_size
    from .io.tiff import open_stack
    from .outputs import write_figures, write_tables

    final = os.path.join(a.output_dir, stem)
    _remove_stale_partials(a.output_dir, stem)
    if os.path.exists(final) and not os.path.isdir(final):
        from .errors import OutputError

        raise OutputError(f"{final}: exists and is not a folder (the outputs of {path} go "
                          f"there)")
    if os.path.isdir(final) and not a.overwrite and _complete(final, a):
        print(f"{path}: outputs complete in {final}, skipped (use --overwrite to redo)")
        return
    try:
        tmp = tempfile.mkdtemp(prefix=f".{stem}.partial-", dir=a.output_dir)
        # mkdtemp makes it private (0700); the finished folder gets the usual permissions
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        from .errors import OutputError

        raise OutputError(f"{a.output_dir}: output folder cannot be written "
                          f"({e.strerror or e})") from None
    try:
        with open_stack(path) as stack:
            px = a.pixel_size if a.pixel_size is not None else (stack.pixel_size_nm or 100.0)
            attrs = {"model_id": predictor.model_id, "config": predictor.config.to_dict(),
                     "threshold": a.threshold or predictor.threshold_for(a.tta),
                     "tta": bool(a.tta), "border_fit": not a.no_border_fit,
                     "pair_fit": not a.no_pair_fit,
                     "calibration": predictor.calibration,
                     "camera": camera.to_dict(), "pixel_size_nm": float(px),
                     "input": os.path.abspath(path)}
            gen = predictor.predict_iter(
                stack, camera=camera, pixel_size_nm=px, threshold=a.threshold,
                batch_size=a.batch_size or default_batch_size(predictor.device),
                maps=not a.no_maps, name=path, tta=a.tta, border_fit=not a.no_border_fit,
                pair_fit=not a.no_pair_fit,
                maps_h5=None if a.no_maps else os.path.join(tmp, "predictions.h5"),
                h5_attrs=attrs, cancel=interrupts.check)
            bar = _progress_bar(len(stack), 0, True)
            try:
                while True:
                    try:
                        ev = next(gen)
                    except StopIteration as s:
                        result = s.value
                        break
                    if bar is not None:
                        bar.n = ev.done
                        bar.refresh()
            finally:
                gen.close()  # an interrupted generator removes its partial predictions.h5
                if bar is not None:
                    bar.close()
            try:
                write_tables(tmp, result)
                interrupts.check()
                if not a.no_figures:
                    write_figures(tmp, stack, result)
            finally:
                _close_maps(result)
        interrupts.check()
        with interrupts.deferred():  # the rename is never cut in half by Ctrl-C
            _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    psf = result.psf_summary()
    print(f"{path}: {len(result.localizations)} localisations in "
          f"{result.shape[0]} frames{', ' + psf if psf else ''} -> {final}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_partials(out_dir, stem) -> None:
    """Temporary folders of an earlier run of this input killed outright (``kill -9``)."""
    try:
        entries = os.listdir(out_dir)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(f".{stem}.partial-"):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)


class _Interrupts:
    """Cooperative SIGINT/SIGTERM: the first signal is only recorded, and :meth:`check`
    (called after every batch, between outputs and before each input) turns it into a
    KeyboardInterrupt, so clean-up runs and the exit status is 130. A second signal raises
    at once, for a user who does not want to wait for the current batch.

    Raising from the handler itself is unsafe here: a signal that lands while Python runs a
    weakref callback or a ``__del__`` (h5py and torch run many) has its KeyboardInterrupt
    printed as "Exception ignored" and dropped, and the run would go on. Inside
    :meth:`deferred` blocks nothing is raised until the block ends.
    """

    def __init__(self):
        self._old = {}
        self._depth = 0
        self.received = 0

    def _handler(self, signum, frame):
        self.received += 1
        if self.received > 1 and not self._depth:
            raise KeyboardInterrupt

    def check(self) -> bool:
        """Raise KeyboardInterrupt if a signal arrived; else return False."""
        if self.received and not self._depth:
            raise KeyboardInterrupt
        return False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a GUI worker)
                break
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.check()


def _complete(folder, a) -> bool:
    need = ["localizations.csv", "localizations.hdf5", "localizations.yaml"]
    if not a.no_maps:
        need.append("predictions.h5")
    return all(os.path.exists(os.path.join(folder, n)) for n in need)


def _close_maps(result):
    for d in result.maps.values():
        for ds in d.values():
            f = getattr(ds, "file", None)
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - already closed
                    pass
                return


def _check_pixel_size(pixel_size) -> None:
    """``--pixel-size``: unset or a positive finite number of nm."""
    from .errors import ConfigError

    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ConfigError(f"--pixel-size must be a positive number of nm, got {pixel_size}")


def _replace_dir(tmp, final):
    """Move a finished output folder into place. An existing folder keeps the files that are
    not ours (a user's notes or analyses); our earlier outputs go (one the new run does not
    write, e.g. maps after a redo with --no-maps, would no longer match), the new ones move
    in one by one, the table that marks the folder complete (:func:`_complete`) last, so an
    interrupted move reads as incomplete and is redone."""
    from .errors import OutputError
    from .outputs import is_predict_output

    try:
        if not os.path.isdir(final):
            os.replace(tmp, final)
            return
        new = set(os.listdir(tmp))
        ours = [n for n in os.listdir(final) if n in new or is_predict_output(n)]
        for name in ours:  # checked before anything moves: all or nothing
            if os.path.isdir(os.path.join(final, name)):
                raise OutputError(f"{os.path.join(final, name)}: a folder where an output "
                                  f"file goes; move it away and rerun")
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(final, "localizations.csv"))
        for name in ours:
            if name not in new:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(final, name))
        for name in sorted(new, key=lambda n: n == "localizations.csv"):
            os.replace(os.path.join(tmp, name), os.path.join(final, name))
        os.rmdir(tmp)
    except OSError as e:
        raise OutputError(f"{final}: outputs cannot be moved into place "
                          f"({e.strerror or e})") from None


def _check_writable(folder):
    from .errors import OutputError

    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputError(f"{folder}: output folder cannot be written "
                          f"({e.strerror or e})") from None


# -- calibrate -----------------------------------------------------------------------------
def cmd_calibrate(a) -> int:
    """Calibrate the threshold and uncertainty scale of a checkpoint (see calibration.py)."""
    from .calibration import apply_calibration, calibrate
    from .errors import ConfigError
    from .inference import Predictor

    if a.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {a.frames}")
    predictor = Predictor.from_checkpoint(a.checkpoint, device=a.device)
    if a.out:
        _check_writable(os.path.dirname(os.path.abspath(a.out)))
    cal = calibrate(predictor, n_frames=a.frames, seed=a.seed,
                    log=lambda m: sys.stderr.write(m + "\n"))
    apply_calibration(a.checkpoint, cal, a.out)
    report = {"checkpoint": a.out or a.checkpoint, **cal.summary()}
    print(json.dumps(report))
    return 0


# -- evaluate ------------------------------------------------------------------------------
def cmd_evaluate(a) -> int:
    import numpy as np

    from .camera import Camera
    from .errors import ConfigError, InputFileError
    from .io.emitters import read_emitters
    from .metrics import evaluate_tables

    _check_pixel_size(a.pixel_size)
    if not (math.isfinite(a.tolerance_nm) and a.tolerance_nm > 0):
        raise ConfigError(f"--tolerance-nm must be a positive number, got {a.tolerance_nm}")
    if a.frames is not None and a.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {a.frames}")
    if a.image_size is not None and min(a.image_size) < 1:
        raise ConfigError(f"--image-size must be two positive sizes in pixels, got "
                          f"{' '.join(map(str, a.image_size))}")
    px = 100.0 if a.pixel_size is None else a.pixel_size
    truth, truth_meta = read_emitters(a.truth, pixel_size_nm=px)
    pred, pred_meta = read_emitters(a.pred, pixel_size_nm=px)
    stored = truth_meta.get("file_pixel_size_nm") or pred_meta.get("file_pixel_size_nm")
    if a.pixel_size is None and stored and stored != px:  # the camera's own pixel (CRLB)
        px = stored
        truth, truth_meta = read_emitters(a.truth, pixel_size_nm=px)
        pred, pred_meta = read_emitters(a.pred, pixel_size_nm=px)
    for path, meta in ((a.truth, truth_meta), (a.pred, pred_meta)):
        # Picasso positions are pixels: without the pixel size they cannot be compared in nm
        if (a.pixel_size is None and meta["format"] == "picasso"
                and meta.get("file_pixel_size_nm") is None):
            raise InputFileError(path, "Picasso locs with no pixel size (no Pixelsize in a "
                                 ".yaml beside the file); give --pixel-size")
    # the CRLB needs each true emitter's photons, PSF width and background
    has_physics = len(truth) and all(np.isfinite(truth[k]).all()
                                     for k in ("photons", "sigma", "background"))
    camera = Camera(em_gain=a.em_gain, qe=a.qe, read_noise=a.read_noise) if has_physics else None
    res = evaluate_tables(truth, pred, tolerance_nm=a.tolerance_nm, pixel_size_nm=px,
                          n_frames=a.frames, camera=camera,
                          image_shape=tuple(a.image_size) if a.image_size else None)
    print(json.dumps({k: _jsonable(v) for k, v in res.items()}))
    return 0


def _jsonable(v):
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
    except ImportError:
        pass
    if isinstance(v, float) and v != v:
        return None
    return v


if __name__ == "__main__":
    raise SystemExit(main())
