"""napari-var-emitter: VAR-style multi-scale emitter prediction for SMLM.

The importable core (no Qt needed) walks: :mod:`.config` -> :mod:`.simulation` / :mod:`.io`
-> :mod:`.dataset` -> :mod:`.model` -> :mod:`.losses` -> :mod:`.training` / :mod:`.inference`
-> :mod:`.cli`; the napari plugin lives in :mod:`._napari` and only calls the core.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
