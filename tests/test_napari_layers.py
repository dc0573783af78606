"""Pure-python plugin helpers: layer geometry, layer data from results, shared state."""

from __future__ import annotations

import types

import numpy as np
import pytest

from napari_var_emitter._napari import layers as L
from napari_var_emitter._napari._workers import (FinetunedModels, TrainingControl,
                                                 TrainingHistory, build_training_config,
                                                 prediction_job, run_to_end,
                                                 simulation_for_camera, training_job)
from napari_var_emitter.camera import Camera
from napari_var_emitter.config import Config
from napari_var_emitter.errors import ConfigError
from napari_var_emitter.table import make_table


# -- geometry --------------------------------------------------------------------------------
@pytest.mark.parametrize("factor, translate", [(2, -0.25), (4, -0.375), (8, -0.4375)])
def test_map_geometry_over_a_unit_layer(factor, translate):
    scale, tr = L.map_scale_translate((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), factor)
    assert scale == (1.0, 1.0 / factor, 1.0 / factor)
    assert tr == (0.0, translate, translate)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_map_geometry_composes_with_input_scale_and_translate(factor):
    s_in, t_in = (2.0, 0.1, 0.2), (5.0, 10.0, -3.0)
    scale, tr = L.map_scale_translate(s_in, t_in, factor)
    assert scale[0] == 2.0 and tr[0] == 5.0  # frame axis copied
    assert scale[1:] == pytest.approx((0.1 / factor, 0.2 / factor), abs=0, rel=1e-15)
    assert tr[1] == pytest.approx(10.0 + 0.1 * (0.5 / factor - 0.5), rel=1e-15)
    assert tr[2] == pytest.approx(-3.0 + 0.2 * (0.5 / factor - 0.5), rel=1e-15)
    # map pixel j lies in world where input coordinate (j + 0.5)/f - 0.5 lies
    for j in (0, 1, 7, 5 * factor - 1):
        map_world = j * scale[2] + tr[2]
        input_coord = (j + 0.5) / factor - 0.5
        assert map_world == pytest.approx(input_coord * s_in[2] + t_in[2], abs=1e-12)
    # the outer edge of the map coincides with the outer edge of the input pixels
    w = 40
    assert (-0.5) * scale[2] + tr[2] == pytest.approx(-0.5 * s_in[2] + t_in[2], abs=1e-12)
    assert (factor * w - 0.5) * scale[2] + tr[2] == pytest.approx((w - 0.5) * s_in[2] + t_in[2],
                                                                  abs=1e-12)


def test_map_geometry_of_a_single_frame():
    scale, tr = L.map_scale_translate((1.0, 1.0), (0.0, 0.0), 2)
    assert scale == (0.5, 0.5) and tr == (-0.25, -0.25)
    with pytest.raises(ValueError):
        L.map_scale_translate((1.0,), (0.0,), 2)
    with pytest.raises(ValueError):
        L.map_scale_translate((1.0, 1.0), (0.0, 0.0), 0)


@pytest.mark.parametrize("factor", [2, 8])
def test_highres_grid_inverts_map_geometry(factor):
    s_in, t_in = (1.0, 0.3, 0.7), (2.0, -1.0, 4.0)
    s_hr, t_hr = L.map_scale_translate(s_in, t_in, factor)
    s_back, t_back = L.input_grid_of_highres(s_hr, t_hr, factor)
    assert s_back == pytest.approx(s_in, abs=1e-15)
    assert t_back == pytest.approx(t_in, abs=1e-12)


def test_points_in_grid_maps_world_positions():
    # points drawn on a layer with scale 2 / translate 1 -> pixels of a unit grid
    pts = np.array([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    out = L.points_in_grid(pts, (1.0, 2.0, 2.0), (0.0, 1.0, 1.0), (1.0, 1.0, 1.0),
                           (0.0, 0.0, 0.0))
    np.testing.assert_allclose(out, [[3.0, 3.0, 5.0], [0.0, 1.0, 1.0]])
    # the training pair: emitters on the camera grid under an 8x image
    s_hr, t_hr = L.map_scale_translate((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 8)
    grid = L.input_grid_of_highres(s_hr, t_hr, 8)
    out = L.points_in_grid(pts, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), *grid)
    np.testing.assert_allclose(out, pts, atol=1e-12)


# -- tables <-> points -----------------------------------------------------------------------
def _table():
    return make_table([0, 0, 3], [1.25, 30.0, 7.5], [2.5, 0.0, 39.4],
                      photons=[1000.0, 2000.0, 3000.0], prob=[0.9, 0.6, 0.99],
                      unc_x=[0.1, 0.2, 0.05], unc_y=[0.15, 0.25, 0.07], sigma=[1.1, 1.2, 1.3])


def test_points_data_from_table_orders_frame_y_x():
    t = _table()
    d3 = L.points_data_from_table(t, 3)
    np.testing.assert_array_equal(d3, [[0, 2.5, 1.25], [0, 0.0, 30.0], [3, 39.4, 7.5]])
    d2 = L.points_data_from_table(t, 2)
    np.testing.assert_array_equal(d2, [[2.5, 1.25], [0.0, 30.0], [39.4, 7.5]])
    assert L.points_data_from_table(t[:0], 3).shape == (0, 3)


def test_table_round_trips_through_points_and_features():
    t = _table()
    feats = L.points_features(t, 110.0)
    np.testing.assert_allclose(feats["uncertainty_x_nm"], [11.0, 22.0, 5.5])
    back = L.table_from_points(L.points_data_from_table(t, 3), feats)
    for name in ("frame", "x", "y", "photons", "prob", "unc_x", "unc_y", "sigma"):
        np.testing.assert_array_equal(back[name], t[name])
    # 2-D points take their frame from the feature
    back2 = L.table_from_points(L.points_data_from_table(t, 2), feats)
    np.testing.assert_array_equal(back2["frame"], [0, 0, 3])
    # a DataFrame (what napari passes) works the same
    pd = pytest.importorskip("pandas")
    back3 = L.table_from_points(L.points_data_from_table(t, 3), pd.DataFrame(feats))
    np.testing.assert_array_equal(back3["prob"], t["prob"])


def test_table_from_bare_points_uses_defaults():
    back = L.table_from_points(np.array([[2.0, 5.0, 6.0]]), None)
    assert back["frame"][0] == 2 and back["y"][0] == 5.0 and back["x"][0] == 6.0
    assert back["prob"][0] == 1.0 and np.isnan(back["photons"][0])


def test_image_shape_of_points():
    assert L.image_shape_of_points(np.zeros((0, 3)), {"image_shape": [5, 40, 41]}) == (5, 40, 41)
    assert L.image_shape_of_points(np.array([[2, 10.2, 20.6], [0, 0.0, 0.0]])) == (3, 11, 22)


# -- pixel size and camera from a layer --------------------------------------------------------
def test_pixel_size_from_layer_metadata_and_units():
    meta_layer = types.SimpleNamespace(metadata={"pixel_size_nm": 160}, units=None, scale=None)
    assert L.pixel_size_from_layer(meta_layer) == 160.0
    pint = pytest.importorskip("pint")
    ureg = pint.get_application_registry()
    um = types.SimpleNamespace(metadata={}, units=(ureg.micrometer,) * 3, scale=(1, 0.1, 0.1))
    assert L.pixel_size_from_layer(um) == pytest.approx(100.0)
    px = types.SimpleNamespace(metadata={}, units=(ureg.pixel,) * 2, scale=(1, 1))
    assert L.pixel_size_from_layer(px) is None
    assert L.camera_from_metadata({"camera": {"baseline": 100, "qe": "0.9", "x": 1}}) == {
        "baseline": 100.0, "qe": 0.9}


# -- result layers ---------------------------------------------------------------------------
def _fake_result(t=3, h=10, w=12, factors=(2, 4, 8)):
    rng = np.random.default_rng(0)
    maps = {f: {name: rng.random((t, f * h, f * w), dtype=np.float32) for name in L.MAP_NAMES}
            for f in factors}
    return types.SimpleNamespace(localizations=_table(), maps=maps, factors=list(factors),
                                 loc_factor=2, shape=(t, h, w), pixel_size_nm=100.0)


def test_result_layer_data_names_shapes_and_geometry():
    res = _fake_result()
    geo = L.InputGeometry("movie", (3, 10, 12), scale=(1.0, 2.0, 2.0),
                          translate=(0.0, 1.0, -1.0), pixel_size_nm=100.0)
    sr = np.zeros((100, 120), np.float32)
    sr[5, 7] = 1
    tuples = L.result_layer_data(res, geo, super_resolution=sr)
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in tuples}
    assert set(by_name) == {"VAR movie probability x2", "VAR movie probability x4",
                            "VAR movie probability x8", "VAR movie uncertainty_x x2",
                            "VAR movie uncertainty_y x2", "VAR movie super-resolution",
                            "VAR movie peaks"}
    for f in (2, 4, 8):
        data, kw, kind = by_name[f"VAR movie probability x{f}"]
        assert kind == "image" and data.shape == (3, 10 * f, 12 * f)
        assert kw["scale"] == (1.0, 2.0 / f, 2.0 / f)
        assert kw["translate"] == (0.0, 1.0 + 2.0 * (0.5 / f - 0.5), -1.0 + 2.0 * (0.5 / f - 0.5))
        assert kw["metadata"][L.RESULT_KEY] == "movie"
    data, kw, kind = by_name["VAR movie super-resolution"]
    assert kw["scale"] == (0.2, 0.2)  # 10 render pixels per input pixel
    assert kw["translate"] == pytest.approx((1.0 + 2.0 * (0.05 - 0.5), -1.0 + 2.0 * (0.05 - 0.5)))
    data, kw, kind = by_name["VAR movie peaks"]
    assert kind == "points" and data.shape == (3, 3)
    assert kw["scale"] == geo.scale and kw["translate"] == geo.translate
    assert kw["metadata"]["pixel_size_nm"] == 100.0
    assert kw["metadata"]["image_shape"] == [3, 10, 12]
    np.testing.assert_array_equal(kw["features"]["prob"], [0.9, 0.6, 0.99])


def test_result_layer_data_for_a_single_frame_and_subsets():
    res = _fake_result(t=1)
    geo = L.InputGeometry("img", (10, 12))
    tuples = L.result_layer_data(res, geo, show_maps=True, show_peaks=True,
                                 show_uncertainty=False)
    names = [kw["name"] for _, kw, _ in tuples]
    assert names == ["VAR img probability x2", "VAR img probability x4",
                     "VAR img probability x8", "VAR img peaks"]
    assert tuples[0][0].shape == (20, 24)
    assert tuples[0][1]["translate"] == (-0.25, -0.25)
    assert tuples[-1][0].shape == (3, 2)
    only_peaks = L.result_layer_data(res, geo, show_maps=False, show_uncertainty=False)
    assert [kind for _, _, kind in only_peaks] == ["points"]


def test_input_geometry_rejects_other_dimensions():
    with pytest.raises(ValueError, match="4 dimensions"):
        L.InputGeometry("x", (2, 3, 10, 10))


def test_maps_from_hdf5_are_lazy(tmp_path):
    h5py = pytest.importorskip("h5py")
    da = pytest.importorskip("dask.array")
    with h5py.File(tmp_path / "m.h5", "w") as fh:
        fh["p"] = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    fh = h5py.File(tmp_path / "m.h5", "r")
    try:
        lazy = L.as_lazy(fh["p"])
        assert isinstance(lazy, da.Array) and lazy.chunks == ((1, 1), (4,), (6,))
        np.testing.assert_array_equal(np.asarray(lazy[1]), fh["p"][1])
    finally:
        fh.close()
    arr = np.zeros(3)
    assert L.as_lazy(arr) is arr


# -- shared state and jobs -------------------------------------------------------------------
def test_finetuned_registry_signals():
    reg = FinetunedModels()
    offered, used = [], []
    reg.offered.connect(offered.append)
    reg.use_requested.connect(used.append)
    with pytest.raises(ValueError):
        reg.use()
    reg.offer("/a/best_model.pth")
    reg.use()
    reg.use("/b/best_model.pth")
    assert offered == ["/a/best_model.pth", "/b/best_model.pth"]
    assert used == ["/a/best_model.pth", "/b/best_model.pth"]


def test_prediction_job_passes_progress_and_returns_result(drain):
    class FakePredictor:
        def predict_iter(self, stack, **kw):
            for i in range(3):
                yield ("progress", i, kw["threshold"])
            return "result"

    gen = prediction_job(FakePredictor, np.zeros((3, 4, 4)), {"threshold": 0.7},
                         render=lambda r: r + "-rendered")
    events, value = drain(gen)
    assert events == [("progress", 0, 0.7), ("progress", 1, 0.7), ("progress", 2, 0.7)]
    assert value == ("result", "result-rendered")


def _event(kind, epoch, step, losses=None, metrics=None):
    return types.SimpleNamespace(kind=kind, epoch=epoch, step=step, total_steps=4,
                                 losses=losses or {}, metrics=metrics or {})


def test_training_job_and_history_with_a_fake_trainer():
    class FakeTrainer:
        def __init__(self):
            self.cancelled = False
            self.closed = False

        def cancel(self):
            self.cancelled = True

        def close(self):
            self.closed = True

        def events(self):
            yield _event("step", 0, 1, {"loss": 2.0})
            yield _event("step", 0, 2, {"loss": 1.5, "loc/x4": 0.3})
            yield _event("epoch", 1, 2, {"loss": 1.5}, {"loss": 1.4, "jaccard": 0.5})
            if self.cancelled:
                yield _event("cancelled", 1, 2)
                return
            yield _event("done", 1, 2, {}, {"jaccard": 0.5})

    control = TrainingControl()
    control.cancel()  # requested before the trainer exists: applied once it does
    history = TrainingHistory()
    gen = training_job(FakeTrainer, control)
    trainer = None
    while True:
        try:
            history.add(next(gen))
        except StopIteration as stop:
            trainer = stop.value
            break
    assert trainer.cancelled and trainer.closed
    assert history.status == "cancelled"
    assert history.main_loss() == ([1, 2], [2.0, 1.5])
    assert np.isnan(history.losses["loc/x4"][0]) and history.losses["loc/x4"][1] == 0.3
    assert history.epochs == [1] and history.epoch_steps == [2]
    assert history.metrics == {"loss": [1.4], "jaccard": [0.5]}


def test_run_to_end():
    def gen():
        yield 1
        return 5
    assert run_to_end(gen()) == 5


def test_training_config_from_form_values():
    cam = Camera(baseline=100, e_per_adu=45, em_gain=300, qe=0.9, read_noise=74.4)
    sim = simulation_for_camera(cam, 100.0, (1.0, 1.5), (500, 5000), (10, 50), (0.5, 2))
    cfg = build_training_config(Config(), training={"num_epochs": 3, "learning_rate": 1e-4},
                                simulation=sim)
    assert cfg.training.num_epochs == 3 and cfg.training.learning_rate == 1e-4
    assert cfg.simulation.em_gain == [300.0, 300.0] and cfg.simulation.emccd_fraction == 1.0
    assert cfg.simulation.baseline == [100.0, 100.0] and cfg.simulation.qe == [0.9, 0.9]
    assert cfg.simulation.density_per_um2 == [0.5, 2.0]
    scmos = simulation_for_camera(Camera(e_per_adu=2), 65.0, (1, 2), (1, 2), (1, 2), (1, 2))
    assert scmos["emccd_fraction"] == 0.0 and "em_gain" not in scmos
    with pytest.raises(ConfigError):
        build_training_config(Config(), training={"num_epochs": 0})


def test_result_tuples_make_valid_napari_layers():
    from napari.layers import Layer

    res = _fake_result(t=4)
    geo = L.InputGeometry("movie", (4, 10, 12), pixel_size_nm=100.0)
    sr = np.random.default_rng(1).random((100, 120)).astype(np.float32)
    layers = [Layer.create(*t) for t in L.result_layer_data(res, geo, super_resolution=sr)]
    peaks = next(ly for ly in layers if ly.name == "VAR movie peaks")
    assert len(peaks.data) == 3
    # coloured by detection probability: the most and least probable differ in colour
    colours = np.asarray(peaks.face_color)
    assert not np.allclose(colours[1], colours[2])
    assert list(peaks.features["prob"]) == [0.9, 0.6, 0.99]
    prob8 = next(ly for ly in layers if ly.name == "VAR movie probability x8")
    np.testing.assert_array_equal(prob8.scale, [1.0, 0.125, 0.125])
    np.testing.assert_array_equal(prob8.translate, [0.0, -0.4375, -0.4375])
    assert prob8.contrast_limits == [0.0, 1.0]
    # an empty result still makes a valid (empty) Points layer
    empty = types.SimpleNamespace(localizations=_table()[:0], maps={}, factors=[2],
                                  loc_factor=2)
    [(data, kwargs, kind)] = L.result_layer_data(empty, geo)
    assert Layer.create(data, kwargs, kind).data.shape == (0, 3)
