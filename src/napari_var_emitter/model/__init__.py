"""The VAR-style emitter prediction model.

:class:`VarEmitterNet` is the whole network; its parts are :class:`VectorQuantizer` (EMA
codebook), :class:`MultiScaleVQVAE` (encoder, VAR residual quantisation, frame decoder) and
:class:`ProgressiveEmitterTransformer` (global context + next-scale emitter heads).
"""

from .net import VarEmitterNet, count_parameters, robust_normalisation
from .transformer import ProgressiveEmitterTransformer
from .vq import VectorQuantizer
from .vqvae import MultiScaleVQVAE

__all__ = ["VectorQuantizer", "MultiScaleVQVAE", "ProgressiveEmitterTransformer",
           "VarEmitterNet", "count_parameters", "robust_normalisation"]
