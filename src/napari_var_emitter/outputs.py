"""Files written by prediction: ``predictions.h5`` (streamed maps), localisation tables and
figures. Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from . import __version__
from .errors import OutputError
from .io.atomic import _remove
from .table import LOC_DTYPE


#: storage type per map: half precision keeps 3 significant digits (probabilities to 1e-3,
#: offsets and uncertainties to ~1e-4 px) at half the size; photons can exceed float16's
#: 65,504, so they stay float32.
MAP_DTYPES = {"probability": "f2", "offset_x": "f2", "offset_y": "f2",
              "uncertainty_x": "f2", "uncertainty_y": "f2", "photons": "f4"}


class PredictionsH5Writer:
    """Stream maps into ``predictions.h5``: ``maps/x{f}/{name}`` datasets of shape
    (T, f*H, f*W), chunked per frame and gzip-compressed (:data:`MAP_DTYPES`; offsets,
    uncertainties and photons are NaN where the probability is below
    ``inference.MAP_DEFINED_PROBABILITY``), plus a ``localizations`` table.

    The file is written as ``.NAME.partial`` and renamed by :meth:`close`; :meth:`abort`
    deletes it, so a crash never leaves a half-written ``predictions.h5``.
    """

    def __init__(self, path, shape, factors, attrs=None):
        from .inference import MAP_NAMES

        self.path = os.fspath(path)
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                                "." + os.path.basename(self.path) + ".partial")
        t, h, w = shape
        self.file = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = h5py.File(self.tmp, "w")
            self.file.attrs["package_version"] = __version__
            self.file.attrs["shape"] = np.asarray(shape)
            for k, v in (attrs or {}).items():
                self.file.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            self.datasets = {}
            for f in factors:
                g = self.file.require_group(f"maps/x{f}")
                g.attrs["factor"] = f
                g.attrs["scale"] = 1.0 / f
                g.attrs["translate"] = 0.5 / f - 0.5
                self.datasets[f] = {
                    k: g.create_dataset(k, shape=(t, f * h, f * w), dtype=MAP_DTYPES[k],
                                        chunks=(1, min(f * h, 512), min(f * w, 512)),
                                        compression="gzip", compression_opts=1, shuffle=True)
                    for k in MAP_NAMES}
        except OSError as e:
            self.abort()
            raise _output_error(self.path, e) from None

    def write_maps(self, t0: int, maps: dict) -> None:
        """Write frames ``t0 .. t0+n`` of every map (``maps[f][name]`` arrays (n, fH, fW))."""
        try:
            for f, d in maps.items():
                for k, arr in d.items():
                    self.datasets[f][k][t0:t0 + len(arr)] = arr
        except OSError as e:
            self.abort()
            raise _output_error(self.path, e) from None

    def write_localizations(self, table) -> None:
        """Store the localisation table (positions in input pixels, pixel-centre)."""
        try:
            ds = self.file.create_dataset("localizations",
                                          data=np.asarray(table, dtype=LOC_DTYPE))
            ds.attrs["units"] = ("x, y, sigma, unc_x, unc_y: input pixels (pixel centre at "
                                 "integer); photons: photons; background: photons/pixel; "
                                 "frame: 0-based")
        except OSError as e:
            self.abort()
            raise _output_error(self.path, e) from None

    def close(self) -> None:
        """Flush, close and rename the file into place."""
        try:
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            _remove(self.tmp)
            raise _output_error(self.path, e) from None

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            if self.file is not None:
                self.file.close()
        except Exception:  # noqa: BLE001 - already failing; the partial file goes anyway
            pass
        _remove(self.tmp)

    def open_lazy(self) -> dict:
        """The written maps as read-only h5py datasets (read on access)."""
        return open_prediction_maps(self.path)


def _output_error(path, e: OSError) -> OutputError:
    """One-line :class:`OutputError` for a failed write (HDF5 reports ENOSPC in its text)."""
    import errno

    text = str(e)
    if e.errno == errno.ENOSPC or "No space left" in text or "errno = 28" in text:
        why = "disk full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission denied" in text:
        why = "permission denied"
    else:
        why = " ".join((e.strerror or text).split())[:200]
    return OutputError(f"{path}: cannot write ({why})")


def open_prediction_maps(path) -> dict:
    """Open ``predictions.h5`` lazily: ``{factor: {name: h5py.Dataset}}``."""
    f = h5py.File(path, "r")
    out = {}
    for name, g in f["maps"].items():
        out[int(name[1:])] = {k: g[k] for k in g}
    return out


#: the files `var-emitter predict` writes into ``OUT/STEM/`` (figures: :func:`write_figures`)
PREDICT_OUTPUT_NAMES = ("localizations.csv", "localizations.hdf5", "localizations.yaml",
                        "predictions.h5", "input.png", "peaks.png", "uncertainty.png",
                        "super_resolution.png")


def is_predict_output(name: str) -> bool:
    """Whether ``name`` is one of the files `var-emitter predict` writes (so a redo may
    replace or remove it; any other file in the folder is the user's)."""
    return name in PREDICT_OUTPUT_NAMES or (
        name.startswith("probability_x") and name.endswith(".png")
        and name[len("probability_x"):-len(".png")].isdigit())


def picasso_settings(result) -> dict:
    """How a prediction was made, as entries of the Picasso yaml."""
    names = {"model_id": "Model", "threshold": "Detection threshold",
             "tta": "Symmetry averaging", "border_fit": "Border refit", "pair_fit": "Pair fit"}
    return {names.get(k, k): v for k, v in (getattr(result, "settings", None) or {}).items()}


def write_tables(out_dir, result, stem="localizations") -> list[str]:
    """Write ``localizations.csv`` (ThunderSTORM) and Picasso ``localizations.hdf5`` + yaml
    (with the result's settings: model, threshold, symmetry averaging, border and pair fits)."""
    from .io.emitters import write_picasso_hdf5, write_thunderstorm_csv

    t, h, w = result.shape
    csv = os.path.join(out_dir, stem + ".csv")
    hdf = os.path.join(out_dir, stem + ".hdf5")
    write_thunderstorm_csv(csv, result.localizations, result.pixel_size_nm)
    write_picasso_hdf5(hdf, result.localizations, result.pixel_size_nm, width=w, height=h,
                       n_frames=t, extra_info=picasso_settings(result))
    return [csv, hdf, os.path.splitext(hdf)[0] + ".yaml"]


def write_figures(out_dir, stack, result, frame: int | None = None) -> list[str]:
    """PNG figures: input frame, probability map per scale, peaks over the input,
    uncertainty map and the super-resolution rendering of all localisations."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .inference import render_super_resolution
    from .io.atomic import atomic_path

    locs = result.localizations
    t_total, h, w = result.shape
    if frame is None:
        frame = int(np.bincount(locs["frame"], minlength=t_total).argmax()) if len(locs) else 0
    img = result.camera.adu_to_photons(np.asarray(stack[frame]))
    sel = locs[locs["frame"] == frame]
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(4, 4))
    im = ax.imshow(img, cmap="gray")
    fig.colorbar(im, ax=ax, label="photons")
    ax.set_title(f"input, frame {frame}")
    save(fig, "input.png")
    ext = (-0.5, w - 0.5, h - 0.5, -0.5)  # pixel-centre convention: pixel i spans i +- 0.5
    for f, maps in sorted(result.maps.items()):
        fig, ax = plt.subplots(figsize=(4, 4))
        im = ax.imshow(np.asarray(maps["probability"][frame]), cmap="magma", extent=ext,
                       vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, label="probability")
        ax.set_title(f"probability x{f} ({f * h}x{f * w}), frame {frame}")
        save(fig, f"probability_x{f}.png")
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(img, cmap="gray", extent=ext)
    sc = ax.scatter(sel["x"], sel["y"], c=sel["prob"], s=18, cmap="viridis", vmin=0, vmax=1,
                    marker="+")
    fig.colorbar(sc, ax=ax, label="probability")
    ax.set_xlim(ext[0], ext[1])
    ax.set_ylim(ext[2], ext[3])
    ax.set_title(f"{len(sel)} localisations, frame {frame}")
    save(fig, "peaks.png")
    if result.maps:
        f = result.loc_factor
        unc = 0.5 * (np.asarray(result.maps[f]["uncertainty_x"][frame])
                     + np.asarray(result.maps[f]["uncertainty_y"][frame])) * result.pixel_size_nm
        prob = np.asarray(result.maps[f]["probability"][frame])
        unc = np.where(prob > 0.1, unc, np.nan)
        fig, ax = plt.subplots(figsize=(4, 4))
        im = ax.imshow(unc, cmap="viridis", extent=ext)
        fig.colorbar(im, ax=ax, label="predicted uncertainty [nm] (where p > 0.1)")
        ax.set_title(f"uncertainty x{f}, frame {frame}")
        save(fig, "uncertainty.png")
    elif len(sel):
        fig, ax = plt.subplots(figsize=(4, 4))
        unc = np.sqrt((sel["unc_x"] ** 2 + sel["unc_y"] ** 2) / 2) * result.pixel_size_nm
        ax.imshow(img, cmap="gray", extent=ext)
        sc = ax.scatter(sel["x"], sel["y"], c=unc, s=18, cmap="viridis")
        fig.colorbar(sc, ax=ax, label="uncertainty [nm]")
        ax.set_title("per-emitter uncertainty")
        save(fig, "uncertainty.png")
    sr = render_super_resolution(locs, (h, w), result.pixel_size_nm)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(sr, cmap="hot", vmax=np.percentile(sr, 99.5) if sr.any() else 1)
    ax.set_title(f"super-resolution, {len(locs)} localisations")
    ax.set_axis_off()
    save(fig, "super_resolution.png")
    return paths
