"""Permuted masks: a token permutation around a block-sparse mask (k-means routing, window partitions).

The inner :class:`~sparse_attn.BlockSparseMask` is defined over the PERMUTED order: query row ``r`` of
the inner mask is original query token ``perm_q[r]``, key column ``c`` is original key ``perm_k[c]``.
:func:`permuted_attention` gathers q/k/v into that order, runs :func:`sparse_attention` with the inner
mask and scatters the output back, so the caller only ever sees the original order.

Causal attention is refused: the block kernels apply causality in the permuted order, which is not
the causal predicate of the original positions.
"""

import torch

from ._checks import check_index_mask_inputs
from .mask import BlockSparseMask
from .mask_kinds import register_mask_kind
from .ops import sparse_attention
from .quality import attention_quality


def _check_perm(perm, name, length):
    """int64 ``[Pb, Ph, L]`` (a 1-D ``[L]`` is shared by every batch and head); returns it and its inverse."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(perm).__name__}.")
    if perm.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {perm.dtype}.")
    if perm.dim() == 1:
        perm = perm[None, None]
    if perm.dim() != 3:
        raise ValueError(f"{name} must have shape [L] or [B|1, H|1, L], got {list(perm.shape)}.")
    if perm.shape[2] != length:
        raise ValueError(f"{name} must have length {length} (the inner mask's), got {perm.shape[2]}.")
    ar = torch.arange(length, device=perm.device)
    if length and not torch.equal(torch.sort(perm, dim=-1).values, ar.expand_as(perm)):
        raise ValueError(f"{name} must be a permutation of 0..{length - 1} in every row.")
    inv = torch.empty_like(perm).scatter_(-1, perm, ar.expand_as(perm).contiguous())
    return perm.contiguous(), inv


def _fit_heads(x, n, name):
    """Broadcast/repeat dim 1 of ``x`` (1, a divisor of n, or n) to ``n``."""
    h = x.shape[1]
    if h in (1, n):
        return x
    if n % h:
        raise ValueError(f"{name} heads ({h}) must be 1 or divide {n}.")
    return x.repeat_interleave(n // h, dim=1)


class PermutedMask:
    """A block-sparse mask over permuted tokens.

    Attributes:
        inner: :class:`BlockSparseMask` over the permuted order, ``seq_lens = (Lq, Lk)``.
        perm_q: int64 ``[Pb, Ph, Lq]`` (``Pb`` in (1, B), ``Ph`` in (1, Hq)): permuted row r is query ``perm_q[r]``.
        perm_k: int64 ``[Pb, Ph, Lk]`` (``Ph`` in (1, Hkv, Hq)): permuted column c is key ``perm_k[c]``.
        inv_q, inv_k: the inverse permutations (``inv_q[perm_q[r]] == r``).
        state: optional warm-start state of the pattern that built it (e.g. k-means centroids), or None.

    Example:
        >>> inner = BlockSparseMask.from_dense(torch.eye(2, dtype=torch.bool)[None, None], 2, (4, 4))
        >>> m = PermutedMask(inner, torch.tensor([0, 2, 1, 3]), torch.tensor([0, 2, 1, 3]))
        >>> m.to_dense()[0, 0].int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    """

    def __init__(self, inner, perm_q, perm_k=None, *, state=None):
        if not isinstance(inner, BlockSparseMask):
            raise TypeError(f"inner_mask must be a BlockSparseMask, got {type(inner).__name__}.")
        q_len, kv_len = inner.seq_lens
        if perm_k is None:
            if q_len != kv_len:
                raise ValueError(f"perm_k may be omitted only when q_len == kv_len, got seq_lens={inner.seq_lens}.")
            perm_k = perm_q
        self.inner = inner
        self.perm_q, self.inv_q = _check_perm(perm_q, "perm_q", q_len)
        self.perm_k, self.inv_k = _check_perm(perm_k, "perm_k", kv_len)
        for name, p in (("perm_q", self.perm_q), ("perm_k", self.perm_k)):
            if p.device != inner.device:
                raise ValueError(f"{name} is on {p.device}, but the inner mask is on {inner.device}.")
        self.state = state

    # ---- views --------------------------------------------------------------------------
    @property
    def seq_lens(self):
        return self.inner.seq_lens

    @property
    def block_size(self):
        return self.inner.block_size

    @property
    def device(self):
        return self.inner.device

    def to(self, device) -> "PermutedMask":
        if torch.device(device) == self.device:
            return self
        return PermutedMask(self.inner.to(device), self.perm_q.to(device), self.perm_k.to(device), state=self.state)

    def density(self, causal: bool = False) -> float:
        """Share of (query, key) token pairs computed (a permutation does not change it)."""
        if causal:
            raise ValueError("PermutedMask does not support causal=True (causality is not permutation invariant).")
        return self.inner.density()

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Bm, Hm, Lq, Lk]`` in the ORIGINAL token order (small inputs only)."""
        if causal:
            raise ValueError("PermutedMask does not support causal=True (causality is not permutation invariant).")
        tok = self.inner.to_dense()  # [Bm, Hm, Lq, Lk], permuted order
        n_b = max(tok.shape[0], self.inv_q.shape[0], self.inv_k.shape[0])
        n_h = max(tok.shape[1], self.inv_q.shape[1], self.inv_k.shape[1])
        tok = _fit_heads(tok, n_h, "inner mask").expand(n_b, n_h, -1, -1)
        inv_q = _fit_heads(self.inv_q, n_h, "perm_q").expand(n_b, n_h, -1)
        inv_k = _fit_heads(self.inv_k, n_h, "perm_k").expand(n_b, n_h, -1)
        # original (i, j) = permuted (inv_q[i], inv_k[j])
        rows = tok.take_along_dim(inv_q[..., :, None], dim=2)
        return rows.take_along_dim(inv_k[..., None, :], dim=3)

    def quality(self, q, k, v, *, scale=None) -> dict:
        """:func:`~sparse_attn.attention_quality` of this mask (computed in the permuted order, where the
        inner mask is block-sparse; recall, error and density are permutation invariant)."""
        qp, kp, vp = _gather_qkv(self, q, k, v)
        return attention_quality(qp, kp, vp, self.inner, causal=False, scale=scale)

    def __repr__(self) -> str:
        return (f"PermutedMask(batch_heads_q={tuple(self.perm_q.shape[:2])}, "
                f"batch_heads_k={tuple(self.perm_k.shape[:2])}, inner={self.inner!r})")


def kv_for_key_index(k, v, key_index, n_q_heads):
    """k, v with their kv heads repeated for their query heads when ``key_index`` (a key order or key
    clusters, ``[Pb, Ph, ...]``) has one entry per QUERY head under GQA; unchanged otherwise."""
    n_kv_heads = k.shape[1]
    if key_index.shape[1] == n_q_heads and n_kv_heads != n_q_heads:
        return k.repeat_interleave(n_q_heads // n_kv_heads, 1), v.repeat_interleave(n_q_heads // n_kv_heads, 1)
    return k, v


def _gather_qkv(mask, q, k, v):
    """q, k, v (``[B, H, L, D]``) in the permuted order of ``mask``."""
    check_index_mask_inputs(mask, q, k, v, "perm_q", mask.perm_q, "perm_k", mask.perm_k)
    k, v = kv_for_key_index(k, v, mask.perm_k, q.shape[1])
    qp = q.take_along_dim(mask.perm_q[..., None], dim=2)
    kp = k.take_along_dim(mask.perm_k[..., None], dim=2)
    vp = v.take_along_dim(mask.perm_k[..., None], dim=2)
    return qp, kp, vp


def permuted_attention(q, k, v, mask: PermutedMask, *, causal=False, scale=None, return_lse=False,
                       backend="auto"):
    """:func:`~sparse_attn.sparse_attention` under a :class:`PermutedMask`: gather -> kernel -> scatter.

    Differentiable (autograd flows through the gathers). ``causal=True`` raises ValueError.

    Example:
        >>> q = k = v = torch.randn(1, 2, 4, 16)
        >>> inner = BlockSparseMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), 4, (4, 4))
        >>> m = PermutedMask(inner, torch.tensor([3, 2, 1, 0]))
        >>> permuted_attention(q, k, v, m).shape
        torch.Size([1, 2, 4, 16])
    """
    if not isinstance(mask, PermutedMask):
        raise TypeError(f"mask must be a PermutedMask, got {type(mask).__name__}.")
    if causal:
        raise ValueError("causal=True is not supported with a PermutedMask: the kernel would apply causality "
                         "in the permuted order, not the original positions. Fold causality into the pattern.")
    qp, kp, vp = _gather_qkv(mask, q, k, v)
    inner = mask.inner
    mh = inner.batch_heads[1]
    if kp.shape[1] != k.shape[1] and mh not in (1, kp.shape[1]):  # kv heads were repeated: repeat the mask too
        g = kp.shape[1] // mh
        inner = inner.map_heads(lambda x: x.repeat_interleave(g, 1))
    out = sparse_attention(qp, kp, vp, inner, causal=False, scale=scale, return_lse=return_lse, backend=backend)
    inv = mask.inv_q
    if return_lse:
        o, lse = out
        return o.take_along_dim(inv[..., None], dim=2), lse.take_along_dim(inv, dim=2)
    return out.take_along_dim(inv[..., None], dim=2)


def permuted_quality(mask: PermutedMask, q, k, v, *, causal=False, scale=None) -> dict:
    """:func:`~sparse_attn.attention_quality` under a :class:`PermutedMask` (:meth:`PermutedMask.quality`);
    ``causal=True`` raises ValueError."""
    if causal:
        raise ValueError("causal=True is not supported with a PermutedMask (causality is defined in the "
                         "original token order); got causal=True.")
    return mask.quality(q, k, v, scale=scale)


register_mask_kind(PermutedMask, attend=permuted_attention, quality=permuted_quality)
