"""Maximum-likelihood fits of single spots, and the refit of detections at the frame border.

Why the border needs it
    A spot whose centre lies within about a pixel of the frame border is cut by it. The
    network places such spots too far inside (a spot 0.25 px outside the frame is reported
    about 0.2 px inside it) and folds the question "is its centre inside the frame?" into
    its detection probability, so a real spot half a pixel inside often stays below the
    threshold while one just outside is reported. A fit of the pixels that exist settles
    both: on simulated 40x40 frames (sCMOS, 30 photons/px of background, PSF sigma
    1.0-1.5 px) it finds 0.74 / 0.95 / 0.99 of the spots at the border pixel's centre at
    500 / 1,000 / 2,000 photons, where the network's threshold alone finds 0.41 / 0.68 /
    0.85 (``benchmarks/bench_edges.py``).

The fit
    A pixel-integrated Gaussian (centre, photons, a constant background and its own sigma)
    on a square window around the start, leaving out the pixels beyond the frame, with the
    camera's noise per pixel: ``F * mu / qe`` (Poisson, excess factor ``F`` 2 for an EMCCD)
    plus read noise and ADU rounding, all in photons. Levenberg-Marquardt steps on the
    Fisher information, vectorised over all spots of a batch in torch (float64, on the
    network's device), until no spot's likelihood moves; a step is taken when it raises
    the likelihood of the data as a scaled Poisson variable with that variance. The
    standard errors are the inverse Fisher information's (the Cramer-Rao bound at the
    fitted values, sigma unknown).

The border rule (:func:`refit_border_detections`)
    Detections within :data:`BORDER_FIT_BAND_PX` of the border are fitted from probability
    ``threshold * BORDER_THRESHOLD_RATIO`` up. A fit is trusted when it describes its window
    (reduced chi-square below :data:`MAX_REDUCED_CHI2`; a neighbour's light in the window
    spoils it), stays within :data:`MAX_SHIFT_PX` of the network's position, has a PSF
    width in :data:`SIGMA_BOUNDS_PX` and photons at least :data:`MIN_PHOTON_SIGNIFICANCE`
    standard errors above 0. A trusted fit decides: the detection is kept, at the
    fitted position and photons, exactly when the fitted centre is inside the frame; its
    uncertainty is the larger of the fit's standard error and the network's. Otherwise the
    network's own threshold and position stand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .camera import Camera

#: detections closer than this to the frame border (input px, from the border pixels' outer
#: edges, by the network's position) are refitted
BORDER_FIT_BAND_PX = 1.0
#: border detections are fitted from this fraction of the detection threshold up
BORDER_THRESHOLD_RATIO = 1.0 / 3.0
#: half-width of the fit window (7x7 pixels)
FIT_RADIUS_PX = 3
#: a fit whose reduced chi-square exceeds this is not trusted (e.g. a neighbour's light)
MAX_REDUCED_CHI2 = 2.0
#: a fit that moves the spot further than this from the network's position is not trusted
MAX_SHIFT_PX = 0.8
#: a fit whose photons are fewer than this many standard errors is not trusted (a noise peak)
MIN_PHOTON_SIGNIFICANCE = 3.0
#: PSF sigma (px) allowed during the fit, and the range a trusted fit must end strictly inside
SIGMA_LIMITS_PX = (0.6, 2.5)
SIGMA_BOUNDS_PX = (0.65, 2.4)
#: starting PSF sigma (px), the middle of the operating range
START_SIGMA_PX = 1.25
#: Levenberg-Marquardt rounds at most: from the network's start 12 leave every benchmark
#: figure as 20 did (session 10), at 60 % of the cost
FIT_ITERATIONS = 12

_ROOT2 = math.sqrt(2.0)


def _numpy_erf(x):
    """erf of a numpy array, by torch (already loaded; scipy.special would add a fifth of a
    second to every `var-emitter predict`)."""
    return torch.erf(torch.from_numpy(np.asarray(x, np.float64))).numpy()


def integrated_gaussian_1d(centre, sigma, coords):
    """Pixel-integrated 1-D Gaussian of unit area and its derivatives.

    ``centre``, ``sigma``: (n,); ``coords``: (n, K) pixel centres (pixels span
    ``[c - 0.5, c + 0.5)``). Returns ``(E, dE/dcentre, dE/dsigma)``, each (n, K). Numpy
    arrays in, numpy out; torch tensors in, torch out (on their device).
    """
    if isinstance(coords, torch.Tensor):
        erf_, exp_ = torch.erf, torch.exp
        c, s = centre[:, None], sigma[:, None]
    else:
        erf_, exp_ = _numpy_erf, np.exp
        c, s = np.asarray(centre, float)[:, None], np.asarray(sigma, float)[:, None]
    hi = (coords + 0.5 - c) / (_ROOT2 * s)
    lo = (coords - 0.5 - c) / (_ROOT2 * s)
    e = 0.5 * (erf_(hi) - erf_(lo))
    g_hi = exp_(-hi * hi) / math.sqrt(math.pi)
    g_lo = exp_(-lo * lo) / math.sqrt(math.pi)
    de_dc = (g_lo - g_hi) / (_ROOT2 * s)
    de_ds = (g_lo * lo - g_hi * hi) / s
    return e, de_dc, de_ds


def pixel_variance(mu, camera: Camera):
    """Variance (photons^2) of a pixel with expected ``mu`` photons (array or tensor), as
    :meth:`Camera.adu_to_photons` reports it: shot noise (times the EMCCD excess factor),
    read noise and the rounding to whole ADU, referred to photons."""
    to_photons = camera.e_per_adu / (camera.em_gain * camera.qe)
    read = camera.read_noise / (camera.em_gain * camera.qe)
    shot = mu.clamp_min(0.0) if isinstance(mu, torch.Tensor) else np.maximum(mu, 0.0)
    return camera.excess_noise * shot / camera.qe + read ** 2 + to_photons ** 2 / 12


def frames_tensor(frames, device=None) -> torch.Tensor:
    """``frames`` (numpy or torch) as a tensor on ``device`` (None: where they are, numpy on
    the CPU without a copy); moved only when they are elsewhere."""
    frames = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    return frames if device is None else frames.to(device)


def single_spot_start(win: "FitWindows", photons, background,
                      sigma: float = START_SIGMA_PX) -> torch.Tensor:
    """Starting parameters of one-spot fits (:func:`fit_windows` layout): the windows'
    centres, ``photons`` and ``background`` (NaN: 1,000 and 10; floored at 10 and 0.1) and
    a common ``sigma``."""
    f64, dev = torch.float64, win.data.device

    def column(values, missing, floor):
        values = torch.as_tensor(np.asarray(values, float), dtype=f64, device=dev)
        return values.nan_to_num(missing).clamp_min(floor)

    return torch.stack([win.x0, win.y0, column(photons, 1000.0, 10.0),
                        column(background, 10.0, 0.1),
                        torch.full_like(win.x0, float(sigma))], 1)


@dataclass
class SpotFits:
    """Results of :func:`fit_spots`, one entry per spot (positions in input px; NaN for a
    spot whose start or fit was not finite)."""

    x: np.ndarray
    y: np.ndarray
    photons: np.ndarray
    background: np.ndarray
    sigma: np.ndarray
    se_x: np.ndarray
    se_y: np.ndarray
    se_photons: np.ndarray
    reduced_chi2: np.ndarray


def fit_spots(frames, frame_index, x, y, photons, background, camera: Camera | None = None,
              sigma: float = START_SIGMA_PX, radius: int = FIT_RADIUS_PX,
              iterations: int = FIT_ITERATIONS) -> SpotFits:
    """Fit one Gaussian spot per start by maximum likelihood (scaled Poisson noise).

    ``frames``: (T, H, W) in photons (:meth:`Camera.adu_to_photons`), a numpy array or a
    torch tensor (the fit runs on its device, in float64); spot ``k`` is fitted in frame
    ``frame_index[k]`` on the ``(2 radius + 1)^2`` window around the pixel nearest
    ``(x[k], y[k])``, without the pixels beyond the frame. ``photons``, ``background``
    (per pixel) and ``sigma`` (px) start the fit. ``camera`` gives the noise model (default:
    photons in, Poisson noise and ADU rounding). A spot whose start is not finite is not
    fitted (NaN results); the others do not depend on it.
    """
    start = np.stack([np.asarray(v, float).reshape(-1) for v in (x, y, photons, background)])
    k = start.shape[1]
    finite = np.isfinite(start).all(0)
    result = {name: np.full(k, np.nan) for name in
              ("x", "y", "photons", "background", "sigma", "se_x", "se_y", "se_photons",
               "reduced_chi2")}
    if not finite.any():
        return SpotFits(**result)
    sel = np.flatnonzero(finite)
    win = FitWindows.cut(frames, np.asarray(frame_index, np.int64).reshape(-1)[sel],
                         start[0, sel], start[1, sel], radius)
    p = single_spot_start(win, start[2, sel], start[3, sel], sigma)
    fit = fit_windows(win, p, 1, camera or Camera(), iterations)
    values = torch.cat([fit.params, fit.se[:, [0, 1, 2]], fit.reduced_chi2[:, None]], 1)
    values = values.cpu().numpy()  # one transfer
    for j, name in enumerate(("x", "y", "photons", "background", "sigma", "se_x", "se_y",
                              "se_photons", "reduced_chi2")):
        result[name][sel] = values[:, j]
    return SpotFits(**result)


@dataclass
class FitWindows:
    """The pixels that spots are fitted on: one ``(2 radius + 1)^2`` window per spot, centred
    on the pixel nearest its start ``(x0, y0)``, with the pixels beyond the frame masked out
    (float64 tensors on the frames' device)."""

    data: torch.Tensor  # (n, K, K) photons, 0 where masked
    mask: torch.Tensor  # (n, K, K) bool, True on pixels inside the frame
    rows: torch.Tensor  # (n, K) pixel-centre y of the window's rows
    cols: torch.Tensor  # (n, K) pixel-centre x of the window's columns
    x0: torch.Tensor  # (n,) the starts the windows are centred on
    y0: torch.Tensor
    radius: int

    @classmethod
    def cut(cls, frames, frame_index, x, y, radius: int = FIT_RADIUS_PX) -> "FitWindows":
        """Windows of ``frames`` (T, H, W) photons, numpy or torch, around ``(x[k], y[k])``
        in frame ``frame_index[k]`` (all finite)."""
        frames = frames_tensor(frames)
        dev, f64 = frames.device, torch.float64
        _, h, w = frames.shape
        x0 = torch.as_tensor(np.asarray(x, float), dtype=f64, device=dev)
        y0 = torch.as_tensor(np.asarray(y, float), dtype=f64, device=dev)
        off = torch.arange(-radius, radius + 1, device=dev)
        cols = torch.round(x0).long()[:, None] + off
        rows = torch.round(y0).long()[:, None] + off
        mask = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        fi = torch.as_tensor(np.asarray(frame_index, np.int64), device=dev)
        data = frames[fi[:, None, None], rows.clamp(0, h - 1)[:, :, None],
                      cols.clamp(0, w - 1)[:, None, :]].to(f64)
        data = torch.where(mask, data, torch.zeros((), dtype=f64, device=dev))
        return cls(data, mask, rows.to(f64), cols.to(f64), x0, y0, int(radius))

    def select(self, index) -> "FitWindows":
        """The windows of the spots ``index`` (a torch index or numpy indices)."""
        index = torch.as_tensor(np.asarray(index), device=self.data.device)
        return FitWindows(self.data[index], self.mask[index], self.rows[index],
                          self.cols[index], self.x0[index], self.y0[index], self.radius)


@dataclass
class WindowFits:
    """Results of :func:`fit_windows` (tensors on the windows' device)."""

    params: torch.Tensor  # (n, 3 m + 2): x, y, photons of each of the m spots, background, sigma
    se: torch.Tensor  # (n, 3 m + 2) standard errors (inverse Fisher information), NaN if singular
    cost: torch.Tensor  # (n,) the scaled-Poisson negative log-likelihood (up to a constant)
    reduced_chi2: torch.Tensor  # (n,)


def fit_windows(win: FitWindows, start: torch.Tensor, n_spots: int, camera: Camera,
                iterations: int = FIT_ITERATIONS, reach: float | None = None,
                errors: bool = True) -> WindowFits:
    """Fit ``n_spots`` Gaussian spots with a common background and PSF sigma in each window.

    ``start``: (n, 3 n_spots + 2) float64 starting parameters, laid out as
    :attr:`WindowFits.params`. The spots' centres are kept within ``reach`` (default
    ``radius / 2``) of the window's centre: a fit that wanders off its window is
    meaningless. Costs of fits of different ``n_spots`` on the same windows compare (a
    likelihood-ratio test). ``errors=False`` skips the standard errors (NaN; the costly
    part of a short fit); ``iterations=0`` evaluates ``start`` only.
    """
    n, dev, f64 = start.shape[0], start.device, torch.float64
    n_par = 3 * n_spots + 2
    data, mask, rows, cols = win.data, win.mask, win.rows, win.cols

    def expected(p):
        s = p[:, -1]
        mu = p[:, -2, None, None].expand(-1, rows.shape[1], cols.shape[1])
        columns, d_sigma = [], 0.0
        for i in range(n_spots):
            ex, ex_c, ex_s = integrated_gaussian_1d(p[:, 3 * i], s, cols)
            ey, ey_c, ey_s = integrated_gaussian_1d(p[:, 3 * i + 1], s, rows)
            amp = p[:, 3 * i + 2, None, None]
            psf = ey[:, :, None] * ex[:, None, :]
            mu = mu + amp * psf
            columns += [amp * ey[:, :, None] * ex_c[:, None, :],
                        amp * ey_c[:, :, None] * ex[:, None, :], psf]
            d_sigma = d_sigma + amp * (ey_s[:, :, None] * ex[:, None, :]
                                       + ey[:, :, None] * ex_s[:, None, :])
        return mu, torch.stack(columns + [torch.ones_like(mu), d_sigma], -1)

    # the noise as a scaled Poisson variable: with var = a mu + c, Y = (d + c/a) / a has
    # mean = variance = (mu + c/a) / a, and its Poisson likelihood (consistent with the
    # Fisher-scoring steps below, unbiased on noise-free data) decides which steps to take
    a = camera.excess_noise / camera.qe
    c = float(pixel_variance(0.0, camera))
    scaled = (data + c / a) / a

    def objective(mu):
        lam = ((mu + c / a) / a).clamp_min(1e-9)
        return torch.where(mask, lam - scaled * torch.log(lam), 0.0).sum((1, 2))

    def weights(mu):
        """1 / variance of each window pixel (0 beyond the frame), flattened."""
        return torch.where(mask, 1.0 / pixel_variance(mu, camera), 0.0).reshape(n, -1)

    def information(mu, jac):
        """Fisher information (n, P, P), the weights and the flattened Jacobian."""
        weight = weights(mu)
        flat = jac.reshape(n, -1, n_par)
        return (flat.transpose(1, 2) * weight[:, None, :]) @ flat, weight, flat

    inf = math.inf
    lower = torch.tensor([-inf, -inf, 1.0] * n_spots + [0.01, SIGMA_LIMITS_PX[0]], dtype=f64,
                         device=dev)
    upper = torch.tensor([inf, inf, inf] * n_spots + [inf, SIGMA_LIMITS_PX[1]], dtype=f64,
                         device=dev)
    reach = win.radius / 2 if reach is None else float(reach)
    p = start.clone()
    mu, jac = expected(p)
    cost = objective(mu)
    damping = torch.full((n,), 1e-2, dtype=f64, device=dev)
    eye = torch.eye(n_par, dtype=f64, device=dev)
    stalled = 0
    for _ in range(iterations):
        fisher, weight, flat = information(mu, jac)
        grad = ((weight * (data - mu).reshape(n, -1))[:, None, :] @ flat)[:, 0]
        diag = torch.diagonal(fisher, dim1=1, dim2=2).clamp_min(1e-12)
        lhs = fisher + damping[:, None, None] * eye * diag[:, :, None]
        step = torch.linalg.solve_ex(lhs, grad[..., None])[0][..., 0]  # no raise: NaN stays put
        trial = torch.maximum(torch.minimum(p + step, upper), lower)
        for i in range(n_spots):
            trial[:, 3 * i] = torch.clamp(trial[:, 3 * i], win.x0 - reach, win.x0 + reach)
            trial[:, 3 * i + 1] = torch.clamp(trial[:, 3 * i + 1], win.y0 - reach,
                                              win.y0 + reach)
        mu_t, jac_t = expected(trial)
        cost_t = objective(mu_t)
        better = cost_t < cost
        p = torch.where(better[:, None], trial, p)
        mu = torch.where(better[:, None, None], mu_t, mu)
        jac = torch.where(better[:, None, None, None], jac_t, jac)
        gain = float(torch.where(better, cost - cost_t, 0.0).max()) if n else 0.0
        cost = torch.where(better, cost_t, cost)
        damping = torch.where(better, damping * 0.3, damping * 10.0)
        # converged: two rounds in a row in which no spot's likelihood moved
        stalled = stalled + 1 if gain < 1e-4 else 0
        if stalled == 2:
            break
    if errors:
        fisher, weight, _ = information(mu, jac)
        ok = torch.isfinite(fisher).all(2).all(1)
        cov = torch.linalg.pinv(torch.where(ok[:, None, None], fisher, eye))
        se = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0).sqrt()
        se = torch.where(ok[:, None], se, torch.full_like(se, math.nan))
    else:
        weight = weights(mu)
        se = torch.full_like(p, math.nan)
    n_pix = mask.sum((1, 2))
    chi2 = ((data - mu).reshape(n, -1) ** 2 * weight).sum(1)
    return WindowFits(p, se, cost, chi2 / (n_pix - n_par).clamp_min(1))


def distance_inside(x, y, shape) -> np.ndarray:
    """Distance (px) of positions from the nearest frame border (the outer edges of the
    border pixels); negative outside the frame."""
    h, w = (float(s) for s in shape)
    x, y = np.asarray(x, float), np.asarray(y, float)
    return np.minimum.reduce([x + 0.5, w - 0.5 - x, y + 0.5, h - 0.5 - y])


def border_candidate_threshold(threshold: float) -> float:
    """The probability from which a detection near the border is fitted."""
    return threshold * BORDER_THRESHOLD_RATIO


def refit_border_detections(table, frames, camera: Camera | None, threshold: float,
                            frame_offset: int = 0, device=None) -> np.ndarray:
    """Apply the border rule (module docstring) to one batch of detections.

    ``table``: detections (frame coordinates) decoded down to
    :func:`border_candidate_threshold`; ``frames``: the batch's frames in photons, where
    table frame ``f`` is ``frames[f - frame_offset]``. Returns the kept rows: those at or
    above ``threshold`` away from the border, and the border ones the rule keeps (refitted
    ones get the fit's position, photons, background, sigma and standard errors), ordered
    by frame, then y, then x. ``frames`` may be a tensor already on the fitting device;
    ``device``: where to fit (e.g. the network's GPU; default where ``frames`` are).
    """
    keep = table["prob"] >= threshold
    near = np.flatnonzero((distance_inside(table["x"], table["y"], frames.shape[1:])
                           < BORDER_FIT_BAND_PX)
                          & (table["prob"] >= border_candidate_threshold(threshold)))
    if not len(near):
        return table[keep]
    rows = table[near]
    frames = frames_tensor(frames, device)
    fit = fit_spots(frames, rows["frame"] - frame_offset, rows["x"], rows["y"], rows["photons"],
                    rows["background"], camera)
    trusted = ((fit.reduced_chi2 < MAX_REDUCED_CHI2)
               & (fit.photons > MIN_PHOTON_SIGNIFICANCE * fit.se_photons)
               & (np.hypot(fit.x - rows["x"], fit.y - rows["y"]) < MAX_SHIFT_PX)
               & (fit.sigma > SIGMA_BOUNDS_PX[0]) & (fit.sigma < SIGMA_BOUNDS_PX[1])
               & np.isfinite(fit.se_x) & np.isfinite(fit.se_y))
    idx = near[trusted]
    table = table.copy()
    # the fit's standard errors are a bound for a lone spot on a flat background; a
    # neighbour's light or a sloping background adds error they do not see (refitted spots
    # at 1 emitter/um^2 scatter 1.5x, with a wide PSF 2.4x wider), so the network's own
    # uncertainty is the floor
    for column, values in (("x", fit.x), ("y", fit.y), ("photons", fit.photons),
                           ("background", fit.background), ("sigma", fit.sigma),
                           ("unc_x", np.maximum(fit.se_x, rows["unc_x"])),
                           ("unc_y", np.maximum(fit.se_y, rows["unc_y"]))):
        table[column][idx] = values[trusted]
    keep[idx] = distance_inside(fit.x[trusted], fit.y[trusted], frames.shape[1:]) >= 0
    table = table[keep]
    return table[np.lexsort((table["x"], table["y"], table["frame"]))]  # moved rows re-sorted
