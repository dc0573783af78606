"""Two-spot fits for detections that are two emitters the network reported as one.

Why
    Two emitters closer than about a PSF width blend into one elongated spot, and the
    network then often reports a single emitter between them: one miss, and a position
    that matches neither (or a false detection). This is worst with a narrow PSF, where the
    blend still looks like one sharp spot: on the benchmark's narrow-PSF movie (sigma
    0.8-0.9 px, 1 emitter/um^2) 100 detections split here raise the Jaccard index from 0.907
    to 0.937; at 1 and 3 emitters/um^2 and on filaments it gains 0.004-0.006.

The rule (:func:`split_merged_pairs`)
    Every detection at least :data:`INTERIOR_PX` inside the frame (those nearer the border
    are the border refit's, :mod:`.spotfit`) is fitted as one spot, briefly, on a 5x5
    window. Those that one spot describes badly (reduced chi-square above
    :data:`SUSPECT_REDUCED_CHI2`) are fitted again as two spots of a common PSF width on a
    7x7 window, started half a separation apart along the principal axis of the window's
    light. The pair replaces the detection when

    - it describes the window much better: the negative log-likelihood falls by more than
      :data:`MIN_LIKELIHOOD_GAIN` (the pair has three more parameters: by chance the fall is
      about 1.5, and rarely above 6);
    - both spots are significant (photons at least :data:`MIN_PHOTON_SIGNIFICANCE` standard
      errors above 0) and well placed (position errors below :data:`MAX_POSITION_SE_PX`);
    - the two are :data:`SEPARATION_PX` apart, and their PSF width is plausible;
    - neither lies within :data:`NEIGHBOUR_PX` of another detection of the frame: a "second
      spot" there is that neighbour's light, already reported.

    Both spots keep the detection's probability; their positions, photons, background and
    PSF width are the fit's; their uncertainties the fit's standard errors, floored at the
    network's uncertainty of the blended detection. Every other detection the screen fitted
    gets the screen's PSF width in ``sigma`` (the network does not estimate it), if it has
    none yet; nothing else of it changes.
"""

from __future__ import annotations

import numpy as np
import torch

from .camera import Camera
from .spotfit import (MIN_PHOTON_SIGNIFICANCE, SIGMA_BOUNDS_PX, FitWindows, distance_inside,
                      fit_windows, frames_tensor, single_spot_start)
from .table import concat_tables

#: detections nearer the frame border than this (px) are left to the border refit
INTERIOR_PX = 1.0
#: a single-spot fit with a larger reduced chi-square is a suspect (a wide fitted PSF is not
#: a sign: no benchmark scene split a detection that only that flagged)
SUSPECT_REDUCED_CHI2 = 2.0
#: the pair must lower the negative log-likelihood by more than this
MIN_LIKELIHOOD_GAIN = 10.0
#: both spots' position standard errors must be below this (px)
MAX_POSITION_SE_PX = 0.25
#: the two spots' distance must lie in this range (px)
SEPARATION_PX = (0.5, 3.0)
#: neither spot may lie this close (px) to another detection of the same frame
NEIGHBOUR_PX = 2.0
#: iterations of the single-spot fits that flag suspects (they start at the network's estimate)
SINGLE_ITERATIONS = 3
#: half-width of their windows (px)
SCREEN_RADIUS_PX = 2
#: iterations of the two-spot fits: a first few for all suspects, after which those with a
#: spot within SCREEN_NEIGHBOUR_PX of another detection are dropped, then more for the rest
PAIR_SCREEN_ITERATIONS = 3
SCREEN_NEIGHBOUR_PX = 1.5
PAIR_ITERATIONS = 8
#: spot-detection pairs compared at once in the neighbour test (bounds its memory)
CHUNK_ELEMENTS = 2_000_000
#: the two spots start this far (px) either side of the single-spot fit
START_HALF_SEPARATION_PX = 0.6
#: starting PSF sigma of the pair (px), at most
START_PAIR_SIGMA_PX = 1.3


def split_merged_pairs(table, frames, camera: Camera | None = None, frame_offset: int = 0,
                       device=None):
    """Apply the rule of the module docstring to one batch of detections.

    ``table``: detections in frame coordinates; ``frames``: the batch's frames in photons,
    where table frame ``f`` is ``frames[f - frame_offset]``. Returns the table with each
    split detection replaced by its two spots, ordered by frame, then y, then x, and the
    screened detections' PSF width filled in. ``frames`` may be a tensor already on the
    fitting device; ``device``: where to fit (default where ``frames`` are).
    """
    camera = camera or Camera()
    frames = frames_tensor(frames, device)
    shape = tuple(frames.shape[1:])
    interior = np.flatnonzero(np.isfinite(table["x"]) & np.isfinite(table["y"])
                              & (distance_inside(table["x"], table["y"], shape) >= INTERIOR_PX))
    if not len(interior):
        return table
    rows = table[interior]
    frame_index = rows["frame"].astype(np.int64) - frame_offset
    single = _fit_single(frames, frame_index, rows, camera)
    # the screen's PSF width is a fair estimate (median within 1-2 % of the truth at sigma
    # 0.8-1.5 px, 5 % low at 2 px): rows without a fitted width get it
    table = table.copy()
    width = single.params[:, 4].cpu().numpy()
    fill = np.isnan(rows["sigma"]) & np.isfinite(width)
    table["sigma"][interior[fill]] = width[fill]
    suspects = torch.nonzero(single.reduced_chi2 > SUSPECT_REDUCED_CHI2)[:, 0]  # NaN: False
    if not len(suspects):
        return table
    p1 = single.params[suspects]
    picked = suspects.cpu().numpy()
    which = interior[picked]
    centres = p1[:, :2].cpu().numpy()  # one transfer
    win = FitWindows.cut(frames, frame_index[picked], centres[:, 0], centres[:, 1])
    # spots may run to the window's edge: one drawn to a neighbour's light must get there, to
    # be recognised as that neighbour. Most suspects in crowded frames are such cases, and a
    # few iterations show it: only the others are fitted to the end
    pair = fit_windows(win, _pair_start(win, p1), 2, camera, PAIR_SCREEN_ITERATIONS,
                       reach=win.radius, errors=False)
    alone = np.flatnonzero(~_near_other_detection(table, which, pair.params.cpu().numpy(),
                                                  SCREEN_NEIGHBOUR_PX))
    if not len(alone):
        return table
    win, p1, which = win.select(alone), p1[alone], which[alone]
    pair = fit_windows(win, pair.params[alone], 2, camera, PAIR_ITERATIONS, reach=win.radius)
    # the single fit's cost on the same (recentred) windows, for a fair comparison
    single_here = fit_windows(win, p1.clone(), 1, camera, 0, errors=False)
    ok = _accepted(pair, single_here.cost - pair.cost).cpu().numpy()
    values, errors = pair.params.cpu().numpy(), pair.se.cpu().numpy()
    ok &= ~_near_other_detection(table, which, values, NEIGHBOUR_PX)
    which, values, errors = which[ok], values[ok], errors[ok]
    if not len(which):
        return table
    first, second = table[which].copy(), table[which].copy()
    for spot, part in ((0, first), (1, second)):
        c = 3 * spot
        part["x"], part["y"], part["photons"] = values[:, c], values[:, c + 1], values[:, c + 2]
        # the fit's errors see neither the neighbours' light nor a pair that is really three:
        # alone they are ~1.9x too small; floored at the network's uncertainty of the blend,
        # std(error / uncertainty) is 1.07 (split spots of four benchmark scenes, 2 draws)
        part["unc_x"] = np.maximum(errors[:, c], part["unc_x"])
        part["unc_y"] = np.maximum(errors[:, c + 1], part["unc_y"])
        part["background"], part["sigma"] = values[:, -2], values[:, -1]
    kept = np.ones(len(table), bool)
    kept[which] = False
    out = concat_tables([table[kept], first, second])
    return out[np.lexsort((out["x"], out["y"], out["frame"]))]


def _fit_single(frames, frame_index, rows, camera):
    """One-spot fits of ``rows`` (all finite) in their frames."""
    win = FitWindows.cut(frames, frame_index, rows["x"], rows["y"], SCREEN_RADIUS_PX)
    start = single_spot_start(win, rows["photons"], rows["background"])
    return fit_windows(win, start, 1, camera, SINGLE_ITERATIONS, errors=False)


def _pair_start(win: FitWindows, single: torch.Tensor) -> torch.Tensor:
    """Two spots either side of the single fit, along the principal axis of the window's
    background-subtracted light; half its photons each."""
    x, y, n, b, s = single.unbind(1)
    light = ((win.data - b[:, None, None]).clamp_min(0.0) * win.mask)
    dy = win.rows[:, :, None] - y[:, None, None]
    dx = win.cols[:, None, :] - x[:, None, None]
    total = light.sum((1, 2)) + 1e-9
    cxx = (light * dx * dx).sum((1, 2)) / total
    cyy = (light * dy * dy).sum((1, 2)) / total
    cxy = (light * dx * dy).sum((1, 2)) / total
    angle = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    ux = START_HALF_SEPARATION_PX * torch.cos(angle)
    uy = START_HALF_SEPARATION_PX * torch.sin(angle)
    return torch.stack([x + ux, y + uy, n / 2, x - ux, y - uy, n / 2, b,
                        s.clamp_max(START_PAIR_SIGMA_PX)], 1)


def _accepted(pair, gain: torch.Tensor) -> torch.Tensor:
    """Which pair fits pass the likelihood, significance, precision and shape tests."""
    p, se = pair.params, pair.se
    separation = torch.hypot(p[:, 0] - p[:, 3], p[:, 1] - p[:, 4])
    precision = torch.maximum(torch.hypot(se[:, 0], se[:, 1]), torch.hypot(se[:, 3], se[:, 4]))
    ok = ((gain > MIN_LIKELIHOOD_GAIN)
          & (p[:, 2] > MIN_PHOTON_SIGNIFICANCE * se[:, 2])
          & (p[:, 5] > MIN_PHOTON_SIGNIFICANCE * se[:, 5])
          & (separation > SEPARATION_PX[0]) & (separation < SEPARATION_PX[1])
          & (p[:, -1] > SIGMA_BOUNDS_PX[0]) & (p[:, -1] < SIGMA_BOUNDS_PX[1])
          & (precision < MAX_POSITION_SE_PX))
    return ok & torch.isfinite(precision)


def _near_other_detection(table, which, params, radius: float) -> np.ndarray:
    """Whether either spot of each pair (``params`` rows, fitted for detections ``which``)
    lies within ``radius`` px of another detection of the same frame."""
    near = np.zeros(len(which), bool)
    if not len(which):
        return near
    # each pair is compared with its own frame's detections only (a batch of 1,024 crowded
    # frames holds ~15,000 detections: all against all took a second there)
    order = np.argsort(table["frame"], kind="stable")
    by_frame = table["frame"][order]
    first = np.searchsorted(by_frame, table["frame"][which], "left")
    count = np.searchsorted(by_frame, table["frame"][which], "right") - first
    width = int(count.max())
    step = max(1, CHUNK_ELEMENTS // width)
    for lo in range(0, len(which), step):
        part = slice(lo, lo + step)
        slot = np.arange(width)
        other = order[np.minimum(first[part, None] + slot, len(order) - 1)]
        valid = (slot < count[part, None]) & (other != which[part, None])
        x, y = table["x"][other], table["y"][other]
        for spot in (0, 1):
            dx = params[part, 3 * spot, None] - x
            dy = params[part, 3 * spot + 1, None] - y
            near[part] |= (valid & (dx * dx + dy * dy < radius ** 2)).any(1)
    return near
