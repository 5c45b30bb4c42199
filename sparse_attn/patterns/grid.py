"""A default candidate grid for the per-head search: every pattern family of the package, a few budgets each.

``candidate_grid(seq_len, causal=..., layout=...)`` lists the patterns that apply to the call (causal or
not; a video layout adds the video families) at two or three budgets each, all with one ``block_size``
(``per_head`` needs one). The budgets are fractions of the sequence (windows rounded to whole tiles), so
the same grid shape serves 4k and 64k tokens. Pass it (or a filtered copy) to
:class:`~sparse_attn.patterns.PatternSearch`; every option costs one mask build and one quality pass per
calibration call, so prune it for long sequences on a CPU.
"""

import math
from typing import List, Optional

from ..layout import TokenLayout
from .base import Pattern, get_pattern

# families the grid covers, by registry name (dense/skip are the search's own options; union/per_head combine)
COVERED = ("sliding_window", "sink_local", "vertical_stripes", "block_topk", "block_topp", "exact_importance",
           "lse_mass", "vertical_slash", "chunk_select", "kmeans_routing", "equal_size_routing", "multi_diagonal",
           "window_3d", "video_chunk_select", "region_routing", "hip", "anchor", "dhsa", "sparsifiner", "xattention")


def _tiles(tokens, block):
    return max(block, int(round(tokens / block)) * block)


def candidate_grid(seq_len: int, *, causal: bool = False, layout: Optional[TokenLayout] = None,
                   block_size: int = 64) -> List[Pattern]:
    """Patterns for a search on ``seq_len`` tokens (``Lq == Lk``).

    Causal grids leave out the permuted-mask families (``kmeans_routing``, ``video_chunk_select``,
    ``region_routing``) and the video families (video DiTs are bidirectional); ``layout`` (a video
    :class:`~sparse_attn.TokenLayout` of ``seq_len`` tokens) adds ``multi_diagonal``, ``window_3d``,
    ``video_chunk_select``, ``region_routing`` and text columns.

    Example:
        >>> [p.name for p in candidate_grid(4096, causal=True)][:3]
        ['sliding_window', 'sliding_window', 'sliding_window']
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
    if layout is not None and (not isinstance(layout, TokenLayout) or layout.seq_len != seq_len):
        raise ValueError(f"layout must be a TokenLayout of seq_len={seq_len} tokens or None, got {layout!r}.")
    b = dict(block_size=block_size)
    grid = []
    for frac in (1 / 32, 1 / 16, 1 / 8):
        w = _tiles(frac * seq_len, block_size)
        grid.append(get_pattern("sliding_window", left=w, right=0 if causal else w, **b))
    for frac in (1 / 32, 1 / 16):
        grid.append(get_pattern("sink_local", sink=block_size, window=_tiles(frac * seq_len, block_size), **b))
    cols = tuple(range(4)) + tuple(range(block_size * 8, seq_len, block_size * 8))
    grid.append(get_pattern("vertical_stripes", columns=cols, text=False, **b)
                | get_pattern("sliding_window", left=block_size, right=0 if causal else block_size, **b))
    grid += [get_pattern("block_topk", k=f, **b) for f in (0.05, 0.1, 0.2)]
    grid += [get_pattern("block_topp", p=p, **b) for p in (0.9, 0.95)]
    grid += [get_pattern("exact_importance", select=f, **b) for f in (0.1, 0.2)]
    grid += [get_pattern("lse_mass", sparsity=s, adaptive=False, **b) for s in (0.8, 0.9)]
    stride = math.gcd(8, block_size)
    grid += [get_pattern("xattention", threshold=t, stride=stride, **b) for t in (0.9, 0.95)]
    grid += [get_pattern("vertical_slash", vertical=f, slash=f, **b) for f in (0.05, 0.1)]
    chunk = _tiles(seq_len / 16, block_size)
    grid += [get_pattern("chunk_select", chunk_size=chunk, k=k, **b) for k in (2, 4)]
    grid += [get_pattern("equal_size_routing", clusters=c, **b) for c in (4, 8)]
    grid += [get_pattern("dhsa", budget=f, block_q=block_size, **b) for f in (0.1, 0.15)]
    grid += [get_pattern("hip", mask_k=f, block_q=block_size, micro=block_size, window=2 * block_size,
                         sink=block_size) for f in (0.05, 0.1)]
    unit = 128 * block_size // math.gcd(128, block_size)  # anchor super-blocks: whole pool groups and tiles
    grid.append(get_pattern("anchor", super_block=unit * max(1, round(seq_len / 4 / unit)), sink=block_size,
                            window=_tiles(seq_len / 32, block_size), **b))
    grid.append(get_pattern("sparsifiner", budget=0.1, granularity="tile", **b))  # the untrained JL sketch
    if not causal:
        grid += [get_pattern("kmeans_routing", q_clusters=c, k_clusters=c, **b) for c in (16, 32)]
    if layout is not None and layout.is_video and not causal:
        lay = dict(layout=layout, **b)
        grid += [get_pattern("multi_diagonal", frames=f, width=32, **lay) for f in (2, 4)]
        grid += [get_pattern("window_3d", window=w, **lay) for w in ((1, 4, 4), (2, 6, 6))]
        grid += [get_pattern("video_chunk_select", chunk_shape=(2, 8, 8), rule="topk", k=k, **lay) for k in (4, 8)]
        grid += [get_pattern("region_routing", region_shape=(1, 8, 8), topk=k, **lay) for k in (4, 8)]
        if layout.text_len:
            grid.append(get_pattern("vertical_stripes", columns=(), text=True, **lay)
                        | get_pattern("window_3d", window=(1, 4, 4), **lay))
    return grid
