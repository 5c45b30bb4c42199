"""Integrations: the SDPA drop-in, transformers, diffusers and diffusion-LM generation loops.

One module per target; only :mod:`.sdpa` is imported eagerly (transformers and diffusers are
optional dependencies, imported when their module is).
"""

from .sdpa import SDPAPatch, SparseConfig, patch_sdpa, sparse_sdpa

__all__ = ["SDPAPatch", "SparseConfig", "patch_sdpa", "sparse_sdpa"]
