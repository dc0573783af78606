"""Structured losses of the original design: count, localisation, reconstruction, uncertainty.

All terms work on the model's output dict (:meth:`~.model.VarEmitterNet.forward`) and a
target dict of torch tensors:

- ``xy`` (B, N, 2): true emitter positions (x, y) in input pixels (pixel-centre convention),
- ``mask`` (B, N) bool: which of the N slots are real emitters (the rest is padding),
- ``photons`` (B, N), optional: true photon counts,
- ``background`` (B, H, W), optional: true background, photons per input pixel.

Only emitters inside the frame (``-0.5 <= x < W - 0.5``, same for y) count: an emitter
outside cannot be claimed by any map pixel. Every term is computed in float32 whatever the
autocast dtype, with log-space mixtures (logsumexp), bounded sigmas and a continuity-
corrected count likelihood so nothing overflows. Samples without emitters are fine: the
count term still pushes the summed probability to zero, the per-emitter terms skip them.

Per scale ``f`` (maps upsampled by ``f``) and the model's factors ``f_i``:
``total = sum_i scale_weights[i] * ramp(f_i) * (count_w*Count + loc_w*Loc + unc_w*Unc
+ background_w*Bg [+ photon_w*Photon in l2 mode]) + recon_w*Recon + vq_w*VQ``; in "gmm"
mode the photon term lives inside the mixture (its log-density weighted by photon_w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


# -- helpers ------------------------------------------------------------------------------

def in_frame(xy: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``mask`` restricted to emitters inside the frame of ``height`` x ``width`` input px."""
    x, y = xy[..., 0], xy[..., 1]
    inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return mask.bool() & inside


def containing_pixel(xy: torch.Tensor, factor: int, height: int, width: int):
    """Map pixel (row, col) (long, clamped to the map) containing each position of ``xy``.

    Map pixel ``j`` of a map upsampled by ``factor`` covers input coordinates
    ``[(j)/f - 0.5, (j + 1)/f - 0.5)``; its centre is ``(j + 0.5)/f - 0.5``.
    """
    col = torch.floor((xy[..., 0] + 0.5) * factor).long().clamp(0, width - 1)
    row = torch.floor((xy[..., 1] + 0.5) * factor).long().clamp(0, height - 1)
    return row, col


def pixel_centre(index: torch.Tensor, factor: int) -> torch.Tensor:
    """Input coordinate of the centre of map pixel ``index`` at scale ``factor``."""
    return (index.float() + 0.5) / factor - 0.5


def gather_map(m: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Values of maps ``m`` (B, H, W) at (row, col) of shape (B, ...) -> (B, ...)."""
    b, h, w = m.shape
    flat = (row * w + col).reshape(b, -1)
    return m.reshape(b, -1).float().gather(1, flat).reshape(row.shape)


def gather_maps(maps: list, row: torch.Tensor, col: torch.Tensor) -> list:
    """Like :func:`gather_map` for several maps at once (one gather: cheaper backward)."""
    stacked = torch.stack([m.float() for m in maps], dim=1)  # (B, C, H, W)
    b, c, h, w = stacked.shape
    flat = (row * w + col).reshape(b, 1, -1).expand(b, c, -1)
    values = stacked.reshape(b, c, -1).gather(2, flat)
    return [v.reshape(row.shape) for v in values.unbind(1)]


def log_normal_pdf(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log density of Normal(mean, sigma) at x (elementwise)."""
    z = (x - mean) / sigma
    return -0.5 * z * z - torch.log(sigma) - 0.5 * LOG_2PI


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate at both ends (Maechler 2012)."""
    d = d.clamp(max=-1e-7)
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _per_emitter_denominator(n: torch.Tensor) -> torch.Tensor:
    return n.sum().clamp_min(1.0)


def _tensors(out: dict):
    """Tensors in the model output (to find its device)."""
    for v in out.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):
            yield from _tensors(v)


# -- terms ---------------------------------------------------------------------------------

class CountLoss:
    """Negative log-likelihood of the true emitter count of each sample.

    The number of detections is Poisson-binomial over the per-pixel Bernoulli
    probabilities ``p``; it is approximated by a Gaussian with mean ``sum p`` and variance
    ``sum p (1 - p) + var_floor``, and the likelihood of the integer count ``n`` is the
    Gaussian mass of ``[n - 1/2, n + 1/2]`` (continuity correction). Unlike a density, this
    probability is at most 1, so the loss is >= 0, is smallest when ``sum p = n`` with
    confident pixels, and does not run to minus infinity when every ``p`` goes to 0 on an
    empty frame. ``var_floor`` keeps the gradient bounded when the map is confident and
    the count is off.
    """

    def __init__(self, var_floor: float = 0.05):
        self.var_floor = float(var_floor)

    def __call__(self, prob: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``prob`` (B, H, W), ``count`` (B,) -> per-sample NLL (B,)."""
        p = prob.float().flatten(1)
        mean = p.sum(1)
        std = torch.sqrt((p * (1 - p)).sum(1) + self.var_floor)
        n = count.float()
        a = (n - 0.5 - mean) / std
        b = (n + 0.5 - mean) / std
        # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): evaluate in whichever tail is not close to 1.
        flip = a > 0
        lo = torch.where(flip, -b, a)
        hi = torch.where(flip, -a, b)
        log_hi = torch.special.log_ndtr(hi)
        log_lo = torch.special.log_ndtr(lo)
        return -(log_hi + _log1mexp(log_lo - log_hi))


class LocalizationLoss:
    """Localisation term; ``mode="gmm"`` (DECODE-like mixture) or ``"l2"`` (assigned pixel).

    gmm: per frame, a mixture over map pixels with weights ``p_k / sum p``; component ``k``
    is an independent Normal over x and y centred at its pixel centre + offset with the
    predicted sigmas, and (when photons are given) a log-normal over photons with a fixed
    relative spread ``photon_rel_sigma`` whose log-density is weighted by ``photon_weight``.
    The loss is minus the log-likelihood of the true emitters (per emitter). Components
    farther than ``window_px`` input px (plus the pixel) from an emitter are left out of its
    sum: their offsets are bounded to one map pixel, so they can reach it only through a
    huge sigma, and leaving them out keeps the cost at (window)^2 per emitter instead of
    the whole map (the weights are still normalised over the whole map). With
    ``trains_sigma=False`` the sigmas enter as constants (only :class:`UncertaintyLoss`
    trains them; see ``LossConfig.loc_trains_sigma``).

    l2: each true emitter belongs to the map pixel that contains it; squared offset error
    there (in map pixels) plus a detection BCE summed over the map (assigned pixels 1, all
    others 0) so this mode trains on its own (both divided by the emitter count); photon
    error as the log-normal NLL at the assigned pixel, weighted by ``photon_weight``.

    ``__call__`` returns ``(per-sample loss sum (B,), emitters per sample (B,), extra logs)``.
    """

    def __init__(self, mode: str = "gmm", photon_weight: float = 0.1,
                 photon_rel_sigma: float = 0.2, window_px: float = 1.5,
                 trains_sigma: bool = True):
        if mode not in ("gmm", "l2"):
            raise ValueError(f"loc mode must be 'gmm' or 'l2', got {mode!r}")
        self.mode = mode
        self.trains_sigma = bool(trains_sigma)
        self.photon_weight = float(photon_weight)
        self.photon_rel_sigma = float(photon_rel_sigma)
        self.window_px = float(window_px)

    def __call__(self, maps: dict, factor: int, xy, mask, photons=None):
        if self.mode == "gmm":
            return self._gmm(maps, factor, xy, mask, photons)
        return self._l2(maps, factor, xy, mask, photons)

    def _photon_log_density(self, log_true: torch.Tensor, predicted: torch.Tensor):
        """Log-normal log density (fixed relative spread) of true photons given predicted."""
        s = torch.full_like(predicted, self.photon_rel_sigma)
        return log_normal_pdf(log_true, torch.log(predicted.clamp_min(1e-3)), s)

    def _gmm(self, maps, factor, xy, mask, photons):
        logit = maps["logit"].float()
        b, h, w = logit.shape
        xy = xy.float()
        log_p = F.logsigmoid(logit)
        log_norm = torch.logsumexp(log_p.flatten(1), dim=1)  # log sum_k p_k
        half = max(1, math.ceil(self.window_px * factor))
        d = torch.arange(-half, half + 1, device=logit.device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        row0, col0 = containing_pixel(xy, factor, h, w)
        rows = row0[..., None] + dy.reshape(-1)  # (B, N, K)
        cols = col0[..., None] + dx.reshape(-1)
        valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        use_photons = photons is not None and self.photon_weight > 0
        names = ["offset_x", "offset_y", "sigma_x", "sigma_y"]
        if use_photons:
            names.append("photons")
        g = gather_maps([log_p] + [maps[k] for k in names], rows, cols)
        if not self.trains_sigma:  # the component widths are the uncertainty term's business
            g[3], g[4] = g[3].detach(), g[4].detach()
        mux = pixel_centre(cols, factor) + g[1]
        muy = pixel_centre(rows, factor) + g[2]
        comp = (g[0] - log_norm[:, None, None]
                + log_normal_pdf(xy[..., 0:1], mux, g[3])
                + log_normal_pdf(xy[..., 1:2], muy, g[4]))
        if use_photons:
            pred = g[5]
            log_true = torch.log(photons.float().clamp_min(1.0))[..., None]
            comp = comp + self.photon_weight * self._photon_log_density(log_true, pred)
        comp = comp.masked_fill(~valid, float("-inf"))
        log_lik = torch.logsumexp(comp, dim=2)  # (B, N)
        m = mask.float()
        nll = -(torch.where(mask, log_lik, torch.zeros_like(log_lik)) * m).sum(1)
        return nll, m.sum(1), {}

    def _l2(self, maps, factor, xy, mask, photons):
        logit = maps["logit"].float()
        b, h, w = logit.shape
        xy = xy.float()
        row, col = containing_pixel(xy, factor, h, w)
        m = mask.float()
        ex = (xy[..., 0] - pixel_centre(col, factor) - gather_map(maps["offset_x"], row, col))
        ey = (xy[..., 1] - pixel_centre(row, factor) - gather_map(maps["offset_y"], row, col))
        offset = ((ex * factor) ** 2 + (ey * factor) ** 2) * m
        # Padded slots "write" 0 with amax, so they never clear a real emitter's pixel.
        target = torch.zeros(b, h * w, device=logit.device)
        target.scatter_reduce_(1, row * w + col, m, reduce="amax", include_self=True)
        bce = F.binary_cross_entropy_with_logits(logit.flatten(1), target, reduction="none").sum(1)
        n = m.sum(1)
        loss = offset.sum(1) + bce
        extra = {"offset_l2": offset.sum() / _per_emitter_denominator(n)}
        if photons is not None and self.photon_weight > 0:
            pred = gather_map(maps["photons"], row, col)
            log_true = torch.log(photons.float().clamp_min(1.0))
            ph = -self._photon_log_density(log_true, pred) * m
            loss = loss + self.photon_weight * ph.sum(1)
            extra["photon"] = ph.sum() / _per_emitter_denominator(n)
        return loss, n, extra


class UncertaintyLoss:
    """Calibration of the predicted sigmas for the position the decoder reports.

    :func:`~.inference.decode_maps` reports, for each detection, the probability-weighted
    mean position and sigma over a window of ``2f + 1`` map pixels around a candidate peak
    (pixels shared with neighbouring candidates count in part). This term rebuilds that
    estimator for each true emitter as if it were isolated: the window is centred on the
    pixel of the 3x3 neighbourhood of the containing pixel with the most windowed mass (for
    an isolated compact blob the decoder's peak too; the decoder of sessions 1-5 used this
    exact rule, and the bundled model was trained with it), the
    position is the weighted mean there (detached: this term only moves the sigmas) and the
    sigma the weighted mean sigma. Loss: Gaussian NLL of the true position, summed over x
    and y, plus ``floor_weight * relu(log(floor) - log sigma)^2`` so sigmas cannot collapse
    below ``floor_px`` input px on lucky exact hits. Calibrating a single pixel's sigma
    instead made the shipped sigmas about 1.5x too large when sparse: the decoder's
    windowed mean is more precise than any one pixel's estimate.

    Only emitters the decoder would report count, as in the calibration users measure
    (matched detections): windowed mass at least ``detect_mass`` and the estimate within
    ``match_px`` input px of the truth on both axes. Undetected emitters' "estimates" are
    noise and would only inflate every sigma.
    Returns ``(per-sample sum (B,), emitters per sample (B,))``.
    """

    def __init__(self, floor_px: float = 0.01, floor_weight: float = 1.0,
                 detect_mass: float = 0.5, match_px: float = 2.5):
        self.log_floor = math.log(floor_px)
        self.floor_weight = float(floor_weight)
        self.detect_mass = float(detect_mass)
        self.match_px = float(match_px)

    def __call__(self, maps: dict, factor: int, xy, mask):
        prob = maps["prob"].detach().float()
        b, h, w = prob.shape
        xy = xy.float()
        half = int(factor)
        k = 2 * half + 1
        mass = F.avg_pool2d(prob[:, None], k, 1, half, count_include_pad=True)[:, 0]
        row0, col0 = containing_pixel(xy, factor, h, w)
        d = torch.arange(-1, 2, device=prob.device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        rows = (row0[..., None] + dy.reshape(-1)).clamp(0, h - 1)
        cols = (col0[..., None] + dx.reshape(-1)).clamp(0, w - 1)
        mass_3x3 = gather_map(mass, rows, cols)
        best = mass_3x3.argmax(dim=2, keepdim=True)
        detected = mass_3x3.gather(2, best)[..., 0] * (k * k) >= self.detect_mass
        row_c = rows.gather(2, best)
        col_c = cols.gather(2, best)
        d = torch.arange(-half, half + 1, device=prob.device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        rows = row_c + dy.reshape(-1)  # (B, N, k*k)
        cols = col_c + dx.reshape(-1)
        valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).float()
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        g = gather_maps([prob, maps["offset_x"].detach(), maps["offset_y"].detach(),
                         maps["sigma_x"], maps["sigma_y"]], rows, cols)
        # A tiny uniform weight keeps the mean defined where every probability underflows.
        wgt = (g[0] + 1e-8) * valid
        wgt = wgt / wgt.sum(2, keepdim=True)
        mux = (wgt * (pixel_centre(cols, factor) + g[1])).sum(2)
        muy = (wgt * (pixel_centre(rows, factor) + g[2])).sum(2)
        sx = (wgt * g[3]).sum(2)
        sy = (wgt * g[4]).sum(2)
        nll = -(log_normal_pdf(xy[..., 0], mux, sx) + log_normal_pdf(xy[..., 1], muy, sy))
        reg = (F.relu(self.log_floor - torch.log(sx)) ** 2
               + F.relu(self.log_floor - torch.log(sy)) ** 2)
        close = ((xy[..., 0] - mux).abs() < self.match_px) & ((xy[..., 1] - muy).abs()
                                                              < self.match_px)
        used = mask & detected & close
        per = torch.where(used, nll + self.floor_weight * reg, torch.zeros_like(nll))
        return per.sum(1), used.float().sum(1)


class ReconstructionLoss:
    """Mean squared error between the reconstruction and its target (normalised frame)."""

    def __call__(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon.float(), target.float().detach())


#: the background error's noise unit is at least this times the square root of the tile's
#: mean true background (its shot noise, photons)
BACKGROUND_UNIT_FLOOR = 0.25


def shot_noise(background: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt of the mean background (B, H, W) -> (B,): its Poisson noise, photons."""
    return background.float().flatten(1).mean(1).clamp_min(0.0).sqrt()


def background_loss(predicted: torch.Tensor, true: torch.Tensor,
                    scale: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-sample mean over pixels of the background error in noise units,
    ``d = (pred - true) / scale``: ``d^2`` ("mse") or Huber with delta 1 ("huber"), (B,).

    ``scale`` (the input normalisation's noise estimate) is floored at
    :data:`BACKGROUND_UNIT_FLOOR` x sqrt(mean true background): an empty tile from a camera
    with many electrons per ADU can be one constant value, whose noise estimate is ~0, and
    its background error would otherwise swamp the batch (1e11 was seen)."""
    true = true.float()
    unit = torch.maximum(scale.float().reshape(-1), BACKGROUND_UNIT_FLOOR * shot_noise(true))
    d = (predicted.float() - true) / unit.clamp_min(1e-6).reshape(-1, 1, 1)
    if kind == "huber":
        per_pixel = F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=1.0)
    else:
        per_pixel = d * d
    return per_pixel.flatten(1).mean(1)


# -- the whole objective -------------------------------------------------------------------

class VarEmitterLoss:
    """Multi-scale training objective of :class:`~.model.VarEmitterNet`.

    ``VarEmitterLoss(loss_cfg, factors)(out, target, scale_ramp=None) -> (total, logs)``.
    ``loss_cfg`` is a :class:`~.config.LossConfig`; ``factors`` the model's factors in the
    order of ``loss_cfg.scale_weights``. ``scale_ramp``: ``{factor: weight in [0, 1]}`` for
    progressive training (a factor missing from it is inactive; ``None`` = all 1). Scales
    absent from ``out["maps"]`` or with zero weight are skipped. ``target`` may be ``None``
    for the reconstruction-only path. ``logs`` are floats: ``"count/x2"``, ``"loc/x2"``,
    ``"unc/x2"``, ``"bg/x2"`` (and ``"photon/x2"``, ``"offset_l2/x2"`` in l2 mode),
    ``"count_mae/x2"`` (mean |sum p - n|, a metric), ``"recon"``, ``"vq"``,
    ``"vq_perplexity"``, ``"vq_usage"``, ``"total"``.
    """

    def __init__(self, loss_cfg, factors):
        factors = [int(f) for f in factors]
        if len(loss_cfg.scale_weights) != len(factors):
            raise ValueError(f"{len(loss_cfg.scale_weights)} scale weights for "
                             f"{len(factors)} factors")
        self.cfg = loss_cfg
        self.factors = factors
        self.scale_weights = {f: float(wt) for f, wt in zip(factors, loss_cfg.scale_weights)}
        self.count = CountLoss()
        self.loc = LocalizationLoss(loss_cfg.loc_mode, photon_weight=loss_cfg.photon_weight,
                                    trains_sigma=loss_cfg.loc_trains_sigma)
        self.unc = UncertaintyLoss()
        self.recon = ReconstructionLoss()

    def __call__(self, out: dict, target: dict | None = None, scale_ramp: dict | None = None):
        cfg = self.cfg
        logs: dict[str, float] = {}
        total = None

        def add(term):
            """Accumulate a weighted term into the total."""
            nonlocal total
            total = term if total is None else total + term

        maps = out.get("maps") or {}
        if maps and target is None:
            raise ValueError("emitter maps need a target (xy, mask)")
        for f in self.factors:
            if f not in maps:
                continue
            ramp = 1.0 if scale_ramp is None else float(scale_ramp.get(f, 0.0))
            weight = self.scale_weights[f] * ramp
            if weight <= 0:
                continue
            scale_total, scale_logs = self.scale_terms(maps[f], f, target, out)
            add(weight * scale_total)
            logs.update({f"{k}/x{f}": v for k, v in scale_logs.items()})
        if "recon" in out and cfg.recon_weight > 0:
            r = self.recon(out["recon"], out["recon_target"])
            add(cfg.recon_weight * r)
            logs["recon"] = float(r.detach())
        vq = out.get("vq")
        if vq is not None:
            if cfg.vq_weight > 0 and torch.is_tensor(vq["loss"]) and vq["loss"].requires_grad:
                add(cfg.vq_weight * vq["loss"].float())
            logs["vq"] = float(vq["loss"].detach())
            logs["vq_perplexity"] = float(vq["perplexity"])
            logs["vq_usage"] = float(vq["usage"])
        if total is None:  # nothing to optimise (e.g. every scale ramped to zero)
            device = next((v.device for v in _tensors(out)), None)
            total = torch.zeros((), device=device)
        logs["total"] = float(total.detach())
        return total, logs

    def scale_terms(self, m: dict, factor: int, target: dict, out: dict):
        """Weighted sum of the terms of one scale and their (unweighted) values as floats."""
        cfg = self.cfg
        b, fh, fw = m["prob"].shape
        height, width = fh // factor, fw // factor
        xy = target["xy"].float()
        mask = in_frame(xy, target["mask"].to(torch.bool), height, width)
        # Padding may hold anything (even NaN): zero it so no NaN reaches a gradient.
        xy = torch.where(mask[..., None], xy, torch.zeros_like(xy))
        photons = target.get("photons")
        if photons is not None:
            photons = photons.float()
            photons = torch.where(mask, photons, torch.ones_like(photons))
        n = mask.float().sum(1)
        if cfg.emitter_weighting == "frame":
            # per-tile means, averaged over the tiles that hold emitters
            tiles = (n > 0).float()

            def batch_mean(per_sample):
                return (per_sample * tiles / n.clamp_min(1.0)).sum() / tiles.sum().clamp_min(1.0)
        else:
            denom = _per_emitter_denominator(n)

            def batch_mean(per_sample):
                return per_sample.sum() / denom
        logs = {}
        count = self.count(m["prob"], n).mean()
        logs["count"] = float(count.detach())
        logs["count_mae"] = float((m["prob"].detach().float().sum((1, 2)) - n).abs().mean())
        total = cfg.count_weight * count
        loc_sum, _, extra = self.loc(m, factor, xy, mask, photons)
        loc = batch_mean(loc_sum)
        logs["loc"] = float(loc.detach())
        logs.update({k: float(v.detach()) for k, v in extra.items()})
        total = total + cfg.loc_weight * loc
        if cfg.uncertainty_weight > 0:
            unc_sum, _ = self.unc(m, factor, xy, mask)
            unc = batch_mean(unc_sum)
            logs["unc"] = float(unc.detach())
            total = total + cfg.uncertainty_weight * unc
        if target.get("background") is not None and cfg.background_weight > 0:
            pred = m["background"].float()
            if factor != 1:
                pred = F.avg_pool2d(pred[:, None], factor)[:, 0]
            scale = out.get("norm_scale")
            if scale is None:  # no model normalisation at hand: Poisson noise of the truth
                scale = shot_noise(target["background"]).clamp_min(1.0)
            bg = background_loss(pred, target["background"], scale.detach(),
                                 cfg.background_loss).mean()
            logs["bg"] = float(bg.detach())
            total = total + cfg.background_weight * bg
        return total, logs
