"""config.json: the design's keys, validation and exact round trip."""

import json

import pytest

from napari_var_emitter.config import Config, load_config
from napari_var_emitter.errors import ConfigError


def test_defaults_have_the_design_keys(tmp_path):
    d = Config().validate().to_dict()
    for key in ("input_size", "target_sizes", "base_channels", "embed_dim", "num_heads",
                "num_layers"):
        assert key in d["model"]
    for key in ("num_epochs", "batch_size", "progressive", "warmup_epochs", "scale_schedule"):
        assert key in d["training"]
    for key in ("count_weight", "loc_weight", "recon_weight", "uncertainty_weight",
                "scale_weights"):
        assert key in d["loss"]
    assert Config().model.factors == [2, 4, 8]


def test_round_trip(tmp_path):
    cfg = Config.from_dict({"model": {"embed_dim": 64, "num_heads": 2},
                            "training": {"batch_size": 4}})
    p = tmp_path / "config.json"
    cfg.save(p)
    assert load_config(p) == cfg
    assert json.loads(p.read_text())["model"]["embed_dim"] == 64


@pytest.mark.parametrize("bad, words", [
    ({"model": {"embedd_dim": 3}}, "unknown key"),
    ({"modle": {}}, "unknown key"),
    ({"model": {"base_channels": "64"}}, "must be an integer"),
    ({"model": {"base_channels": -4}}, "must be >= 1"),
    ({"model": {"refine_blocks": -1}}, "refine_blocks must be >= 0"),
    ({"model": {"input_size": [40, -40]}}, "two positive integers"),
    ({"model": {"target_sizes": [[80, 80], [150, 150], [320, 320]]}}, "not an integer multiple"),
    ({"training": {"progressive": "yes"}}, "true or false"),
    ({"training": {"learning_rate": 0}}, "> 0"),
    ({"loss": {"scale_weights": [1.0, 0.5]}}, "scale_weights has 2 entries"),
    ({"loss": {"loc_mode": "l1"}}, "loc_mode"),
    ({"loss": {"background_loss": "l1"}}, "background_loss"),
    ({"simulation": {"photons": [1000, 10]}}, "min <= max"),
    ({"simulation": {"edge_fraction": 1.5}}, "edge_fraction must be in [0, 1]"),
    ({"simulation": {"edge_band_px": 0}}, "edge_band_px must be > 0"),
    ({"simulation": {"edge_band_px": 30}}, "at most half the frame"),
])
def test_bad_values_are_one_line_errors(bad, words):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(bad)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.json")
    p.write_text(json.dumps({"model": {"num_heads": 3}}))
    with pytest.raises(ConfigError, match=r"config.json: .*divisible"):
        load_config(p)


def test_a_fine_tune_keeps_the_model_and_starts_a_fresh_training_section():
    from napari_var_emitter.config import FINE_TUNING

    trained = Config.from_dict({"model": {"refine_blocks": 2},
                                "training": {"trainable": "transformer.stages.2",
                                             "stop_at_step": 500, "learning_rate": 3e-3},
                                "simulation": {"empty_fraction": 0.3}})
    tuned = trained.for_fine_tuning()
    assert tuned.model == trained.model and tuned.simulation == trained.simulation
    assert tuned.loss == trained.loss and tuned.data == trained.data
    assert tuned.training.trainable == "" and tuned.training.stop_at_step == 0
    for key, value in FINE_TUNING.items():
        assert getattr(tuned.training, key) == value, key
