"""Routed masks: clusters of tokens that attend within themselves (Routing Transformer).

Each of ``C`` clusters holds ``Wq`` query positions and ``Wk`` key positions of the original order
(sorted, distinct inside a cluster; a token may belong to several clusters or to none). The queries of
a cluster attend to the keys of the same cluster, densely. A query's output is the MEAN of its
clusters' outputs; a query in no cluster gets 0 (the Routing Transformer's definition).

:func:`routed_attention` gathers q/k/v cluster by cluster into a ``C * W`` long sequence, runs
:func:`~sparse_attn.sparse_attention` with a block-diagonal inner mask (one ``Wq x Wk`` square per
cluster: ``Wq``/``Wk`` are multiples of the tile size, or ``C == 1``) and scatter-averages back.

Causal: only when queries and keys share the clusters (``q_index`` equal to ``k_index``, ``Lq == Lk``).
Then, because the positions in a cluster are sorted, "key position <= query position" is exactly the
lower triangle of the cluster's square in the gathered order, which the kernel's causal mask gives.
"""

import math

import torch

from ._checks import check_index_mask_inputs, check_positive_int
from .mask import BlockSparseMask, _as_pair
from .mask_kinds import register_mask_kind
from .ops import sparse_attention
from .permuted import kv_for_key_index
from .quality import CHUNK_BYTES, dense_rows, summarize


def _check_index(index, name, length):
    """int64 ``[Pb, Ph, C, W]``: positions in ``[0, length)``, strictly increasing inside each cluster."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}.")
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {index.dtype}.")
    if index.dim() != 4 or index.shape[2] == 0 or index.shape[3] == 0:
        raise ValueError(f"{name} must have shape [B|1, H|1, C, W] with C, W >= 1, got {list(index.shape)}.")
    if bool((index < 0).any()) or bool((index >= length).any()):
        raise ValueError(f"{name} must hold positions in [0, {length}), got values in "
                         f"[{int(index.min())}, {int(index.max())}].")
    if index.shape[3] > 1 and not bool((index[..., 1:] > index[..., :-1]).all()):
        raise ValueError(f"{name} must be strictly increasing inside every cluster (sorted, distinct positions).")
    return index.contiguous()


def _incidence(index, length):
    """float32 ``[Pb, Ph, L, C]``: 1 where position ``l`` belongs to cluster ``c``."""
    pb, ph, n_c, _ = index.shape
    inc = torch.zeros(pb, ph, n_c, length, device=index.device)
    inc.scatter_(-1, index, 1.0)
    return inc.transpose(-1, -2)


class RoutedMask:
    """Token clusters attending within themselves; see the module docstring for the semantics.

    Attributes:
        q_index: int64 ``[Pb, Ph, C, Wq]`` (``Pb`` in (1, B), ``Ph`` in (1, Hq)): sorted query positions per cluster.
        k_index: int64 ``[Pb, Ph, C, Wk]`` (``Ph`` in (1, Hkv, Hq)): sorted key positions per cluster.
        block_size: ``(BLOCK_M, BLOCK_N)`` of the inner block-diagonal mask (``Wq % BLOCK_M == 0`` and
            ``Wk % BLOCK_N == 0`` unless ``C == 1``).
        seq_lens: ``(Lq, Lk)`` of the original order.
        inner: the :class:`BlockSparseMask` over the gathered order (``[1, 1]`` batch-heads).
        state: optional warm-start state of the pattern that built it (e.g. centroids), or None.

    Example:
        >>> idx = torch.tensor([[0, 2], [1, 3]])[None, None]  # 2 clusters of 2 tokens over L = 4
        >>> m = RoutedMask(idx, idx, 2, (4, 4))
        >>> m.to_dense()[0, 0].int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    """

    def __init__(self, q_index, k_index, block_size, seq_lens, *, state=None):
        if not (isinstance(seq_lens, (tuple, list)) and len(seq_lens) == 2):
            raise TypeError(f"seq_lens must be a pair (q_len, kv_len), got {seq_lens!r}.")
        q_len, kv_len = (check_positive_int(n, f"seq_lens[{i}]") for i, n in enumerate(seq_lens))
        self.seq_lens = (q_len, kv_len)
        self.q_index = _check_index(q_index, "q_index", q_len)
        self.k_index = _check_index(k_index, "k_index", kv_len)
        if self.q_index.device != self.k_index.device:
            raise ValueError(f"q_index is on {self.q_index.device} but k_index is on {self.k_index.device}.")
        n_c = self.q_index.shape[2]
        if self.k_index.shape[2] != n_c:
            raise ValueError(f"q_index and k_index must have the same number of clusters, got {n_c} and "
                             f"{self.k_index.shape[2]}.")
        self.block_size = bm, bn = _as_pair(block_size)
        w_q, w_k = self.q_index.shape[3], self.k_index.shape[3]
        if n_c > 1 and (w_q % bm or w_k % bn):
            raise ValueError(f"cluster sizes (Wq={w_q}, Wk={w_k}) must be multiples of block_size {self.block_size} "
                             f"when there is more than one cluster (got {n_c} clusters).")
        per_q, per_k = math.ceil(w_q / bm), math.ceil(w_k / bn)
        tiles = torch.kron(torch.eye(n_c, dtype=torch.float32, device=self.q_index.device),
                           torch.ones(per_q, per_k, device=self.q_index.device)) > 0
        self.inner = BlockSparseMask.from_dense(tiles[None, None], self.block_size, (n_c * w_q, n_c * w_k))
        self.state = state

    # ---- views --------------------------------------------------------------------------
    @property
    def n_clusters(self) -> int:
        return self.q_index.shape[2]

    @property
    def device(self):
        return self.q_index.device

    def shares_clusters(self) -> bool:
        """True when queries and keys have the same clusters (the condition for causal attention)."""
        return (self.seq_lens[0] == self.seq_lens[1] and self.q_index.shape == self.k_index.shape
                and torch.equal(self.q_index, self.k_index))

    def check_causal(self, causal):
        if causal and not self.shares_clusters():
            raise ValueError("causal=True needs queries and keys routed to the same clusters (q_index equal to "
                             "k_index, Lq == Lk); this RoutedMask routes them separately.")

    def to(self, device) -> "RoutedMask":
        if torch.device(device) == self.device:
            return self
        return RoutedMask(self.q_index.to(device), self.k_index.to(device), self.block_size, self.seq_lens,
                          state=self.state)

    def density(self, causal: bool = False) -> float:
        """Computed (query, key) pairs / visible pairs, counting a pair once per cluster that computes it."""
        self.check_causal(causal)
        (q_len, kv_len), (n_c, w_q, w_k) = self.seq_lens, (self.n_clusters, self.q_index.shape[3],
                                                            self.k_index.shape[3])
        if causal:
            return n_c * w_q * (w_q + 1) / 2 / (q_len * (q_len + 1) / 2)
        return n_c * w_q * w_k / (q_len * kv_len)

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Pb, Ph, Lq, Lk]``: pairs computed by at least one cluster (small inputs only)."""
        self.check_causal(causal)
        inc_q = _incidence(self.q_index, self.seq_lens[0])  # [Pb, Ph, Lq, C]
        inc_k = _incidence(self.k_index, self.seq_lens[1])  # [Pb, Phk, Lk, C]
        dense = (inc_q @ inc_k.transpose(-1, -2)) > 0
        if causal:
            q_len = self.seq_lens[0]
            dense = dense & torch.ones(q_len, q_len, dtype=torch.bool, device=self.device).tril()
        return dense

    def coverage(self) -> torch.Tensor:
        """int64 ``[Pb, Ph, Lq]``: how many clusters hold each query (0: its output is 0)."""
        inc = _incidence(self.q_index, self.seq_lens[0])
        return inc.sum(-1).long()

    def quality(self, q, k, v, *, causal=False, scale=None) -> dict:
        """:func:`~sparse_attn.attention_quality`-style report: recall (dense softmax mass on the pairs of a
        query's clusters; 0 for a query in no cluster), relative error of :func:`routed_attention` against
        dense attention, and :meth:`density`."""
        return routed_quality(self, q, k, v, causal=causal, scale=scale)

    def __repr__(self) -> str:
        return (f"RoutedMask(clusters={self.n_clusters}, Wq={self.q_index.shape[3]}, Wk={self.k_index.shape[3]}, "
                f"batch_heads_q={tuple(self.q_index.shape[:2])}, batch_heads_k={tuple(self.k_index.shape[:2])}, "
                f"seq_lens={self.seq_lens}, block_size={self.block_size})")


def _gather(x, index):
    """``x [B, H, L, D]`` gathered to ``[B, H, C * W, D]`` by ``index [Pb, Ph, C, W]`` (broadcast over B, H)."""
    flat = index.flatten(2)[..., None]
    return x.take_along_dim(flat, dim=2)


def routed_attention(q, k, v, mask: RoutedMask, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """:func:`~sparse_attn.sparse_attention` under a :class:`RoutedMask`: gather -> kernel -> scatter-average.

    Differentiable (autograd flows through the gathers and the scatter). ``return_lse`` is refused: a
    query in several clusters averages several softmaxes, which have no single log-sum-exp.

    Example:
        >>> q = k = v = torch.randn(1, 2, 4, 16)
        >>> idx = torch.tensor([[0, 1], [2, 3]])[None, None]
        >>> routed_attention(q, k, v, RoutedMask(idx, idx, 2, (4, 4)), causal=True).shape
        torch.Size([1, 2, 4, 16])
    """
    if not isinstance(mask, RoutedMask):
        raise TypeError(f"mask must be a RoutedMask, got {type(mask).__name__}.")
    if return_lse:
        raise ValueError("return_lse=True is not supported with a RoutedMask: a query in several clusters "
                         "averages several softmaxes (Routing Transformer), which have no single log-sum-exp.")
    check_index_mask_inputs(mask, q, k, v, "q_index", mask.q_index, "k_index", mask.k_index)
    mask.check_causal(causal)
    n_q_heads = q.shape[1]
    k, v = kv_for_key_index(k, v, mask.k_index, n_q_heads)  # keys routed per query head: repeat kv heads
    qg, kg, vg = _gather(q, mask.q_index), _gather(k, mask.k_index), _gather(v, mask.k_index)
    og = sparse_attention(qg, kg, vg, mask.inner, causal=bool(causal), scale=scale, backend=backend)
    flat = mask.q_index.flatten(2)  # [Pb, Ph, C * Wq]
    shape = (q.shape[0], n_q_heads, q.shape[2])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sums = torch.zeros(*shape, q.shape[3], dtype=acc, device=q.device)
    sums = sums.scatter_add(2, flat[..., None].expand(*shape[:2], -1, q.shape[3]), og.to(acc))
    counts = torch.zeros(flat.shape[:2] + (q.shape[2],), dtype=acc, device=q.device)
    counts = counts.scatter_add(2, flat, torch.ones(flat.shape, dtype=acc, device=q.device))
    return (sums / counts.clamp_min(1)[..., None]).to(q.dtype)


def _fit(x, n_q_heads, n_kv_heads):
    """Repeat kv-head rows of ``x [Pb, Hkv, ...]`` to query heads (1 and Hq pass through)."""
    return x if x.shape[1] in (1, n_q_heads) else x.repeat_interleave(n_q_heads // n_kv_heads, 1)


def routed_quality(mask, q, k, v, *, causal=False, scale=None, chunk_bytes=CHUNK_BYTES) -> dict:
    """Per head: recall (dense softmax mass on the pairs of the query's clusters; 0 for a query in no
    cluster), relative error of :func:`routed_attention` against dense attention, density.

    Returns the dict of :func:`~sparse_attn.attention_quality` (float64 ``[B, Hq]`` tensors and their means).
    """
    mask.check_causal(causal)
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    o_routed = routed_attention(q.float(), k.float(), v.float(), mask, causal=causal, scale=scale).float()
    inc_q = _incidence(mask.q_index, q_len)  # [Pb, Ph, Lq, C]
    inc_k = _fit(_incidence(mask.k_index, kv_len), n_q_heads, n_kv_heads)  # [Pb, Ph', Lk, C]
    shape = (batch, n_q_heads)
    mass, rows_seen, err2, ref2 = (torch.zeros(shape, dtype=torch.float64, device=q.device) for _ in range(4))
    for r0, r1, p, o_dense, visible, _ in dense_rows(q, k, v, causal=causal, scale=scale, chunk_bytes=chunk_bytes):
        keep = ((inc_q[:, :, r0:r1] @ inc_k.transpose(-1, -2)) > 0) & visible  # [Pb, Ph, R, Lk]
        seen = visible.any(-1)  # [R]
        mass += ((p * keep).sum(-1) * seen).sum(-1).double()
        rows_seen += seen.sum().double()
        err2 += ((o_routed[:, :, r0:r1] - o_dense) ** 2).sum((-1, -2)).double()
        ref2 += (o_dense ** 2).sum((-1, -2)).double()
    recall = torch.where(rows_seen > 0, mass / rows_seen.clamp_min(1), torch.ones_like(mass))
    error = torch.sqrt(err2 / ref2.clamp_min(1e-300))
    density = torch.full(shape, mask.density(causal), dtype=torch.float64, device=q.device)
    return summarize(recall, error, density)


register_mask_kind(RoutedMask, attend=routed_attention, quality=routed_quality)
