"""Integrations: the SDPA drop-in, transformers, diffusers and diffusion-LM generation loops.

One module per target; only :mod:`.sdpa` and :mod:`.calibrate` (a config that feeds a pattern search)
are imported eagerly (transformers and diffusers are optional dependencies, imported when their module is).
"""

from .sdpa import SDPAPatch, SparseConfig, patch_sdpa, sparse_sdpa
from .calibrate import CalibrationConfig  # calibrate() stays in its module (same name as the module)

__all__ = ["CalibrationConfig", "SDPAPatch", "SparseConfig", "patch_sdpa", "sparse_sdpa"]
