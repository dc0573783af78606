"""Smoke tests of the benchmark scripts (benchmarks/run_benchmarks.py, peer_picasso.py).

The full benchmark takes minutes; here it runs in ``--quick`` mode on one scenario with the
tiny untrained model (its detections are meaningless: the test checks that the report is
complete and its numbers are real numbers). The Picasso side is checked on hand-made locs;
the part that needs the peers venv (``picassosr``) is skipped when it is not installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peer_picasso  # noqa: E402
import run_benchmarks  # noqa: E402

PEER_PYTHON = os.environ.get("VAR_EMITTER_PEER_PYTHON", run_benchmarks.DEFAULT_PEER_PYTHON)


def _section_rows(report: str, heading: str) -> list[list[str]]:
    """Data rows (cells) of the first markdown table after ``## heading``."""
    part = report.split(f"## {heading}", 1)[1]
    rows = []
    for line in part.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and "---" not in line:
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # drop the header


def test_quick_benchmark_writes_complete_report(tmp_path, untrained_checkpoint):
    out = tmp_path / "results.md"
    raw = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH / "run_benchmarks.py"), "--quick", "--skip-picasso",
           "--scenarios", "sparse", "--checkpoint", str(untrained_checkpoint),
           "--out", str(out), "--json", str(raw), "--no-speed"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    for heading in ("Machine and software", "Scenarios", "Detection", "Localisation accuracy",
                    "Counting", "Uncertainty calibration", "Speed and memory"):
        assert f"## {heading}" in report, heading
    assert "--scenarios sparse" in report  # the exact command is recorded
    assert re.search(r"\d+ cores \(nproc\)", report)
    assert "Picasso: not run (--skip-picasso)" in report

    det = _section_rows(report, "Detection")
    assert [r[0] for r in det] == ["sparse"]
    n_true, jaccard = int(det[0][1]), float(det[0][2])
    assert n_true > 0 and 0.0 <= jaccard <= 1.0

    speed = _section_rows(report, "Speed and memory")
    frames, fps, rss = int(speed[0][1]), float(speed[0][2]), float(speed[0][3])
    assert frames == run_benchmarks.SCENARIOS["sparse"].quick_frames
    assert fps > 0 and 100 < rss < 4000  # MB: a Python + torch process

    data = json.loads(raw.read_text())
    (res,) = data["results"]
    assert res["n_true"] == n_true
    assert res["ours"]["n_true"] == n_true
    assert math.isclose(res["ours"]["jaccard"], jaccard, abs_tol=5e-4)


def test_report_states_the_bundled_models_uncertainty_calibration(tmp_path):
    """The bundled model's calibration (threshold, scale, power and reference) is written
    into the report, so its uncertainty figures can be read."""
    from napari_var_emitter.inference import Predictor

    out = tmp_path / "results.md"
    cmd = [sys.executable, str(BENCH / "run_benchmarks.py"), "--quick", "--skip-picasso",
           "--scenarios", "sparse", "--out", str(out), "--no-speed"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cal = Predictor.from_pretrained(device="cpu").calibration
    line = next(ln for ln in out.read_text().splitlines() if ln.startswith("- Our model:"))
    assert f"threshold {cal['threshold']} (the model's calibrated threshold" in line
    scale = f"{cal['sigma_scale'][0]:.3f} / {cal['sigma_scale'][1]:.3f}"
    if cal["sigma_power"] != (1.0, 1.0):
        assert (f"scale {scale}, power {cal['sigma_power'][0]:.2f} / "
                f"{cal['sigma_power'][1]:.2f}, ref {cal['sigma_reference_px'][0]:.3f} / "
                f"{cal['sigma_reference_px'][1]:.3f} px" in line)
    else:
        assert f"uncertainties x {scale}" in line


def test_run_measured_reports_the_childs_own_peak_memory(tmp_path):
    # the end-to-end timing relies on os.wait4's ru_maxrss of that one child
    code = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    r = run_benchmarks.run_measured([sys.executable, "-c", code], str(tmp_path / "log"))
    assert r["rc"] == 0
    assert 300 <= r["peak_rss_mb"] < 1000
    assert r["wall_s"] > 0
    failing = run_benchmarks.run_measured([sys.executable, "-c", "raise SystemExit(3)"],
                                          str(tmp_path / "log2"))
    assert failing["rc"] == 3
    assert failing["peak_rss_mb"] < 100  # not this (large) test process's RSS


def test_cli_command_is_the_contract_predict_line():
    cmd = run_benchmarks.cli_command("in.tif", "OUT", "m.pth", run_benchmarks.EMCCD)
    assert cmd[cmd.index("predict") + 1] == "in.tif"
    for opt, val in (("--output_dir", "OUT"), ("--baseline", "100.0"), ("--e-per-adu", "20.0"),
                     ("--em-gain", "200.0"), ("--qe", "0.9"), ("--checkpoint", "m.pth")):
        assert cmd[cmd.index(opt) + 1] == val
    assert "--no-maps" in cmd and "--no-figures" in cmd
    with_maps = run_benchmarks.cli_command("in.tif", "OUT", None, run_benchmarks.SCMOS,
                                           maps=True)
    assert "--no-maps" not in with_maps and "--checkpoint" not in with_maps


def test_unknown_scenario_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run_benchmarks.py"), "--scenarios",
                           "nonesuch", "--out", str(tmp_path / "r.md")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown scenario(s) nonesuch" in proc.stderr
    assert not (tmp_path / "r.md").exists()


def _hand_made_picasso_locs():
    """A Picasso-like locs record array (its field names; what older Picasso returns)."""
    dtype = [("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"), ("sx", "f4"),
             ("sy", "f4"), ("bg", "f4"), ("lpx", "f4"), ("lpy", "f4"),
             ("net_gradient", "f4")]
    locs = np.zeros(3, dtype=dtype).view(np.recarray)
    locs.frame = [0, 0, 4]
    locs.x = [1.25, 10.0, 38.5]
    locs.y = [0.0, 20.75, 3.5]
    locs.photons = [1000, 2500, 400]
    locs.sx = [1.0, 1.2, 1.5]
    locs.sy = [1.2, 1.2, 1.3]
    locs.bg = [20, 21, 22]
    locs.lpx = [0.05, 0.1, 0.2]
    locs.lpy = [0.06, 0.1, 0.25]
    locs.net_gradient = [900, 5000, 120]
    return locs


def test_peer_locs_round_trip_to_our_table(tmp_path):
    locs = _hand_made_picasso_locs()
    path = str(tmp_path / "locs.npz")
    peer_picasso.write_npz(path, peer_picasso.locs_to_columns(locs), {"min_net_gradient": 100})
    table, ng, meta = run_benchmarks.load_peer_locs(path)
    assert meta == {"min_net_gradient": 100}
    np.testing.assert_array_equal(table["frame"], [0, 0, 4])
    # Picasso's pixel-centre coordinates are ours: no shift
    np.testing.assert_allclose(table["x"], [1.25, 10.0, 38.5])
    np.testing.assert_allclose(table["y"], [0.0, 20.75, 3.5])
    np.testing.assert_allclose(table["sigma"], [1.1, 1.2, 1.4], rtol=1e-6)
    np.testing.assert_allclose(table["unc_x"], [0.05, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(table["unc_y"], [0.06, 0.1, 0.25], rtol=1e-6)
    np.testing.assert_allclose(table["background"], [20, 21, 22])
    np.testing.assert_allclose(ng, [900, 5000, 120])
    assert (table["prob"] == 1).all()
    # tuning filters by net gradient exactly as Picasso's threshold would
    assert list(table[ng > 500]["x"]) == [1.25, 10.0]


def test_picasso_threshold_grid_is_in_adu_of_each_camera():
    # Picasso's net gradient is computed on raw counts: 1 photon = qe * gain / e_per_adu ADU
    assert run_benchmarks.adu_per_photon(run_benchmarks.SCMOS) == pytest.approx(0.9 / 0.5)
    assert run_benchmarks.adu_per_photon(run_benchmarks.EMCCD) == pytest.approx(0.9 * 200 / 20)
    info = peer_picasso.camera_info({"baseline": 100, "e_per_adu": 20, "em_gain": 200,
                                     "qe": 0.9}, 100.0)
    assert info == {"Baseline": 100.0, "Sensitivity": 20.0, "Gain": 200.0, "Qe": 0.9,
                    "Pixelsize": 100.0}


@pytest.mark.skipif(not os.path.exists(PEER_PYTHON),
                    reason=f"no peers venv with picassosr at {PEER_PYTHON}")
def test_picasso_reads_our_locs_file_and_peer_output_parses(tmp_path):
    from napari_var_emitter.io.emitters import write_picasso_hdf5
    from napari_var_emitter.table import make_table

    table = make_table([0, 2, 2], [3.0, 7.5, 12.25], [4.0, 8.5, 0.0],
                       photons=[1000.0, 2000.0, 3000.0], sigma=[1.1, 1.2, 1.3],
                       background=[10.0, 11.0, 12.0], unc_x=[0.1, 0.2, 0.3],
                       unc_y=[0.15, 0.25, 0.35])
    hdf5, _ = write_picasso_hdf5(tmp_path / "hand.hdf5", table, 100.0, 16, 16, 3)
    out = tmp_path / "converted.npz"
    proc = subprocess.run([PEER_PYTHON, str(BENCH / "peer_picasso.py"), "--convert-locs",
                           str(hdf5), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0 and "No module named 'picasso'" in proc.stderr:
        pytest.skip("picassosr is not installed in the peers venv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed, _, meta = run_benchmarks.load_peer_locs(str(out))
    assert meta["picasso_version"] != "unknown"
    np.testing.assert_array_equal(parsed["frame"], table["frame"])
    np.testing.assert_allclose(parsed["x"], table["x"], rtol=1e-6)
    np.testing.assert_allclose(parsed["y"], table["y"], rtol=1e-6)
    np.testing.assert_allclose(parsed["photons"], table["photons"], rtol=1e-6)
    np.testing.assert_allclose(parsed["sigma"], table["sigma"], rtol=1e-6)
    np.testing.assert_allclose(parsed["unc_x"], table["unc_x"], rtol=1e-6)
    np.testing.assert_allclose(parsed["unc_y"], table["unc_y"], rtol=1e-6)


def test_scale_benchmark_runs_and_reports_every_size(tmp_path, untrained_checkpoint):
    out = tmp_path / "scale.md"
    cmd = [sys.executable, str(BENCH / "bench_scale.py"), "--checkpoint",
           str(untrained_checkpoint), "--frames", "20,40", "--maps-frames", "10",
           "--probe-frames", "4", "--size", "32", "32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines()
            if line.startswith("| predict")]
    runs = [(r.split("|")[1].strip(), int(r.split("|")[2])) for r in rows]
    assert ("predict --no-maps", 20) in runs and ("predict --no-maps", 40) in runs
    assert ("predict with maps", 10) in runs
    for r in rows:
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        assert cells[-1] == "0"  # every run exited 0
        assert float(cells[5]) > 0  # a real peak RSS in MB


def test_compare_models_scores_every_checkpoint_on_the_same_movies(capsys, untrained_checkpoint):
    import compare_models

    ckpt = str(untrained_checkpoint)
    compare_models.main([ckpt, ckpt, "--densities", "0.5,2", "--movies", "2", "--frames", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 0.5 |") or line.startswith("| 2 |")]
    assert len(rows) == 4  # two densities x two checkpoints
    by_density = {}
    for r in rows:
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        assert 0.0 <= float(cells[2]) <= 1.0  # Jaccard
        by_density.setdefault(cells[0], []).append(cells[2:])
    # the same model on the same movies scores the same; other densities are other movies
    for scores in by_density.values():
        assert scores[0] == scores[1]


def test_compare_models_draws_movies_with_the_asked_mean_on_time():
    import compare_models
    from run_benchmarks import SCMOS

    def stays_on(mean_on):
        """Share of emitters (by position) on in frame t that are on in frame t + 1 too."""
        movie = compare_models.draw_movie(np.random.default_rng(5), 1.0, 40, SCMOS,
                                          mean_on=mean_on)
        t = movie.table
        on = {(int(f), round(float(x), 6), round(float(y), 6))
              for f, x, y in zip(t["frame"], t["x"], t["y"])}
        return np.mean([(f + 1, x, y) in on for f, x, y in on if f < 39])

    assert stays_on(1.0) < 0.15 < 0.6 < stays_on(3.0) < 0.8 < stays_on(20.0)


def test_compare_models_adds_rows_without_the_border_fit_and_the_pair_fit(
        capsys, untrained_checkpoint):
    import compare_models

    ckpt = str(untrained_checkpoint)
    compare_models.main([ckpt, "--densities", "1", "--movies", "1", "--frames", "2",
                         "--no-border-fit-too", "--no-pair-fit-too"])
    names = [line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines()
             if line.startswith("| 1 |")]
    assert names == [ckpt, ckpt + " -border fit", ckpt + " -pair fit"]


def test_compare_models_margin_zero_draws_emitters_only_inside_the_frame():
    import compare_models
    from napari_var_emitter.simulation import in_field_of_view

    rng = np.random.default_rng(0)
    inside_only = compare_models.draw_movie(rng, 3.0, 5, compare_models.CAMERAS[0], margin_px=0)
    assert len(inside_only.table) > 50
    assert len(in_field_of_view(inside_only.table, (40, 40))) == len(inside_only.table)
    default = compare_models.draw_movie(np.random.default_rng(0), 3.0, 5, compare_models.CAMERAS[0])
    assert len(in_field_of_view(default.table, (40, 40))) < len(default.table)

def test_compare_models_tta_adds_a_row_per_checkpoint(capsys, untrained_checkpoint):
    import compare_models

    ckpt = str(untrained_checkpoint)
    compare_models.main([ckpt, "--densities", "1", "--movies", "1", "--frames", "2", "--tta"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert [r.split("|")[2].strip() for r in rows] == [ckpt, ckpt + " +tta"]


def test_edge_frames_put_each_emitter_at_the_asked_distance_from_the_border():
    import bench_edges
    from napari_var_emitter.metrics import border_distance_px

    h, w = bench_edges.SHAPE
    for d in (-0.5, 0.0, 0.5, 2.0):
        adu, t = bench_edges.edge_frames(np.random.default_rng(1), 40, d, 2000.0, 20.0)
        assert adu.shape == (40, h, w) and len(t) == 40
        np.testing.assert_allclose(border_distance_px(t, (h, w)), d, atol=1e-9)
        # the spot is in its frame: the pixel nearest to it is far above the background
        r = np.clip(np.rint(t["y"]).astype(int), 0, h - 1)
        c = np.clip(np.rint(t["x"]).astype(int), 0, w - 1)
        photons = bench_edges.CAMERA.adu_to_photons(adu)[np.arange(40), r, c]
        assert np.median(photons) > 20.0 + 60.0
    _, t = bench_edges.edge_frames(np.random.default_rng(1), 40, None, 2000.0, 20.0)
    assert border_distance_px(t, (h, w)).min() >= 8.0


def test_small_frame_benchmark_scores_every_crop_of_the_same_movie(capsys,
                                                                   untrained_checkpoint):
    import bench_small_frames

    ckpt = str(untrained_checkpoint)
    bench_small_frames.main([ckpt, "--frames", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {ckpt}")]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    assert [c[1] for c in cells] == [f"{n}x{n}" for n in bench_small_frames.SIZES]
    counts = [int(c[2]) for c in cells]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0  # corners of one movie


def test_photon_simulator_puts_each_spot_where_its_truth_says():
    """The second simulator's truth is in the package's pixel-centre convention: the light
    centroid of a lone bright spot sits at its true position."""
    import bench_photon_sim

    cam = bench_photon_sim.SCMOS
    adu, truth = bench_photon_sim.photon_movie(np.random.default_rng(4), 300, (40, 40), 0.06,
                                               10.0, cam)
    photons = cam.adu_to_photons(adu) - 10.0
    counts = np.bincount(truth["frame"].astype(int), minlength=300)
    rr, cc = np.mgrid[:40, :40]
    errors = []
    for t in truth:
        if counts[int(t["frame"])] != 1 or not (8 < t["x"] < 31 and 8 < t["y"] < 31):
            continue
        img = photons[int(t["frame"])]
        w = np.where((np.abs(cc - t["x"]) < 5) & (np.abs(rr - t["y"]) < 5), img, 0.0)
        errors.append(((w * cc).sum() / w.sum() - t["x"], (w * rr).sum() / w.sum() - t["y"]))
    errors = np.asarray(errors)
    assert len(errors) > 20
    # no offset (a corner/centre mix-up would be half a pixel), and each spot close
    assert np.all(np.abs(errors.mean(0)) < 0.08) and np.median(np.abs(errors)) < 0.2


def test_photon_simulator_benchmark_scores_both_simulators(capsys, untrained_checkpoint):
    import bench_photon_sim

    ckpt = str(untrained_checkpoint)
    bench_photon_sim.main([ckpt, "--sizes", "24", "--densities", "1", "--frames", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 24x24")]
    assert [r.split("|")[3].strip() for r in rows] == ["photons", "package"]


def test_edge_benchmark_reports_every_distance(capsys, untrained_checkpoint):
    import bench_edges

    ckpt = str(untrained_checkpoint)
    bench_edges.main([ckpt, "--frames", "2", "--photons", "1000", "--no-border-fit-too"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [ckpt, ckpt + " -border fit"]
    cells = [c.strip() for c in rows[-1].strip().strip("|").split("|")]
    assert cells[:2] == [ckpt + " -border fit", "1000"]
    values = cells[2:]
    assert len(values) == len(bench_edges.DISTANCES_PX) + 1
    # outside the frame the share of false detections is shown in parentheses
    n_out = sum(d < 0 for d in bench_edges.DISTANCES_PX)
    assert all(v.startswith("(") for v in values[:n_out])
    assert all(0.0 <= float(v.strip("()")) <= 1.0 for v in values)


def test_empty_frames_hold_only_background_and_camera_noise():
    import bench_empty

    rng = np.random.default_rng(0)
    for label, camera, background in bench_empty.CONDITIONS:
        adu = bench_empty.empty_frames(rng, 50, camera, background)
        assert adu.shape == (50, *bench_empty.SHAPE)
        photons = camera.adu_to_photons(adu)
        # the mean is the background (EM gain and coarse ADC steps only add noise)
        if np.ndim(background):  # smooth maps: each spans (min, max), a new one per block
            block = photons[:bench_empty.FRAMES_PER_MAP].mean(0)
            assert block.min() < background[0] + 3 and block.max() > background[1] - 3, label
            assert not np.allclose(block, photons[-bench_empty.FRAMES_PER_MAP:].mean(0),
                                   atol=3), label
        else:
            assert abs(photons.mean() - background) < 0.1 * background + 1.0, label
    flat = bench_empty.empty_frames(rng, 400, bench_empty.SCMOS, 20.0)
    assert bench_empty.SCMOS.adu_to_photons(flat).std(0).mean() > 3  # shot noise, ~sqrt(18)


def test_empty_frame_benchmark_reports_every_condition(capsys, untrained_checkpoint):
    import bench_empty

    ckpt = str(untrained_checkpoint)
    bench_empty.main([ckpt, "bundled", "--frames", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == len(bench_empty.CONDITIONS) + 1  # header + one per condition
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3 and all(float(c) >= 0 for c in cells[1:])


def test_gpu_round_sizes_its_phases_from_the_probe_and_keeps_the_recipes_rate(tmp_path):
    """benchmarks/bundled_model/gpu_round.py: a lent GPU's minutes decide the steps; the
    config it writes (the recipe that then reproduces the weights) must still be the
    recipe, with only the batch, workers, steps and seed changed."""
    sys.path.insert(0, str(BENCH / "bundled_model"))
    import gpu_round

    probe = tmp_path / "gpu_results.json"
    probe.write_text(json.dumps({"training": [
        {"batch": 64, "num_workers": 0, "steps_per_s": 40.0, "tiles_per_s": 2560.0},
        {"batch": 512, "num_workers": 12, "steps_per_s": 11.9, "tiles_per_s": 6093.0},
        {"batch": 1024, "num_workers": 12, "steps_per_s": 5.0, "tiles_per_s": 5120.0}]}))
    # the fastest in tiles/s among batches of 256-1024 (64 is too small to count)
    assert gpu_round.choose_setting(str(probe)) == (512, 12, 11.9)
    assert gpu_round.choose_setting(str(tmp_path / "missing.json")) == (512, 12, 8.0)
    recipe = BENCH / "bundled_model" / "v10_o_steep_bg.json"
    out = gpu_round.phase_config(str(recipe), 512, 12, 3652, 10, 1.0, 7,
                                 str(tmp_path / "trunk.json"))
    written, original = json.loads(Path(out).read_text()), json.loads(recipe.read_text())
    tr = written["training"]
    assert (tr["batch_size"], tr["num_workers"], tr["num_epochs"], tr["seed"]) == (512, 12, 10, 7)
    assert tr["steps_per_epoch"] == 365
    assert tr["learning_rate"] == original["training"]["learning_rate"]
    assert written["simulation"] == original["simulation"] and written["loss"] == original["loss"]
    # and var-emitter train accepts it
    from napari_var_emitter.config import load_config
    assert load_config(out).training.batch_size == 512
    # a recipe stopped early on the CPU (stop_at_step) runs its whole sized schedule here
    stopped = BENCH / "bundled_model" / "v12_q_context3.json"
    assert json.loads(stopped.read_text())["training"]["stop_at_step"] > 0
    out = gpu_round.phase_config(str(stopped), 512, 12, 3652, 10, 1.0, 7,
                                 str(tmp_path / "context.json"))
    assert load_config(out).training.stop_at_step == 0


def test_operating_range_scores_each_row_at_each_threshold(capsys):
    """The bundled model on one small movie per row: a higher threshold keeps a subset of
    the detections, so it finds fewer emitters and is more precise."""
    import operating_range

    operating_range.main(["bundled", "--movies", "1", "--frames", "6", "--rows",
                          "PSF sigma 0.8-1.0;photons 2,000", "--thresholds", "0.35,0.9"])
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("| PSF") or line.startswith("| photons")]
    assert [(r[0], r[2]) for r in rows] == [("PSF sigma 0.8-1.0 px", "0.35"),
                                            ("PSF sigma 0.8-1.0 px", "0.9"),
                                            ("photons 2,000-10,000", "0.35"),
                                            ("photons 2,000-10,000", "0.9")]
    for low, high in (rows[:2], rows[2:]):
        assert 0.7 < float(low[1]) < 1.3  # the spot fits' median PSF width of the movie
        assert 0.5 < float(low[3]) <= 1.0  # Jaccard of the bundled model
        assert float(high[4]) < float(low[4])  # recall
        assert float(high[5]) > float(low[5])  # precision
