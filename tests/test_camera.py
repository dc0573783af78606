"""The contract's camera model and its inverse."""

import numpy as np
import pytest

from napari_var_emitter.camera import Camera
from napari_var_emitter.errors import ConfigError


def test_mean_round_trip_emccd():
    cam = Camera(baseline=100, e_per_adu=45, em_gain=300, qe=0.9, read_noise=74.4)
    rng = np.random.default_rng(1)
    adu = cam.photons_to_adu(np.full(200_000, 50.0), rng, clip_uint16=False)
    assert cam.adu_to_photons(adu).mean() == pytest.approx(50.0, rel=0.02)


def test_emccd_excess_noise_factor_two():
    lam = 40.0
    cam = Camera(em_gain=100, e_per_adu=10)
    rng = np.random.default_rng(2)
    ph = cam.adu_to_photons(cam.photons_to_adu(np.full(200_000, lam), rng, clip_uint16=False))
    # variance in photon units: F * lambda with F = 2 for an EM register
    assert ph.var() / lam == pytest.approx(2.0, rel=0.05)


def test_uint16_clipping_and_baseline():
    cam = Camera(baseline=100, e_per_adu=2)
    adu = cam.photons_to_adu(np.array([0.0, 1e9]), np.random.default_rng(0))
    assert adu.dtype == np.uint16 and adu[0] == 100 and adu[1] == 65535


@pytest.mark.parametrize("kw", [{"e_per_adu": 0}, {"qe": 1.5}, {"em_gain": 0.5},
                                {"read_noise": -1}, {"baseline": float("nan")}])
def test_invalid_parameters(kw):
    with pytest.raises(ConfigError):
        Camera(**kw)
