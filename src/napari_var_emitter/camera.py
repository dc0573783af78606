"""The camera model of the contract: photons in, ADU out, and back.

``ADU = baseline + gain_chain(Poisson(photons * qe)) / e_per_adu`` where the gain chain is
an EM register (gamma distributed, excess noise factor 2) when ``em_gain > 1`` followed by
Gaussian read noise in electrons. Inference inverts the mean:
``photons = (ADU - baseline) * e_per_adu / (em_gain * qe)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Camera:
    """Camera parameters. Defaults mean "the input is already in photons"."""

    baseline: float = 0.0
    e_per_adu: float = 1.0
    em_gain: float = 1.0
    qe: float = 1.0
    read_noise: float = 0.0  # electrons (rms)

    def __post_init__(self):
        for name in ("e_per_adu", "em_gain", "qe"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise ConfigError(f"camera {name} must be a positive number, got {v!r}")
        if self.qe > 1:
            raise ConfigError(f"camera qe must be in (0, 1], got {self.qe!r}")
        if self.em_gain < 1:
            raise ConfigError(f"camera em_gain must be >= 1 (1 = no EM gain), got {self.em_gain!r}")
        if not np.isfinite(self.read_noise) or self.read_noise < 0:
            raise ConfigError(f"camera read_noise must be >= 0, got {self.read_noise!r}")
        if not np.isfinite(self.baseline):
            raise ConfigError(f"camera baseline must be finite, got {self.baseline!r}")

    @property
    def is_emccd(self) -> bool:
        """True when the camera has an EM gain register (excess noise factor 2)."""
        return self.em_gain > 1

    @property
    def excess_noise(self) -> float:
        """Excess noise factor F (2 for EMCCD, 1 otherwise)."""
        return 2.0 if self.is_emccd else 1.0

    def to_dict(self) -> dict:
        """Plain dict of the parameters (for JSON and HDF5 attributes)."""
        return asdict(self)

    def photons_to_adu(self, photons, rng: np.random.Generator, clip_uint16: bool = True):
        """Apply the camera model to expected photon counts; returns ADU (float or uint16)."""
        lam = np.asarray(photons, dtype=np.float64) * self.qe
        electrons = rng.poisson(np.clip(lam, 0, None)).astype(np.float64)
        if self.is_emccd:
            # EM register: Gamma(shape=n, scale=g) for n > 0 electrons (0 stays 0)
            pos = electrons > 0
            out = np.zeros_like(electrons)
            out[pos] = rng.gamma(electrons[pos], self.em_gain)
            electrons = out
        if self.read_noise > 0:
            electrons = electrons + rng.normal(0.0, self.read_noise, size=electrons.shape)
        adu = self.baseline + electrons / self.e_per_adu
        if clip_uint16:
            return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
        return adu

    def adu_to_photons(self, adu, dtype=np.float32):
        """Convert ADU to (expected) photons, inverting the mean of the camera model."""
        a = np.asarray(adu, dtype=dtype)
        return (a - dtype(self.baseline)) * dtype(self.e_per_adu / (self.em_gain * self.qe))
