"""The plugin's sample data, simulated deterministically on the spot (each < 2 s).

Shared by the napari "Open Sample" menu and ``var-emitter predict --sample NAME``.
"""

from __future__ import annotations

from .camera import Camera
from .simulation import SimulatedMovie, simulate_movie

PIXEL_SIZE_NM = 100.0

#: a scientific CMOS camera: offset 100 ADU, 2 e-/ADU, QE 0.9, 1.5 e- read noise
SAMPLE_CAMERA = Camera(baseline=100.0, e_per_adu=2.0, em_gain=1.0, qe=0.9, read_noise=1.5)

_COMMON = dict(camera=SAMPLE_CAMERA, pixel_size_nm=PIXEL_SIZE_NM, sigma_px=(1.0, 1.4))

#: name -> (description, simulate_movie keyword arguments)
SAMPLES = {
    "sparse": ("Sparse emitters (40x40, 200 frames)",
               dict(n_frames=200, shape=(40, 40), rng=20240601, density_per_um2=0.3,
                    photons=(1000.0, 5000.0), background=(20.0, 40.0))),
    "dense": ("Dense emitters (40x40, 200 frames)",
              dict(n_frames=200, shape=(40, 40), rng=20240602, density_per_um2=3.0,
                   photons=(1000.0, 5000.0), background=(20.0, 40.0))),
    "filaments": ("Blinking filaments (64x64, 500 frames)",
                  dict(n_frames=500, shape=(64, 64), rng=20240603, density_per_um2=1.0,
                       photons=(800.0, 4000.0), background=(20.0, 60.0), scene="filaments")),
    "training_pair": ("Training pair (8x photon image + emitters)",
                      dict(n_frames=60, shape=(40, 40), rng=20240604, density_per_um2=1.0,
                           photons=(1000.0, 5000.0), background=(20.0, 40.0))),
}


def make_sample(name: str, highres_factor: int | None = None) -> SimulatedMovie:
    """Simulate the sample ``name`` (one of :data:`SAMPLES`); the same frames every call."""
    from .errors import ConfigError

    if name not in SAMPLES:
        raise ConfigError(f"unknown sample {name!r} (choose from {', '.join(SAMPLES)})")
    return simulate_movie(highres_factor=highres_factor, **_COMMON, **SAMPLES[name][1])
