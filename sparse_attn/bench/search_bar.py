"""Issue-6 search bar: a per-head plan vs the best single pattern for all heads, at equal density.

A synthetic layer has one head per planted structure (``local``, ``sink_local``, ``clusters`` with 16
topics, ``columns``). :class:`~sparse_attn.patterns.PatternSearch` picks per head; then every single
pattern family is given AT LEAST the plan's mean density on all heads (``block_topk`` with ``k`` = that
fraction of the key blocks, ``sliding_window`` / ``sink_local`` with the narrowest window reaching it) and
its mean error is compared with the plan's. Bar: the plan's error is lower than every single pattern's.
"""

import torch

from ..patterns import (BlockTopK, KMeansRouting, PatternSearch, SinkLocal, SlidingWindow, VerticalStripes,
                        planted_qkv)
from ..quality import attention_quality

STRUCTURES = ("local", "sink_local", "clusters", "columns")


def planted_layer(seq_len, head_dim=64, seed=0):
    """q, k, v ``[1, 4, L, D]``: head h planted with ``STRUCTURES[h]`` (clusters: 16 topics)."""
    parts = [planted_qkv(s, seq_len, heads=1, head_dim=head_dim, seed=seed + i, topics=16)
             for i, s in enumerate(STRUCTURES)]
    return tuple(torch.cat([getattr(p, n) for p in parts], 1) for n in ("q", "k", "v"))


def candidates(seq_len, block=64):
    cols = tuple(range(4)) + tuple(range(512, seq_len, 512))
    return [SlidingWindow(left=128, right=128, block_size=block), SinkLocal(sink=64, window=128, block_size=block),
            KMeansRouting(q_clusters=16, k_clusters=16, init="kmeans++", block_size=block),
            VerticalStripes(columns=cols, text=False, block_size=block) | SlidingWindow(left=64, right=64,
                                                                                         block_size=block),
            BlockTopK(k=0.1, block_size=block)]


def _mean(q, k, v, mask):
    qual = attention_quality(q, k, v, mask)
    return qual["error_mean"], qual["density_mean"]


def _widest_needed(make, q, k, target, seq_len):
    """The smallest window (doubling, then bisecting on the block grid) whose density is >= target."""
    lo, hi = 0, 64
    while _mean(q, k, q, make(hi).build(q, k))[1] < target and hi < seq_len:
        lo, hi = hi, min(seq_len, hi * 2)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if _mean(q, k, q, make(mid).build(q, k))[1] >= target:
            hi = mid
        else:
            lo = mid
    return make(hi)


def search_vs_single(seq_len=4096, *, lam=0.5, eps=0.1, block=64, seed=0) -> dict:
    """``{"plan": (names, error, density), "single": {name: (error, density)}}`` (non-causal, means over heads)."""
    q, k, v = planted_layer(seq_len, seed=seed)
    search = PatternSearch(candidates(seq_len, block), lam=lam, eps=eps, include_skip=False)
    search.observe(0, q, k, v)
    plan = search.plan()
    mask = plan.pattern_for(0).build(q, k)
    err, dens = _mean(q, k, v, mask)
    singles = {
        "block_topk": BlockTopK(k=dens, block_size=block),
        "sliding_window": _widest_needed(lambda w: SlidingWindow(left=w, right=w, block_size=block), q, k, dens,
                                         seq_len),
        "sink_local": _widest_needed(lambda w: SinkLocal(sink=64, window=w, block_size=block), q, k, dens, seq_len),
    }
    return {"plan": (plan.names(0), err, dens),
            "single": {name: _mean(q, k, v, p.build(q, k)) for name, p in singles.items()},
            "single_patterns": {name: p for name, p in singles.items()}}
