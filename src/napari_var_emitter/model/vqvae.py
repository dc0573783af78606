"""Multi-scale VQ-VAE: conv encoder -> token map -> VAR-style residual quantisation -> decoder.

The encoder turns the (normalised) input tile into native-resolution skip features and a
token map of side ``H / patch_size`` (10x10 for a 40x40 tile). The token map is quantised
the way VAR (Tian et al. 2024) builds its multi-scale token maps: the residual left by the
coarser scales is area-pooled to the next side, replaced by its nearest code of a single
shared codebook, upsampled back (bicubic), passed through a small conv ``phi`` (which
undoes the blur of upsampling a coarse code) and subtracted. The sum of the scales is the
quantised map; the decoder reconstructs the centre frame from it alone, so the discrete
latents must describe the frame (reconstruction loss), which is what lets the model learn
from unlabeled frames. The codebook is updated by EMA with dead-code restarts
(:class:`~.vq.VectorQuantizer`), quantisation is done in a small ``code_dim`` space because
short vectors are used more evenly by a codebook than long ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vq import VectorQuantizer


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with 'same' padding (zero padding: the frame edge is visible to the net)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class ConvEncoder(nn.Module):
    """Cheap conv encoder: native-resolution skip features and a token map (stride ``patch``).

    Cost per 40x40 frame (base 32, embed 128, patch 4): ~65 MFLOP. Two 3x3 convs at native
    resolution see a 5x5 neighbourhood (enough for the skip features to carry sub-pixel
    spot shape); one stride-2 level and a 2x2 patchify conv make the tokens.
    """

    def __init__(self, in_channels: int, base_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        c = base_channels
        self.stem = nn.Sequential(conv3x3(in_channels, max(c // 2, 4)), nn.SiLU(),
                                  conv3x3(max(c // 2, 4), c), nn.SiLU())
        if patch_size % 2 == 0:
            self.down = conv3x3(c, 2 * c, stride=2)
            self.down_block = conv3x3(2 * c, 2 * c)
            self.patchify = nn.Conv2d(2 * c, embed_dim, patch_size // 2, stride=patch_size // 2)
        else:
            self.down = None
            self.down_block = None
            self.patchify = nn.Conv2d(c, embed_dim, patch_size, stride=patch_size)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in, H, W) -> (skip (B, base, H, W), tokens (B, embed, H/p, W/p))."""
        skip = self.stem(x)
        y = skip
        if self.down is not None:
            y = F.silu(self.down(y))
            y = y + F.silu(self.down_block(y))
        return skip, self.patchify(y)


class FrameDecoder(nn.Module):
    """Token map (B, E, h, w) -> reconstructed normalised centre frame (B, 1, h*p, w*p)."""

    def __init__(self, embed_dim: int, patch_size: int, channels: int = 16):
        super().__init__()
        self.lift = nn.Conv2d(embed_dim, channels * patch_size * patch_size, 1)
        self.shuffle = nn.PixelShuffle(patch_size)
        self.refine = nn.Sequential(conv3x3(channels, channels), nn.SiLU(), conv3x3(channels, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode; linear output (the target is an unbounded normalised image)."""
        return self.refine(F.silu(self.shuffle(self.lift(tokens))))


class Phi(nn.Module):
    """VAR's residual refinement of an upsampled code map: ``(1 - r) x + r conv3x3(x)``."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__()
        self.conv = conv3x3(dim, dim)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blend of the input and its 3x3 refinement (same shape)."""
        return x * (1 - self.ratio) + self.conv(x) * self.ratio


def scale_sides(vq_scales, reference_grid, grid) -> list[tuple[int, int]]:
    """Token-map sides of each quantisation scale for a token grid ``grid`` = (h, w).

    ``vq_scales`` are sides for the ``reference_grid`` (the configured input size over the
    patch size, e.g. 10x10); other grids scale them per axis (rounded, >= 1, <= the grid),
    so a 12x16 grid with scales [1, 2, 5, 10] uses (1,2), (2,3), (6,8), (12,16).
    """
    h, w = grid
    rh, rw = reference_grid
    sides = []
    for s in vq_scales:
        sh = min(h, max(1, int(round(s * h / rh))))
        sw = min(w, max(1, int(round(s * w / rw))))
        sides.append((sh, sw))
    return sides


_BICUBIC_CACHE: dict = {}


def upsample_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` as one matrix product.

    Bicubic upsampling is a fixed linear map from the ``sh x sw`` inputs to the ``h x w``
    outputs; on a CPU, interpolating the tiny code maps (1x1 to 5x5 -> 10x10) cost 2 ms per
    scale for a batch of 64 tiles (3 % of a forward pass) where the product costs 0.05 ms.
    The matrix is the interpolation of the identity, so the result is the same up to
    rounding (1e-6); it is cached per shape, device and dtype. Like ``F.interpolate``, the
    product runs in ``x``'s own dtype under autocast too: mixed precision would otherwise
    round the fp32 code residuals to fp16/bf16 before the next scale's nearest-code search.
    """
    b, d, sh, sw = x.shape
    h, w = size
    key = (sh, sw, h, w, x.device, x.dtype)
    matrix = _BICUBIC_CACHE.get(key)
    if matrix is None:
        # a plain tensor even when first made during inference: an inference-mode tensor
        # in the cache would break training later in the same process (fine-tuning in napari)
        with torch.inference_mode(False), torch.no_grad():
            eye = torch.eye(sh * sw, device=x.device, dtype=torch.float32).reshape(-1, 1, sh, sw)
            matrix = F.interpolate(eye, size=(h, w), mode="bicubic", align_corners=False)
            matrix = matrix.reshape(sh * sw, h * w).to(x.dtype)
        _BICUBIC_CACHE[key] = matrix
    with torch.autocast(x.device.type, enabled=False):
        return (x.reshape(b, d, sh * sw) @ matrix).reshape(b, d, h, w)


class MultiScaleVQVAE(nn.Module):
    """Encoder + multi-scale residual vector quantisation + frame decoder.

    ``encode`` -> (skip, tokens); ``quantize(tokens)`` -> (quantised tokens, vq info);
    ``decode(tokens)`` -> reconstruction; ``forward(x)`` runs all three (the
    reconstruction-only training path, no emitter heads).
    """

    def __init__(self, cfg):
        super().__init__()
        # two intensity transforms per frame, plus the frame mask (model.frame_mask)
        self.in_channels = 2 * cfg.context_frames + int(bool(getattr(cfg, "frame_mask", False)))
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.code_dim = getattr(cfg, "code_dim", 32)
        self.vq_scales = [int(s) for s in cfg.vq_scales]
        self.reference_grid = (cfg.input_size[0] // cfg.patch_size,
                               cfg.input_size[1] // cfg.patch_size)
        self.use_quantization = bool(cfg.use_quantization)
        self.encoder = ConvEncoder(self.in_channels, cfg.base_channels, cfg.embed_dim,
                                   cfg.patch_size)
        self.decoder = FrameDecoder(cfg.embed_dim, cfg.patch_size)
        if self.use_quantization:
            self.quant_in = nn.Conv2d(cfg.embed_dim, self.code_dim, 1)
            self.quantizer = VectorQuantizer(cfg.codebook_size, self.code_dim)
            self.phis = nn.ModuleList(Phi(self.code_dim) for _ in self.vq_scales)
            self.quant_out = nn.Conv2d(self.code_dim, cfg.embed_dim, 1)

    @property
    def skip_channels(self) -> int:
        """Channels of the native-resolution skip features."""
        return self.encoder.out_channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input (B, 2C, H, W) -> (skip features (B, base, H, W), tokens (B, E, h, w))."""
        return self.encoder(x)

    def quantize(self, tokens: torch.Tensor, with_loss: bool = True) -> tuple[torch.Tensor, dict]:
        """VAR residual quantisation of ``tokens``; returns (quantised tokens (B, E, h, w), info).

        ``info``: ``loss`` (mean over scales of |f_hat - sg(f)|^2 + 0.25 |sg(f_hat) - f|^2,
        float32; the first term trains ``phi``, the second is the commitment of the
        encoder), ``perplexity``, ``usage`` (fraction of codes used in this batch over all
        scales), ``indices`` (one (B, sh, sw) map per scale). The quantised tokens pass the
        encoder's gradient straight through. Without quantisation (ablation) the tokens are
        returned unchanged with zero loss. ``with_loss=False`` (inference) skips the loss
        (reported as 0): it only matters for training and costs ~5 % of a fast-path call.
        """
        if not self.use_quantization:
            zero = tokens.new_zeros((), dtype=torch.float32)
            return tokens, {"loss": zero, "perplexity": zero, "usage": zero, "indices": []}
        f = self.quant_in(tokens).float()
        b, d, h, w = f.shape
        target = f.detach()
        rest = target.clone()
        f_hat = torch.zeros_like(f)
        loss = f.new_zeros(())
        zs, idxs, maps = [], [], []
        sides = scale_sides(self.vq_scales, self.reference_grid, (h, w))
        vq = self.quantizer
        for phi, (sh, sw) in zip(self.phis, sides):
            full = (sh, sw) == (h, w)
            z = rest if full else F.adaptive_avg_pool2d(rest, (sh, sw))
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            idx = vq.lookup(z_flat)
            q = vq.embed(idx).reshape(b, sh, sw, d).permute(0, 3, 1, 2)
            if not full:
                q = upsample_bicubic(q, (h, w))
            step = phi(q).float()
            f_hat = f_hat + step
            rest = rest - step.detach()
            if with_loss:
                loss = loss + F.mse_loss(f_hat, target) + vq.beta * F.mse_loss(f_hat.detach(), f)
            zs.append(z_flat)
            idxs.append(idx)
            maps.append(idx.reshape(b, sh, sw))
        loss = loss / len(sides)
        all_idx = torch.cat(idxs)
        if self.training:
            vq.update(torch.cat(zs), all_idx)
        perplexity, usage = vq.statistics(all_idx)
        f_st = f + (f_hat - f).detach()
        quantised = self.quant_out(f_st.to(tokens.dtype))
        return quantised, {"loss": loss, "perplexity": perplexity, "usage": usage,
                           "indices": maps}

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Quantised tokens -> reconstructed normalised centre frame (B, 1, H, W)."""
        return self.decoder(tokens)

    def forward(self, x: torch.Tensor) -> dict:
        """Reconstruction path only: encode, quantise, decode.

        Returns ``{"recon", "vq", "skip", "tokens", "tokens_q"}``.
        """
        skip, tokens = self.encode(x)
        tokens_q, info = self.quantize(tokens)
        return {"recon": self.decode(tokens_q), "vq": info, "skip": skip, "tokens": tokens,
                "tokens_q": tokens_q}
