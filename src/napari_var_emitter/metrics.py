"""Localisation metrics (SMLM-challenge style) and Cramer-Rao lower bounds.

Matching is per frame and optimal: :func:`match_frame` solves the assignment problem
(``scipy.optimize.linear_sum_assignment``) so that the number of pairs within the tolerance
is maximal and, among such matchings, the summed distance is minimal. A greedy
nearest-first matching can lose pairs that an optimal one keeps.

:func:`evaluate_tables` returns plain Python numbers (JSON-ready); a ratio or error that is
undefined (no emitters, no matches) is ``nan``.

The Cramer-Rao bound is given two ways: Mortensen et al. (Nat. Methods 2010) closed form
for the MLE of a Gaussian PSF on an infinite pixel grid (:func:`crlb_mortensen`), and the
exact Fisher information of the pixelated, possibly truncated (frame edge) Gaussian with
x, y, photons and background unknown (:func:`crlb_pixelwise`, :func:`crlb_for_table`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import spence

from .spotfit import distance_inside, integrated_gaussian_1d
from .table import LOC_DTYPE

__all__ = [
    "match_frame",
    "match_tables",
    "efficiency",
    "evaluate_tables",
    "crlb_mortensen",
    "crlb_pixelwise",
    "crlb_for_table",
    "crlb_rmse_nm",
]


# ==========================================================================================
# matching
def match_frame(truth_xy, pred_xy, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimally match two point sets of one frame; return index arrays ``(ti, pi)``.

    ``truth_xy`` (n, 2) and ``pred_xy`` (m, 2) are in the same unit as ``tolerance``.
    Pairs farther apart than ``tolerance`` are never matched (distance == tolerance is a
    match). The matching has the largest possible number of pairs, and among those the
    smallest summed distance. Pairs are returned sorted by truth index.
    """
    t = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    empty = (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp))
    if len(t) == 0 or len(p) == 0:
        return empty
    dist = np.hypot(t[:, None, 0] - p[None, :, 0], t[:, None, 1] - p[None, :, 1])
    within = dist <= tolerance
    # drop rows/columns that cannot match at all: smaller assignment problems
    rows = np.flatnonzero(within.any(axis=1))
    cols = np.flatnonzero(within.any(axis=0))
    if len(rows) == 0:
        return empty
    d = dist[np.ix_(rows, cols)]
    ok = within[np.ix_(rows, cols)]
    # An out-of-tolerance pair costs more than any k+1 in-tolerance pairs together
    # (k+1 <= min(n, m)), so trading one out-of-tolerance pair for an in-tolerance one
    # always lowers the total: the optimum maximises the number of valid matches first.
    n_max = min(d.shape)
    big = (n_max + 1) * max(float(tolerance), 1e-12) + 1.0
    cost = np.where(ok, d, big)
    r, c = linear_sum_assignment(cost)
    keep = ok[r, c]
    ti, pi = rows[r[keep]], cols[c[keep]]
    order = np.argsort(ti, kind="stable")
    return ti[order], pi[order]


def _frame_groups(frames: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(frames, kind="stable")
    f = frames[order]
    uniq, starts = np.unique(f, return_index=True)
    ends = np.append(starts[1:], len(f))
    return {int(u): order[s:e] for u, s, e in zip(uniq, starts, ends)}


def match_tables(truth, pred, tolerance_nm: float = 250.0,
                 pixel_size_nm: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Match two localisation tables frame by frame; return global index arrays ``(ti, pi)``."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    tol_px = float(tolerance_nm) / float(pixel_size_nm)
    tg = _frame_groups(truth["frame"])
    pg = _frame_groups(pred["frame"])
    ti_all, pi_all = [], []
    for f, tidx in tg.items():
        pidx = pg.get(f)
        if pidx is None:
            continue
        txy = np.stack([truth["x"][tidx], truth["y"][tidx]], axis=1)
        pxy = np.stack([pred["x"][pidx], pred["y"][pidx]], axis=1)
        ti, pi = match_frame(txy, pxy, tol_px)
        ti_all.append(tidx[ti])
        pi_all.append(pidx[pi])
    if not ti_all:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    return np.concatenate(ti_all), np.concatenate(pi_all)


def efficiency(jaccard: float, rmse_nm: float) -> float:
    """SMLM-challenge 2D efficiency ``100 - sqrt((100 (1 - JI))^2 + (1/nm * RMSE)^2)``."""
    return float(100.0 - math.sqrt((100.0 * (1.0 - jaccard)) ** 2 + float(rmse_nm) ** 2))


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def evaluate_tables(truth, pred, tolerance_nm: float = 250.0, pixel_size_nm: float = 100.0,
                    n_frames: int | None = None, camera=None,
                    image_shape: tuple[int, int] | None = None) -> dict:
    """Compare predicted localisations with the truth (both LOC_DTYPE tables, input px).

    Returns a dict of plain numbers: ``jaccard, recall, precision, rmse_nm`` (lateral,
    ``sqrt(mean(dx^2 + dy^2))``), ``rmse_x_nm, rmse_y_nm, bias_x_nm, bias_y_nm``
    (mean pred - true), ``efficiency``, ``count_mae`` (mean over frames of
    ``|n_pred - n_true|``; frames = those with any emitter in either table, plus
    ``0..n_frames-1`` when given), ``n_true, n_pred, tp, fp, fn``, and
    ``calibration_x/y``: the std of ``(pred - true) / unc`` over matches whose predicted
    uncertainty is finite (1 = well calibrated, > 1 overconfident).

    With ``image_shape`` (H, W), ``recall_border`` and ``n_true_border`` are added: the recall
    of the true emitters inside the frame and within :data:`BORDER_BAND_PX` of its border
    (spots cut by it).
    With a :class:`~napari_var_emitter.camera.Camera`, ``crlb_rmse_nm`` is added: the
    lateral CRLB (pixelwise Fisher, edge truncation when ``image_shape`` is given) of the
    matched true emitters, i.e. the RMSE an efficient estimator would reach on them.
    """
    truth = np.asarray(truth, dtype=LOC_DTYPE) if len(truth) else np.zeros(0, LOC_DTYPE)
    pred = np.asarray(pred, dtype=LOC_DTYPE) if len(pred) else np.zeros(0, LOC_DTYPE)
    px = float(pixel_size_nm)
    ti, pi = match_tables(truth, pred, tolerance_nm, px)
    tp = int(len(ti))
    n_true, n_pred = int(len(truth)), int(len(pred))
    fn, fp = n_true - tp, n_pred - tp
    dx = (pred["x"][pi] - truth["x"][ti]) * px
    dy = (pred["y"][pi] - truth["y"][ti]) * px
    nan = float("nan")
    jaccard = _ratio(tp, tp + fp + fn)
    rmse = float(np.sqrt(np.mean(dx ** 2 + dy ** 2))) if tp else nan
    result = {
        "jaccard": jaccard,
        "recall": _ratio(tp, n_true),
        "precision": _ratio(tp, n_pred),
        "rmse_nm": rmse,
        "rmse_x_nm": float(np.sqrt(np.mean(dx ** 2))) if tp else nan,
        "rmse_y_nm": float(np.sqrt(np.mean(dy ** 2))) if tp else nan,
        "bias_x_nm": float(np.mean(dx)) if tp else nan,
        "bias_y_nm": float(np.mean(dy)) if tp else nan,
        "efficiency": efficiency(jaccard, rmse) if tp else nan,
        "count_mae": _count_mae(truth["frame"], pred["frame"], n_frames),
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": tp,
        "fp": int(fp),
        "fn": int(fn),
        "tolerance_nm": float(tolerance_nm),
    }
    for axis, err in (("x", dx / px), ("y", dy / px)):
        unc = pred["unc_" + axis][pi]
        ok = np.isfinite(unc) & (unc > 0)
        result["calibration_" + axis] = float(np.std(err[ok] / unc[ok])) if ok.sum() >= 2 else nan
    if image_shape is not None:
        # half-cut spots at the frame border are the hardest isolated emitters (and the
        # border band is ~10 % of a 40x40 frame): their recall is reported on its own
        d = border_distance_px(truth, image_shape)
        border = (d >= 0) & (d < BORDER_BAND_PX)  # rows outside the frame are not border spots
        result["n_true_border"] = int(border.sum())
        result["recall_border"] = _ratio(int(border[ti].sum()), int(border.sum()))
    if camera is not None:
        result["crlb_rmse_nm"] = crlb_rmse_nm(truth[ti], px, camera=camera, shape=image_shape) \
            if tp else nan
    return result


#: density bands (true emitters per um^2 of a tile) that validation reports on their own:
#: pooled scores are dominated by dense tiles, which hold most emitters, so a model that
#: fires on background noise in sparse tiles hardly moves them
DENSITY_BANDS = (("sparse", 0.0, 0.5), ("medium", 0.5, 2.0), ("dense", 2.0, float("inf")))


def evaluate_by_density(truths, preds, area_um2: float, tolerance_nm: float = 250.0,
                        pixel_size_nm: float = 100.0) -> dict:
    """Scores of tiles grouped by their true density (:data:`DENSITY_BANDS`).

    ``truths`` and ``preds`` are lists of per-tile tables (any ``frame`` values) and
    ``area_um2`` the area of one tile. Returns ``{"<band>_<metric>": value}`` for
    ``jaccard, recall, precision, efficiency`` and ``<band>_tiles`` (the number of tiles),
    for every band that holds at least one tile.
    """
    from .table import concat_tables

    density = np.array([len(t) for t in truths], float) / float(area_um2)
    out = {}
    for name, lo, hi in DENSITY_BANDS:
        idx = np.flatnonzero((density >= lo) & (density < hi))
        if not len(idx):
            continue
        tt, pp = [], []
        for k, i in enumerate(idx):  # one frame number per tile of the band
            t, p = np.array(truths[i], copy=True), np.array(preds[i], copy=True)
            t["frame"] = k
            p["frame"] = k
            tt.append(t)
            pp.append(p)
        ev = evaluate_tables(concat_tables(tt), concat_tables(pp), tolerance_nm, pixel_size_nm,
                             n_frames=len(idx))
        out[f"{name}_tiles"] = int(len(idx))
        for key in ("jaccard", "recall", "precision", "efficiency"):
            out[f"{name}_{key}"] = float(ev[key])
    return out


#: width (input px) of the frame-border band whose recall ``evaluate_tables`` reports
BORDER_BAND_PX = 1.0


def border_distance_px(table, image_shape) -> np.ndarray:
    """Distance (input px) of each row of ``table`` from the nearest frame border (the outer
    edges of the border pixels, ``-0.5`` and ``size - 0.5``); negative outside the frame."""
    return distance_inside(table["x"], table["y"], image_shape)


def _count_mae(tf: np.ndarray, pf: np.ndarray, n_frames) -> float:
    frames = np.union1d(tf, pf)
    if n_frames is not None:
        frames = np.union1d(frames, np.arange(int(n_frames)))
    if len(frames) == 0:
        return float("nan")
    nt = np.searchsorted(np.sort(tf), frames, side="right") - np.searchsorted(np.sort(tf),
                                                                               frames)
    npr = np.searchsorted(np.sort(pf), frames, side="right") - np.searchsorted(np.sort(pf),
                                                                                frames)
    return float(np.mean(np.abs(npr - nt)))


# ==========================================================================================
# Cramer-Rao bounds
def crlb_mortensen(photons, background, sigma_nm, pixel_nm, emccd: bool = False):
    """Mortensen et al. (2010) MLE localisation bound, nm per axis.

    ``sigma_a^2 = sigma^2 + a^2/12``, ``tau = 2 pi sigma_a^2 b / (N a^2)``,
    ``Var = F sigma_a^2 / N / (1 + int_0^1 ln t / (1 + t/tau) dt)`` with F = 2 for an
    EMCCD (excess noise) and 1 otherwise. ``photons`` N and ``background`` b (per pixel)
    are detected photons. The integral equals ``tau * Li2(-1/tau)``. Broadcasts over arrays.
    """
    n = np.asarray(photons, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    s = np.asarray(sigma_nm, dtype=np.float64)
    a = np.asarray(pixel_nm, dtype=np.float64)
    sa2 = s ** 2 + a ** 2 / 12.0
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = 2.0 * np.pi * sa2 * b / (n * a ** 2)
        # Li2(z) = spence(1 - z) in SciPy's convention; tau -> 0 (no background): integral -> 0
        integral = np.where(tau > 0, tau * spence(1.0 + 1.0 / np.where(tau > 0, tau, 1.0)), 0.0)
        var = (2.0 if emccd else 1.0) * sa2 / n / (1.0 + integral)
    out = np.sqrt(var)
    return float(out) if out.ndim == 0 else out


def _fisher_std(photons, background, sigma, x0, y0, xs, ys, mx, my, excess, read_var):
    """Per-axis CRLB std (px) from the exact Fisher matrix over the (masked) pixel window.

    All emitter parameters (n,); xs, ys (n, K) pixel centres; mx, my (n, K) masks of
    pixels that exist (inside the image).
    """
    ex, dex, _ = integrated_gaussian_1d(x0, sigma, xs)
    ey, dey, _ = integrated_gaussian_1d(y0, sigma, ys)
    n = photons[:, None, None]
    shape_xy = ey[:, :, None] * ex[:, None, :]  # (n, Ky, Kx) indexed [row=y, col=x]
    mu = n * shape_xy + background[:, None, None]
    var = excess * mu + read_var
    mask = my[:, :, None] & mx[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(mask & (var > 0), 1.0 / var, 0.0)
    grads = [
        n * ey[:, :, None] * dex[:, None, :],  # d mu / d x0
        n * dey[:, :, None] * ex[:, None, :],  # d mu / d y0
        shape_xy,                              # d mu / d N
        np.ones_like(shape_xy),                # d mu / d b
    ]
    fisher = np.empty((len(photons), 4, 4))
    for i in range(4):
        gw = grads[i] * w
        for j in range(i, 4):
            fisher[:, i, j] = fisher[:, j, i] = np.sum(gw * grads[j], axis=(1, 2))
    std = np.full((len(photons), 2), np.nan)
    ok = np.isfinite(fisher).all(axis=(1, 2))
    if ok.any():
        cov = np.full((int(ok.sum()), 4, 4), np.nan)
        det = np.linalg.det(fisher[ok])
        inv_ok = np.abs(det) > 0
        if inv_ok.any():
            cov[inv_ok] = np.linalg.inv(fisher[ok][inv_ok])
        with np.errstate(invalid="ignore"):
            std[ok] = np.sqrt(np.stack([cov[:, 0, 0], cov[:, 1, 1]], axis=1))
    return std


def crlb_pixelwise(photons: float, background: float, sigma_px: float, shape=(15, 15),
                   x0: float | None = None, y0: float | None = None, emccd: bool = False,
                   read_noise_e: float = 0.0) -> tuple[float, float]:
    """Exact Cramer-Rao bound (std per axis, px) of a Gaussian spot on a pixel grid.

    The image is ``shape`` = (H, W) pixels (pixel-centre convention), the emitter at
    ``(x0, y0)`` (default: the centre), with ``photons`` in the spot (the full Gaussian;
    light falling outside the image is lost) and ``background`` photons per pixel; x, y,
    photons and background are all unknown. Noise per pixel: Poisson (variance mu), times
    2 for an EMCCD (excess noise factor), plus Gaussian read noise of ``read_noise_e``
    (photoelectrons rms, sCMOS-like). Fisher: ``I_ij = sum_k d_i mu_k d_j mu_k / var_k``.
    """
    h, w = (int(n) for n in shape)
    x0 = (w - 1) / 2.0 if x0 is None else float(x0)
    y0 = (h - 1) / 2.0 if y0 is None else float(y0)
    xs = np.arange(w, dtype=np.float64)[None, :]
    ys = np.arange(h, dtype=np.float64)[None, :]
    std = _fisher_std(np.array([float(photons)]), np.array([float(background)]),
                      np.array([float(sigma_px)]), np.array([x0]), np.array([y0]), xs, ys,
                      np.ones_like(xs, dtype=bool), np.ones_like(ys, dtype=bool),
                      2.0 if emccd else 1.0, float(read_noise_e) ** 2)
    return float(std[0, 0]), float(std[0, 1])


def _camera_noise(camera, emccd, read_noise_e, qe):
    if camera is None:
        return bool(emccd), float(read_noise_e), float(qe)
    # read noise is added after the EM register: referred to photoelectrons it shrinks by g
    return camera.is_emccd, float(camera.read_noise) / float(camera.em_gain), float(camera.qe)


def crlb_for_table(table, pixel_nm: float, emccd: bool = False, read_noise_e: float = 0.0,
                   qe: float = 1.0, shape: tuple[int, int] | None = None, camera=None,
                   method: str = "pixelwise", chunk: int = 4096) -> np.ndarray:
    """Per-emitter CRLB (std, nm) as an (n, 2) array of x and y bounds.

    Uses each emitter's ``photons`` (incident; detected = photons * qe), ``background``
    (photons per pixel, incident) and ``sigma`` (PSF sigma, px). ``method="pixelwise"``
    (default) evaluates the exact Fisher matrix around the emitter; with ``shape`` = (H, W)
    pixels outside the image are missing, so emitters at the edge get their larger bound.
    ``method="mortensen"`` uses the closed form. A ``camera``
    (:class:`~napari_var_emitter.camera.Camera`) sets ``emccd``, ``qe`` and the read noise
    (referred to photoelectrons, divided by the EM gain). Emitters lacking photons, sigma
    or background get NaN.
    """
    t = np.asarray(table)
    emccd, read_noise_e, qe = _camera_noise(camera, emccd, read_noise_e, qe)
    out = np.full((len(t), 2), np.nan)
    if len(t) == 0:
        return out
    photons = t["photons"].astype(np.float64) * qe
    background = t["background"].astype(np.float64) * qe
    sigma = t["sigma"].astype(np.float64)
    valid = (np.isfinite(photons) & (photons > 0) & np.isfinite(background)
             & (background >= 0) & np.isfinite(sigma) & (sigma > 0)
             & np.isfinite(t["x"]) & np.isfinite(t["y"]))
    if method == "mortensen":
        # Gaussian read noise of variance r^2 acts like r^2 / F extra background photons
        b_eff = background[valid] + read_noise_e ** 2 / (2.0 if emccd else 1.0)
        m = crlb_mortensen(photons[valid], b_eff, sigma[valid] * pixel_nm, pixel_nm, emccd)
        out[valid, 0] = out[valid, 1] = m
        return out
    if method != "pixelwise":
        raise ValueError(f"unknown CRLB method {method!r} (pixelwise or mortensen)")
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return out
    # window: +-(4 sigma + 2) px holds all but ~1e-8 of the spot's light
    half = int(min(np.ceil(4.0 * sigma[idx].max() + 2.0), 40))
    offs = np.arange(-half, half + 1, dtype=np.float64)[None, :]
    excess = 2.0 if emccd else 1.0
    for s in range(0, len(idx), chunk):
        sel = idx[s:s + chunk]
        x0, y0 = t["x"][sel].astype(np.float64), t["y"][sel].astype(np.float64)
        xs = np.round(x0)[:, None] + offs
        ys = np.round(y0)[:, None] + offs
        if shape is not None:
            h, w = shape
            mx = (xs >= 0) & (xs <= w - 1)
            my = (ys >= 0) & (ys <= h - 1)
        else:
            mx = np.ones_like(xs, dtype=bool)
            my = np.ones_like(ys, dtype=bool)
        std = _fisher_std(photons[sel], background[sel], sigma[sel], x0, y0, xs, ys, mx, my,
                          excess, read_noise_e ** 2)
        out[sel] = std * pixel_nm
    return out


def crlb_rmse_nm(table, pixel_nm: float, **kwargs) -> float:
    """Lateral CRLB over a table: ``sqrt(mean(crlb_x^2 + crlb_y^2))`` in nm.

    Directly comparable with ``rmse_nm`` of :func:`evaluate_tables` (the RMSE an
    efficient, unbiased estimator would reach on these emitters). Emitters without the
    needed fields are left out; NaN when none is usable. ``kwargs`` go to
    :func:`crlb_for_table`.
    """
    b = crlb_for_table(table, pixel_nm, **kwargs)
    lateral = b[:, 0] ** 2 + b[:, 1] ** 2
    lateral = lateral[np.isfinite(lateral)]
    return float(np.sqrt(np.mean(lateral))) if len(lateral) else float("nan")
