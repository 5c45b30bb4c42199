"""Ulysses context parallelism: all-to-all from sequence shards to head shards and back.

Each rank holds a contiguous sequence shard of every head; one all-to-all gives it the whole sequence
of ``Hq / world`` query heads (and the key/value heads they read), it runs :func:`sparse_attention` with
its head slice of the mask, and a second all-to-all returns its sequence shard of the output.
"""

from typing import List, Tuple

import torch

from ..mask import BlockSparseMask
from ..ops import sparse_attention
from ..stripe_mask import StripeSparseMask
from ._comm import all_gather_ints, all_to_all, group_info


def head_spans(n_q_heads: int, n_kv_heads: int, world: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Query and key/value head spans ``[(lo, hi)]`` per rank.

    Rank ``r`` gets query heads ``[r*h, (r+1)*h)``, ``h = Hq / world``, and the key/value heads they read.
    With fewer key/value heads than ranks a head is replicated to every rank that reads it (its gradient
    is the sum of the replicas'). Raises ValueError when the heads do not split evenly.
    """
    if n_q_heads % world:
        raise ValueError(f"q heads ({n_q_heads}) must be divisible by the group size ({world}) for Ulysses.")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"q heads ({n_q_heads}) must be a multiple of k/v heads ({n_kv_heads}).")
    h, group = n_q_heads // world, n_q_heads // n_kv_heads
    if not (h % group == 0 or group % h == 0):
        raise ValueError(f"each rank's {h} q heads must cover whole GQA groups of {group} heads or lie inside "
                         f"one ({n_q_heads} q heads, {n_kv_heads} k/v heads, {world} ranks).")
    q_spans = [(r * h, (r + 1) * h) for r in range(world)]
    kv_spans = [(lo // group, (hi - 1) // group + 1) for lo, hi in q_spans]
    return q_spans, kv_spans


def _to_heads(x, spans, seq_lens, group):
    """``[B, H, S_r, D]`` sequence shard -> ``[B, h_r, S, D]`` (heads ``spans[rank]``, whole sequence)."""
    rank, world = group_info(group)
    lo, hi = spans[rank]
    sends = [x[:, a:b] for a, b in spans]
    shapes = [(x.shape[0], hi - lo, seq_lens[p], x.shape[3]) for p in range(world)]
    return torch.cat(all_to_all(sends, shapes, x, group), dim=2)


def _to_seq(y, spans, seq_lens, n_heads, group):
    """``[B, h_r, S, D]`` -> ``[B, H, S_r, D]``; heads held by several ranks (replicas) are summed."""
    rank, world = group_info(group)
    starts = [sum(seq_lens[:p]) for p in range(world)]
    sends = [y[:, :, starts[p]:starts[p] + seq_lens[p]] for p in range(world)]
    shapes = [(y.shape[0], b - a, seq_lens[rank], y.shape[3]) for a, b in spans]
    got = all_to_all(sends, shapes, y, group)
    out = y.new_zeros((y.shape[0], n_heads, seq_lens[rank], y.shape[3]))
    for (a, b), t in zip(spans, got):
        out[:, a:b] += t
    return out


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spans, seq_lens, group):
        ctx.meta = (spans, seq_lens, x.shape[1], group)
        return _to_heads(x, spans, seq_lens, group)

    @staticmethod
    def backward(ctx, g):
        spans, seq_lens, n_heads, group = ctx.meta
        return _to_seq(g.contiguous(), spans, seq_lens, n_heads, group), None, None, None


class _ToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, spans, seq_lens, n_heads, group):
        ctx.meta = (spans, seq_lens, group)
        return _to_seq(y, spans, seq_lens, n_heads, group)

    @staticmethod
    def backward(ctx, g):
        spans, seq_lens, group = ctx.meta
        return _to_heads(g.contiguous(), spans, seq_lens, group), None, None, None, None


def mask_heads(mask, lo: int, hi: int):
    """The heads ``lo:hi`` of a mask (a mask broadcast over heads is returned as is)."""
    if mask is None or mask.batch_heads[1] == 1:
        return mask
    if isinstance(mask, BlockSparseMask):
        return mask.map_heads(lambda x: x[:, lo:hi])
    if isinstance(mask, StripeSparseMask):
        return mask.map_fields(lambda x: x[:, lo:hi].contiguous())  # block columns (if any) included
    raise TypeError(f"mask must be a BlockSparseMask, a StripeSparseMask or None, got {type(mask).__name__}.")


def ulysses_attention(q, k, v, mask=None, group=None, *, causal=False, scale=None, return_lse=False):
    """Sparse attention over sequence shards by all-to-all (DeepSpeed-Ulysses), exact and differentiable.

    Args:
        q: ``[B, Hq, S_r, D]``, this rank's contiguous sequence shard (rank order = sequence order; shards may
            differ in length or be empty); k, v: ``[B, Hkv, S_r, D]``, the same shard of keys and values.
        mask: the *global* mask for ``(S, S)`` (``S = sum of S_r``), a BlockSparseMask or StripeSparseMask with
            ``Hm`` in ``(1, Hkv, Hq)``, or None (dense); every rank passes the same mask.
        group: the process group (None = default). ``Hq`` must be divisible by its size; key/value heads are
            replicated when there are fewer than ranks (see :func:`head_spans`).
        causal, scale: as :func:`sparse_attention`, for the global sequence.

    Returns:
        ``o`` ``[B, Hq, S_r, D]`` (and ``lse`` float32 ``[B, Hq, S_r]`` with ``return_lse``).

    Example:
        >>> o = ulysses_attention(q_shard, k_shard, v_shard, mask)  # doctest: +SKIP
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name} must be a 4-D tensor [B, H, S_r, D], got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else list(x.shape)}.")
    if k.shape[2] != q.shape[2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k and v must hold the same sequence shard as q, got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}.")
    if mask is not None and not isinstance(mask, (BlockSparseMask, StripeSparseMask)):
        raise TypeError(f"mask must be a BlockSparseMask, a StripeSparseMask or None, got {type(mask).__name__}.")
    rank, world = group_info(group)
    seq_lens = [x[0] for x in all_gather_ints([q.shape[2]], group, q.device)]
    total = sum(seq_lens)
    if mask is not None and tuple(mask.seq_lens) != (total, total):
        raise ValueError(f"mask must be built for the global lengths ({total}, {total}), got {tuple(mask.seq_lens)}.")
    n_q, n_kv = q.shape[1], k.shape[1]
    q_spans, kv_spans = head_spans(n_q, n_kv, world)
    qh = _ToHeads.apply(q, q_spans, seq_lens, group)
    kh = _ToHeads.apply(k, kv_spans, seq_lens, group)
    vh = _ToHeads.apply(v, kv_spans, seq_lens, group)
    if mask is not None:
        hm = mask.batch_heads[1]
        if hm not in (1, n_kv, n_q):
            raise ValueError(f"mask heads must be 1, {n_kv} (k/v heads) or {n_q} (q heads), got {hm}.")
        span = q_spans[rank] if hm == n_q else kv_spans[rank]
        mask = mask_heads(mask, *span)
    if not return_lse:  # lse only when asked: its gradient path is slower on CPU
        return _ToSeq.apply(sparse_attention(qh, kh, vh, mask, causal=causal, scale=scale), q_spans, seq_lens,
                            n_q, group)
    o, lse = sparse_attention(qh, kh, vh, mask, causal=causal, scale=scale, return_lse=True)
    return (_ToSeq.apply(o, q_spans, seq_lens, n_q, group),
            _ToSeq.apply(lse[..., None], q_spans, seq_lens, n_q, group)[..., 0])
