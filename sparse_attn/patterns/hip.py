"""HiP: hierarchically pruned attention (Lee et al., DeepAuto-AI/hip-attention ``v1_0``), at tile granularity.

Per query block of ``block_q`` queries, a coarse-to-fine tree search over the key tiles (``micro`` keys each)
that neither the sliding window nor the sink keep:

1. The searched tiles (a virtual, gap-free range: the tiles before the window, and without causality also the
   tiles after it) are split into ``K = ceil(mask_k / micro)`` groups of equal size.
2. Each level splits every group ``[s, e)`` of ``m > 1`` tiles into ``[s, s + ceil(m/2))`` and the rest (a
   one-tile group stays as it is, beside an empty sibling), scores every child by
   ``max over the block's queries (and, with GQA, the kv head's query heads) of scale * q . mean(child keys)``
   and keeps the ``K`` best children (ties: lower child first).
3. It stops when every group is one tile: the ``K`` kept tiles, plus the window, the sink and (causal) the
   diagonal and sink tiles of :func:`~sparse_attn.patterns.base.causal_anchors`.

The representative of a child is the mean of its keys (one prefix sum over tiles per head gives all of them),
not a single key as in the paper: with 16-key micro blocks a single key is a poor proxy for its tile.
Work per level is ``O(Lq * 2K * D)`` and the number of levels is ``log2(NKB / K)``: ``O(L log L)`` in all;
no ``[L, L]`` score matrix is formed. The search is vectorized over batch, heads and query blocks.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .._checks import check_positive_int
from .base import Pattern, causal_anchors, register

_TILE_SIZES = (16, 32, 64, 128)
_MAX_ELEMS = 1 << 24  # scores [B, Hkv, chunk, G*bm, 2W] per scoring step


def _check_tile(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (a power of two in {_TILE_SIZES}), got {value!r}.")
    if value not in _TILE_SIZES:
        raise ValueError(f"{name} must be a power of two in {_TILE_SIZES}, got {value}.")


def _check_mask_k(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"mask_k must be an int (keys) or a float fraction of the visible keys, got {value!r}.")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"mask_k as a float must be a fraction in (0, 1], got {value}.")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"mask_k must be >= 0 keys, got {value}.")


def hip_ranges(q_len, kv_len, block_q, micro, window, sink, causal, device=None):
    """Per query block, in key tiles (int64 ``[NQB]`` each): ``sink_end`` (tiles ``[0, sink_end)`` are the sink),
    ``win_lo, win_hi`` (the window ``[win_lo, win_hi)``, diagonal included) and the searched virtual range:
    ``n_a`` tiles from ``sink_end`` and ``n_b`` tiles from ``b_lo`` (non-causal: after the window)."""
    n_qb, n_kb = -(-q_len // block_q), -(-kv_len // micro)
    shift = kv_len - q_len
    q_first = torch.arange(n_qb, device=device) * block_q
    q_last = torch.clamp(q_first + block_q, max=q_len) - 1
    last_key = q_last + shift  # the block's last query sees keys <= last_key (causal)
    vis_hi = torch.clamp(last_key // micro + 1, 0, n_kb) if causal else torch.full_like(q_first, n_kb)
    win_lo = torch.clamp((q_first + shift - window).clamp_min(0) // micro, 0, n_kb)
    win_lo = torch.minimum(win_lo, vis_hi)
    win_hi = torch.clamp(last_key // micro + 1, 0, n_kb) if window > 0 or causal else win_lo
    win_hi = torch.maximum(torch.minimum(win_hi, vis_hi), win_lo)
    sink_tiles = max(-(-sink // micro), 1 if causal else 0)  # causal: the sink tile is an anchor anyway
    sink_end = torch.minimum(torch.full_like(q_first, sink_tiles), vis_hi)
    n_a = (win_lo - sink_end).clamp_min(0)
    b_lo = torch.maximum(win_hi, sink_end)
    n_b = (vis_hi - b_lo).clamp_min(0) if not causal else torch.zeros_like(q_first)
    return sink_end, win_lo, win_hi, n_a, b_lo, n_b, vis_hi


def _tile_prefix(k, micro):
    """float64 ``[B, Hkv, NKB + 1, D]`` prefix sums of the keys over whole tiles, and int64 ``[NKB + 1]`` key counts."""
    kv_len = k.shape[2]
    n_kb = -(-kv_len // micro)
    pad = n_kb * micro - kv_len
    kt = torch.nn.functional.pad(k.to(torch.float64), (0, 0, 0, pad))
    sums = kt.reshape(*k.shape[:2], n_kb, micro, k.shape[3]).sum(3)  # [B, Hkv, NKB, D]
    zero = torch.zeros_like(sums[:, :, :1])
    counts = torch.clamp(kv_len - torch.arange(n_kb, device=k.device) * micro, max=micro)
    count_pre = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return torch.cat([zero, torch.cumsum(sums, 2)], 2), count_pre


def _block_max(qp, rep, pad_q):
    """float ``[B, Hkv, N, C]``: per query block the max over its queries ``qp [B, Hkv, N, R, D]`` (rows with
    ``pad_q [N, R, 1]`` left out) of ``q . rep`` for the children ``rep [B, Hkv, N, C, D]``."""
    score = torch.einsum("bhnqd,bhnkd->bhnqk", qp, rep)  # [B, Hkv, N, R, C]
    return score.masked_fill(pad_q, float("-inf")).amax(3)


@register("hip")
@dataclass(frozen=True)
class HiP(Pattern):
    """HiP tree search per query block: ``mask_k`` keys as ``micro``-key tiles, plus window and sink.

    Args:
        mask_k: keys the tree search keeps per query block: an int (rounded up to whole ``micro`` tiles) or a
            float fraction of the keys the query block can see (``ceil(mask_k * visible tiles)``), on top of
            the window and the sink.
        block_q: queries per block (the mask's ``BLOCK_M``): 16, 32, 64 or 128.
        micro: keys per leaf of the tree (the mask's ``BLOCK_N``): 16, 32, 64 or 128.
        window: most recent keys kept (from ``q_first + Lk - Lq - window`` up to the block's diagonal; the
            diagonal tiles are kept even with ``window=0``; without causality the search covers both sides).
        sink: first keys always kept (rounded up to whole tiles; with causality at least the first tile).
        scale: score scale (default ``1/sqrt(D)``; it does not change the ranking).

    The mask has ``block_size (block_q, micro)``, batch ``B`` and heads ``Hq``; with GQA (``Hkv < Hq``) the
    search runs per kv head, scored by the max over its query heads, and the mask repeats over the group.

    Example:
        >>> q, k = torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 1024, 64)
        >>> mask = HiP(mask_k=256, window=128).build(q, k, causal=True)
        >>> mask.block_size
        (32, 16)
    """

    mask_k: Union[int, float] = 512
    block_q: int = 32
    micro: int = 16
    window: int = 128
    sink: int = 16
    scale: Optional[float] = None

    def __post_init__(self):
        _check_mask_k(self.mask_k)
        _check_tile(self.block_q, "block_q")
        _check_tile(self.micro, "micro")
        check_positive_int(self.window, "window", allow_zero=True)
        check_positive_int(self.sink, "sink", allow_zero=True)
        s = self.scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
            raise ValueError(f"scale must be a positive float or None, got {s!r}.")

    @property
    def block_size(self):
        return (self.block_q, self.micro)

    def _budget(self, vis_hi):
        """int64 ``[NQB]``: tiles the search keeps per query block."""
        if isinstance(self.mask_k, float):
            return torch.ceil(self.mask_k * vis_hi.to(torch.float64) - 1e-9).to(torch.int64)
        return torch.full_like(vis_hi, -(-self.mask_k // self.micro))

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        bm, bn = self.block_pair
        batch, n_q_heads, q_len, dim = q.shape
        n_kv_heads, kv_len = k.shape[1], k.shape[2]
        group = n_q_heads // n_kv_heads
        n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
        dev = q.device
        scale = dim ** -0.5 if self.scale is None else float(self.scale)
        sink_end, win_lo, win_hi, n_a, b_lo, n_b, vis_hi = hip_ranges(
            q_len, kv_len, bm, bn, self.window, self.sink, causal, dev)
        n = n_a + n_b  # [NQB] searched tiles
        budget = torch.minimum(self._budget(vis_hi), n)  # [NQB]
        width = int(budget.max()) if n_qb else 0
        keep = torch.zeros((batch, n_kv_heads, n_qb, n_kb + 1), dtype=torch.bool, device=dev)  # last: dead slots
        if width > 0:
            start, end = self._search(q, k, sink_end, n_a, b_lo, n, budget, width, scale, group)  # [B, Hkv, NQB, W]
            tile = torch.where(start < n_a[:, None], sink_end[:, None] + start, b_lo[:, None] + start - n_a[:, None])
            keep.scatter_(3, torch.where(end > start, tile, n_kb), True)
        keep = keep[..., :n_kb]
        cols = torch.arange(n_kb, device=dev)
        fixed = (cols < sink_end[:, None]) | ((cols >= win_lo[:, None]) & (cols < win_hi[:, None]))
        if causal:
            fixed = fixed | causal_anchors(q_len, kv_len, (bm, bn), dev)
        keep = keep | fixed  # [B, Hkv, NQB, NKB]
        if group > 1:
            keep = keep.repeat_interleave(group, dim=1)
        return keep if forced is None else keep | forced.to(torch.bool)

    def _search(self, q, k, a_lo, n_a, b_lo, n, budget, width, scale, group):
        """The tree search; int64 ``start, end [B, Hkv, NQB, W]``: the kept groups in virtual tile units (one tile
        each, or empty). Virtual tile ``v`` is tile ``a_lo + v`` for ``v < n_a``, else ``b_lo + v - n_a``.
        ``a_lo``/``n_a``/``b_lo``/``n``/``budget``: int64 ``[NQB]``; ``W = max(budget)``."""
        bm, bn = self.block_pair
        batch, n_q_heads, q_len, dim = q.shape
        n_kv_heads = k.shape[1]
        n_qb, dev = n.shape[0], q.device
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        # queries [B, Hkv, NQB, G * bm, D]: every query of a block and of the kv head's group of query heads
        qp = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, n_qb * bm - q_len))
        qp = qp.reshape(batch, n_kv_heads, group, n_qb, bm, dim).permute(0, 1, 3, 2, 4, 5)
        qp = qp.reshape(batch, n_kv_heads, n_qb, group * bm, dim)
        rows = torch.arange(n_qb, device=dev)[:, None] * bm + torch.arange(bm, device=dev)
        pad_q = (rows >= q_len).repeat(1, group)[:, :, None]  # [NQB, G*bm, 1] padding rows
        key_pre, count_pre = _tile_prefix(k, bn)  # [B, Hkv, NKB+1, D] float64, [NKB+1]
        a_lo, n_a, b_lo = a_lo[:, None], n_a[:, None], b_lo[:, None]  # [NQB, 1]
        step = max(1, _MAX_ELEMS // max(1, batch * n_kv_heads * group * bm * 2 * width))  # query blocks per chunk

        def prefix(v):  # v int64 [B, Hkv, NQB, W] -> key sums [B, Hkv, NQB, W, D], key counts (up to a constant)
            ia = a_lo + torch.minimum(v, n_a)
            ib = b_lo + (v - n_a).clamp_min(0)
            both = torch.cat([ia, ib], -1).reshape(batch, n_kv_heads, -1, 1).expand(-1, -1, -1, dim)
            got = key_pre.gather(2, both).reshape(batch, n_kv_heads, n_qb, 2, width, dim)
            return got[:, :, :, 0] + got[:, :, :, 1], count_pre[ia] + count_pre[ib]

        slot = torch.arange(width, device=dev)
        live = slot < budget[:, None]  # [NQB, W]
        kk = budget.clamp_min(1)[:, None]
        # initial groups [floor(i n / K), floor((i+1) n / K)) for slots i < K; other slots empty
        start = torch.where(live, slot * n[:, None] // kk, 0).expand(batch, n_kv_heads, n_qb, width)
        end = torch.where(live, (slot + 1) * n[:, None] // kk, 0).expand(batch, n_kv_heads, n_qb, width)
        max_size = int((end - start).max())
        levels = math.ceil(math.log2(max_size)) if max_size > 1 else 0
        for _ in range(levels):
            size = end - start
            mid = torch.where(size > 1, start + (size + 1) // 2, end)  # children [start, mid) and [mid, end)
            (s0, c0), (s1, c1), (s2, c2) = prefix(start), prefix(mid), prefix(end)
            c_start, c_end = torch.cat([start, mid], -1), torch.cat([mid, end], -1)  # [B, Hkv, NQB, 2W]
            sums = torch.cat([s1 - s0, s2 - s1], -2)  # [B, Hkv, NQB, 2W, D]
            counts = torch.cat([c1 - c0, c2 - c1], -1).clamp_min(1)
            rep = (sums / counts[..., None]).to(dtype)  # mean key of each child
            score = torch.cat([_block_max(qp[:, :, r:r + step], rep[:, :, r:r + step], pad_q[r:r + step])
                               for r in range(0, n_qb, step)], 2) * scale  # [B, Hkv, NQB, 2W]
            score = score.masked_fill(c_end <= c_start, float("-inf"))
            order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :width]
            start = c_start.gather(-1, order).masked_fill(~live, 0)
            end = c_end.gather(-1, order).masked_fill(~live, 0)
        return start, end
