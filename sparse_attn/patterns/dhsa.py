"""DHSA (dynamic hierarchical sparse attention): variable-length key chunks, chunk scores inherited by tokens,
a per-query-block token budget.

1. **Chunks.** ``boundary="similarity"``: a new chunk starts at key ``j`` where ``cos(k_j, k_{j-1}) <
   threshold`` (per kv head, or the head-averaged cosine with ``per_head=False``). Candidates closer than
   ``min_chunk`` to a stronger one (a lower cosine) are suppressed (non-maximum suppression over a window of
   ``2 * min_chunk - 1``, so kept starts are ``>= min_chunk`` apart and ``>= min_chunk`` from both ends); a run
   longer than ``max_chunk`` is cut into equal pieces (each ``>= max_chunk / 2 >= min_chunk``). A strong start
   suppressed by a stronger neighbour that is itself suppressed is lost (plain NMS, no chain repair).
   ``boundary="fixed"``: chunks of ``chunk_size`` keys (the DHSA code; the last one may be ragged).
2. **Scores.** Chunk representation ``mean(keys) * sqrt(len)``, query block (``block_q`` queries) likewise;
   ``g = q_blk . k_chunk`` per head (``per_head=True``, the code) or averaged over query heads
   (``per_head=False``, the paper). Every key token inherits its chunk's score.
3. **Selection** per query block: the ``local`` latest keys of each of its rows (the band from
   ``q_first + Lk - Lq - local + 1`` to its last diagonal key ``q_last + Lk - Lq``; non-causal: clamped into
   ``[0, Lk)``, at least ``local`` keys) and the first ``sink`` keys are always kept; of the other
   visible keys the top ``budget - local`` by inherited score, i.e. whole chunks in descending score, the chunk
   that crosses the budget contributing its latest candidate tokens. ``budget`` is a token count (including the
   local keys) or a fraction of the keys the block can see.

Lowering: token-exact (``token_exact = True``), with
:meth:`~sparse_attn.BlockSparseMask.from_tile_evaluator`: a tile whose keys are all kept (and entirely visible
under causality) is full, the tiles a chunk edge crosses keep bit masks. Variable chunks start anywhere, so
covering tiles would add up to two tiles per selected chunk (``+50-100%`` density at 64-256-token chunks)
beyond the token budget; the bits cost one ``[P, BM, BN]`` gather for the ~2 partial tiles per selected chunk.
Under causality a query row keeps the selected keys ``<= i + Lk - Lq``. Masks have batch ``B`` and heads
``Hq`` (``per_head=True``) or 1. Padding (:func:`sparse_attn.patterns.padding`) only drops invalid tiles.
"""

import math
from dataclasses import dataclass
from typing import Union as TUnion

import torch

from .._checks import check_positive_int
from ..mask import BlockSparseMask
from . import _scoring as S
from .base import Pattern, as_tuple, causal_tiles, check_qk, drop_padding, register
from .hierarchical import chunk_means

_BOUNDARIES = ("similarity", "fixed")


def _work_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def similarity_starts(k, threshold, min_chunk, per_head=True):
    """bool ``[B, Hc, Lk]``: chunk starts from key cosine drops (``Hc = Hkv``, or 1 head-averaged); key 0 starts."""
    b, h, length, _ = k.shape
    starts = torch.zeros((b, h if per_head else 1, length), dtype=torch.bool, device=k.device)
    starts[..., 0] = True
    if length < 2:
        return starts
    kn = torch.nn.functional.normalize(k.to(_work_dtype(k)), dim=-1)  # [B, Hkv, Lk, D]
    sim = (kn[:, :, 1:] * kn[:, :, :-1]).sum(-1)  # [B, Hkv, Lk-1]: cos(k_j, k_{j-1}) at j - 1
    if not per_head:
        sim = sim.mean(1, keepdim=True)  # [B, 1, Lk-1]
    pos = torch.arange(1, length, device=k.device)
    cand = (sim < threshold) & (pos >= min_chunk) & (pos <= length - min_chunk)
    # unique strengths (lower cosine first, ties: earlier key) so that NMS keeps one start per window
    order = torch.sort(sim, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(length - 1, device=k.device).expand_as(order))
    strength = torch.where(cand, (length - 1 - rank).to(torch.float32), 0.0)  # [B, Hc, Lk-1], >= 1 on candidates
    if min_chunk > 1:
        flat = strength.reshape(-1, 1, length - 1)
        peak = torch.nn.functional.max_pool1d(flat, 2 * min_chunk - 1, stride=1, padding=min_chunk - 1)
        cand = cand & (strength == peak.view_as(strength))
    starts[..., 1:] = cand
    return starts


def split_long(starts, max_chunk):
    """int64 ``[B, Hc, Lk]`` chunk ids: the runs of ``starts`` cut into equal pieces of at most ``max_chunk``."""
    length = starts.shape[-1]
    pos = torch.arange(length, device=starts.device)
    seg = torch.cumsum(starts, -1) - 1  # [B, Hc, Lk] run id
    first = torch.cummax(torch.where(starts, pos, 0), -1).values  # first key of the run
    n_runs = seg.new_zeros(starts.shape).scatter_add_(-1, seg, torch.ones_like(seg))  # run lengths by id
    n = torch.gather(n_runs, -1, seg)  # [B, Hc, Lk] own run length
    m = -(-n // max_chunk)  # pieces per run
    off = pos - first
    piece = off * m // n
    new = (off == 0) | (piece != ((off - 1).clamp_min(0) * m // n))
    return torch.cumsum(new, -1) - 1


@register("dhsa")
@dataclass(frozen=True)
class DHSA(Pattern):
    """DHSA: per query block, the latest ``local`` keys plus whole variable-length chunks by score, to a budget.

    Args:
        budget: tokens per query block including the local ones: an int, or a float fraction of the keys
            the block can see (``ceil(budget * visible)``). The paper: 1024.
        local: latest visible keys of each query row always kept (the paper: 64): per query block the keys from
            its first query's ``local`` latest to its last query's diagonal.
        boundary: ``"similarity"`` (chunk starts at key cosine drops) or ``"fixed"`` (``chunk_size`` keys).
        threshold: cosine below which a key may start a chunk (``"similarity"``), in ``[-1, 1]``.
        min_chunk, max_chunk: chunk length bounds of ``"similarity"`` (``2 * min_chunk <= max_chunk``).
        chunk_size: chunk length of ``"fixed"``.
        block_q: queries per scored query block (a multiple of the tile's BLOCK_M; the paper: 128).
        per_head: chunks and scores per head (True, the DHSA code) or head-averaged (False, the paper).
        block_size: tile size of the mask.
        sink: the first keys, always kept (counted in the budget; 0 in the paper, needed by causal LMs).

    Example:
        >>> q = k = torch.randn(1, 2, 1024, 64)
        >>> mask = DHSA(budget=256).build(q, k, causal=True)
    """

    token_exact = True

    budget: TUnion[int, float] = 0.15
    local: int = 64
    boundary: str = "similarity"
    threshold: float = 0.5
    min_chunk: int = 32
    max_chunk: int = 256
    chunk_size: int = 64
    block_q: int = 64
    per_head: bool = True
    block_size: int = 64
    sink: int = 0

    def __post_init__(self):
        if isinstance(self.budget, (tuple, list)):
            raise TypeError(f"budget must be an int or a float fraction, got a sequence {self.budget!r}.")
        S.check_budget(self.budget, "budget")
        check_positive_int(self.local, "local", allow_zero=True)
        check_positive_int(self.sink, "sink", allow_zero=True)
        if self.boundary not in _BOUNDARIES:
            raise ValueError(f"boundary must be one of {_BOUNDARIES}, got {self.boundary!r}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a float in [-1, 1], got {self.threshold!r}.")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a float in [-1, 1], got {self.threshold!r}.")
        check_positive_int(self.min_chunk, "min_chunk")
        check_positive_int(self.max_chunk, "max_chunk")
        if 2 * self.min_chunk > self.max_chunk:
            raise ValueError(f"max_chunk must be >= 2 * min_chunk = {2 * self.min_chunk}, got {self.max_chunk}.")
        check_positive_int(self.chunk_size, "chunk_size")
        check_positive_int(self.block_q, "block_q")
        if not isinstance(self.per_head, bool):
            raise TypeError(f"per_head must be a bool, got {type(self.per_head).__name__}.")
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        bm = self.block_pair[0]
        if self.block_q % bm:
            raise ValueError(f"block_q must be a multiple of BLOCK_M={bm}, got {self.block_q}.")

    # ---- stages -----------------------------------------------------------------------------------------
    def chunk_ids(self, k):
        """int64 ``[B|1, Hc, Lk]``: chunk id of every key (non-decreasing; ``Hc`` = Hkv, or 1 when shared)."""
        length = k.shape[2]
        if self.boundary == "fixed":
            return (torch.arange(length, device=k.device) // self.chunk_size)[None, None]
        starts = similarity_starts(k, self.threshold, self.min_chunk, self.per_head)
        return split_long(starts, self.max_chunk)

    def chunk_scores(self, q, k, ids):
        """float ``[B, Hm, NQ, NC]``: ``q_blk . k_chunk`` (both ``mean * sqrt(len)``); ``-inf`` on empty ids."""
        b, h_kv, length, d = k.shape
        dt = _work_dtype(k)
        qb = S.block_mean_pool(q, self.block_q).to(dt)  # [B, Hq, NQ, D]
        q_rows = torch.clamp(q.shape[2] - torch.arange(qb.shape[2], device=q.device) * self.block_q,
                             max=self.block_q)
        qb = qb * q_rows.to(dt).sqrt()[:, None]
        if self.boundary == "fixed":
            kc = chunk_means(k, self.chunk_size).to(dt)  # [B, Hkv, NC, D]
            sizes = torch.ones(kc.shape[2], device=k.device)
        else:
            n_c = int(ids.max()) + 1
            idx = ids.expand(b, h_kv, length)  # [B, Hkv, Lk]
            sums = torch.zeros((b, h_kv, n_c, d), dtype=dt, device=k.device)
            sums.scatter_add_(2, idx[..., None].expand(b, h_kv, length, d), k.to(dt))
            sizes = torch.zeros((b, h_kv, n_c), dtype=dt, device=k.device).scatter_add_(
                2, idx, torch.ones_like(idx, dtype=dt))
            kc = sums / sizes.clamp_min(1).sqrt()[..., None]  # mean * sqrt(len) = sum / sqrt(len)
            sizes = sizes.repeat_interleave(q.shape[1] // h_kv, 1)[:, :, None, :]  # [B, Hq, 1, NC]
        kc = kc.repeat_interleave(q.shape[1] // h_kv, 1)  # [B, Hq, NC, D]
        g = qb @ kc.transpose(-1, -2)  # [B, Hq, NQ, NC]
        g = g.masked_fill(sizes == 0, -math.inf)
        return g if self.per_head else g.mean(1, keepdim=True)

    def _rows(self, q_len, kv_len, causal, device):
        """int64 ``[NQ]``: each query block's last visible key ``hi`` (``-1``: none) and its visible count."""
        n_q = -(-q_len // self.block_q)
        q_last = torch.clamp(torch.arange(1, n_q + 1, device=device) * self.block_q, max=q_len) - 1
        hi = q_last + (kv_len - q_len)
        if causal:
            hi = hi.clamp(min=-1, max=kv_len - 1)
            return hi, hi + 1
        hi = hi.clamp(min=0, max=kv_len - 1)
        return hi, torch.full_like(hi, kv_len)

    def token_map(self, q, k, *, causal=False):
        """bool ``[B, Hm, NQ, Lk]``: the keys each query block of ``block_q`` queries keeps (before the per-row
        causal cut); ``Hm = Hq`` with ``per_head`` else 1."""
        check_qk(q, k)
        q_len, kv_len = q.shape[2], k.shape[2]
        dev = q.device
        ids = self.chunk_ids(k)  # [B|1, Hc, Lk]
        g = self.chunk_scores(q, k, ids)  # [B, Hm, NQ, NC]
        b, h_m, n_q, n_c = g.shape
        if ids.shape[1] != h_m:  # per kv head -> per query head
            ids = ids.repeat_interleave(h_m // ids.shape[1], 1)
        ids = ids.expand(b, h_m, kv_len)  # [B, Hm, Lk]
        pos = torch.arange(kv_len, device=dev)
        end = torch.zeros((b, h_m, n_c), dtype=torch.int64, device=dev).scatter_reduce_(
            -1, ids, pos.expand(b, h_m, kv_len), "amax", include_self=False)
        end = torch.gather(end, -1, ids)[:, :, None, :].expand(b, h_m, n_q, kv_len)  # last key of j's chunk
        ids = ids[:, :, None, :].expand(b, h_m, n_q, kv_len)  # [B, Hm, NQ, Lk]
        hi, visible = self._rows(q_len, kv_len, causal, dev)  # [NQ]
        seen = (pos[None, :] <= hi[:, None]) | (not causal)  # [NQ, Lk] visible to the block's last query
        # the band from the first query's latest `local` keys to the last query's diagonal: every row of the
        # block keeps (at least) its own `local` latest visible keys after the per-row causal cut
        q_first = torch.arange(n_q, device=dev) * self.block_q + (kv_len - q_len)
        lo = torch.minimum(q_first, hi) - self.local + 1  # [NQ]
        local = (pos[None, :] <= hi[:, None]) & (pos[None, :] >= lo[:, None]) & (self.local > 0)
        local = local | (seen & (pos[None, :] < self.sink))  # sink keys
        cand = seen & ~local  # [NQ, Lk]
        if isinstance(self.budget, float):
            total = torch.ceil(self.budget * visible.double() - 1e-9).long()
        else:
            total = torch.full_like(visible, self.budget)
        quota = (torch.minimum(total, visible) - local.sum(-1)).clamp_min(0)  # [NQ]
        # chunks in descending score (ties: lower id), then the tokens of a chunk latest first
        cand_i = cand.to(torch.int64)
        cnt = torch.zeros((b, h_m, n_q, n_c), dtype=torch.int64, device=dev).scatter_add_(
            -1, ids, cand_i.expand(b, h_m, n_q, kv_len))  # [B, Hm, NQ, NC] candidates per chunk
        g = g.expand(b, h_m, n_q, n_c).masked_fill(cnt == 0, -math.inf)
        order = torch.sort(g, dim=-1, descending=True, stable=True).indices
        sorted_cnt = torch.gather(cnt, -1, order)
        before = torch.zeros_like(cnt).scatter_(-1, order, torch.cumsum(sorted_cnt, -1) - sorted_cnt)
        after = torch.cumsum(cand_i.flip(-1), -1).flip(-1) - cand_i  # [NQ, Lk] candidates strictly after j
        after = after.expand(b, h_m, n_q, kv_len)
        within = after - torch.gather(after, -1, end)  # [B, Hm, NQ, Lk] later candidates of j's chunk
        rank = torch.gather(before, -1, ids) + within
        finite = torch.isfinite(torch.gather(g, -1, ids))
        return local | (cand & finite & (rank < quota[:, None]))

    # ---- lowering -------------------------------------------------------------------------------------------
    def _tile_rows(self, q, k, causal):
        """bool ``[B, Hm, NQB, Lk]``: :meth:`token_map` per tile row of BLOCK_M queries."""
        bm = self.block_pair[0]
        keep = self.token_map(q, k, causal=causal)
        return keep.repeat_interleave(self.block_q // bm, 2)[:, :, :-(-q.shape[2] // bm)]

    def _tiles(self, rows, q_len, kv_len, causal):
        """(kept bool, full bool) ``[B, Hm, NQB, NKB]`` from the tile rows' key sets."""
        bm, bn = self.block_pair
        n_kb = -(-kv_len // bn)
        pad = n_kb * bn - kv_len
        kept = torch.nn.functional.pad(rows, (0, pad), value=False).view(*rows.shape[:3], n_kb, bn).any(-1)
        full = torch.nn.functional.pad(rows, (0, pad), value=True).view(*rows.shape[:3], n_kb, bn).all(-1)
        if causal:
            shift = kv_len - q_len
            q_first = torch.arange(rows.shape[2], device=rows.device)[:, None] * bm
            k_last = torch.clamp(torch.arange(1, n_kb + 1, device=rows.device) * bn, max=kv_len)[None, :] - 1
            kept = kept & causal_tiles(q_len, kv_len, (bm, bn), rows.device)
            full = full & (k_last <= q_first + shift)
        return kept, full & kept

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        """bool ``[B, Hm, NQB, NKB]``: the tiles covering the kept tokens (the mask itself is token-exact)."""
        kept, _ = self._tiles(self._tile_rows(q, k, causal), q.shape[2], k.shape[2], causal)
        return kept if forced is None else kept | forced.to(torch.bool)

    def build(self, q, k, *, causal=False, layout=None) -> BlockSparseMask:
        check_qk(q, k)
        causal = bool(causal)
        bm, bn = self.block_pair
        q_len, kv_len = q.shape[2], k.shape[2]
        rows = self._tile_rows(q, k, causal)  # [B, Hm, NQB, Lk]
        kept, full = self._tiles(rows, q_len, kv_len, causal)
        kept = drop_padding(kept, q, k, (bm, bn))
        shift = kv_len - q_len

        def evaluate(b, h, qb, kb):
            cols = (kb[:, None] * bn + torch.arange(bn, device=kb.device)).clamp(max=kv_len - 1)  # [P, BN]
            bits = rows[b[:, None], h[:, None], qb[:, None], cols]  # [P, BN]
            out = bits[:, None, :].expand(-1, bm, -1)
            if causal:
                i = qb[:, None] * bm + torch.arange(bm, device=qb.device)  # [P, BM]
                out = out & (cols[:, None, :] <= i[:, :, None] + shift)
            return out
        return BlockSparseMask.from_tile_evaluator(evaluate, kept, (bm, bn), (q_len, kv_len),
                                                   full=full.expand(kept.shape) & kept)
