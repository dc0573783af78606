"""Progressive emitter transformer: global context once, then next-scale emitter prediction.

Design (why it looks like this)
-------------------------------
VAR predicts an image scale by scale, each scale conditioned on all coarser ones through
block-causal attention over the concatenated token maps. Done literally for emitter maps
of a 40x40 tile that is 80^2 + 160^2 + 320^2 ~ 134k tokens: unaffordable on a CPU (the
field notes measured 42 frames/s for a model whose transposed-conv decoders to 80/160/320
dominate the cost; attention over the fine scales would be orders of magnitude worse).
So the chain is split in two parts:

1. **Global context once, on the coarse token grid.** A pre-norm transformer (``num_layers``
   blocks, ``num_heads`` heads, 2-D sine-cosine positions computed for any grid size) runs
   over the 10x10 token map (the continuous encoder tokens plus the multi-scale quantised
   tokens of :class:`~.vqvae.MultiScaleVQVAE`). This is where frame-wide information lives:
   background level, PSF width, density, neighbouring spots that overlap.
2. **Next-scale prediction by convolution.** The token features return to native
   resolution (1x1 conv + PixelShuffle) and are fused with the encoder's native skip
   features, then refined by ``refine_blocks`` residual conv blocks at native resolution
   (:class:`RefineBlock`: the sub-pixel detail the offsets need). Scale ``x2`` is predicted from them (1x1 conv + PixelShuffle(2), 1x1 heads).
   Every finer scale ``f_{k+1} = r f_k`` is predicted from (a) the features of scale ``k``
   and (b) scale ``k``'s own *predictions* (detection probability, logit, offsets
   expressed in finer map pixels, photons, sigma), mixed and refined at scale ``k``'s
   resolution and read out per finer sub-pixel by a 1x1 conv + PixelShuffle(r)
   (:class:`ScaleStage` explains why this states "where is the coarse estimate relative to
   this finer pixel" exactly). That is VAR's next-scale chain (each scale conditioned on
   the coarser scale's output) with local conditioning, which is all a finer scale needs:
   where an emitter is at x4 is decided within the x2 pixel that already claimed it. The
   coarser predictions are detached when used as conditioning so a finer scale's loss
   never degrades a coarser scale's calibration (coarser outputs are fixed inputs, as in
   VAR's teacher-forced training); the shared features still learn from every scale.

Only the requested scales and those below them are computed: ``factors=[2]`` (the
localisation scale) never touches the x4/x8 layers.

Outputs per scale (dict of (B, f*H, f*W) tensors): ``logit`` (soft-clamped to
+-(10 + 2 ln f) so that a map with f^2 times more pixels can still say "nothing here": with
DECODE's +-8 an 80x80 map could not go below ~2 phantom emitters per 40x40 tile), ``prob``,
``offset_x``, ``offset_y`` (input px, relative to the map pixel centre
``(j + 0.5)/f - 0.5``, within +-1 map pixel), ``photons`` (photons), ``sigma_x``,
``sigma_y`` (predicted 1-sigma position error in input px, log-uniformly bounded to
[0.005, 3] px so that 0.02 px (bright) and 0.5 px (dim) are equally easy to express) and
``background`` (photons per input px, predicted at native resolution and upsampled).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_MIN = 0.005  # input px; far below any CRLB (~0.02 px for the brightest emitters)
SIGMA_MAX = 3.0  # input px; beyond this a "localisation" carries no information
PRIOR_DENSITY = 0.01  # emitters per input pixel assumed at initialisation (~16 per 40x40)
N_HEAD_CHANNELS = 6  # logit, offset_x, offset_y, log photons, sigma_x, sigma_y


def logit_bound(factor: int) -> float:
    """Soft clamp of the detection logit at scale ``factor`` (10 + 2 ln f)."""
    return 10.0 + 2.0 * math.log(factor)


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D sine-cosine position embedding (h*w, dim) for any grid (dim divisible by 4)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    oy = ys.reshape(-1, 1) * omega[None]
    ox = xs.reshape(-1, 1) * omega[None]
    emb = torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)
    if emb.shape[1] < dim:  # dim not divisible by 4: pad with zeros
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(dtype)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (self-attention + MLP with ratio 2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> tokens (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class RefineBlock(nn.Module):
    """Residual block at native resolution: ``x + conv3x3(silu(conv3x3_dilated(x)))``.

    The encoder's skip path sees only a 5x5 neighbourhood through two thin convolutions;
    sub-pixel offsets of a spot with sigma up to 2 px need a wider and deeper view at full
    resolution (the token path is 4x coarser). Dilation grows the receptive field by
    ``2 * dilation + 2`` px per block at the cost of a plain 3x3 pair. The second
    convolution starts at zero, so a new block is the identity: blocks can be added to a
    trained model without changing its output (``model.refine_blocks``, ``train --init``).
    """

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x + self.conv2(F.silu(self.conv1(x)))


def scale_channels(factor: int) -> int:
    """Feature channels at upsampling ``factor`` (fewer where maps are large)."""
    return max(8, 32 // factor)


class ScaleStage(nn.Module):
    """One scale of the next-scale chain (sub-pixel convolution heads).

    First stage (x2 from native features ``F0``): ``y = silu(PixelShuffle(1x1(F0)))`` at the
    map resolution, heads by 1x1 conv on ``y``.

    Finer stage (``f = r * f_prev``): everything runs at the *coarser* resolution ``f_prev``
    and only the outputs are pixel-shuffled up. Input: the coarser features and the coarser
    scale's (detached) predictions, ``N_COND`` channels: probability, logit, offsets in
    *finer* map pixels, log photons, log sigma. ``h = silu(1x1(cat))``, refined by a
    depthwise-separable 3x3; heads ``PixelShuffle(1x1(h))`` give each finer sub-pixel ``s``
    its own linear read-out of ``h``. The coarse emitter estimate ``o`` (finer px) seen from
    sub-pixel ``s`` lies at ``o - (s + 0.5 - r/2)``, a linear function of the inputs with a
    per-sub-pixel constant, so the read-out can state each finer pixel's offset directly.
    No feature map with more than 6 channels ever exists at 320x320 (the full-resolution
    maps dominated the measured cost of earlier designs); features for a still finer
    scale are pixel-shuffled the same way only when that scale is requested.
    """

    N_COND = 6  # prob, logit/bound, offset_x, offset_y (finer px), log photons, log sigma

    def __init__(self, in_channels: int, ratio: int, factor: int, first: bool):
        super().__init__()
        c = scale_channels(factor)
        self.ratio = ratio
        self.factor = factor
        self.first = first
        self.out_channels = c
        self.shuffle = nn.PixelShuffle(ratio)
        if first:
            self.lift = nn.Conv2d(in_channels, c * ratio * ratio, 1)
            self.mix = self.refine = None
            self.head = nn.Conv2d(c, N_HEAD_CHANNELS, 1)
            per_pixel = 1
        else:
            h = in_channels
            self.mix = nn.Conv2d(in_channels + self.N_COND, h, 1)
            self.refine = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h),
                                        nn.Conv2d(h, h, 1), nn.SiLU())
            self.head = nn.Conv2d(h, N_HEAD_CHANNELS * ratio * ratio, 1)
            self.lift = nn.Conv2d(h, c * ratio * ratio, 1)
            per_pixel = ratio * ratio
        with torch.no_grad():  # start quiet: prior density, zero offsets, sigma ~0.3 px
            self.head.weight.mul_(0.1)
            bias = torch.zeros(N_HEAD_CHANNELS)
            p0 = PRIOR_DENSITY / factor ** 2
            bias[0] = math.log(p0 / (1 - p0))
            bias[3] = math.log(30.0)  # ~30 noise units of photons
            # errors of an untrained offset are ~1/(2f) px: start sigma at 0.3 px
            log_lo, log_hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
            frac = (math.log(0.3) - log_lo) / (log_hi - log_lo)
            bias[4:6] = math.log(frac / (1 - frac))
            # PixelShuffle reads output channel k at sub-pixel s from input k * r^2 + s
            self.head.bias.copy_(bias.repeat_interleave(per_pixel))

    def forward(self, feats: torch.Tensor, cond: torch.Tensor | None, need_features: bool):
        """-> (features at this scale or None, raw head output (B, 6, fH, fW))."""
        if self.first:
            y = F.silu(self.shuffle(self.lift(feats)))
            return y, self.head(y)
        h = F.silu(self.mix(torch.cat([feats, cond], dim=1)))
        h = h + self.refine(h)
        raw = self.shuffle(self.head(h))
        y = F.silu(self.shuffle(self.lift(h))) if need_features else None
        return y, raw


class ProgressiveEmitterTransformer(nn.Module):
    """Transformer over the token grid, return to native resolution, next-scale heads.

    ``forward(tokens, tokens_q, skip, level, scale, factors)`` -> ``(maps, background)``:
    ``maps[f]`` the output dict of each requested factor (see module docstring),
    ``background`` (B, H, W) photons per input px. ``level``/``scale`` (B,) undo the
    per-sample input normalisation so that photons and background come out in photons.
    """

    def __init__(self, cfg, skip_channels: int):
        super().__init__()
        e = cfg.embed_dim
        p = cfg.patch_size
        c = skip_channels
        self.embed_dim = e
        self.patch_size = p
        self.factors = [int(f) for f in cfg.factors]
        self.token_norm = nn.LayerNorm(e)
        self.blocks = nn.ModuleList(TransformerBlock(e, cfg.num_heads)
                                    for _ in range(cfg.num_layers))
        self.out_norm = nn.LayerNorm(e)
        self.to_native = nn.Conv2d(e, c * p * p, 1)
        self.unpatch = nn.PixelShuffle(p)
        self.fuse = nn.Conv2d(c, c, 3, padding=1)
        # dilations 1, 2, 1, 2, ...: alternate fine detail and reach
        self.refine = nn.ModuleList(RefineBlock(c, dilation=1 + i % 2)
                                    for i in range(int(getattr(cfg, "refine_blocks", 0))))
        self.background_head = nn.Conv2d(c, 1, 1)
        stages = []
        prev_factor, prev_channels = 1, c
        for i, f in enumerate(self.factors):
            if f % prev_factor:
                raise ValueError(f"factor {f} is not a multiple of the previous factor "
                                 f"{prev_factor}")
            st = ScaleStage(prev_channels, f // prev_factor, f, first=(i == 0))
            stages.append(st)
            prev_factor, prev_channels = f, st.out_channels
        self.stages = nn.ModuleList(stages)
        self._pos_cache: dict = {}

    def _positions(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, str(device), dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = sincos_2d(h, w, self.embed_dim, device=device, dtype=dtype)
            self._pos_cache[key] = pos
        return pos

    def context(self, tokens: torch.Tensor, tokens_q: torch.Tensor | None) -> torch.Tensor:
        """Transformer over the token grid -> token features (B, E, h, w)."""
        b, e, h, w = tokens.shape
        x = tokens if tokens_q is None else tokens + tokens_q
        x = x.flatten(2).transpose(1, 2)
        x = self.token_norm(x) + self._positions(h, w, x.device, x.dtype)
        for blk in self.blocks:
            x = blk(x)
        x = self.out_norm(x)
        return x.transpose(1, 2).reshape(b, e, h, w)

    def forward(self, tokens, tokens_q, skip, level, scale, factors):
        """Predict the maps of ``factors`` (each must be one of ``cfg.factors``)."""
        wanted = set(int(f) for f in factors)
        unknown = wanted - set(self.factors)
        if unknown:
            raise ValueError(f"factors {sorted(unknown)} are not among the model's factors "
                             f"{self.factors}")
        ctx = self.context(tokens, tokens_q)
        feats = F.silu(self.unpatch(self.to_native(ctx)) + skip)
        feats = feats + F.silu(self.fuse(feats))
        for block in self.refine:
            feats = block(feats)
        lvl = level.reshape(-1, 1, 1).float()
        scl = scale.reshape(-1, 1, 1).float()
        bg_norm = self.background_head(feats)[:, 0].float()
        background = (lvl + scl * bg_norm).clamp_min(0.0)
        maps = {}
        last = max(wanted) if wanted else 0
        cond = None
        x = feats
        for stage in self.stages:
            f = stage.factor
            if f > last:
                break
            x, raw = stage(x, cond, need_features=f < last)
            out = self._activate(raw.float(), f, scl, background)
            if f in wanted:
                maps[f] = out
            if f < last:
                cond = self._condition(out, raw.dtype, f, scl)
        return maps, background

    def _condition(self, out: dict, dtype, factor: int, scale: torch.Tensor) -> torch.Tensor:
        """Detached coarse predictions (B, N_COND, fH, fW) that condition the next finer stage."""
        idx = [st.factor for st in self.stages].index(factor)
        finer = factor * self.stages[idx + 1].ratio
        with torch.no_grad():
            cond = torch.stack([
                out["prob"],
                out["logit"] / logit_bound(factor),
                out["offset_x"] * finer,
                out["offset_y"] * finer,
                (torch.log(out["photons"] / scale + 1e-6) - 3.0) / 3.0,
                torch.log(0.5 * (out["sigma_x"] + out["sigma_y"])),
            ], dim=1)
        return cond.to(dtype)

    @staticmethod
    def _activate(raw: torch.Tensor, factor: int, scale: torch.Tensor, background: torch.Tensor):
        """Raw head channels (B, 6, fH, fW) -> bounded physical outputs (float32)."""
        # unbind, not raw[:, k]: each slice's backward would allocate a full-size zero tensor
        r_logit, r_ox, r_oy, r_photons, r_sx, r_sy = raw.unbind(1)
        bound = logit_bound(factor)
        logit = bound * torch.tanh(r_logit / bound)
        log_lo, log_span = math.log(SIGMA_MIN), math.log(SIGMA_MAX) - math.log(SIGMA_MIN)
        photons = scale * torch.exp(r_photons.clamp(-8.0, 12.0))
        bg = background[:, None]
        if factor != 1:
            bg = F.interpolate(bg, scale_factor=factor, mode="bilinear", align_corners=False)
        return {
            "logit": logit,
            "prob": torch.sigmoid(logit),
            "offset_x": torch.tanh(r_ox) / factor,
            "offset_y": torch.tanh(r_oy) / factor,
            "photons": photons,
            "sigma_x": torch.exp(log_lo + torch.sigmoid(r_sx) * log_span),
            "sigma_y": torch.exp(log_lo + torch.sigmoid(r_sy) * log_span),
            "background": bg[:, 0],
        }
