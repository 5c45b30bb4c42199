"""Sequence sharding and the static plan of a ring call.

A sharding is, per rank, a list of ``(start, end)`` token chunks of the global sequence (contiguous:
one chunk per rank; zig-zag: chunks ``r`` and ``2·world - 1 - r``). The local tensor of a rank is its
chunks concatenated in order. A :class:`RingPlan` holds, for one rank, the mask of every (own query
chunk, key chunk) pair and, for every peer it exchanges with, the key blocks that move: both sides
derive them from the same global mask, so no index travels with the data.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..mask import BlockSparseMask
from ..stripe_mask import StripeSparseMask

Span = Tuple[int, int]
Chunks = List[List[Span]]


def contiguous_chunks(lengths: Sequence[int]) -> Chunks:
    """One chunk per rank, in rank order: ``[[(0, l0)], [(l0, l0 + l1)], ...]`` (lengths may differ or be 0)."""
    out, start = [], 0
    for n in lengths:
        out.append([(start, start + int(n))])
        start += int(n)
    return out


def zigzag_chunks(length: int, world: int, block: int = 64) -> Chunks:
    """Zig-zag load balancing for causal attention: ``2·world`` chunks of a multiple of ``block`` tokens
    (the last one ragged, trailing ones possibly empty); rank ``r`` holds chunks ``r`` and ``2·world-1-r``."""
    size = math.ceil(length / (2 * world * block)) * block
    spans = [(min(i * size, length), min((i + 1) * size, length)) for i in range(2 * world)]
    return [[spans[r], spans[2 * world - 1 - r]] for r in range(world)]


def shard(x: torch.Tensor, chunks_of_rank: Sequence[Span], dim: int = 2) -> torch.Tensor:
    """This rank's local tensor: its chunks of ``x`` along ``dim``, concatenated."""
    return torch.cat([x.narrow(dim, a, b - a) for a, b in chunks_of_rank], dim=dim)


def unshard(shards: Sequence[torch.Tensor], chunks: Chunks, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard`: the global tensor from every rank's local tensor."""
    total = check_chunks(chunks, "chunks")
    pieces = []
    for x, spans in zip(shards, chunks):
        off = 0
        for a, b in spans:
            pieces.append((a, x.narrow(dim, off, b - a)))
            off += b - a
    pieces.sort(key=lambda p: p[0])
    out = torch.cat([p for _, p in pieces], dim=dim)
    assert out.shape[dim] == total
    return out


def check_chunks(chunks, name: str, world: Optional[int] = None) -> int:
    """Check that ``chunks`` tile ``[0, L)`` exactly once; return ``L``."""
    if not isinstance(chunks, (list, tuple)) or (world is not None and len(chunks) != world):
        raise ValueError(f"{name} must be a list of {world} per-rank lists of (start, end) spans, got {chunks!r}.")
    spans = []
    for r, own in enumerate(chunks):
        for span in own:
            if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)
                    and 0 <= span[0] <= span[1]):
                raise ValueError(f"{name}[{r}] must hold (start, end) int spans with 0 <= start <= end, got {span!r}.")
            spans.append(tuple(span))
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            raise ValueError(f"{name} must cover the sequence without gaps or overlaps; a span starts at {a}, "
                             f"expected {pos}.")
        pos = b
    return pos


def _local(chunks_of_rank):
    """``[(local_start, global_start, length)]`` of one rank's chunks."""
    out, off = [], 0
    for a, b in chunks_of_rank:
        out.append((off, a, b - a))
        off += b - a
    return out


def _aligned_block(chunks, cap=64):
    """Largest power of two <= cap dividing every chunk border (the dense mask's tile)."""
    block = cap
    borders = [x for own in chunks for span in own for x in span]
    total = max(borders, default=0)
    while block > 1 and any(x % block and x != total for x in borders):
        block //= 2
    return block


def _empty(mask) -> bool:
    if isinstance(mask, StripeSparseMask):
        return int(mask.block_counts.sum()) == 0 and int(mask.col_counts.sum()) == 0
    return int(mask.counts.sum()) == 0


def step_mask(mask, q_span: Span, k_span: Span, causal: bool):
    """``(mask, local_causal)`` of one (query chunk, key chunk) pair, or None when it keeps nothing."""
    (a, b), (c, d) = q_span, k_span
    if b == a or d == c:
        return None
    local_causal = False
    if isinstance(mask, StripeSparseMask) and causal:
        shift = mask.kv_len - mask.q_len
        if d - 1 <= a + shift:  # every pair visible
            m = mask.slice(a, b, c, d)
        elif d - b == shift:  # the slice's corner is on the global diagonal: local causal = global causal
            m, local_causal = mask.slice(a, b, c, d), True
        else:
            m = mask.slice(a, b, c, d, causal=True)
    else:
        m = mask.slice(a, b, c, d, causal=causal)
    return None if _empty(m) else (m, local_causal)


def tile_visibility(mask, causal: bool) -> torch.Tensor:
    """bool ``[Bm', Hm, NQB, NKB]``: tiles that may hold a visible pair (a superset of every slice's tiles)."""
    if isinstance(mask, StripeSparseMask):
        mask = mask.covering_block_mask()
    return mask.visible_tiles(causal)


def _kv_heads(vis, n_q_heads, n_kv_heads):
    hm = vis.shape[1]
    if hm in (1, n_kv_heads):
        return vis
    if hm == n_q_heads:
        return vis.view(vis.shape[0], n_kv_heads, n_q_heads // n_kv_heads, *vis.shape[2:]).any(2)
    raise ValueError(f"mask heads must be 1, {n_kv_heads} (k/v heads) or {n_q_heads} (q heads), got {hm}.")


class RingPlan:
    """The static schedule of :func:`ring_attention` on one rank (build once per mask and sharding).

    Attributes:
        steps: ``{(i, src, j): (mask, local_causal)}`` for this rank's query chunk ``i`` and chunk ``j`` of
            rank ``src``'s keys; pairs that keep nothing are absent.
        need: ``{(dst, src): [bool [Bm', Hkv|1, NKB_c] per chunk c of src]}``: the key blocks ``src`` sends
            ``dst`` (only pairs involving this rank).
    """

    def __init__(self, mask, q_chunks: Chunks, kv_chunks: Chunks, rank: int, n_q_heads: int, n_kv_heads: int,
                 causal: bool = False):
        world = len(q_chunks)
        q_len = check_chunks(q_chunks, "chunks", world)
        kv_len = check_chunks(kv_chunks, "kv_chunks", world)
        if mask is None:
            mask = BlockSparseMask.full(q_len, kv_len, (_aligned_block(q_chunks), _aligned_block(kv_chunks)))
        if not isinstance(mask, (BlockSparseMask, StripeSparseMask)):
            raise TypeError(f"mask must be a BlockSparseMask, a StripeSparseMask or None, got {type(mask).__name__}.")
        if tuple(mask.seq_lens) != (q_len, kv_len):
            raise ValueError(f"mask must be built for the global lengths ({q_len}, {kv_len}) of the chunks, got "
                             f"{tuple(mask.seq_lens)}.")
        bm, bn = mask.block_size
        for name, chunks, block, length in (("chunks", q_chunks, bm, q_len), ("kv_chunks", kv_chunks, bn, kv_len)):
            bad = [x for own in chunks for span in own for x in span if x % block and x != length]
            if bad:
                raise ValueError(f"{name} borders must be multiples of the mask's block size {block} (or the "
                                 f"length {length}), got {bad[0]}.")
        self.causal, self.rank, self.world = causal, rank, world  # no reference to the mask: plans are cached by it
        self.q_chunks, self.kv_chunks, self.block_n = q_chunks, kv_chunks, bn
        self.heads = (n_q_heads, n_kv_heads)
        vis = _kv_heads(tile_visibility(mask, causal), n_q_heads, n_kv_heads)  # [Bm', Hkv|1, NQB, NKB]
        self.need = {}
        for dst in range(world):
            for src in range(world):
                if dst != src and rank in (dst, src):
                    rows = [vis[:, :, a // bm:-(-b // bm)] for a, b in q_chunks[dst]]
                    rows = torch.cat(rows, 2).any(2) if rows else vis[:, :, :0].any(2)
                    self.need[(dst, src)] = [rows[..., c // bn:-(-d // bn)] for c, d in kv_chunks[src]]
        self.steps = {}
        for i, q_span in enumerate(q_chunks[rank]):
            for src in range(world):
                for j, k_span in enumerate(kv_chunks[src]):
                    got = step_mask(mask, q_span, k_span, causal)
                    if got is not None:
                        self.steps[(i, src, j)] = got

    def sends(self, dst: int, src: int) -> bool:
        """True when ``src`` sends key blocks to ``dst``."""
        return any(bool(n.any()) for n in self.need[(dst, src)])

    def local_q(self):
        return _local(self.q_chunks[self.rank])

    def local_kv(self, src: int):
        return _local(self.kv_chunks[src])
