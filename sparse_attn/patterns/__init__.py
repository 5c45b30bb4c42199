"""Patterns: small configured objects that decide which tiles attention computes.

Every pattern is a frozen dataclass with ``build(q, k, *, causal=False, layout=None) -> mask``;
structural ones (positions only) also give ``mask_mod(b, h, q_idx, kv_idx)`` and ``build_for(Lq, Lk)``.
Registry names (the same in docs/patterns.md) come from :func:`list_patterns`.

Example:
    >>> pat = get_pattern("block_topk", k=8)
    >>> pattern_from_json(pat.to_json()) == pat
    True
"""

from ._scoring import padding
from .base import (Pattern, StructuralPattern, get_pattern, list_patterns, pattern_from_dict, pattern_from_json,
                   register)
from .static import Dense, SinkLocal, Skip, SlidingWindow, VerticalStripes
from .video import MultiDiagonal, Window3D
from .dynamic import BlockTopK, BlockTopP
from .estimate import ExactImportance, LSEMass, VerticalSlash
from .anchor import Anchor
from .xattention import XAttention
from .combine import PerHead, Union
from .routing import KMeansRouting, RoutingState, kmeans
from .equal_routing import EqualSizeRouting, SharedCentroids
from .hierarchical import ChunkSelect, VideoChunkSelect
from .dhsa import DHSA
from .region import RegionRouting
from .hip import HiP
from .sparsifiner import Sparsifiner, SparsifinerPredictor
from .search import PatternSearch, SearchPlan, search_plan
from .grid import candidate_grid
from .synthetic import build_cost_table, pattern_table, planted_qkv
from .decode import (KineticsSelect, LokiSelect, QuestSelect, decode_pattern_from_dict, get_decode_pattern,
                     list_decode_patterns)

__all__ = [
    "padding", "Pattern", "StructuralPattern", "get_pattern", "list_patterns", "pattern_from_dict", "pattern_from_json",
    "register", "Dense", "Skip", "SlidingWindow", "SinkLocal", "VerticalStripes", "MultiDiagonal", "Window3D",
    "BlockTopK", "BlockTopP", "ExactImportance", "LSEMass", "VerticalSlash", "Anchor", "XAttention", "Union", "PerHead",
    "KMeansRouting", "RoutingState", "kmeans", "EqualSizeRouting", "SharedCentroids", "ChunkSelect", "DHSA",
    "VideoChunkSelect", "RegionRouting", "HiP", "PatternSearch", "SearchPlan", "search_plan", "candidate_grid",
    "pattern_table", "build_cost_table", "planted_qkv", "Sparsifiner", "SparsifinerPredictor",
    "KineticsSelect", "LokiSelect", "QuestSelect", "get_decode_pattern", "list_decode_patterns", "decode_pattern_from_dict",
]
