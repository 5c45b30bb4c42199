"""sparse-attn: sparse attention kernels (Triton) with a pattern layer above them.

Dataflow: pattern -> mask (:class:`BlockSparseMask`) -> :func:`sparse_attention` -> kernel.
"""

from .mask import BlockSparseMask, ranges_from_attention_mask, ranges_from_lengths
from .ops import sparse_attention
from .varlen import sparse_attention_varlen, stack_masks
from .integrations.sdpa import patch_sdpa, sparse_sdpa
from .stripe_mask import StripeSparseMask
from .stripe_ops import stripe_attention
from .permuted import PermutedMask, permuted_attention
from .routed import RoutedMask, routed_attention
from .layout import TokenLayout
from .quality import attention_quality
from .patterns import Pattern, get_pattern, list_patterns, pattern_from_json
from .distributed import ring_attention, ulysses_attention
from .decode import sparse_attention_with_kvcache
from .kvcache import PageSummaries
from .dynamic_mask import DynamicMaskAttention, dynamic_mask

__version__ = "0.1.0"
__all__ = [
    "BlockSparseMask", "StripeSparseMask", "PermutedMask", "sparse_attention", "stripe_attention",
    "sparse_attention_varlen", "stack_masks", "ranges_from_attention_mask", "ranges_from_lengths",
    "permuted_attention", "RoutedMask", "routed_attention",
    "TokenLayout", "attention_quality", "Pattern", "get_pattern", "list_patterns", "pattern_from_json",
    "patch_sdpa", "sparse_sdpa", "sparse_attention_with_kvcache", "PageSummaries", "ring_attention",
    "ulysses_attention", "DynamicMaskAttention", "dynamic_mask", "__version__",
]
