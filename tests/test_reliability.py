"""Reliability: every bad input answered clearly, nothing lost on a crash (issue 6).

Command-line cases run ``cli.main`` in-process (an escaping exception would fail the test,
so "returns 2" also means "no traceback"); signals (Ctrl-C, SIGTERM, ``kill -9``) are sent
to real subprocesses. Every CLI error must be exit code 2 and exactly one stderr line
``error: ...`` naming the file, with no output left behind for that input; the Python API
raises our own :class:`~napari_var_emitter.errors.VarEmitterError` subclasses.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tifffile
import torch

from napari_var_emitter.checkpoint import load_checkpoint, save_checkpoint
from napari_var_emitter.cli import main
from napari_var_emitter.config import Config, load_config
from napari_var_emitter.dataset import TrainingData
from napari_var_emitter.errors import (CheckpointError, ConfigError, InputFileError,
                                       OutputError, VarEmitterError)
from napari_var_emitter.inference import Predictor
from napari_var_emitter.io.emitters import write_emitter_h5
from napari_var_emitter.io.tiff import open_stack
from napari_var_emitter.table import make_table

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


TINY = {
    "model": {"input_size": [16, 16], "target_sizes": [[32, 32], [64, 64], [128, 128]],
              "base_channels": 8, "embed_dim": 16, "num_heads": 2, "num_layers": 1,
              "patch_size": 4, "codebook_size": 16, "code_dim": 8, "vq_scales": [1, 2, 4]},
    "training": {"num_epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "val_samples": 4,
                 "warmup_epochs": 1},
    "simulation": {"frame_size": [16, 16]},
    "data": {"tiff_kind": "camera"},
}


def write_config(path, **sections):
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    path.write_text(json.dumps(d))
    return path


def cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr lines)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_one_error_line(code, err, *words):
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err
    for w in words:
        assert str(w) in err[0], (w, err[0])


def no_hidden_leftovers(folder):
    return not os.path.exists(folder) or not [n for n in os.listdir(folder) if n.startswith(".")]


# -- bad stacks -----------------------------------------------------------------------------

def _tiff(p, data, **kw):
    tifffile.imwrite(p, data, **kw)
    return p


def _truncated(p):
    _tiff(p, np.arange(10 * 32 * 32, dtype=np.uint16).reshape(10, 32, 32),
          photometric="minisblack")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    return p


def _corrupt_ifd(p):
    _tiff(p, np.ones((4, 32, 32), np.uint16), photometric="minisblack")
    data = bytearray(p.read_bytes())
    data[4:8] = (len(data) + 10_000).to_bytes(4, "little")  # first IFD beyond the end
    p.write_bytes(bytes(data))
    return p


def _float_with(p, value):
    stack = np.full((4, 32, 32), 10.0, np.float32)
    stack[2, 5, 6] = value
    return _tiff(p, stack, photometric="minisblack")


BAD_STACKS = {
    "missing": lambda p: p,
    "empty": lambda p: (p.write_bytes(b""), p)[1],
    "truncated": _truncated,
    "corrupt": _corrupt_ifd,
    "random": lambda p: (p.write_bytes(b"\x00\x01" + os.urandom(4000)), p)[1],
    "text": lambda p: (p.write_text("frame,x,y\n1,2,3\n" * 50), p)[1],
    "rgb": lambda p: _tiff(p, np.zeros((32, 32, 3), np.uint8), photometric="rgb"),
    "extra_axes": lambda p: _tiff(p, np.zeros((3, 2, 32, 32), np.uint16), imagej=True,
                                  metadata={"axes": "TZYX"}),
    "nan": lambda p: _float_with(p, np.nan),
    "inf": lambda p: _float_with(p, np.inf),
    "tiny_frames": lambda p: _tiff(p, np.full((3, 5, 5), 7, np.uint16),
                                   photometric="minisblack"),
}
EXPECTED_WORDS = {
    "missing": "no such file", "empty": "empty", "truncated": "truncated",
    "corrupt": "corrupt", "random": "not a TIFF", "text": "text file", "rgb": "RGB",
    "extra_axes": "more than one axis", "nan": "frame 2 contains NaN", "inf": "frame 2 contains NaN",
    "tiny_frames": "smaller than the model can use",
}


@pytest.mark.parametrize("case", sorted(BAD_STACKS))
def test_predict_refuses_a_bad_stack_with_one_line_and_no_output(case, tmp_path, capsys,
                                                                 untrained_checkpoint):
    path = BAD_STACKS[case](tmp_path / f"{case}.tif")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "predict", path, "--output_dir", out, "--checkpoint",
                       untrained_checkpoint, "--device", "cpu")
    assert_one_error_line(code, err, f"{case}.tif", EXPECTED_WORDS[case])
    assert not (out / case).exists()
    assert not out.exists()  # the output folder it would have created is not left behind


@pytest.mark.parametrize("case", sorted(set(BAD_STACKS) - {"tiny_frames"}))
def test_reading_a_bad_stack_raises_input_file_error(case, tmp_path):
    path = BAD_STACKS[case](tmp_path / f"{case}.tif")
    with pytest.raises(InputFileError) as info:
        with open_stack(path) as st:
            st[:]
    assert f"{case}.tif" in str(info.value) and "\n" not in str(info.value)


def test_api_refuses_tiny_frames_and_accepts_all_zero_frames(untrained_checkpoint):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    with pytest.raises(InputFileError, match="smaller than the model"):
        pred.predict(np.zeros((3, 5, 5), np.uint16), name="tiny.tif")
    assert len(pred.predict(np.zeros((3, 20, 20), np.uint16)).localizations) == 0


def test_all_zero_frames_are_not_an_error(tmp_path, capsys, untrained_checkpoint):
    path = _tiff(tmp_path / "zeros.tif", np.zeros((3, 24, 24), np.uint16),
                 photometric="minisblack")
    code, out, err = cli(capsys, "predict", path, "--output_dir", tmp_path / "out",
                         "--checkpoint", untrained_checkpoint, "--device", "cpu")
    assert code == 0, err
    lines = (tmp_path / "out" / "zeros" / "localizations.csv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith('"id","frame"')
    assert "0 localisations" in out


# -- bad training data ----------------------------------------------------------------------

def training_pair(root, emitters=None, n_frames=6, shape=(24, 24)):
    """A camera-resolution TIFF and its emitter H5 (same stem) in root/tiff, root/emitters."""
    (root / "tiff").mkdir(parents=True)
    (root / "emitters").mkdir()
    rng = np.random.default_rng(0)
    _tiff(root / "tiff" / "movie.tif", rng.poisson(20, (n_frames,) + shape).astype(np.uint16),
          photometric="minisblack")
    table = emitters if emitters is not None else make_table(
        [0, 1, 5], [3.0, 10.5, 20.0], [4.0, 12.0, 7.5], photons=[1000.0, 2000.0, 800.0])
    write_emitter_h5(root / "emitters" / "movie.h5", table, pixel_size_nm=100.0)
    return root / "tiff", root / "emitters"


def _h5_without_table(p):
    with h5py.File(p, "w") as fh:
        fh["something_else"] = np.zeros(3)


def _h5_without_columns(p):
    rec = np.zeros(3, dtype=[("frame", "i8"), ("x_nm", "f8")])
    with h5py.File(p, "w") as fh:
        fh.create_dataset("emitters", data=rec).attrs["pixel_size_nm"] = 100.0


BAD_EMITTERS = {
    "no_table": (_h5_without_table, "movie.h5"),
    "no_columns": (_h5_without_columns, "y_nm"),
    "frames_beyond": (lambda p: write_emitter_h5(p, make_table([0, 9], [3.0, 4.0], [3.0, 4.0]),
                                                 100.0), "frame 9"),
    "outside_image": (lambda p: write_emitter_h5(p, make_table([0, 1], [3.0, 240.0],
                                                               [3.0, 4.0]), 100.0),
                      "outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_EMITTERS))
def test_train_refuses_bad_emitter_files(case, tmp_path, capsys):
    tiff_dir, emitter_dir = training_pair(tmp_path / "data")
    make, words = BAD_EMITTERS[case]
    os.remove(emitter_dir / "movie.h5")
    make(emitter_dir / "movie.h5")
    cfg = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "train", "--config", cfg, "--tiff_dir", tiff_dir,
                       "--emitter_dir", emitter_dir, "--output_dir", out, "--device", "cpu")
    assert_one_error_line(code, err, "movie.h5", words)
    assert not out.exists()
    with pytest.raises(InputFileError):
        TrainingData.from_folders(tiff_dir, emitter_dir, load_config(cfg))


def test_training_arrays_with_emitters_outside_the_stack_are_refused():
    cfg = Config.from_dict(TINY)
    frames = np.zeros((4, 20, 20), np.uint16)
    with pytest.raises(InputFileError, match="frame 7"):
        TrainingData.from_arrays(frames, make_table([7], [3.0], [3.0]), cfg, name="layer")
    with pytest.raises(InputFileError, match="outside"):
        TrainingData.from_arrays(frames, make_table([1], [3.0], [-9.0]), cfg, name="layer")
    # emitters just beyond the edge (their PSF still shows) are fine
    TrainingData.from_arrays(frames, make_table([1], [20.2], [-1.0]), cfg, name="layer")


def test_train_and_predict_refuse_frames_smaller_than_the_tile(tmp_path, capsys):
    tiff_dir, emitter_dir = training_pair(tmp_path / "data", shape=(12, 30))
    cfg = write_config(tmp_path / "config.json")
    code, _, err = cli(capsys, "train", "--config", cfg, "--tiff_dir", tiff_dir,
                       "--emitter_dir", emitter_dir, "--output_dir", tmp_path / "out")
    assert_one_error_line(code, err, "movie.tif", "smaller than the model's training tile")


# -- bad configuration ----------------------------------------------------------------------

BAD_CONFIGS = {
    "not_json": ('{"model": {"input_size": [40, 40]', "not valid JSON"),
    "unknown_key": ('{"model": {"input_sise": [40, 40]}}', "input_sise"),
    "unknown_section": ('{"modle": {}}', "modle"),
    "wrong_type": ('{"training": {"batch_size": "16"}}', "batch_size"),
    "negative_size": ('{"model": {"input_size": [-40, 40]}}', "input_size"),
    "not_a_multiple": ('{"model": {"target_sizes": [[60, 60], [160, 160], [320, 320]]}}',
                       "not an integer multiple"),
    "impossible_epochs": ('{"training": {"num_epochs": 0}}', "num_epochs"),
    "not_an_object": ("[1, 2, 3]", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_one_line_naming_the_file(case, tmp_path, capsys,
                                                      untrained_checkpoint):
    text, words = BAD_CONFIGS[case]
    cfg = tmp_path / f"{case}.json"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load_config(cfg)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "train", "--config", cfg, "--simulate", "--output_dir", out)
    assert_one_error_line(code, err, f"{case}.json", words)
    assert not out.exists()
    stack = _tiff(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint16), photometric="minisblack")
    code, _, err = cli(capsys, "predict", stack, "--config", cfg, "--checkpoint",
                       untrained_checkpoint, "--output_dir", out)
    assert_one_error_line(code, err, f"{case}.json")
    assert not out.exists()


# -- bad checkpoints ------------------------------------------------------------------------

class _Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plain_pickle(p, marker):
    with open(p, "wb") as fh:
        pickle.dump({"format": "napari-var-emitter-checkpoint-v1", "x": _Payload(marker)}, fh)


def _torch_zip_pickle(p, marker):
    torch.save({"format": "napari-var-emitter-checkpoint-v1", "model": {},
                "hook": _Payload(marker)}, p)


def _other_architecture(p, marker, source):
    ckpt = torch.load(source, weights_only=True)
    ckpt["config"]["model"]["base_channels"] = 12  # weights are for base_channels 8
    torch.save(ckpt, p)


BAD_CHECKPOINTS = {
    "pickle_with_code": (_plain_pickle, "refused"),
    "torch_file_with_code": (_torch_zip_pickle, "refused"),
    # seeded: unseeded bytes start with 0x80 (a raw pickle's opcode, refused with another
    # message) once in 256 runs
    "random_bytes": (lambda p, m: p.write_bytes(np.random.default_rng(7).bytes(2048)),
                     "not a PyTorch checkpoint"),
    "text": (lambda p, m: p.write_text("junk\n"), "not a PyTorch checkpoint"),
    "plain_state_dict": (lambda p, m: torch.save({"w": torch.zeros(3)}, p),
                         "not a napari-var-emitter checkpoint"),
    "other_architecture": (None, "do not match"),
    "empty": (lambda p, m: p.write_bytes(b""), "checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_and_never_run_code(case, tmp_path, capsys,
                                                        untrained_checkpoint):
    make, words = BAD_CHECKPOINTS[case]
    path = tmp_path / f"{case}.pth"
    marker = tmp_path / "code_ran"
    if make is None:
        _other_architecture(path, marker, untrained_checkpoint)
    else:
        make(path, marker)
    with pytest.raises(CheckpointError) as info:
        Predictor.from_checkpoint(path, device="cpu")
    assert "\n" not in str(info.value)
    stack = _tiff(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint16), photometric="minisblack")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "predict", stack, "--checkpoint", path, "--output_dir", out)
    assert_one_error_line(code, err, f"{case}.pth", words)
    assert not out.exists()
    cfg = write_config(tmp_path / "config.json")
    for flag in ("--init", "--resume"):
        code, _, err = cli(capsys, "train", "--config", cfg, "--simulate", flag, path,
                           "--output_dir", out)
        assert_one_error_line(code, err, f"{case}.pth")
        assert not out.exists()
    assert not marker.exists(), "unpickling ran the file's code"


def test_init_with_a_checkpoint_of_another_architecture_is_refused(tmp_path, capsys,
                                                                   untrained_checkpoint):
    cfg = write_config(tmp_path / "config.json", model={"base_channels": 12})
    code, _, err = cli(capsys, "train", "--config", cfg, "--simulate", "--init",
                       untrained_checkpoint, "--output_dir", tmp_path / "out")
    assert_one_error_line(code, err, "untrained.pth", "same architecture")


# -- outputs that cannot be written --------------------------------------------------------

def test_unwritable_output_folder(tmp_path, capsys, untrained_checkpoint):
    # tests run as root, which ignores permission bits: a folder *under a regular file*
    # cannot be created by anyone
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    stack = _tiff(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint16), photometric="minisblack")
    code, _, err = cli(capsys, "predict", stack, "--checkpoint", untrained_checkpoint,
                       "--output_dir", out)
    assert_one_error_line(code, err, str(out), "cannot be written")
    cfg = write_config(tmp_path / "config.json")
    code, _, err = cli(capsys, "train", "--config", cfg, "--simulate", "--output_dir", out)
    assert_one_error_line(code, err, str(out), "cannot be created")
    code, _, err = cli(capsys, "predict", stack, "--checkpoint", untrained_checkpoint,
                       "--output_dir", "/proc/var-emitter-out")
    assert_one_error_line(code, err, "/proc/var-emitter-out")


def _enospc_after(n_bytes):
    """A ``write`` that accepts ``n_bytes`` and then fails like a full disk."""
    budget = [n_bytes]

    def write(real_write, data):
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(data)
        return real_write(data)

    return write


class _FullDiskFile:
    def __init__(self, fh, write):
        self._fh, self._write = fh, write

    def write(self, data):
        return self._write(self._fh.write, data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_disk_full_while_writing_tables_keeps_the_earlier_outputs(tmp_path, monkeypatch):
    import builtins

    import napari_var_emitter.io.emitters as emitters_io
    from napari_var_emitter.inference import PredictionResult
    from napari_var_emitter.outputs import write_tables

    table = make_table(np.zeros(5000, int), np.linspace(1, 20, 5000), np.full(5000, 3.0),
                       photons=np.full(5000, 900.0))
    result = PredictionResult(table, (1, 24, 24), 100.0, [2], 2)
    write_tables(tmp_path, result)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    write = _enospc_after(50)  # the header goes through, the rows hit a full disk
    real_open = builtins.open
    monkeypatch.setattr(emitters_io, "open",
                        lambda *a, **k: _FullDiskFile(real_open(*a, **k), write), raising=False)
    result2 = PredictionResult(table[:4000], (1, 24, 24), 100.0, [2], 2)
    with pytest.raises(OutputError, match="disk full") as info:
        write_tables(tmp_path, result2)
    assert "localizations.csv" in str(info.value)
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert after == before  # earlier complete outputs intact, no temporary file left


def test_disk_full_while_streaming_maps_leaves_no_partial_file(tmp_path, monkeypatch,
                                                               untrained_checkpoint):
    pred = Predictor.from_checkpoint(untrained_checkpoint, device="cpu")
    calls = [0]
    real_setitem = h5py.Dataset.__setitem__

    def failing_setitem(self, key, value):
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(errno.ENOSPC, "Can't write data (No space left on device)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_setitem)
    with pytest.raises(OutputError, match="disk full"):
        pred.predict(np.full((8, 16, 16), 20, np.uint16), batch_size=1,
                     maps_h5=tmp_path / "predictions.h5")
    assert os.listdir(tmp_path) == []


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch,
                                                                    untrained_checkpoint):
    ckpt = load_checkpoint(untrained_checkpoint)
    path = tmp_path / "last_model.pth"
    save_checkpoint(path, ckpt["model"], ckpt["config_obj"], step=1)
    good = path.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OutputError, match="disk full"):
        save_checkpoint(path, ckpt["model"], ckpt["config_obj"], step=2)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["last_model.pth"]
    assert load_checkpoint(path)["step"] == 1


def test_disk_full_during_predict_exits_2_and_keeps_earlier_outputs(tmp_path, capsys,
                                                                    monkeypatch,
                                                                    untrained_checkpoint):
    import napari_var_emitter.outputs as outputs

    stack = _tiff(tmp_path / "s.tif", np.full((2, 16, 16), 20, np.uint16),
                  photometric="minisblack")
    out = tmp_path / "out"
    args = ["predict", stack, "--checkpoint", untrained_checkpoint, "--output_dir", out,
            "--no-figures", "--device", "cpu"]
    assert cli(capsys, *args)[0] == 0
    before = {n: (out / "s" / n).read_bytes() for n in os.listdir(out / "s")}

    def full(*a, **k):
        raise OutputError(f"{out / 's' / 'localizations.csv'}: cannot write (disk full)")

    monkeypatch.setattr(outputs, "write_tables", full)
    code, _, err = cli(capsys, *args, "--overwrite")
    assert_one_error_line(code, err, "localizations.csv", "disk full")
    assert {n: (out / "s" / n).read_bytes() for n in os.listdir(out / "s")} == before
    assert no_hidden_leftovers(out)


def _flat_stack_predict(tmp_path, checkpoint, *options):
    """A 2-frame flat 16x16 stack ``s.tif`` and the predict arguments into ``tmp_path/out``."""
    stack = _tiff(tmp_path / "s.tif", np.full((2, 16, 16), 20, np.uint16),
                  photometric="minisblack")
    out = tmp_path / "out"
    return out, ["predict", stack, "--checkpoint", checkpoint, "--output_dir", out,
                 "--device", "cpu", *options]


def test_predict_into_an_existing_folder_keeps_the_users_own_files(tmp_path, capsys,
                                                                    untrained_checkpoint):
    from napari_var_emitter.outputs import is_predict_output

    out, args = _flat_stack_predict(tmp_path, untrained_checkpoint)
    (out / "s").mkdir(parents=True)
    (out / "s" / "notes.txt").write_text("my notes")  # an incomplete folder of the user's
    assert cli(capsys, *args)[0] == 0
    ours = set(os.listdir(out / "s")) - {"notes.txt"}
    assert PREDICT_OUTPUTS <= ours and all(is_predict_output(n) for n in ours)
    assert (out / "s" / "notes.txt").read_text() == "my notes"
    # a redo replaces our files and drops those it no longer writes, not the user's
    assert cli(capsys, *args, "--overwrite", "--no-maps", "--no-figures")[0] == 0
    assert sorted(os.listdir(out / "s")) == ["localizations.csv", "localizations.hdf5",
                                             "localizations.yaml", "notes.txt"]
    assert (out / "s" / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(out)) == ["s"] and no_hidden_leftovers(out)


def test_predict_refuses_a_folder_where_an_output_file_goes_and_changes_nothing(
        tmp_path, capsys, untrained_checkpoint):
    out, args = _flat_stack_predict(tmp_path, untrained_checkpoint, "--no-figures")
    assert cli(capsys, *args, "--no-maps")[0] == 0
    (out / "s" / "predictions.h5").mkdir()  # the user's folder, named like our maps file
    (out / "s" / "predictions.h5" / "mine.txt").write_text("keep")
    before = {n: (out / "s" / n).read_bytes() for n in os.listdir(out / "s")
              if (out / "s" / n).is_file()}
    code, _, err = cli(capsys, *args, "--overwrite")
    assert_one_error_line(code, err, str(out / "s" / "predictions.h5"), "folder")
    assert (out / "s" / "predictions.h5" / "mine.txt").read_text() == "keep"
    assert {n: (out / "s" / n).read_bytes() for n in os.listdir(out / "s")
            if (out / "s" / n).is_file()} == before
    assert no_hidden_leftovers(out)


def test_predict_refuses_a_file_where_its_output_folder_goes(tmp_path, capsys,
                                                             untrained_checkpoint):
    out, args = _flat_stack_predict(tmp_path, untrained_checkpoint, "--no-figures")
    out.mkdir()
    (out / "s").write_text("not a folder")
    code, _, err = cli(capsys, *args)
    assert_one_error_line(code, err, str(out / "s"), "not a folder")
    assert (out / "s").read_text() == "not a folder"
    assert sorted(os.listdir(out)) == ["s"]

# -- interrupted runs (real processes, real signals) ----------------------------------------

def spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "napari_var_emitter", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(predicate, proc, timeout=60.0):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): "
                                 + proc.stderr.read()[-2000:])
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


PREDICT_OUTPUTS = {"localizations.csv", "localizations.hdf5", "localizations.yaml",
                   "predictions.h5", "input.png", "peaks.png", "super_resolution.png"}


def test_ctrl_c_is_acted_on_at_the_next_batch_and_a_second_one_at_once():
    """The first signal is only recorded (a KeyboardInterrupt raised inside a weakref
    callback or __del__ would be printed as "Exception ignored" and dropped by Python);
    check() after the batch stops the run. A second signal stops it where it is."""
    from napari_var_emitter.cli import _Interrupts

    with _Interrupts() as interrupts:
        assert interrupts.check() is False
        interrupts._handler(signal.SIGINT, None)  # returns: nothing raised mid-callback
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        with pytest.raises(KeyboardInterrupt):
            interrupts._handler(signal.SIGINT, None)
    with _Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):  # raised when the rename block has ended
            with interrupts.deferred():
                interrupts._handler(signal.SIGTERM, None)
                interrupts._handler(signal.SIGTERM, None)


def test_ctrl_c_during_predict_leaves_complete_outputs_or_none(tmp_path,
                                                               untrained_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    # with every map up to x8 streamed to predictions.h5 a 32x32 frame takes ~10-50 ms
    # here: "b" runs for seconds, so the signal lands while it is being written
    for name, n in (("a", 2), ("b", 400), ("c", 60)):
        _tiff(inputs / f"{name}.tif", rng.poisson(20, (n, 32, 32)).astype(np.uint16),
              photometric="minisblack")
    out = tmp_path / "out"
    args = ["predict", "--input_dir", inputs, "--output_dir", out, "--checkpoint",
            untrained_checkpoint, "--device", "cpu", "--batch_size", 16]
    proc = spawn(*args)
    wait_for(lambda: (out / "a").exists(), proc)
    time.sleep(0.3)  # into input b
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "interrupt" in lines[0]
    done = sorted(os.listdir(out))
    assert "a" in done and "c" not in done and no_hidden_leftovers(out), done
    for stem in done:
        assert PREDICT_OUTPUTS <= set(os.listdir(out / stem)), stem
    stamp = {s: os.path.getmtime(out / s / "localizations.csv") for s in done}

    rerun = subprocess.run([sys.executable, "-m", "napari_var_emitter", *map(str, args)],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for stem in done:  # complete inputs are skipped
        assert f"{stem}.tif: outputs complete" in rerun.stdout
        assert os.path.getmtime(out / stem / "localizations.csv") == stamp[stem]
    assert sorted(os.listdir(out)) == ["a", "b", "c"]

    redo = subprocess.run([sys.executable, "-m", "napari_var_emitter", *map(str, args),
                           "--overwrite", "--no-maps", "--no-figures"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert redo.returncode == 0, redo.stderr
    assert "skipped" not in redo.stdout
    assert "predictions.h5" not in os.listdir(out / "a")  # redone, with the new options
    assert no_hidden_leftovers(out)


def _train_args(tmp_path, out, epochs=200):
    cfg = write_config(tmp_path / "config.json",
                       training={"num_epochs": epochs, "steps_per_epoch": 5, "val_samples": 4})
    return ["train", "--config", cfg, "--simulate", "--output_dir", out, "--device", "cpu"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_writes_a_resumable_checkpoint(sig, tmp_path):
    out = tmp_path / "out"
    proc = spawn(*_train_args(tmp_path, out))
    wait_for(lambda: (out / "last_model.pth").exists(), proc)  # past the first epoch
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "last_model.pth")
    step = ckpt["step"]
    assert 5 <= step < 1000
    # --resume alone (no --config): the run's own configuration comes from the checkpoint
    target = (step // 5 + 1) * 5
    r = subprocess.run([sys.executable, "-m", "napari_var_emitter", "train", "--resume",
                        str(out / "last_model.pth"), "--simulate", "--output_dir", str(out),
                        "--epochs", str(target // 5), "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "last_model.pth")["step"] == target


def test_kill_9_during_training_leaves_the_previous_checkpoint_loadable(tmp_path):
    out = tmp_path / "out"
    args = _train_args(tmp_path, out)
    args[args.index("--config") + 1] = write_config(
        tmp_path / "config.json",
        training={"num_epochs": 1000, "steps_per_epoch": 1, "val_samples": 4})
    rng = np.random.default_rng(0)
    for attempt in range(2):
        proc = spawn(*args)
        stamp = os.path.getmtime(out / "last_model.pth") if attempt else 0
        wait_for(lambda: (out / "last_model.pth").exists()
                 and os.path.getmtime(out / "last_model.pth") > stamp, proc)
        time.sleep(float(rng.uniform(0.05, 0.6)))  # checkpoints are written every step
        proc.kill()
        proc.communicate()
        ckpt = load_checkpoint(out / "last_model.pth")
        assert ckpt["step"] >= 1
        Predictor.from_checkpoint(out / "last_model.pth", device="cpu")
    # a new run in the same folder clears what a killed write left behind
    leftovers = [n for n in os.listdir(out) if n.startswith(".tmp-")]
    proc = spawn(*args)
    wait_for(lambda: not any((out / n).exists() for n in leftovers)
             and (out / "config.json").exists(), proc)
    proc.kill()
    proc.communicate()


def test_trainer_api_errors_are_ours(tmp_path):
    from napari_var_emitter.training import Trainer

    cfg = Config.from_dict(TINY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        Trainer(cfg, TrainingData.simulated(cfg), blocker / "out", device="cpu")
    with pytest.raises(CheckpointError):
        Trainer(cfg, TrainingData.simulated(cfg), tmp_path / "o", device="cpu",
                resume=tmp_path / "missing.pth")
    with pytest.raises(VarEmitterError):
        Trainer(cfg, TrainingData.simulated(cfg), tmp_path / "o", device="cuda:7")


def test_random_bytes_of_every_kind_are_refused_cleanly(tmp_path):
    """torch.load fails on arbitrary bytes in many ways (IndexError deep in the weights-only
    unpickler among them): every one must come out as a CheckpointError."""
    from napari_var_emitter.checkpoint import load_checkpoint

    rng = np.random.default_rng(2026)
    path = tmp_path / "noise.pth"
    for i in range(300):
        data = rng.bytes(int(rng.integers(1, 2048)))
        if i % 3 == 0:
            data = b"\x80\x02" + data  # starts like a pickle stream
        path.write_bytes(data)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
