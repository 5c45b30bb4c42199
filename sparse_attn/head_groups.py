"""Head groups: different kinds of masks for disjoint groups of query heads (one launch per group).

A per-head plan may give some heads block-map patterns (combined into one block mask) and others a
routing pattern (a :class:`~sparse_attn.PermutedMask` / :class:`~sparse_attn.RoutedMask`) or a stripe mask.
Those cannot share one kernel launch; :class:`HeadGroupsMask` keeps one mask per group of query heads and
:func:`head_groups_attention` runs each group on its heads (the kv head of each query head is selected,
so a group need not hold whole GQA groups) and puts the outputs back in head order.
"""

import torch

from .mask import BlockSparseMask
from .mask_kinds import register_mask_kind
from .ops import sparse_attention
from .permuted import PermutedMask
from .quality import attention_quality, summarize
from .routed import RoutedMask
from .stripe_mask import StripeSparseMask


def _pick(x, heads, n_q_heads, n_kv_heads):
    """``x [Bm, Hm, ...]`` for the query heads ``heads``: Hm == 1 kept, Hm == Hq indexed by ``heads``,
    Hm == Hkv indexed by each query head's kv head."""
    hm = x.shape[1]
    if hm == 1:
        return x
    idx = heads.to(x.device)
    if hm == n_q_heads:
        return x.index_select(1, idx)
    if hm == n_kv_heads:
        return x.index_select(1, idx // (n_q_heads // n_kv_heads))
    raise ValueError(f"a mask with {hm} heads does not fit {n_q_heads} query / {n_kv_heads} kv heads.")


def select_heads(mask, heads, n_q_heads, n_kv_heads):
    """The part of ``mask`` (built for all ``n_q_heads``) that applies to the query heads ``heads`` (int64
    ``[G]``), for attention where query head ``heads[g]`` is paired with its own kv head (as in
    :func:`head_groups_attention`). Warm-start state is dropped."""
    def pick(x):
        return _pick(x, heads, n_q_heads, n_kv_heads)
    if mask is None:
        return None
    if isinstance(mask, BlockSparseMask):
        return mask.map_heads(pick)
    if isinstance(mask, StripeSparseMask):
        return mask.map_fields(pick)  # block columns (if any) included
    if isinstance(mask, PermutedMask):
        return PermutedMask(select_heads(mask.inner, heads, n_q_heads, n_kv_heads), pick(mask.perm_q),
                            pick(mask.perm_k))
    if isinstance(mask, RoutedMask):
        return RoutedMask(pick(mask.q_index), pick(mask.k_index), mask.block_size, mask.seq_lens)
    raise TypeError(f"cannot select heads of a {type(mask).__name__}.")


class HeadGroupsMask:
    """Masks for disjoint groups of query heads that together cover all ``n_heads``.

    Attributes:
        groups: list of ``(heads, mask)``: int64 query-head indices ``[G]`` (sorted) and the mask built for
            those heads (its head dim is 1 or ``G``; ``None`` means dense attention).
        n_heads: Hq. seq_lens: ``(Lq, Lk)``.

    Example:
        >>> from sparse_attn import BlockSparseMask
        >>> m = HeadGroupsMask([([0, 2], None), ([1], BlockSparseMask.full(64, 64, 32))], 3, (64, 64))
        >>> m.density()
        1.0
    """

    def __init__(self, groups, n_heads, seq_lens):
        if not isinstance(groups, (list, tuple)) or not groups:
            raise TypeError(f"groups must be a non-empty list of (heads, mask), got {groups!r}.")
        self.n_heads, self.seq_lens = int(n_heads), tuple(seq_lens)
        self.groups, seen = [], []
        for i, item in enumerate(groups):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"groups[{i}] must be a (heads, mask) pair, got {item!r}.")
            heads = torch.as_tensor(item[0], dtype=torch.int64).flatten()
            if heads.numel() == 0 or not bool((heads[1:] > heads[:-1]).all()):
                raise ValueError(f"groups[{i}] heads must be a non-empty increasing list, got {heads.tolist()}.")
            mask = item[1]
            if mask is not None and tuple(mask.seq_lens) != self.seq_lens:
                raise ValueError(f"groups[{i}] mask has seq_lens={tuple(mask.seq_lens)}, expected {self.seq_lens}.")
            self.groups.append((heads, mask))
            seen.extend(heads.tolist())
        if sorted(seen) != list(range(self.n_heads)):
            raise ValueError(f"groups must cover the query heads 0..{self.n_heads - 1} exactly once, got {sorted(seen)}.")

    @property
    def device(self):
        for _, m in self.groups:
            if m is not None:
                return m.device
        return torch.device("cpu")

    def to(self, device) -> "HeadGroupsMask":
        return HeadGroupsMask([(h, None if m is None else m.to(device)) for h, m in self.groups], self.n_heads,
                              self.seq_lens)

    def density(self, causal: bool = False) -> float:
        """Mean over query heads of each group's density (dense groups count 1)."""
        total = sum(len(h) * (1.0 if m is None else m.density(causal=causal)) for h, m in self.groups)
        return total / self.n_heads

    def __repr__(self) -> str:
        parts = ", ".join(f"{h.tolist()}: {type(m).__name__ if m is not None else 'dense'}" for h, m in self.groups)
        return f"HeadGroupsMask(n_heads={self.n_heads}, seq_lens={self.seq_lens}, groups={{{parts}}})"


def _select(q, k, v, heads):
    """q/k/v restricted to the query heads ``heads`` (each with its own kv head)."""
    n_q, n_kv = q.shape[1], k.shape[1]
    idx = heads.to(q.device)
    kv_idx = idx // (n_q // n_kv)
    return q.index_select(1, idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx)


def _check(mask, q, k):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError("q, k and v must be rank-4 tensors [B, H, L, D].")
    if q.shape[1] != mask.n_heads:
        raise ValueError(f"mask has {mask.n_heads} query heads, but q has {q.shape[1]}.")
    if (q.shape[2], k.shape[2]) != mask.seq_lens:
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths "
                         f"({q.shape[2]}, {k.shape[2]}).")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]}).")


def head_groups_attention(q, k, v, mask: HeadGroupsMask, *, causal=False, scale=None, return_lse=False,
                          backend="auto"):
    """:func:`~sparse_attn.sparse_attention` under a :class:`HeadGroupsMask`: one call per group, heads reassembled.

    Example:
        >>> q = k = v = torch.randn(1, 2, 64, 16)
        >>> m = HeadGroupsMask([([0], None), ([1], None)], 2, (64, 64))
        >>> head_groups_attention(q, k, v, m).shape
        torch.Size([1, 2, 64, 16])
    """
    if not isinstance(mask, HeadGroupsMask):
        raise TypeError(f"mask must be a HeadGroupsMask, got {type(mask).__name__}.")
    _check(mask, q, k)
    outs, lses, order = [], [], []
    for heads, m in mask.groups:
        qg, kg, vg = _select(q, k, v, heads)
        out = sparse_attention(qg, kg, vg, m, causal=causal, scale=scale, return_lse=return_lse, backend=backend)
        if return_lse:
            outs.append(out[0])
            lses.append(out[1])
        else:
            outs.append(out)
        order.extend(heads.tolist())
    inv = torch.empty(len(order), dtype=torch.int64)
    inv[torch.tensor(order)] = torch.arange(len(order))
    inv = inv.to(q.device)
    o = torch.cat(outs, 1).index_select(1, inv)
    return (o, torch.cat(lses, 1).index_select(1, inv)) if return_lse else o


def head_groups_quality(mask: HeadGroupsMask, q, k, v, *, causal=False, scale=None) -> dict:
    """:func:`~sparse_attn.attention_quality` per group, reassembled into ``[B, Hq]`` tensors."""
    if not isinstance(mask, HeadGroupsMask):
        raise TypeError(f"mask must be a HeadGroupsMask, got {type(mask).__name__}.")
    _check(mask, q, k)
    out = {}
    for heads, m in mask.groups:
        qg, kg, vg = _select(q, k, v, heads)
        qual = attention_quality(qg, kg, vg, m, causal=causal, scale=scale)
        for key in ("recall", "error", "density"):
            if key not in out:
                out[key] = torch.zeros(q.shape[0], mask.n_heads, dtype=torch.float64, device=q.device)
            out[key][:, heads.to(q.device)] = qual[key].to(q.device)
    return summarize(out["recall"], out["error"], out["density"])


register_mask_kind(HeadGroupsMask, attend=head_groups_attention, quality=head_groups_quality)
