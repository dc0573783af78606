"""Physical and statistical checks of the simulator (fixed seeds, honest tolerances)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.stats import kstest, norm

from napari_var_emitter.camera import Camera
from napari_var_emitter.config import SimulationConfig
from napari_var_emitter.errors import ConfigError
from napari_var_emitter.simulation import (
    SimulatedMovie,
    TrainingBatch,
    in_field_of_view,
    render_expected,
    sample_training_batch,
    simulate_emitters,
    simulate_movie,
    smooth_background,
    write_simulation,
)
from napari_var_emitter.table import LOC_DTYPE, make_table


def _one(x, y, photons=1000.0, sigma=1.3, frame=0):
    return make_table([frame], [x], [y], photons=[photons], sigma=[sigma])


def _analytic_psf(x, y, photons, sigma, shape):
    """Pixel-integrated Gaussian from normal CDFs (independent of the erf code path)."""
    h, w = shape
    ex = np.arange(w + 1) - 0.5
    ey = np.arange(h + 1) - 0.5
    px = np.diff(norm.cdf(ex, loc=x, scale=sigma))
    py = np.diff(norm.cdf(ey, loc=y, scale=sigma))
    return photons * np.outer(py, px)


# --- rendering ----------------------------------------------------------------------------------

def test_render_matches_pixel_integrated_gaussian():
    img = render_expected(_one(10.3, 12.7, 2000.0, 1.3), 1, (20, 24), background=7.0)
    assert img.shape == (1, 20, 24) and img.dtype == np.float32
    ref = _analytic_psf(10.3, 12.7, 2000.0, 1.3, (20, 24)) + 7.0
    np.testing.assert_allclose(img[0], ref, rtol=1e-5, atol=1e-4)
    # the centre of mass is the emitter position (pixel-centre convention)
    sig = img[0] - 7.0
    yy, xx = np.mgrid[:20, :24]
    assert abs((sig * xx).sum() / sig.sum() - 10.3) < 1e-3
    assert abs((sig * yy).sum() / sig.sum() - 12.7) < 1e-3


@pytest.mark.parametrize("factor", [1, 8])
def test_total_photons_of_centred_emitter(factor):
    img = render_expected(_one(19.5, 20.0, 5000.0, 1.8), 1, (40, 40), factor=factor)
    assert img.shape == (1, 40 * factor, 40 * factor)
    assert img.sum() == pytest.approx(5000.0, rel=1e-5)


def test_highres_binned_equals_camera_resolution():
    rng = np.random.default_rng(3)
    n = 60
    table = make_table(rng.integers(0, 4, n), rng.uniform(-2, 17, n), rng.uniform(-2, 13, n),
                       photons=rng.uniform(100, 5000, n), sigma=rng.uniform(0.7, 2.0, n))
    bg = smooth_background((12, 16), rng, 5.0, 40.0)
    coarse = render_expected(table, 4, (12, 16), 1, bg)
    fine = render_expected(table, 4, (12, 16), 8, bg)
    assert fine.shape == (4, 96, 128)
    binned = fine.reshape(4, 12, 8, 16, 8).sum(axis=(2, 4))
    np.testing.assert_allclose(binned, coarse, rtol=2e-5, atol=2e-3)
    # the fine grid keeps sub-pixel detail: not just each coarse pixel spread evenly
    assert np.abs(fine - np.repeat(np.repeat(coarse, 8, 1), 8, 2) / 64).max() > 1.0


def test_background_forms_and_frames_outside_ignored():
    t = make_table([0, 5], [3.0, 3.0], [3.0, 3.0], photons=[100.0, 1e6], sigma=[1.0, 1.0])
    per_frame = np.array([1.0, 2.0], np.float32)
    img = render_expected(t, 2, (8, 8), 2, per_frame)
    # frame 5 does not exist: ignored; background per input px is spread over f^2 sub-pixels
    assert img[1].sum() == pytest.approx(2.0 * 64, rel=1e-6)
    inside = (1 - norm.sf(3.5) - norm.sf(4.5)) ** 2  # the emitter is 3.5 / 4.5 px from edges
    assert img[0].sum() == pytest.approx(64 + 100 * inside, rel=1e-5)
    with pytest.raises(ValueError):
        render_expected(t, 2, (8, 8), 1, np.zeros((3, 8, 8)))


def test_emitters_at_edges_appear_partially():
    sigma, n = 1.2, 4000.0
    on_edge = render_expected(_one(-0.5, 10.0, n, sigma), 1, (21, 21))[0]
    assert on_edge.sum() == pytest.approx(n / 2, rel=1e-4)
    outside = render_expected(_one(-1.3, 10.0, n, sigma), 1, (21, 21))[0]
    assert outside.sum() == pytest.approx(n * norm.sf(0.8 / sigma), rel=1e-4)
    assert outside[:, 0].sum() > outside[:, 1].sum() > 0  # partial PSF on the border column
    # the simulator places emitters in the margin as well, in proportion to its area
    t = simulate_emitters(300, (20, 20), 1, density_per_um2=2.0, margin_px=1.5)
    in_view = len(in_field_of_view(t, (20, 20)))
    assert (t["x"] < -0.5).any() and (t["y"] > 19.5).any()
    assert in_view / len(t) == pytest.approx(400 / 23 ** 2, abs=0.03)


# --- camera -------------------------------------------------------------------------------------

def test_mean_of_noisy_frames_matches_integrated_gaussian():
    rng = np.random.default_rng(11)
    expected = render_expected(_one(8.4, 7.6, 1500.0, 1.4), 1, (16, 16), background=12.0)[0]
    cam = Camera(baseline=100.0, e_per_adu=2.0, qe=0.9, read_noise=3.0)
    n = 4000
    adu = cam.photons_to_adu(np.broadcast_to(expected, (n, 16, 16)), rng)
    photons = cam.adu_to_photons(adu).astype(np.float64)
    mean = photons.mean(axis=0)
    # variance in photons: shot noise / qe + read noise and rounding, converted
    var = expected / cam.qe + (cam.read_noise ** 2 + cam.e_per_adu ** 2 / 12) / cam.qe ** 2
    z = (mean - expected) / np.sqrt(var / n)
    assert np.abs(z).max() < 5
    assert mean.sum() == pytest.approx(expected.sum(), rel=2e-3)
    ref = _analytic_psf(8.4, 7.6, 1500.0, 1.4, (16, 16)) + 12.0
    assert np.abs(mean - ref).max() < 5 * np.sqrt(var.max() / n)


@pytest.mark.parametrize("cam", [
    Camera(baseline=100.0, e_per_adu=0.5, qe=0.8, read_noise=1.5),
    Camera(baseline=400.0, e_per_adu=20.0, em_gain=200.0, qe=0.9, read_noise=50.0),
])
def test_adu_to_photons_round_trip_mean(cam):
    rng = np.random.default_rng(5)
    lam = 50.0
    photons = cam.adu_to_photons(cam.photons_to_adu(np.full((200, 50, 50), lam), rng))
    se = np.sqrt(cam.excess_noise * lam / cam.qe / photons.size) * 1.5
    assert photons.mean() == pytest.approx(lam, abs=5 * se)


def test_emccd_variance_is_twice_poisson_in_photons():
    rng = np.random.default_rng(7)
    lam, qe = 40.0, 0.9
    field = np.full((100, 50, 50), lam)
    plain = Camera(e_per_adu=0.25, qe=qe)
    em = Camera(e_per_adu=10.0, em_gain=150.0, qe=qe)
    var_plain = plain.adu_to_photons(plain.photons_to_adu(field, rng)).astype(np.float64).var()
    var_em = em.adu_to_photons(em.photons_to_adu(field, rng)).astype(np.float64).var()
    assert var_plain == pytest.approx(lam / qe, rel=0.03)
    assert var_em / var_plain == pytest.approx(2.0, rel=0.05)


def test_read_noise_adds_variance_in_adu():
    rng = np.random.default_rng(9)
    field = np.full((100, 50, 50), 20.0)
    quiet = Camera(baseline=500.0, e_per_adu=2.0)
    noisy = Camera(baseline=500.0, e_per_adu=2.0, read_noise=10.0)
    v0 = quiet.photons_to_adu(field, rng).astype(np.float64).var()
    v1 = noisy.photons_to_adu(field, rng).astype(np.float64).var()
    assert v1 - v0 == pytest.approx(10.0 ** 2 / 2.0 ** 2, rel=0.05)


# --- emitters and blinking ----------------------------------------------------------------------

def _runs(table):
    """Lengths of runs of consecutive on-frames per fluorophore, and whether a run is cut."""
    _, fluo = np.unique(np.stack([table["x"], table["y"]], 1), axis=0, return_inverse=True)
    fluo = fluo.ravel()
    order = np.lexsort((table["frame"], fluo))
    f, fr = fluo[order], table["frame"][order]
    new = np.ones(f.size, bool)
    new[1:] = (f[1:] != f[:-1]) | (fr[1:] != fr[:-1] + 1)
    starts = np.nonzero(new)[0]
    lengths = np.diff(np.append(starts, f.size))
    first = fr[starts]
    last = fr[starts + lengths - 1]
    return lengths, first, last


def test_density_and_on_time_statistics():
    n_frames, shape, density = 2000, (40, 40), 1.0
    t = simulate_emitters(n_frames, shape, 123, density_per_um2=density, mean_on_frames=3.0,
                          margin_px=1.0)
    assert t.dtype == LOC_DTYPE and np.all(np.diff(t["frame"]) >= 0)
    per_frame = np.bincount(t["frame"], minlength=n_frames)
    assert per_frame.mean() == pytest.approx(density * 42 * 42 * 0.01, rel=0.05)
    in_view = np.bincount(in_field_of_view(t, shape)["frame"], minlength=n_frames)
    # fewer fluorophores lie in the view than in the whole pool: a looser (3 sd) tolerance
    assert in_view.mean() == pytest.approx(density * 16.0, rel=0.1)
    lengths, first, last = _runs(t)
    whole = (first > 0) & (last < n_frames - 1)  # runs cut by the movie's ends are biased
    assert lengths[whole].mean() == pytest.approx(3.0, rel=0.05)
    assert lengths.max() > 6  # geometric on-times, not a fixed length
    # a fluorophore blinks on again later at the same place, with photons that vary per frame
    assert np.sum(first[1:] > 0) > 0
    same = t[(t["x"] == t["x"][0]) & (t["y"] == t["y"][0])]
    assert len(same) > 1 and np.ptp(same["photons"]) > 0


def test_photon_distributions():
    lo, hi = 200.0, 20000.0
    # many distinct fluorophores over few frames; per-frame photons of one fluorophore are
    # correlated, so the KS bound is that of ~1000 independent draws (99.9%: ~0.06)
    t = simulate_emitters(50, (60, 60), 2, density_per_um2=3.0, photons=(lo, hi))
    assert t["photons"].min() >= lo and t["photons"].max() <= hi
    assert kstest(np.log(t["photons"] / lo) / np.log(hi / lo), "uniform").statistic < 0.06
    t2 = simulate_emitters(50, (60, 60), 3, density_per_um2=3.0, photons=(lo, hi),
                           photon_distribution="uniform")
    assert kstest((t2["photons"] - lo) / (hi - lo), "uniform").statistic < 0.06


def test_filament_scene_is_locally_denser():
    shape, density = (64, 64), 2.0
    nn = {}
    counts = {}
    for scene in ("uniform", "filaments"):
        t = simulate_emitters(40, shape, 4, density_per_um2=density, scene=scene)
        d = []
        for f in range(40):
            pts = np.stack([t["x"][t["frame"] == f], t["y"][t["frame"] == f]], 1)
            if len(pts) > 2:
                d.append(cKDTree(pts).query(pts, k=2)[0][:, 1])
        nn[scene] = np.median(np.concatenate(d))
        counts[scene] = len(t) / 40
    assert counts["filaments"] == pytest.approx(counts["uniform"], rel=0.1)
    assert nn["filaments"] < 0.6 * nn["uniform"]
    # distinct fluorophore positions cluster: counts in 8x8 px boxes are over-dispersed
    # (variance/mean ~ 1 for a uniform Poisson scene)
    dispersion = {}
    for scene in ("uniform", "filaments"):
        t = in_field_of_view(simulate_emitters(40, shape, 5, density, scene=scene), shape)
        xy = np.unique(np.stack([t["x"], t["y"]], 1), axis=0)
        boxes = np.histogram2d(xy[:, 0], xy[:, 1], bins=8, range=[[-0.5, 63.5]] * 2)[0]
        dispersion[scene] = boxes.var() / boxes.mean()
    assert dispersion["uniform"] == pytest.approx(1.0, abs=0.5)
    assert dispersion["filaments"] > 3.0


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        simulate_emitters(5, (10, 10), 0, 1.0, scene="spiral")
    with pytest.raises(ConfigError):
        simulate_emitters(5, (10, 10), 0, -1.0)
    with pytest.raises(ConfigError):
        simulate_emitters(5, (10, 10), 0, 1.0, photons=(0.0, 10.0))  # log-uniform needs min > 0
    with pytest.raises(ConfigError):
        simulate_movie(5, (10, 10), 0, background=(30.0, 10.0))


# --- movies -------------------------------------------------------------------------------------

def test_simulate_movie_consistency_and_reproducibility():
    cam = Camera(baseline=100.0, e_per_adu=2.0, em_gain=50.0, qe=0.9, read_noise=20.0)
    m = simulate_movie(30, (24, 32), 8, density_per_um2=1.5, background=(10.0, 40.0),
                       camera=cam, scene="filaments")
    assert isinstance(m, SimulatedMovie)
    assert m.adu.shape == (30, 24, 32) and m.adu.dtype == np.uint16
    assert m.photons_expected.shape == (30, 24, 32) and m.photons_expected.dtype == np.float32
    assert m.highres.shape == (30, 192, 256) and m.highres.dtype == np.float32
    assert m.background.shape == (24, 32)
    assert m.background.min() == pytest.approx(10.0) and m.background.max() == pytest.approx(40.0)
    np.testing.assert_allclose(
        m.highres.reshape(30, 24, 8, 32, 8).sum((2, 4)), m.photons_expected, rtol=2e-5, atol=2e-3)
    np.testing.assert_allclose(
        m.photons_expected, render_expected(m.table, 30, (24, 32), 1, m.background), rtol=1e-6)
    # background field of the table is the map under each emitter
    inside = m.table_in_view()
    r, c = np.rint(inside["y"]).astype(int), np.rint(inside["x"]).astype(int)
    np.testing.assert_allclose(inside["background"], m.background[r, c])
    # camera frames follow the expected photons on average
    ph = cam.adu_to_photons(m.adu)
    assert ph.mean() == pytest.approx(m.photons_expected.mean(), rel=0.03)
    again = simulate_movie(30, (24, 32), 8, density_per_um2=1.5, background=(10.0, 40.0),
                           camera=cam, scene="filaments")
    assert np.array_equal(again.adu, m.adu) and again.table.tobytes() == m.table.tobytes()


def test_smooth_background_is_smooth():
    bg = smooth_background((40, 40), 6, 20.0, 60.0)
    assert bg.min() == pytest.approx(20.0) and bg.max() == pytest.approx(60.0)
    # neighbouring pixels differ by a small part of the range
    assert np.abs(np.diff(bg, axis=0)).max() < 0.25 * 40 and np.abs(np.diff(bg, axis=1)).max() < 10
    assert np.all(smooth_background((5, 5), 6, 7.0, 7.0) == 7.0)


# --- training batches ---------------------------------------------------------------------------

def test_sample_training_batch_shapes_and_ranges():
    sim = SimulationConfig(frame_size=[40, 48])
    batch = sample_training_batch(sim, 16, np.random.default_rng(1), context_frames=3)
    assert isinstance(batch, TrainingBatch) and len(batch) == 16
    assert batch.frames.shape == (16, 3, 40, 48) and batch.frames.dtype == np.float32
    assert batch.expected.shape == (16, 3, 40, 48)
    assert batch.background.shape == (16, 40, 48) and batch.background.dtype == np.float32
    assert len(batch.tables) == 16 and len(batch.cameras) == 16
    ratios = []
    for t, cam, bg in zip(batch.tables, batch.cameras, batch.background):
        assert t.dtype == LOC_DTYPE and np.all(t["frame"] == 0)
        assert np.all((t["x"] >= -0.5) & (t["x"] < 47.5) & (t["y"] >= -0.5) & (t["y"] < 39.5))
        assert np.all((t["sigma"] >= 0.8) & (t["sigma"] <= 2.0))
        assert np.all((t["photons"] >= 200) & (t["photons"] <= 10000))
        assert np.all(np.isfinite(t["background"]))
        assert isinstance(cam, Camera) and 0.7 <= cam.qe <= 0.95
        # a uniform or smoothly varying background within +-70% of its level
        ratios.append(bg.max() / bg.min())
        assert ratios[-1] <= 1.7 / 0.3 + 1e-4
    # steep backgrounds (as users' fields, and `simulate --background 10 50`) are in the mix
    assert max(ratios) > 2.0 and min(ratios) == pytest.approx(1.0)
    assert 0 < sum(c.is_emccd for c in batch.cameras) < 16
    # consecutive frames share blinking emitters: the context frames are correlated
    sig = batch.expected - batch.background[:, None]
    corr = np.corrcoef(sig[:, 0].ravel(), sig[:, 1].ravel())[0, 1]
    assert corr > 0.3
    # frames are photons: they average to the expected photons
    assert batch.frames.mean() == pytest.approx(batch.expected.mean(), rel=0.05)


def _neighbour_share(sim, seed=3):
    """Share of the centre frame's emitters also on in the frame before (same position)."""
    batch = sample_training_batch(sim, 64, np.random.default_rng(seed), context_frames=3)
    sig = batch.expected - batch.background[:, None]
    on_before = on_centre = 0
    for b, t in enumerate(batch.tables):
        inside = (t["x"] > 1) & (t["x"] < 38) & (t["y"] > 1) & (t["y"] < 38)
        r, c = np.rint(t["y"][inside]).astype(int), np.rint(t["x"][inside]).astype(int)
        # lit in the frame before: a good part of its photons on its pixel there too
        on_before += int(np.sum(sig[b, 0, r, c] > 0.5 * sig[b, 1, r, c]))
        on_centre += int(inside.sum())
    return on_before / on_centre


def test_mean_on_time_sets_how_often_an_emitter_stays_on_into_the_next_frame():
    base = dict(frame_size=[40, 40], sigma_px=[1.0, 1.2], photons=[3000.0, 5000.0],
                density_per_um2=[0.2, 0.4], filament_fraction=0.0, background=[5.0, 20.0])
    short = _neighbour_share(SimulationConfig(**base, mean_on_frames=1.0))
    long = _neighbour_share(SimulationConfig(**base, mean_on_frames=20.0))
    mixed = _neighbour_share(SimulationConfig(**base, mean_on_frames=[1.0, 20.0]))
    # geometric on-times: P(on before | on now) = 1 - 1/mean_on (plus re-activation, 1-10 %)
    assert short < 0.2 and long > 0.85 and short < mixed < long


def test_missing_context_copies_the_centre_frame_into_its_neighbours():
    sim = SimulationConfig(frame_size=[40, 40], missing_context_fraction=1.0)
    batch = sample_training_batch(sim, 48, np.random.default_rng(4), context_frames=3)
    before = [np.array_equal(f[0], f[1]) for f in batch.frames]
    after = [np.array_equal(f[2], f[1]) for f in batch.frames]
    assert all(b or a for b, a in zip(before, after))  # every sample lost a side
    # one side or both, each about a third of the time
    n_both = sum(b and a for b, a in zip(before, after))
    assert 5 <= n_both <= 30 and 5 <= sum(b and not a for b, a in zip(before, after)) <= 30
    # the noise-free frames follow, so the reconstruction target stays consistent
    assert all(np.array_equal(e[0], e[1]) for e, b in zip(batch.expected, before) if b)
    # by default (and with one frame) nothing is copied: independent noise in every frame
    plain = sample_training_batch(SimulationConfig(frame_size=[40, 40]), 16,
                                  np.random.default_rng(4), context_frames=3)
    assert not any(np.array_equal(f[0], f[1]) or np.array_equal(f[2], f[1])
                   for f in plain.frames)


@pytest.mark.parametrize("value, message", [
    (0.5, "mean_on_frames"), ([0.5, 3.0], "mean_on_frames"), ([4.0, 2.0], "mean_on_frames"),
    (["a", 2], "mean_on_frames"), (True, "mean_on_frames")])
def test_bad_mean_on_time_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(mean_on_frames=value).validate()
    with pytest.raises(ConfigError, match="missing_context_fraction"):
        SimulationConfig(missing_context_fraction=1.5).validate()


def test_training_tables_line_up_with_bright_spots():
    sim = SimulationConfig(frame_size=[40, 40], sigma_px=[1.0, 1.2], photons=[3000.0, 5000.0],
                           background=[5.0, 10.0], density_per_um2=[0.3, 0.6],
                           filament_fraction=0.0, emccd_fraction=0.0, read_noise=[0.5, 1.0])
    batch = sample_training_batch(sim, 32, np.random.default_rng(2), context_frames=1)
    n_emitters = 0
    for b, t in enumerate(batch.tables):
        frame = batch.frames[b, 0]
        r = np.rint(t["y"]).astype(int)
        c = np.rint(t["x"]).astype(int)
        # the pixel under each emitter holds a good part of its photons above background
        assert np.all(frame[r, c] - batch.background[b, r, c] > 0.05 * t["photons"])
        # the noise-free centre frame is exactly the tabled emitters (+ margin ones at the
        # border) on the background: compare the interior, out of reach of margin emitters
        model = render_expected(t, 1, (40, 40), 1, batch.background[b])[0]
        np.testing.assert_allclose(batch.expected[b, 0, 7:33, 7:33], model[7:33, 7:33],
                                   rtol=1e-4, atol=1e-2)
        n_emitters += len(t)
    assert n_emitters == pytest.approx(32 * 0.45 * 16, rel=0.25)


def _share_near_border(tables, shape, px=1.0):
    from napari_var_emitter.metrics import border_distance_px

    t = np.concatenate(tables)
    return float(np.mean(border_distance_px(t, shape) < px)), len(t)


def test_edge_fraction_puts_more_training_emitters_at_the_border():
    # half-cut spots at the frame border are rare in uniform draws; edge_fraction trains on more
    base = dict(frame_size=[40, 40], density_per_um2=[3.0, 3.0], filament_fraction=0.0)
    plain, n_plain = _share_near_border(
        sample_training_batch(SimulationConfig(**base), 64, 5).tables, (40, 40))
    edges, n_edges = _share_near_border(
        sample_training_batch(SimulationConfig(edge_fraction=0.5, **base), 64, 5).tables,
        (40, 40))
    assert plain == pytest.approx(1 - (38 / 40) ** 2, abs=0.03)  # the area share, ~10 %
    assert edges > 2.5 * plain
    # the expected number of emitters is unchanged; a part of the band lies outside the frame
    assert 0.7 * n_plain < n_edges < n_plain


def test_steep_background_fraction_spans_larger_ratios_around_the_same_level():
    base = dict(frame_size=[40, 40], background=[20.0, 20.0], density_per_um2=[0.0, 0.0])
    plain = sample_training_batch(SimulationConfig(**base), 64, 3).background
    steep = sample_training_batch(
        SimulationConfig(steep_background_fraction=1.0, steep_background_ratio=20.0, **base),
        64, 3).background
    ratio = steep.max((1, 2)) / steep.min((1, 2))
    assert (plain.max((1, 2)) / plain.min((1, 2))).max() <= 1.7 / 0.3 + 1e-4
    assert ratio.max() > 8.0 and ratio.min() >= 1.0 - 1e-5 and ratio.max() <= 20.0 + 1e-3
    # log-uniform ratios: gentle and steep ones alike; the level is each map's mean
    assert np.mean(ratio < np.sqrt(20.0)) == pytest.approx(0.5, abs=0.2)
    np.testing.assert_allclose(steep.mean((1, 2)), 20.0, rtol=1e-4)
    with pytest.raises(ConfigError, match="steep_background_ratio"):
        SimulationConfig(steep_background_ratio=0.5).validate()
    with pytest.raises(ConfigError, match="steep_background_fraction"):
        SimulationConfig(steep_background_fraction=1.5).validate()


def test_training_batch_is_fast_enough_smoke():
    # correctness of the fast path at high density (speed itself is in benchmarks/)
    sim = SimulationConfig(density_per_um2=[5.0, 5.0], filament_fraction=1.0)
    batch = sample_training_batch(sim, 8, np.random.default_rng(3))
    counts = [len(t) for t in batch.tables]
    assert np.mean(counts) == pytest.approx(5.0 * 16, rel=0.25)


# --- files --------------------------------------------------------------------------------------

def test_write_simulation_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    tifffile = pytest.importorskip("tifffile")
    cam = Camera(baseline=100.0, e_per_adu=2.0)
    m = simulate_movie(6, (20, 24), 0, density_per_um2=2.0, pixel_size_nm=110.0, camera=cam)
    paths = write_simulation(tmp_path, "scene", m)
    assert set(paths) == {"train_tiff", "train_emitters", "inference_tiff", "ground_truth"}
    hr = tifffile.imread(paths["train_tiff"])
    assert hr.shape == (6, 160, 192) and hr.dtype == np.float32
    np.testing.assert_allclose(hr.reshape(6, 20, 8, 24, 8).sum((2, 4)), m.photons_expected,
                               rtol=2e-5, atol=2e-3)
    adu = tifffile.imread(paths["inference_tiff"])
    assert adu.dtype == np.uint16 and np.array_equal(adu, m.adu)
    truth = m.table_in_view()
    with h5py.File(paths["train_emitters"], "r") as fh:
        em = fh["emitters"][()]
    assert len(em) == len(truth)
    np.testing.assert_allclose(em["frame"], truth["frame"])
    np.testing.assert_allclose(em["x_nm"], (truth["x"] + 0.5) * 110.0, rtol=1e-6)
    np.testing.assert_allclose(em["y_nm"], (truth["y"] + 0.5) * 110.0, rtol=1e-6)
    with open(paths["ground_truth"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(truth)
    frames = np.array([float(r["frame"]) for r in rows])
    x_nm = np.array([float(r["x [nm]"]) for r in rows])
    offset = np.array([float(r["offset [photon]"]) for r in rows])
    np.testing.assert_array_equal(frames, truth["frame"] + 1)  # 1-based in ThunderSTORM
    np.testing.assert_allclose(x_nm, (truth["x"] + 0.5) * 110.0, rtol=1e-5)
    np.testing.assert_allclose(offset, truth["background"], rtol=1e-4)
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(ConfigError):
        write_simulation(tmp_path, "../evil", m)


def test_write_simulation_streams_highres_when_movie_has_none(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    m = simulate_movie(20, (10, 12), 4, density_per_um2=3.0, highres_factor=None)
    assert m.highres is None
    paths = write_simulation(tmp_path, "long", m)
    hr = tifffile.imread(paths["train_tiff"])
    assert hr.shape == (20, 80, 96) and hr.dtype == np.float32
    np.testing.assert_allclose(hr, render_expected(m.table, 20, (10, 12), 8, m.background),
                               rtol=1e-5, atol=1e-4)
    # an explicit factor other than the movie's own is rendered too
    hr4 = tifffile.imread(write_simulation(tmp_path, "x4", m, highres_factor=4)["train_tiff"])
    np.testing.assert_allclose(hr4.reshape(20, 10, 4, 12, 4).sum((2, 4)), m.photons_expected,
                               rtol=2e-5, atol=2e-3)


def test_write_simulation_failure_leaves_no_partial_set(tmp_path):
    from napari_var_emitter.errors import OutputError

    m = simulate_movie(3, (8, 8), 0, density_per_um2=2.0)
    (tmp_path / "ground_truth" / "s.csv").mkdir(parents=True)  # the last file cannot be written
    with pytest.raises(OutputError):
        write_simulation(tmp_path, "s", m)
    for sub, ext in [("train_tiff", "tif"), ("train_emitters", "h5"), ("inference_tiff", "tif")]:
        assert not (tmp_path / sub / f"s.{ext}").exists()
    assert not list(tmp_path.rglob(".tmp-*"))
