"""Context-parallel sparse attention over ``torch.distributed``: Ulysses (all-to-all) and ring (docs/distributed.md)."""

from ._comm import CommStats, count_bytes
from .plan import RingPlan, contiguous_chunks, shard, step_mask, unshard, zigzag_chunks
from .ring import ring_attention, ring_plan
from .share import broadcast_mask
from .sdpa_ring import ring_sdpa
from .ulysses import head_spans, ulysses_attention

__all__ = ["ulysses_attention", "ring_attention", "ring_plan", "RingPlan", "contiguous_chunks", "zigzag_chunks",
           "shard", "unshard", "step_mask", "head_spans", "count_bytes", "CommStats",
           "broadcast_mask", "ring_sdpa"]
