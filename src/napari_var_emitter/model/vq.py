"""Vector quantiser with an EMA codebook, dead-code restart and straight-through gradients.

The codebook is not trained by gradients but by exponential moving averages of the vectors
assigned to each code (van den Oord et al. 2017, appendix; Razavi et al. 2019): this is
steadier than the codebook loss term and lets the model train with a single commitment
term. Codes that stop being used (their EMA count falls below a fraction of the average)
are restarted from vectors of the current batch, which is what keeps the codebook from
collapsing onto a handful of entries when the encoder's output distribution drifts early
in training. Distances and EMA statistics are always computed in float32 so that the
quantiser is safe under bf16/fp16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-code lookup over a codebook of ``codebook_size`` vectors of ``dim`` entries.

    Parameters
    ----------
    codebook_size, dim:
        Number of codes and their length.
    decay:
        EMA decay of the per-code counts and sums (higher = slower codebook).
    beta:
        Weight of the commitment loss ``beta * |z - sg(q)|^2``.
    dead_fraction:
        A code whose EMA count is below ``dead_fraction`` times the average count is dead
        and is restarted from a random vector of the current batch.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.95, beta: float = 0.25,
                 dead_fraction: float = 0.05, eps: float = 1e-5):
        super().__init__()
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.decay = float(decay)
        self.beta = float(beta)
        self.dead_fraction = float(dead_fraction)
        self.eps = float(eps)
        # Buffers, not parameters: the codebook moves by EMA only (and is saved in checkpoints).
        self.register_buffer("codebook", torch.randn(self.codebook_size, self.dim) * 0.1)
        # A zero count marks every code as dead, so the first training update restarts the
        # whole codebook from batch vectors: data-dependent initialisation for free.
        self.register_buffer("ema_count", torch.zeros(self.codebook_size))
        self.register_buffer("ema_sum", torch.zeros(self.codebook_size, self.dim))
        self.register_buffer("restarts", torch.tensor(0, dtype=torch.long))

    # -- lookup -----------------------------------------------------------------------------
    def lookup(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) for each row of ``z_flat``."""
        z = z_flat.detach().float()
        cb = self.codebook.float()
        # autocast would run the matmul in bf16/fp16 and pick wrong codes: keep float32
        with torch.autocast(device_type=z.device.type, enabled=False):
            # |z|^2 is the same for every code, so only -2 z.c + |c|^2 decides the argmin.
            dist = cb.pow(2).sum(1)[None, :] - 2.0 * (z @ cb.t())
        return dist.argmin(dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for integer ``indices`` of any shape -> shape + (D,)."""
        return F.embedding(indices, self.codebook)

    # -- training-time codebook maintenance -------------------------------------------------
    @torch.no_grad()
    def update(self, z_flat: torch.Tensor, indices: torch.Tensor) -> None:
        """EMA update of the codebook from vectors ``z_flat`` (N, D) assigned to ``indices`` (N,).

        Every call restarts dead codes from random vectors of the batch; on the first call
        all codes are dead, which initialises the codebook from the data. Only call in
        training mode.
        """
        z = z_flat.detach().float()
        n = z.shape[0]
        if n == 0:
            return
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, z)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        # Laplace smoothing keeps codes with tiny counts from dividing by ~0.
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_fraction * (total / self.codebook_size)
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, n, (n_dead,), device=z.device)
            fresh = z[pick] + 1e-3 * z.std() * torch.randn(n_dead, self.dim, device=z.device)
            avg = total / self.codebook_size
            self.codebook[dead] = fresh
            self.ema_count[dead] = avg
            self.ema_sum[dead] = fresh * avg
            self.restarts.add_(n_dead)

    # -- statistics -------------------------------------------------------------------------
    def statistics(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(perplexity, usage) of a set of code indices: exp(entropy) and fraction of codes hit."""
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        usage = (counts > 0).float().mean()
        return entropy.exp(), usage

    # -- the usual one-scale quantiser ------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantise ``z`` of shape (N, D) or (B, D, H, W).

        Returns ``(z_q, info)``: ``z_q`` has the code values in the forward pass and the
        gradient of ``z`` in the backward pass (straight-through); ``info`` has ``loss``
        (commitment loss, float32), ``indices``, ``perplexity`` and ``usage``.
        In training mode the codebook is updated by EMA after the lookup.
        """
        spatial = z.dim() == 4
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim) if spatial else z
        idx = self.lookup(flat)
        q = self.embed(idx).to(flat.dtype)
        loss = self.beta * F.mse_loss(flat.float(), q.detach().float())
        if self.training:
            self.update(flat, idx)
        q_st = flat + (q - flat).detach()
        if spatial:
            b, _, h, w = z.shape
            q_st = q_st.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
            idx = idx.reshape(b, h, w)
        perplexity, usage = self.statistics(idx)
        return q_st, {"loss": loss, "indices": idx, "perplexity": perplexity, "usage": usage}
