"""Tests of the VAR-style emitter model: shapes, conventions, fast path, VQ, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_var_emitter.config import LossConfig, ModelConfig
from napari_var_emitter.losses import VarEmitterLoss
from napari_var_emitter.model import (MultiScaleVQVAE, ProgressiveEmitterTransformer,
                                      VarEmitterNet, VectorQuantizer, count_parameters)
from napari_var_emitter.model.net import robust_normalisation
from napari_var_emitter.model.transformer import SIGMA_MAX, SIGMA_MIN

MAP_KEYS = {"logit", "prob", "offset_x", "offset_y", "photons", "sigma_x", "sigma_y",
            "background"}


def small_config(**kw) -> ModelConfig:
    """A model small enough to train for a few hundred steps inside a unit test."""
    base = dict(base_channels=8, embed_dim=32, num_heads=2, num_layers=1, codebook_size=64,
                code_dim=8)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def render_spots(rng, n_frames, size=40, n_spots=3, photons=2000.0, sigma=1.2,
                 background=20.0, noise=True):
    """Frames (T, 1, size, size) photons with Gaussian spots and their positions (T, n, 2).

    Each spot is the pixel-integrated 2-D Gaussian (erf differences) with pixel (r, c)
    covering [c - 0.5, c + 0.5) x [r - 0.5, r + 0.5).
    """
    from scipy.special import erf

    edges = np.arange(size + 1) - 0.5
    xy = rng.uniform(3, size - 4, size=(n_frames, n_spots, 2))
    frames = np.full((n_frames, size, size), background, dtype=np.float64)
    for t in range(n_frames):
        for x, y in xy[t]:
            ex = np.diff(erf((edges - x) / (math.sqrt(2) * sigma))) / 2
            ey = np.diff(erf((edges - y) / (math.sqrt(2) * sigma))) / 2
            frames[t] += photons * ey[:, None] * ex[None, :]
    if noise:
        frames = rng.poisson(frames).astype(np.float64)
    return (torch.tensor(frames, dtype=torch.float32)[:, None],
            torch.tensor(xy, dtype=torch.float32))


# -- shapes and conventions ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 40), (48, 64)])
def test_output_shapes_and_ranges_at_all_factors(shape):
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = VarEmitterNet(cfg).eval()
    h, w = shape
    frames = 50 + 5 * torch.randn(3, 1, h, w)
    with torch.no_grad():
        out = model(frames)
    assert sorted(out["maps"]) == [2, 4, 8]
    for f, m in out["maps"].items():
        assert set(m) == MAP_KEYS
        for key, v in m.items():
            assert v.shape == (3, f * h, f * w), (f, key)
            assert v.dtype == torch.float32
            assert torch.isfinite(v).all()
        assert torch.allclose(m["prob"], torch.sigmoid(m["logit"]))
        # offsets stay within one map pixel = 1/f input px
        assert m["offset_x"].abs().max() <= 1.0 / f + 1e-6
        assert m["offset_y"].abs().max() <= 1.0 / f + 1e-6
        assert m["sigma_x"].min() >= SIGMA_MIN * 0.999 and m["sigma_y"].max() <= SIGMA_MAX
        assert m["photons"].min() >= 0 and m["background"].min() >= 0
    assert out["background"].shape == (3, h, w)
    assert out["recon"].shape == (3, 1, h, w) and out["recon_target"].shape == (3, 1, h, w)
    assert set(out["vq"]) >= {"loss", "perplexity", "usage"}
    # VQ scales follow the token grid: (1,2,5,10) for 10x10, scaled per axis otherwise
    sides = [tuple(i.shape[1:]) for i in out["vq"]["indices"]]
    th, tw = h // 4, w // 4
    assert sides[-1] == (th, tw)
    if shape == (40, 40):
        assert sides == [(1, 1), (2, 2), (5, 5), (10, 10)]


def test_initial_maps_expect_few_emitters_at_every_scale():
    """Untrained, each scale predicts roughly the prior count, not thousands of phantoms."""
    torch.manual_seed(0)
    model = VarEmitterNet(ModelConfig()).eval()
    with torch.no_grad():
        out = model(50 + 5 * torch.randn(2, 1, 40, 40), with_recon=False)
    for f, m in out["maps"].items():
        expected = m["prob"].sum((1, 2))
        assert (expected > 2).all() and (expected < 80).all(), (f, expected)


def test_fast_path_computes_no_finer_scale_and_no_decoder():
    torch.manual_seed(0)
    model = VarEmitterNet(ModelConfig()).eval()
    calls = []
    for name, mod in [("x4", model.transformer.stages[1]), ("x8", model.transformer.stages[2]),
                      ("decoder", model.vqvae.decoder)]:
        mod.register_forward_hook(lambda *a, name=name: calls.append(name))
    x = 50 + 5 * torch.randn(4, 1, 40, 40)
    with torch.inference_mode():
        out = model(x, factors=[2], with_recon=False)
        full = model(x, factors=[2], with_recon=True)
    assert list(out["maps"]) == [2]
    assert "recon" not in out and "recon_target" not in out
    assert calls == ["decoder"]  # only the with_recon call
    calls.clear()
    # no VQ training loss on the fast path, and the same maps as with it
    assert out["vq"]["loss"].item() == 0 and full["vq"]["loss"].item() > 0
    assert torch.equal(out["maps"][2]["prob"], full["maps"][2]["prob"])
    with torch.inference_mode():
        model(50 + 5 * torch.randn(1, 1, 40, 40), factors=[4], with_recon=True)
    assert sorted(calls) == ["decoder", "x4"]  # x4 needs x2 but never x8


def test_requested_scale_matches_full_forward():
    """Asking for one scale gives the same maps as computing all of them (eval mode)."""
    torch.manual_seed(1)
    model = VarEmitterNet(ModelConfig()).eval()
    frames = 50 + 5 * torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        full = model(frames)
        only4 = model(frames, factors=[4], with_recon=False)
    for k in MAP_KEYS:
        assert torch.allclose(full["maps"][4][k], only4["maps"][4][k], atol=1e-5)


def test_outputs_follow_camera_gain_and_offset():
    """Per-sample normalisation: x k scales photons/background by k and leaves the rest."""
    torch.manual_seed(2)
    rng = np.random.default_rng(0)
    frames, _ = render_spots(rng, 2)
    model = VarEmitterNet(ModelConfig()).eval()
    with torch.no_grad():
        a = model(frames, factors=[2], with_recon=False)["maps"][2]
        b = model(frames * 7.0, factors=[2], with_recon=False)["maps"][2]
        c = model(frames + 300.0, factors=[2], with_recon=False)["maps"][2]
    for k in ("prob", "offset_x", "offset_y", "sigma_x"):
        assert torch.allclose(a[k], b[k], atol=1e-4), k
        assert torch.allclose(a[k], c[k], atol=1e-4), k
    assert torch.allclose(b["photons"], 7.0 * a["photons"], rtol=1e-3)
    assert torch.allclose(b["background"], 7.0 * a["background"], rtol=1e-3, atol=1e-3)
    assert torch.allclose(c["photons"], a["photons"], rtol=1e-3)


def test_robust_normalisation_estimates_background_and_shot_noise():
    rng = np.random.default_rng(3)
    frames, _ = render_spots(rng, 4, n_spots=5, background=100.0)
    level, scale = robust_normalisation(frames[:, 0])
    # 20 % quantile of Poisson(100) ~ 100 - 0.84 * 10; noise sigma ~ sqrt(100)
    assert torch.all((level > 85) & (level < 98)), level
    assert torch.all((scale > 8) & (scale < 13)), scale
    level0, scale0 = robust_normalisation(torch.zeros(1, 8, 8))
    assert scale0.item() > 0 and level0.item() == 0


def test_context_frames_and_bad_inputs():
    cfg = ModelConfig(context_frames=3)
    model = VarEmitterNet(cfg).eval()
    with torch.no_grad():
        out = model(50 + 5 * torch.randn(2, 3, 40, 40), factors=[2], with_recon=True)
    assert out["maps"][2]["prob"].shape == (2, 80, 80)
    assert out["recon"].shape == (2, 1, 40, 40)
    with pytest.raises(ValueError, match="frames must be"):
        model(torch.zeros(2, 1, 40, 40))
    with pytest.raises(ValueError, match="patch size"):
        model(torch.zeros(2, 3, 42, 40))
    with pytest.raises(ValueError, match="factors"):
        model(torch.zeros(2, 3, 40, 40), factors=[3])


def test_count_parameters_and_exports():
    model = VarEmitterNet(ModelConfig())
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 2_000_000
    assert isinstance(model.vqvae, MultiScaleVQVAE)
    assert isinstance(model.transformer, ProgressiveEmitterTransformer)
    assert isinstance(model.vqvae.quantizer, VectorQuantizer)
    # the codebook is EMA-maintained state, saved with the model but not a parameter
    assert "vqvae.quantizer.codebook" in model.state_dict()
    assert all("codebook" not in name for name, _ in model.named_parameters())


def test_continuous_tokens_ablation():
    cfg = ModelConfig(use_quantization=False)
    model = VarEmitterNet(cfg)
    out = model(50 + 5 * torch.randn(2, 1, 40, 40))
    assert out["vq"]["loss"].item() == 0.0
    assert out["maps"][8]["prob"].shape == (2, 320, 320)
    assert not hasattr(model.vqvae, "quantizer")


def test_bf16_autocast_forward_and_loss_are_finite():
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = VarEmitterNet(cfg)
    rng = np.random.default_rng(1)
    frames, xy = render_spots(rng, 2)
    target = {"xy": xy, "mask": torch.ones(2, 3, dtype=torch.bool),
              "photons": torch.full((2, 3), 2000.0), "background": torch.full((2, 40, 40), 20.0)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(frames)
        total, logs = VarEmitterLoss(LossConfig(), cfg.factors)(out, target)
    assert total.dtype == torch.float32 and math.isfinite(total.item())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- vector quantisation ------------------------------------------------------------------

def test_vector_quantizer_lookup_straight_through_and_stats():
    vq = VectorQuantizer(4, 2)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    vq.eval()
    z = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7], [0.05, 0.0]], requires_grad=True)
    before = vq.codebook.clone()
    q, info = vq(z)
    assert torch.equal(vq.codebook, before)  # eval mode: no EMA update
    assert info["indices"].tolist() == [0, 1, 2, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # lookup stays float32
        assert vq.lookup(z).tolist() == [0, 1, 2, 0]
    assert torch.allclose(q, vq.codebook[[0, 1, 2, 0]])
    q.sum().backward()  # straight-through: d q / d z = identity
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert info["usage"].item() == pytest.approx(3 / 4)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert info["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert info["loss"].item() == pytest.approx(0.25 * ((z - q) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("side,size", [((1, 1), (10, 10)), ((2, 3), (10, 12)),
                                       ((5, 5), (10, 10)), ((3, 2), (7, 9))])
def test_code_map_upsampling_is_bicubic_interpolation(side, size):
    """The matrix product that upsamples code maps gives what F.interpolate gives, in
    value and in gradient (training goes through it)."""
    from napari_var_emitter.model.vqvae import _BICUBIC_CACHE, upsample_bicubic

    _BICUBIC_CACHE.clear()
    with torch.inference_mode():  # prediction first (the cache is filled here), then training
        upsample_bicubic(torch.randn(1, 4, *side), size)
    x = torch.randn(3, 4, *side, requires_grad=True)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
    out = upsample_bicubic(x, size)
    assert out.shape == (3, 4, *size)
    assert torch.allclose(out, ref, atol=1e-5)
    weights = torch.randn_like(ref)
    g_ref, = torch.autograd.grad((ref * weights).sum(), x)
    g_out, = torch.autograd.grad((out * weights).sum(), x)
    assert torch.allclose(g_out, g_ref, atol=1e-5)
    # mixed precision (bf16 autocast on this CPU stands in for fp16 on a GPU) leaves it in
    # x's dtype, as F.interpolate: the code residuals are not rounded to half precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = upsample_bicubic(x.detach(), size)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, ref, atol=1e-5)


def test_vector_quantizer_ema_restarts_dead_codes_instead_of_collapsing():
    """Clustered data, codebook all started on one cluster: restarts spread the codes."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(48, 8, generator=g) * 3
    vq = VectorQuantizer(64, 8)
    vq.train()
    vq.codebook.copy_(centres[0] + 0.01 * torch.randn(64, 8, generator=g))
    probe = centres.repeat(8, 1) + 0.1 * torch.randn(48 * 8, 8, generator=g)
    collapsed_err = ((vq.embed(vq.lookup(probe)) - probe) ** 2).sum(1).mean()
    for _ in range(300):
        pick = torch.randint(0, 48, (256,), generator=g)
        z = centres[pick] + 0.1 * torch.randn(256, 8, generator=g)
        _, info = vq(z)
    vq.eval()
    _, info = vq(probe)
    assert info["usage"].item() > 0.5  # most of the 48 clusters got their own code
    assert info["perplexity"].item() > 25
    q_err = ((vq.embed(info["indices"]) - probe) ** 2).sum(1).mean()
    assert q_err < 0.1 * collapsed_err
    assert vq.restarts.item() > 0


def test_multiscale_vqvae_reconstruction_training_keeps_codebook_alive():
    """Reconstruction-only training on simple frames: recon improves, codes stay in use."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = small_config()
    model = VarEmitterNet(cfg)
    frames, _ = render_spots(rng, 64, n_spots=4)
    calls = []
    model.transformer.register_forward_hook(lambda *a: calls.append(1))
    loss_fn = VarEmitterLoss(LossConfig(recon_weight=1.0), cfg.factors)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for step in range(200):
        batch = frames[torch.randint(0, 64, (8,))]
        out = model.reconstruct(batch)
        total, logs = loss_fn(out, None)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(logs["recon"])
    assert calls == []  # the reconstruction path never runs the transformer or heads
    assert set(out) >= {"recon", "recon_target", "vq"} and out["maps"] == {}
    assert np.mean(history[-20:]) < 0.5 * np.mean(history[:5])
    model.eval()
    with torch.no_grad():
        out = model.reconstruct(frames[:16])
    assert out["vq"]["usage"].item() > 0.25, out["vq"]["usage"]
    assert out["vq"]["perplexity"].item() > 8


# -- training -----------------------------------------------------------------------------

def test_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    cfg = small_config(base_channels=16)
    model = VarEmitterNet(cfg)
    frames, xy = render_spots(rng, 4, n_spots=3, photons=3000.0)
    target = {"xy": xy, "mask": torch.ones(4, 3, dtype=torch.bool),
              "photons": torch.full((4, 3), 3000.0), "background": torch.full((4, 40, 40), 20.0)}
    loss_fn = VarEmitterLoss(LossConfig(), cfg.factors)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for step in range(50):
        out = model(frames, factors=[2])
        total, logs = loss_fn(out, target)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(logs)
    first = {k: np.mean([h[k] for h in history[:3]]) for k in history[0]}
    last = {k: np.mean([h[k] for h in history[-3:]]) for k in history[0]}
    assert last["total"] < 0.5 * first["total"], (first["total"], last["total"])
    assert last["count/x2"] < 0.3 * first["count/x2"]
    assert last["loc/x2"] < first["loc/x2"] - 5  # likelihood of the true positions x e^5
    # the expected count went from ~20 phantom emitters to within ~1 of the truth (3)
    assert first["count_mae/x2"] > 15 and last["count_mae/x2"] < 2.0


def test_normalisation_measures_the_noise_of_a_frame_of_few_grey_levels():
    # 20 e-/ADU at ~18 photo-electrons per pixel: most neighbours share one grey level, so
    # the median neighbour difference is 0; the mean difference still gives the noise
    from napari_var_emitter.model import robust_normalisation

    rng = np.random.default_rng(0)
    adu = np.round(100 + rng.poisson(18, (4, 40, 40)) / 20.0)
    photons = torch.from_numpy(((adu - 100) * 20).astype(np.float32))
    level, scale = robust_normalisation(photons)
    assert len(np.unique(adu)) <= 6
    # the noise shows only as occasional 20-photon steps: about 1 photon, not the 1e-3 of
    # the dynamic range (0.02-0.06) that the median alone left, which made every step a
    # thousand-sigma "spot"
    dynamic = photons.flatten(1).amax(1) - level
    assert torch.all(scale > 0.5) and torch.all(scale < 20) and torch.all(scale > 10 * 1e-3 * dynamic)
    # ordinary noisy frames keep the median-based estimate (sigma ~ sqrt(100) = 10)
    level, scale = robust_normalisation(torch.from_numpy(rng.poisson(100, (4, 40, 40)).astype(np.float32)))
    assert torch.all((scale > 8.5) & (scale < 11.5))
