"""Tests of the structured losses on hand-made maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from napari_var_emitter.config import LossConfig
from napari_var_emitter.losses import (CountLoss, LocalizationLoss, ReconstructionLoss,
                                       UncertaintyLoss, VarEmitterLoss, background_loss,
                                       containing_pixel, pixel_centre)


def make_maps(b=1, h=10, w=10, factor=2, logit=-12.0, sigma=0.1, photons=1000.0,
              background=10.0, requires_grad=False):
    """Maps of one scale: (b, f*h, f*w) tensors with constant values (quiet everywhere)."""
    shape = (b, h * factor, w * factor)
    maps = {
        "logit": torch.full(shape, logit),
        "offset_x": torch.zeros(shape),
        "offset_y": torch.zeros(shape),
        "photons": torch.full(shape, photons),
        "sigma_x": torch.full(shape, sigma),
        "sigma_y": torch.full(shape, sigma),
        "background": torch.full(shape, background),
    }
    if requires_grad:
        for v in maps.values():
            v.requires_grad_(True)
    return maps


def finish(maps):
    out = dict(maps)
    out["prob"] = torch.sigmoid(out["logit"])
    return out


def claim(maps, xy, factor, p_logit=8.0, offset=None):
    """Make the pixel containing each (x, y) confident and point its offset at ``offset``."""
    with torch.no_grad():
        for b, pts in enumerate(xy):
            for x, y in pts:
                shape = maps["logit"].shape[1:]
                row, col = containing_pixel(torch.tensor([[x, y]]), factor, *shape)
                r, c = int(row), int(col)
                maps["logit"][b, r, c] = p_logit
                if offset is None:
                    ox = x - pixel_centre(torch.tensor(c), factor).item()
                    oy = y - pixel_centre(torch.tensor(r), factor).item()
                else:
                    ox, oy = offset
                maps["offset_x"][b, r, c] = ox
                maps["offset_y"][b, r, c] = oy
    return maps


# -- pixel convention ---------------------------------------------------------------------

def test_map_pixel_convention():
    # map pixel j at factor f covers [j/f - 0.5, (j+1)/f - 0.5) with centre (j + 0.5)/f - 0.5
    xy = torch.tensor([[[-0.5, -0.5], [0.0, 0.0], [0.249, 0.251], [9.49, 9.0]]])
    row, col = containing_pixel(xy, 2, 20, 20)
    assert col.tolist() == [[0, 1, 1, 19]]
    assert row.tolist() == [[0, 1, 1, 19]]
    assert pixel_centre(torch.tensor([0, 1, 19]), 2).tolist() == [-0.25, 0.25, 9.25]
    assert pixel_centre(torch.tensor([0]), 8).item() == pytest.approx(-0.4375)


# -- count --------------------------------------------------------------------------------

def confident_map(k, n_pixels=400):
    p = torch.full((1, n_pixels), 1e-6)
    p[0, :k] = 0.999
    return p.reshape(1, 20, 20)


def test_count_loss_is_minimal_at_the_true_count():
    loss = CountLoss()
    # fixed prediction with 4 confident pixels: the likeliest true count is 4
    values = [loss(confident_map(4), torch.tensor([float(n)])).item() for n in range(9)]
    assert int(torch.tensor(values).argmin()) == 4
    # fixed truth of 3: the best prediction among 0..8 confident pixels is 3
    values = [loss(confident_map(k), torch.tensor([3.0])).item() for k in range(9)]
    assert int(torch.tensor(values).argmin()) == 3
    assert values[3] < 0.05  # near-certain and right: close to zero (it is a probability)
    assert all(v >= 0 for v in values)
    # diffuse predictions: the expected count is pulled to the truth
    p = torch.full((1, 20, 20), 3.0 / 400, requires_grad=True)
    loss(p, torch.tensor([6.0])).sum().backward()
    assert (p.grad < 0).all()  # more emitters wanted: every probability should rise


def test_count_loss_on_empty_frames_pushes_probabilities_to_zero():
    loss = CountLoss()
    logits = torch.full((2, 20, 20), -4.0, requires_grad=True)  # ~7 phantom emitters
    value = loss(torch.sigmoid(logits), torch.zeros(2))
    assert torch.isfinite(value).all() and (value > 1).all()
    value.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()
    p = torch.sigmoid(torch.tensor(-12.0)).item()
    quiet = loss(torch.full((2, 20, 20), p), torch.zeros(2))
    # near the floor -log P(-1/2 < N(mean, var) < 1/2), var = sum p(1-p) + var_floor (0.05)
    mean, std = 400 * p, math.sqrt(400 * p * (1 - p) + 0.05)
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    floor = -math.log(cdf((0.5 - mean) / std) - cdf((-0.5 - mean) / std))
    assert torch.allclose(quiet, torch.full((2,), floor), atol=1e-4)
    assert floor < 0.03


def test_count_loss_is_finite_far_in_the_tails():
    loss = CountLoss()
    p = torch.full((1, 40, 40), 0.999, requires_grad=True)  # ~1600 predicted, truth 0
    v = loss(p, torch.zeros(1))
    v.backward()
    assert torch.isfinite(v).all() and torch.isfinite(p.grad).all()
    p2 = torch.full((1, 40, 40), 1e-7, requires_grad=True)  # ~0 predicted, truth 50
    v2 = loss(p2, torch.tensor([50.0]))
    v2.backward()
    assert torch.isfinite(v2).all() and torch.isfinite(p2.grad).all() and (p2.grad < 0).all()


# -- localisation -------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 4, 8])
def test_gmm_loss_is_lower_when_the_offset_points_at_the_emitter(factor):
    xy = torch.tensor([[[4.3, 6.1], [7.8, 2.2]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loc = LocalizationLoss("gmm", photon_weight=0.0)
    sigma = 0.02
    right = finish(claim(make_maps(factor=factor, sigma=sigma), xy.tolist(), factor))
    wrong = finish(claim(make_maps(factor=factor, sigma=sigma), xy.tolist(), factor,
                         offset=(0.4 / factor, -0.4 / factor)))
    l_right, n, _ = loc(right, factor, xy, mask)
    l_wrong, _, _ = loc(wrong, factor, xy, mask)
    assert n.item() == 2
    assert l_right.item() < l_wrong.item() - 2.0
    # exact offsets: each emitter's NLL is -log(mixture weight p / sum p) plus that of a
    # 2-D Normal at its mean (distant components contribute nothing)
    weight = torch.sigmoid(torch.tensor(8.0)) / right["prob"].sum()
    expected = 2 * (-math.log(weight) + 2 * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))
    assert l_right.item() == pytest.approx(expected, abs=0.01)


def test_gmm_loss_prefers_weight_on_true_emitters_and_finds_the_minimum_at_the_emitter():
    factor = 2
    xy = torch.tensor([[[3.3, 5.6]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loc = LocalizationLoss("gmm", photon_weight=0.0)
    clean = finish(claim(make_maps(factor=factor), xy.tolist(), factor))
    spurious = claim(make_maps(factor=factor), xy.tolist(), factor)
    spurious["logit"][0, 2, 2] = 8.0  # a confident phantom far from the emitter
    spurious = finish(spurious)
    assert loc(clean, factor, xy, mask)[0] < loc(spurious, factor, xy, mask)[0] - 0.5
    # gradient descent on the offsets moves the claimed pixel's estimate onto the emitter
    maps = claim(make_maps(factor=factor), xy.tolist(), factor, offset=(0.0, 0.0))
    ox = maps["offset_x"].clone().requires_grad_(True)
    oy = maps["offset_y"].clone().requires_grad_(True)
    opt = torch.optim.SGD([ox, oy], lr=2e-3)
    for _ in range(300):
        m = finish({**maps, "offset_x": ox, "offset_y": oy})
        opt.zero_grad()
        loc(m, factor, xy, mask)[0].sum().backward()
        opt.step()
    row, col = containing_pixel(xy, factor, 20, 20)
    est_x = pixel_centre(col, factor) + ox[0, row, col]
    est_y = pixel_centre(row, factor) + oy[0, row, col]
    assert est_x.item() == pytest.approx(3.3, abs=0.01)
    assert est_y.item() == pytest.approx(5.6, abs=0.01)


@pytest.mark.parametrize("trains_sigma", [True, False])
def test_gmm_loss_leaves_sigmas_to_the_uncertainty_term_when_asked(trains_sigma):
    xy = torch.tensor([[[4.3, 6.1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    maps = claim(make_maps(sigma=0.3), xy.tolist(), 2, offset=(0.1, -0.1))
    for v in maps.values():
        v.requires_grad_(True)
    loc = LocalizationLoss("gmm", photon_weight=0.0, trains_sigma=trains_sigma)
    loss, _, _ = loc(finish(maps), 2, xy, mask)
    loss.sum().backward()
    assert maps["offset_x"].grad.abs().sum() > 0  # offsets learn either way
    moved = maps["sigma_x"].grad is not None and maps["sigma_x"].grad.abs().sum() > 0
    assert moved == trains_sigma
    total = VarEmitterLoss(LossConfig(loc_trains_sigma=trains_sigma), [2, 4, 8])
    assert total.loc.trains_sigma == trains_sigma


def test_gmm_photon_term_prefers_the_true_photon_count():
    factor = 2
    xy = torch.tensor([[[4.0, 4.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loc = LocalizationLoss("gmm", photon_weight=1.0)
    truth = torch.tensor([[1500.0]])
    right = finish(claim(make_maps(factor=factor, photons=1500.0), xy.tolist(), factor))
    wrong = finish(claim(make_maps(factor=factor, photons=3000.0), xy.tolist(), factor))
    assert loc(right, factor, xy, mask, truth)[0] < loc(wrong, factor, xy, mask, truth)[0] - 1


def test_l2_loss_zero_offset_error_and_bce_trains_detection():
    factor = 4
    xy = torch.tensor([[[2.31, 7.77], [5.05, 1.4]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loc = LocalizationLoss("l2", photon_weight=0.0)
    maps = claim(make_maps(factor=factor, logit=-3.0), xy.tolist(), factor, p_logit=0.0)
    logit = maps["logit"].clone().requires_grad_(True)
    loss, n, extra = loc(finish({**maps, "logit": logit}), factor, xy, mask)
    assert extra["offset_l2"].item() == pytest.approx(0.0, abs=1e-8)
    loss.sum().backward()
    row, col = containing_pixel(xy, factor, 40, 40)
    # assigned pixels pushed up, all others pushed down
    assert (logit.grad[0, row[0], col[0]] < 0).all()
    others = torch.ones_like(logit.grad, dtype=torch.bool)
    others[0, row[0], col[0]] = False
    assert (logit.grad[others] > 0).all()
    shifted = claim(make_maps(factor=factor), xy.tolist(), factor, offset=(0.1, 0.0))
    _, _, extra = loc(finish(shifted), factor, xy, mask)
    assert extra["offset_l2"].item() > 0


# -- uncertainty --------------------------------------------------------------------------

def test_uncertainty_loss_penalises_overconfidence_and_only_moves_sigma():
    g = torch.Generator().manual_seed(0)
    factor, n = 2, 200
    unc = UncertaintyLoss()
    # 200 emitters, one per frame, each estimated with a true error of 0.05 px per axis
    xy = torch.rand(n, 1, 2, generator=g) * 8 + 1
    err = 0.05 * torch.randn(n, 1, 2, generator=g)
    mask = torch.ones(n, 1, dtype=torch.bool)

    def maps_with_sigma(s):
        maps = make_maps(b=n, factor=factor, sigma=s)
        est = (xy + err).tolist()
        for b in range(n):
            claim_one = claim({k: v[b:b + 1] for k, v in maps.items()}, [est[b]], factor)
            for k in maps:
                maps[k][b:b + 1] = claim_one[k]
        return maps

    calibrated = finish(maps_with_sigma(0.05))
    overconfident = finish(maps_with_sigma(0.01))
    underconfident = finish(maps_with_sigma(0.25))
    per_cal = unc(calibrated, factor, xy, mask)[0].mean()
    per_over = unc(overconfident, factor, xy, mask)[0].mean()
    per_under = unc(underconfident, factor, xy, mask)[0].mean()
    assert per_cal < per_over - 3  # 5x overconfident: much worse
    assert per_cal < per_under - 1
    # the predicted position is detached: only sigma gets a gradient
    m = maps_with_sigma(0.02)
    for k in ("offset_x", "sigma_x"):
        m[k].requires_grad_(True)
    unc(finish(m), factor, xy, mask)[0].sum().backward()
    assert m["offset_x"].grad is None or (m["offset_x"].grad == 0).all()
    assert (m["sigma_x"].grad != 0).any()


def test_uncertainty_loss_calibrates_the_decoders_windowed_estimate():
    """Two pixels share an emitter, each off by 0.3 px in opposite directions: the decoder's
    probability-weighted mean is exact, so a small sigma must score better than 0.3 px."""
    factor = 2
    unc = UncertaintyLoss()
    xy = torch.tensor([[[4.1, 4.1]]])
    mask = torch.ones(1, 1, dtype=torch.bool)

    def maps_with_sigma(s):
        maps = make_maps(factor=factor, sigma=s)
        row, col = containing_pixel(xy, factor, 20, 20)
        r, c = int(row), int(col)
        for cc, ox in ((c, 0.3), (c + 1, -0.3)):
            true_offset = 4.1 - pixel_centre(torch.tensor(cc), factor).item()
            maps["logit"][0, r, cc] = 0.0  # p = 0.5 each
            maps["offset_x"][0, r, cc] = true_offset + ox
            maps["offset_y"][0, r, cc] = 4.1 - pixel_centre(torch.tensor(r), factor).item()
        return finish(maps)

    small = unc(maps_with_sigma(0.02), factor, xy, mask)[0].item()
    single_pixel_error = unc(maps_with_sigma(0.3), factor, xy, mask)[0].item()
    assert small < single_pixel_error - 2


def test_uncertainty_loss_counts_only_emitters_the_decoder_would_report():
    unc = UncertaintyLoss()
    xy = torch.tensor([[[3.0, 3.0], [7.0, 7.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    maps = claim(make_maps(sigma=0.05), [[(3.0, 3.0)]], 2)  # only the first is detected
    per, n = unc(finish(maps), 2, xy, mask)
    assert n.tolist() == [1.0]
    alone, _ = unc(finish(maps), 2, xy[:, :1], mask[:, :1])
    assert per.item() == pytest.approx(alone.item())  # the missed one adds nothing


def test_uncertainty_floor_stops_collapse():
    unc = UncertaintyLoss(floor_px=0.01)
    xy = torch.tensor([[[3.0, 3.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    maps = claim(make_maps(sigma=0.002), xy.tolist(), 2)  # exact hit, tiny sigma
    sig = maps["sigma_x"].clone().requires_grad_(True)
    loss, _ = unc(finish({**maps, "sigma_x": sig}), 2, xy, mask)
    loss.sum().backward()
    row, col = containing_pixel(xy, 2, 20, 20)
    assert sig.grad[0, row, col].item() < 0  # the regulariser pushes sigma back up


# -- the whole objective ------------------------------------------------------------------

def model_like_output(b=2, h=10, w=10, factors=(2, 4, 8), requires_grad=True):
    out = {"maps": {}, "norm_scale": torch.full((b,), 3.0)}
    for f in factors:
        out["maps"][f] = finish(make_maps(b=b, h=h, w=w, factor=f, logit=-9.0,
                                          requires_grad=requires_grad))
    out["recon"] = torch.zeros(b, 1, h, w, requires_grad=requires_grad)
    out["recon_target"] = torch.ones(b, 1, h, w)
    out["vq"] = {"loss": torch.tensor(0.5, requires_grad=requires_grad),
                 "perplexity": torch.tensor(10.0), "usage": torch.tensor(0.3)}
    return out


def leaves(out):
    yield out["recon"]
    yield out["vq"]["loss"]
    for m in out["maps"].values():
        for k, v in m.items():
            if k != "prob":
                yield v


@pytest.mark.parametrize("mode", ["gmm", "l2"])
def test_total_loss_handles_empty_samples_padding_and_nan_padding(mode):
    out = model_like_output()
    target = {
        "xy": torch.tensor([[[3.0, 4.0], [float("nan"), float("nan")], [12.0, 1.0]],
                            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]),
        "mask": torch.tensor([[True, False, True], [False, False, False]]),
        "photons": torch.tensor([[800.0, float("nan"), 900.0], [0.0, 0.0, 0.0]]),
        "background": torch.full((2, 10, 10), 10.0),
    }
    loss_fn = VarEmitterLoss(LossConfig(loc_mode=mode), [2, 4, 8])
    total, logs = loss_fn(out, target)
    assert math.isfinite(total.item())
    total.backward()
    for v in leaves(out):
        assert v.grad is not None and torch.isfinite(v.grad).all()
    for f in (2, 4, 8):
        for term in ("count", "loc", "unc", "bg", "count_mae"):
            assert math.isfinite(logs[f"{term}/x{f}"])
    assert {"recon", "vq", "vq_perplexity", "vq_usage", "total"} <= set(logs)
    # the emitter at x = 12 is outside the 10 px frame: only one true emitter counts
    assert logs["count_mae/x2"] == pytest.approx((abs(out["maps"][2]["prob"][0].sum().item() - 1)
                                                  + out["maps"][2]["prob"][1].sum().item()) / 2,
                                                 rel=1e-4)


@pytest.mark.parametrize("weighting", ["emitter", "frame"])
def test_emitter_weighting_gives_sparse_tiles_their_say(weighting):
    """One emitter in tile 0, four in tile 1 (tile 2 empty): "emitter" averages over the five
    emitters, "frame" over the two tiles' own means."""
    out = model_like_output(b=3, factors=(2,), requires_grad=False)
    nan = float("nan")
    target = {"xy": torch.tensor([[[3.0, 4.0], [nan, nan], [nan, nan], [nan, nan]],
                                  [[1.0, 1.0], [3.0, 7.0], [6.0, 2.0], [8.0, 8.0]],
                                  [[nan, nan]] * 4]),
              "mask": torch.tensor([[True, False, False, False], [True] * 4, [False] * 4])}
    cfg = LossConfig(scale_weights=[1.0], emitter_weighting=weighting)
    _, logs = VarEmitterLoss(cfg, [2])(out, target)
    per, n, _ = LocalizationLoss("gmm", photon_weight=cfg.photon_weight)(
        out["maps"][2], 2, torch.nan_to_num(target["xy"]), target["mask"])
    assert n.tolist() == [1, 4, 0]
    expected = (per[0] / 1 + per[1] / 4) / 2 if weighting == "frame" else per.sum() / 5
    assert logs["loc/x2"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(Exception, match="emitter_weighting"):
        LossConfig(emitter_weighting="pixel").validate()


def test_total_loss_with_no_emitter_slots_at_all():
    out = model_like_output(factors=(2,))
    target = {"xy": torch.zeros(2, 0, 2), "mask": torch.zeros(2, 0, dtype=torch.bool),
              "photons": torch.zeros(2, 0)}
    total, logs = VarEmitterLoss(LossConfig(scale_weights=[1.0]), [2])(out, target)
    total.backward()
    logit = out["maps"][2]["logit"]
    assert torch.isfinite(logit.grad).all() and (logit.grad > 0).all()  # fewer phantoms
    assert logs["loc/x2"] == 0.0 and "bg/x2" not in logs


def test_total_loss_weighting_ramp_and_reconstruction_only():
    cfg = LossConfig(count_weight=1.0, loc_weight=0.0, uncertainty_weight=0.0,
                     background_weight=0.0, recon_weight=0.5, vq_weight=2.0,
                     scale_weights=[1.0, 0.5, 0.25])
    loss_fn = VarEmitterLoss(cfg, [2, 4, 8])
    target = {"xy": torch.tensor([[[3.0, 4.0]], [[5.0, 5.0]]]),
              "mask": torch.ones(2, 1, dtype=torch.bool)}
    out = model_like_output(requires_grad=False)
    total, logs = loss_fn(out, target, scale_ramp={2: 1.0, 4: 0.5})  # x8 inactive
    expected = (logs["count/x2"] + 0.5 * 0.5 * logs["count/x4"]
                + 0.5 * logs["recon"])  # vq loss without grad is logged, not optimised
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert "count/x8" not in logs and logs["recon"] == pytest.approx(1.0)
    # reconstruction-only path: no maps, no target
    out = model_like_output(factors=())
    total, logs = loss_fn(out, None)
    assert total.item() == pytest.approx(0.5 * 1.0 + 2.0 * 0.5)
    assert set(logs) == {"recon", "vq", "vq_perplexity", "vq_usage", "total"}
    with pytest.raises(ValueError):
        VarEmitterLoss(cfg, [2, 4])


def test_background_and_reconstruction_terms():
    pred = torch.full((2, 5, 5), 12.0)
    true = torch.full((2, 5, 5), 10.0)
    assert background_loss(pred, true, torch.tensor([2.0, 1.0])).tolist() == [1.0, 4.0]
    # huber: the same half-square within one noise unit, linear beyond it (an outlier tile
    # 10 noise units off costs 9.5, not 100)
    far = torch.full((2, 5, 5), 30.0)
    huber = background_loss(torch.stack([pred[0], far[0]]), true, torch.tensor([4.0, 2.0]),
                            kind="huber").tolist()
    assert huber == pytest.approx([0.125, 9.5])
    # a constant empty tile (noise estimate ~0) is measured in its shot noise instead
    bounded = background_loss(pred[:1], true[:1], torch.tensor([1e-6])).item()
    assert bounded == pytest.approx((2.0 / (0.25 * 10 ** 0.5)) ** 2)
    r = ReconstructionLoss()(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 3.0))
    assert r.item() == pytest.approx(9.0)


def test_losses_are_float32_under_bf16_inputs():
    out = model_like_output(factors=(2,), requires_grad=False)
    out["maps"][2] = {k: v.to(torch.bfloat16) for k, v in out["maps"][2].items()}
    target = {"xy": torch.tensor([[[3.0, 4.0]], [[5.0, 5.0]]]),
              "mask": torch.ones(2, 1, dtype=torch.bool), "photons": torch.full((2, 1), 500.0),
              "background": torch.full((2, 10, 10), 10.0)}
    total, logs = VarEmitterLoss(LossConfig(scale_weights=[1.0]), [2])(out, target)
    assert total.dtype == torch.float32 and math.isfinite(total.item())
