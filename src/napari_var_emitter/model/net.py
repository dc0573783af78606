"""VarEmitterNet: per-sample robust normalisation -> MultiScaleVQVAE -> progressive transformer.

The whole model in one module with the interface training and inference use:
``forward(frames, factors=None, with_recon=True)`` -> dict (see :meth:`VarEmitterNet.forward`).

Input normalisation. Frames arrive in photons, but users' camera parameters are often
guessed, so the network never sees absolute units: per sample it subtracts a robust
background level (the 20 % quantile of the centre frame) and divides by a robust noise
scale (the median absolute difference of neighbouring pixels, converted to a Gaussian
standard deviation; differences cancel the smooth background and most of each PSF, so
the estimate stays near the shot noise even in dense frames). The normalised image is fed
as two intensity transforms, ``asinh(x)`` (linear up to the noise level, logarithmic above:
dim and bright spots in one dynamic range) and ``asinh(x / 30)`` (linear up to bright
peaks, for photon counting). Photons and background are predicted in these normalised
units and mapped back to photons with the same level and scale, so outputs are in photons
whatever the camera gain.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .transformer import ProgressiveEmitterTransformer
from .vqvae import MultiScaleVQVAE

LEVEL_QUANTILE = 0.2
MAD_TO_SIGMA = 1.0 / (0.6745 * 2 ** 0.5)  # median |a - b| of two N(0, s^2) pixels = 0.954 s
MEAN_DIFF_TO_SIGMA = math.pi ** 0.5 / 2  # mean |a - b| of two N(0, s^2) pixels = 1.128 s
SECOND_CHANNEL_DIVISOR = 30.0


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def robust_normalisation(centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (level, scale) of frames ``centre`` (B, H, W): low quantile and noise sigma.

    The noise is the median absolute difference of neighbouring pixels, or their mean
    absolute difference where the median is 0 (a frame of a few grey levels). ``scale`` is
    floored at 1e-3 of the frame's dynamic range (and 1e-6) so that a noise-free or
    constant frame does not divide by zero.
    """
    x = centre.float()
    flat = x.flatten(1)
    k = max(1, int(LEVEL_QUANTILE * flat.shape[1]))
    level = flat.kthvalue(k, dim=1).values
    diffs = []
    if x.shape[2] > 1:
        diffs.append((x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1))
    if x.shape[1] > 1:
        diffs.append((x[:, 1:, :] - x[:, :-1, :]).abs().flatten(1))
    if diffs:
        d = torch.cat(diffs, 1)
        noise = d.median(dim=1).values * MAD_TO_SIGMA
        # a frame of a few grey levels (many electrons per ADU, low background) has most
        # neighbours equal: the median difference is 0 although the frame is noisy. The mean
        # difference (2 sigma / sqrt(pi) for Gaussian noise) still measures it
        noise = torch.where(noise > 0, noise, d.mean(dim=1) * MEAN_DIFF_TO_SIGMA)
    else:
        noise = torch.zeros_like(level)
    dynamic = (flat.amax(1) - level).clamp_min(0.0)
    scale = torch.maximum(noise, 1e-3 * dynamic).clamp_min(1e-6)
    return level, scale


class VarEmitterNet(nn.Module):
    """VAR-style multi-scale emitter prediction network (built from a ``ModelConfig``).

    ``frames`` (B, C, H, W) photons with ``C = cfg.context_frames`` consecutive frames
    (the centre one is localised); H and W must be multiples of ``cfg.patch_size``; any
    size works (the configured ``input_size`` only sets the reference token grid of the
    VQ scales).
    """

    def __init__(self, cfg):
        super().__init__()
        self.context_frames = int(cfg.context_frames)
        self.centre = self.context_frames // 2
        self.patch_size = int(cfg.patch_size)
        self.factors = [int(f) for f in cfg.factors]
        self.loc_factor = int(cfg.loc_factor)
        self.frame_mask = bool(getattr(cfg, "frame_mask", False))
        self.vqvae = MultiScaleVQVAE(cfg)
        self.transformer = ProgressiveEmitterTransformer(cfg, self.vqvae.skip_channels)

    # -- input -------------------------------------------------------------------------------
    def _check(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() == 3 and self.context_frames == 1:
            frames = frames[:, None]
        if frames.dim() != 4 or frames.shape[1] != self.context_frames:
            raise ValueError(f"frames must be (B, {self.context_frames}, H, W), got "
                             f"{tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise ValueError(f"frame size {h}x{w} is not a positive multiple of the patch "
                             f"size {self.patch_size}")
        return frames

    def normalise(self, frames: torch.Tensor):
        """(network input (B, 2C [+1 frame mask], H, W), level (B,), scale (B,), recon target
        (B, 1, H, W))."""
        frames = self._check(frames).float()
        level, scale = robust_normalisation(frames[:, self.centre])
        x = (frames - level[:, None, None, None]) / scale[:, None, None, None]
        channels = [torch.asinh(x), torch.asinh(x / SECOND_CHANNEL_DIVISOR)]
        if self.frame_mask:  # ones inside the frame; the convolutions' padding is outside
            channels.append(torch.ones_like(x[:, :1]))
        net_in = torch.cat(channels, dim=1)
        target = net_in[:, self.centre:self.centre + 1]
        return net_in, level, scale, target

    # -- paths ---------------------------------------------------------------------------
    def forward(self, frames: torch.Tensor, factors=None, with_recon: bool = True) -> dict:
        """Predict emitter maps.

        Returns a dict:

        - ``maps``: ``{f: {...}}`` for each requested factor (default all ``cfg.factors``),
          each a dict of (B, f*H, f*W) float32 tensors: ``logit``, ``prob``, ``offset_x``,
          ``offset_y`` (input px from the map-pixel centre ``(j + 0.5)/f - 0.5``),
          ``photons`` (photons), ``sigma_x``, ``sigma_y`` (1-sigma position error, input
          px), ``background`` (photons per input px).
        - ``background``: (B, H, W) photons per input px at input resolution.
        - ``norm_level``, ``norm_scale``: (B,) the per-sample normalisation (photons).
        - ``vq``: ``loss`` (float32 scalar), ``perplexity``, ``usage`` (fraction of codes
          used in this batch), ``indices`` (one code map per VQ scale).
        - ``recon``, ``recon_target``: (B, 1, H, W) reconstructed and true normalised centre
          frame (``asinh`` of the normalised frame); only when ``with_recon``.

        ``factors=[2], with_recon=False`` is the fast inference path: no finer scale, no
        VQ decoder and (in eval mode) no VQ loss is computed.
        """
        factors = self.factors if factors is None else [int(f) for f in factors]
        net_in, level, scale, target = self.normalise(frames)
        skip, tokens = self.vqvae.encode(net_in)
        # the VQ loss is a training term: the inference fast path does not compute it
        tokens_q, vq = self.vqvae.quantize(tokens, with_loss=with_recon or self.training)
        out = {"norm_level": level, "norm_scale": scale, "vq": vq}
        if factors:
            use_q = tokens_q if self.vqvae.use_quantization else None
            maps, background = self.transformer(tokens, use_q, skip, level, scale, factors)
            out["maps"] = maps
            out["background"] = background
        else:
            out["maps"] = {}
        if with_recon:
            out["recon"] = self.vqvae.decode(tokens_q).float()
            out["recon_target"] = target
        return out

    def reconstruct(self, frames: torch.Tensor) -> dict:
        """Reconstruction-only path for unlabeled frames: encoder + VQ + decoder, no heads.

        Returns ``{"recon", "recon_target", "vq", "maps": {}}``; :class:`~..losses.VarEmitterLoss`
        then computes only the reconstruction and VQ terms.
        """
        return self.forward(frames, factors=[], with_recon=True)
