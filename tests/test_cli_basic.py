"""`var-emitter simulate` and `evaluate` through the real command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_var_emitter.cli import main
from napari_var_emitter.io.emitters import read_emitters


def run_cli(*args):
    """Run `python -m napari_var_emitter` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "napari_var_emitter", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_simulate_writes_the_design_layout(tmp_path):
    r = run_cli("simulate", "--out", tmp_path, "--name", "frame_001", "--frames", 20,
                "--size", 32, 48, "--density", 2, "--em-gain", 100, "--e_per_adu", 20,
                "--baseline", 100, "--read-noise", 50, "--seed", 7)
    assert r.returncode == 0, r.stderr
    hi = tifffile.imread(tmp_path / "train_tiff" / "frame_001.tif")
    adu = tifffile.imread(tmp_path / "inference_tiff" / "frame_001.tif")
    assert hi.shape == (20, 256, 384) and adu.shape == (20, 32, 48)
    assert adu.dtype == np.uint16
    # binning the 8x photon image by 8 gives the camera-grid photons, whose mean the
    # camera frames reproduce after ADU -> photons
    binned = hi.reshape(20, 32, 8, 48, 8).sum(axis=(2, 4))
    photons = (adu.astype(float) - 100) * 20 / 100
    assert photons.mean() == pytest.approx(binned.mean(), rel=0.05)
    h5, _ = read_emitters(tmp_path / "train_emitters" / "frame_001.h5")
    csv, _ = read_emitters(tmp_path / "ground_truth" / "frame_001.csv", pixel_size_nm=100)
    assert len(h5) == len(csv) > 0
    np.testing.assert_allclose(np.sort(h5["x"]), np.sort(csv["x"]), atol=1e-3)


def test_evaluate_prints_one_json_object(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path), "--frames", "10", "--seed", "1"]) == 0
    capsys.readouterr()
    gt = tmp_path / "ground_truth" / "sim.csv"
    assert main(["evaluate", "--truth", str(gt), "--pred", str(gt)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["jaccard"] == 1.0 and res["rmse_nm"] == 0.0 and res["efficiency"] == 100.0
    for key in ("recall", "precision", "count_mae", "crlb_rmse_nm"):
        assert key in res
    assert 1 < res["crlb_rmse_nm"] < 50
    assert "recall_border" not in res  # the frame size is not known
    # with the frame size: the recall at the frame border; every emitter is found here
    assert main(["evaluate", "--truth", str(gt), "--pred", str(gt), "--image-size", "40", "40"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_true_border"] > 0 and res["recall_border"] == 1.0


@pytest.mark.parametrize("args, words", [
    (["evaluate", "--truth", "missing.csv", "--pred", "missing.csv"], "missing.csv"),
    (["simulate", "--out", "x", "--frames", "0"], "--frames"),
    (["simulate", "--out", "x", "--density", "-1"], "density"),
    (["predict", "--output_dir", "x"], "no input"),
    (["predict", "nope.tif", "--output_dir", "x"], "nope.tif"),
    (["predict", "nope.tif", "--output_dir", "x", "--batch-size", "0"], "--batch_size"),
    (["frobnicate"], "invalid choice"),
    (["predict", "nope.tif", "--output_dir", "x", "--pixel-size", "0"], "--pixel-size"),
    (["predict", "nope.tif", "--output_dir", "x", "--pixel-size", "nan"], "--pixel-size"),
    (["evaluate", "--truth", "a.csv", "--pred", "a.csv", "--tolerance-nm", "-5"],
     "--tolerance-nm"),
    (["evaluate", "--truth", "a.csv", "--pred", "a.csv", "--frames", "0"], "--frames"),
    (["evaluate", "--truth", "a.csv", "--pred", "a.csv", "--image-size", "0", "40"],
     "--image-size"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, words):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists("x")


def test_predict_inputs_with_one_name_are_refused_naming_both(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        tifffile.imwrite(tmp_path / d / "movie.tif", np.zeros((2, 16, 16), np.uint16))
    r = run_cli("predict", tmp_path / "a" / "movie.tif", tmp_path / "b" / "movie.tif",
                "--output_dir", tmp_path / "out")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert str(tmp_path / "a" / "movie.tif") in line and str(tmp_path / "b" / "movie.tif") in line
    assert not (tmp_path / "out" / "movie").exists()


def test_evaluate_refuses_picasso_locs_without_their_pixel_size(tmp_path, capsys):
    from napari_var_emitter.io.emitters import write_picasso_hdf5

    assert main(["simulate", "--out", str(tmp_path), "--frames", "5", "--seed", "2",
                 "--pixel-size", "110"]) == 0
    capsys.readouterr()
    gt = tmp_path / "ground_truth" / "sim.csv"
    table, _ = read_emitters(gt, pixel_size_nm=110.0)
    h5, yml = write_picasso_hdf5(tmp_path / "locs.hdf5", table, 110.0, 40, 40, 5)
    # with its .yaml: the pixel size comes from there, and the truth matches itself
    assert main(["evaluate", "--truth", str(h5), "--pred", str(gt)]) == 0
    assert json.loads(capsys.readouterr().out)["jaccard"] == 1.0
    os.remove(yml)  # without it, positions in pixels cannot be put in nm: an error
    assert main(["evaluate", "--truth", str(h5), "--pred", str(gt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "locs.hdf5" in err and "--pixel-size" in err
    assert main(["evaluate", "--truth", str(h5), "--pred", str(gt), "--pixel-size", "110"]) == 0
    assert json.loads(capsys.readouterr().out)["jaccard"] == 1.0


def test_evaluate_piped_into_a_reader_that_leaves_early_is_quiet(tmp_path):
    # `var-emitter evaluate ... | head -c 10`: no BrokenPipeError traceback when the reader
    # has gone (`true` exits at once, long before the JSON is written)
    assert main(["simulate", "--out", str(tmp_path), "--frames", "3"]) == 0
    gt = tmp_path / "ground_truth" / "sim.csv"
    cmd = (f"'{sys.executable}' -m napari_var_emitter evaluate --truth '{gt}' --pred '{gt}'"
           f" | true; echo $PIPESTATUS")
    # stdout into a pipe is block-buffered unless PYTHONUNBUFFERED is set: test that case
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env=env)
    assert "Traceback" not in r.stderr and r.stderr == ""
    assert r.stdout.strip() == "141"  # as a process ended by SIGPIPE
