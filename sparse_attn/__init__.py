"""sparse-attn: sparse attention kernels (Triton) with a pattern layer above them.

Dataflow: pattern -> mask (:class:`BlockSparseMask`) -> :func:`sparse_attention` -> kernel.
"""

from .mask import BlockSparseMask
from .ops import sparse_attention

__version__ = "0.1.0"
__all__ = ["BlockSparseMask", "sparse_attention", "__version__"]
