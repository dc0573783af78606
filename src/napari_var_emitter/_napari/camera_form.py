"""The pixel-size and camera fields both dock widgets show, and the Camera they describe."""

from __future__ import annotations

from magicgui.widgets import FloatSpinBox

from ..camera import Camera
from .layers import DEFAULT_PIXEL_SIZE_NM, camera_from_metadata


class CameraForm:
    """Spin boxes for pixel size, baseline, e-/ADU, EM gain, QE (and read noise)."""

    def __init__(self, read_noise: bool = False):
        self.pixel_size = FloatSpinBox(label="Pixel size (nm)", min=1.0, max=1e5, step=1.0,
                                       value=DEFAULT_PIXEL_SIZE_NM)
        self.baseline = FloatSpinBox(label="Baseline (ADU)", min=0.0, max=1e6, step=1.0,
                                     value=0.0)
        self.e_per_adu = FloatSpinBox(label="e-/ADU", min=0.001, max=1e4, step=0.1, value=1.0)
        self.em_gain = FloatSpinBox(label="EM gain", min=1.0, max=1e4, step=1.0, value=1.0)
        self.qe = FloatSpinBox(label="QE", min=0.01, max=1.0, step=0.01, value=1.0)
        self.read_noise = (FloatSpinBox(label="Read noise (e-)", min=0.0, max=1e3, step=0.1,
                                        value=1.0) if read_noise else None)

    def _camera_fields(self) -> dict:
        fields = {"baseline": self.baseline, "e_per_adu": self.e_per_adu,
                  "em_gain": self.em_gain, "qe": self.qe}
        if self.read_noise is not None:
            fields["read_noise"] = self.read_noise
        return fields

    @property
    def widgets(self) -> list:
        """The fields in display order."""
        return [self.pixel_size, *self._camera_fields().values()]

    def fill_camera(self, metadata) -> None:
        """Set the camera fields found in a layer's metadata (others keep their values)."""
        cam = camera_from_metadata(metadata)
        for key, widget in self._camera_fields().items():
            if key in cam:
                widget.value = cam[key]

    def camera(self) -> Camera:
        """The camera described by the form (raises ConfigError on bad values)."""
        return Camera(**{k: float(w.value) for k, w in self._camera_fields().items()})
