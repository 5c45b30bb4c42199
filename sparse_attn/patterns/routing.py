"""Content-based routing by k-means (Routing Transformer; Sparse VideoGen 2's semantic-aware permutation).

Per (batch, head), queries and keys are clustered separately by batched k-means (all heads at once:
no Python loop over heads or clusters in the Lloyd iterations). Tokens are permuted so that each
cluster is contiguous; a query cluster ``a`` keeps the key clusters ``b`` with the largest centroid
attention mass ``softmax_b(scale * mean_q[a] . mean_k[b] + log |b|)`` until their cumulative mass
reaches ``top_p`` (SVG2). The result is a :class:`~sparse_attn.PermutedMask`: a block-sparse mask
over the permuted order plus the permutations; :func:`~sparse_attn.sparse_attention` gathers, runs
the kernel and scatters back.

Variable cluster sizes: clusters are NOT padded to blocks. A tile of the permuted order that holds
tokens of several clusters (a "ragged boundary") is kept when any of its (query cluster, key cluster)
pairs is kept. This keeps the sequence length (no padded copies of q/k/v, any BLOCK size the kernel
supports) and is an exact superset of the selected cluster pairs; the price is the boundary tiles,
at most ``(Cq + Ck)`` extra tile rows/columns, small when clusters are several blocks long.

Warm start: the mask carries ``mask.state`` (:class:`RoutingState`, the k-means centroids); pass it as
``build(q, k, state=mask.state)`` at the next step to run ``warm_iters`` iterations instead of ``iters``.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparse_attn_kernels import reference_scoring as ref

from .._checks import check_positive_int
from ..mask import BlockSparseMask
from ..permuted import PermutedMask
from . import _scoring as S
from .base import Pattern, check_qk, register

_METRICS = ("cosine", "l2")
_INITS = ("random", "kmeans++")
_ORDERS = ("spectral", "label")


@dataclass
class RoutingState:
    """Warm-start state: k-means centroids ``q_centroids [B, Hq, Cq, D]``, ``k_centroids [B, Hkv, Ck, D]`` (float32)."""

    q_centroids: torch.Tensor
    k_centroids: torch.Tensor


def _prep(x, metric):
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x


def kmeans_assign(x, centroids, metric):
    """Nearest centroid: int64 ``[G, L]`` for ``x [G, L, D]`` and ``centroids [G, C, D]`` (x already prepared).

    Triton kernel on CUDA (``SPARSE_ATTN_SCORING=triton`` forces it), its PyTorch twin otherwise.
    """
    if S.use_triton(x) and 16 <= x.shape[-1] <= 256:
        from sparse_attn_kernels.scoring.kmeans import kmeans_assign as fn
        return fn(x, centroids, metric)
    return ref.kmeans_assign_ref(x, centroids, metric)


def _init_centroids(x, n_clusters, init, seed):
    """``[G, C, D]`` seeded initial centroids: random distinct tokens, or greedy k-means++ (loop over the C
    picks, vectorized over groups: k-means++ is sequential by definition).

    The random draws are shared by all groups (the same token positions for ``"random"``, the same
    uniforms, inverted through each group's own distance distribution, for ``"kmeans++"``), so a group's
    centroids do not depend on which other groups (heads, batch rows) are clustered with it.
    Greedy k-means++ draws ``2 + ln C`` candidates per pick by squared distance and keeps the one that
    lowers the total squared distance most (as scikit-learn does); plain k-means++ often seeds two
    centroids in one well-separated cluster and leaves another cluster without one.
    """
    g, length, dim = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if init == "random":
        idx = torch.randperm(length, generator=gen)[:n_clusters].to(x.device)
        return x[:, idx].clone()
    trials = 2 + int(math.log(max(n_clusters, 1)))
    first = int(torch.randint(0, length, (1,), generator=gen))
    cents = [x[:, first:first + 1]]
    d2 = ((x - cents[0]) ** 2).sum(-1)  # [G, L]
    for _ in range(n_clusters - 1):
        u = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device)
        cdf = torch.cumsum(d2.double().clamp_min(0) + 1e-12, -1)
        picks = torch.searchsorted(cdf, (u[None, :] * cdf[:, -1:]).contiguous()).clamp_max(length - 1)  # [G, T]
        cand = x.gather(1, picks[..., None].expand(-1, -1, dim))  # [G, T, D]
        cand_d2 = torch.minimum(d2[:, None, :], torch.cdist(cand, x) ** 2)  # [G, T, L]
        best = cand_d2.sum(-1).argmin(-1)  # [G]
        cents.append(cand.gather(1, best[:, None, None].expand(-1, 1, dim)))
        d2 = cand_d2.gather(1, best[:, None, None].expand(-1, 1, length))[:, 0]
    return torch.cat(cents, 1)


def kmeans(x, n_clusters, iters, *, metric="cosine", init="random", seed=0, centroids=None):
    """Batched Lloyd k-means over groups.

    Args:
        x: ``[G, L, D]`` points (any float dtype; computed in float32).
        n_clusters: C (clamped to L).
        iters: Lloyd iterations (assign, then update); 0 only assigns.
        metric: ``"cosine"`` (points and centroids unit-normalized) or ``"l2"``.
        init: ``"random"`` (seeded distinct tokens) or ``"kmeans++"``; ignored when ``centroids`` is given.
        centroids: ``[G, C, D]`` warm start.

    Returns:
        ``(centroids [G, C, D] float32, assign int64 [G, L])``; empty clusters keep their previous centroid.

    Example:
        >>> c, a = kmeans(torch.randn(2, 100, 8), 4, 5)
        >>> c.shape, a.shape
        (torch.Size([2, 4, 8]), torch.Size([2, 100]))
    """
    xp = _prep(x, metric)
    g, length, dim = xp.shape
    if centroids is None:
        centroids = _init_centroids(xp, min(n_clusters, length), init, seed)
    else:
        centroids = _prep(centroids, metric).clone()
    n_c = centroids.shape[1]
    ones = torch.ones(g, length, device=x.device)
    for _ in range(iters):
        assign = kmeans_assign(xp, centroids, metric)
        sums = torch.zeros(g, n_c, dim, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, dim), xp)
        counts = torch.zeros(g, n_c, device=x.device).scatter_add_(1, assign, ones)
        new = sums / counts.clamp_min(1)[..., None]
        if metric == "cosine":
            new = torch.nn.functional.normalize(new, dim=-1)
        centroids = torch.where(counts[..., None] > 0, new, centroids)
    return centroids, kmeans_assign(xp, centroids, metric)


def _cluster_means(x, assign, n_c):
    """Raw (unnormalized) per-cluster means ``[G, C, D]`` and sizes ``[G, C]`` of ``x [G, L, D]``."""
    g, length, dim = x.shape
    sums = torch.zeros(g, n_c, dim, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
    sizes = torch.zeros(g, n_c, device=x.device).scatter_add_(1, assign, torch.ones(g, length, device=x.device))
    return sums / sizes.clamp_min(1)[..., None], sizes


def top_p_pairs(cq, ck, k_sizes, top_p, scale):
    """bool ``[G, Cq, Ck]``: per query cluster, the fewest key clusters whose centroid attention mass
    ``softmax(scale * cq . ck + log size)`` reaches ``top_p`` (the best one is always kept)."""
    logits = scale * (cq @ ck.transpose(1, 2)) + torch.log(k_sizes)[:, None, :]
    p = torch.softmax(logits, dim=-1)
    ps, order = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(ps, -1) - ps  # mass of the strictly better clusters
    keep_sorted = (before < top_p) & (ps > 0)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def spectral_ranks(mq, mk, mk_q, size_q, scale, group):
    """Positions of the clusters in the permuted order: ``(rank_q [Gq, Cq], rank_k [Gk, Ck])`` int64.

    Key clusters are ordered along the first principal axis of their centroids (per kv head); query
    clusters by the expected position, under their centroid attention mass, of the key clusters they
    attend to. Clusters that are kept together then sit side by side, so most tiles shared by two
    clusters at a ragged boundary are wanted anyway (on 8k planted clusters, 128 clusters: 57% fewer tiles
    than in label order).
    """
    centered = mk - mk.mean(1, keepdim=True)  # [Gk, Ck, D]
    axis = torch.linalg.eigh(centered.transpose(1, 2) @ centered).eigenvectors[..., -1]  # [Gk, D]
    rank_k = torch.argsort(torch.argsort((centered @ axis[..., None])[..., 0], dim=-1, stable=True), dim=-1)
    rank_kq = rank_k.repeat_interleave(group, 0).float()  # [Gq, Ck]
    p = torch.softmax(scale * (mq @ mk_q.transpose(1, 2)) + torch.log(size_q.clamp_min(1))[:, None, :], -1)
    expected = (p * rank_kq[:, None, :]).sum(-1)  # [Gq, Cq]
    rank_q = torch.argsort(torch.argsort(expected, dim=-1, stable=True), dim=-1)
    return rank_q, rank_k


def _incidence(assign_sorted, block, n_c):
    """float ``[G, NB, C]``: 1 where permuted block ``nb`` holds a token of cluster ``c``."""
    g, length = assign_sorted.shape
    n_b = math.ceil(length / block)
    blk = torch.arange(length, device=assign_sorted.device) // block
    flat = torch.zeros(g, n_b * n_c, device=assign_sorted.device)
    flat.scatter_(1, blk[None, :] * n_c + assign_sorted, 1.0)
    return flat.view(g, n_b, n_c)


@register("kmeans_routing")
@dataclass(frozen=True)
class KMeansRouting(Pattern):
    """k-means routing with top-p cluster pairs (SVG2); returns a :class:`~sparse_attn.PermutedMask`.

    Args:
        q_clusters, k_clusters: clusters of queries (per query head) and keys (per kv head).
        top_p: cumulative centroid attention mass kept per query cluster.
        iters: Lloyd iterations from a cold start; warm_iters: from ``state`` centroids.
        metric: ``"cosine"`` or ``"l2"``; init: ``"random"`` or ``"kmeans++"`` (seeded by ``seed``).
        block_size: tile size of the inner mask.
        scale: score scale for the centroid attention (default ``1/sqrt(D)``).
        cluster_order: ``"spectral"`` (related clusters side by side: fewer boundary tiles, see
            :func:`spectral_ranks`) or ``"label"`` (k-means label order).

    ``causal=True`` is refused (causality is not defined in the permuted order). The mask carries
    ``mask.state`` (:class:`RoutingState`) for warm starts: ``build(q, k, state=prev.state)``.
    Routing masks do not combine in ``Union`` (they are not block maps of the original order); in ``PerHead``
    they run as a separate head group.

    Example:
        >>> q, k = torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64)
        >>> mask = KMeansRouting(q_clusters=8, k_clusters=8).build(q, k)
        >>> mask2 = KMeansRouting(q_clusters=8, k_clusters=8).build(q, k, state=mask.state)
    """

    mask_kind: ClassVar[str] = "permuted"

    q_clusters: int = 32
    k_clusters: int = 32
    top_p: float = 0.9
    iters: int = 10
    warm_iters: int = 2
    metric: str = "cosine"
    init: str = "random"
    seed: int = 0
    block_size: int = 64
    scale: Optional[float] = None
    cluster_order: str = "spectral"

    def __post_init__(self):
        if self.cluster_order not in _ORDERS:
            raise ValueError(f"cluster_order must be one of {_ORDERS}, got {self.cluster_order!r}.")
        for name in ("q_clusters", "k_clusters", "block_size"):
            check_positive_int(getattr(self, name), name)
        for name in ("iters", "warm_iters", "seed"):
            check_positive_int(getattr(self, name), name, allow_zero=True)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a float in (0, 1], got {self.top_p!r}.")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}.")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}.")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
                                       or self.scale <= 0):
            raise ValueError(f"scale must be a positive float or None, got {self.scale!r}.")

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        raise NotImplementedError("kmeans_routing produces a PermutedMask (permuted order); it has no block map "
                                  "of the original order and cannot be combined in Union/PerHead.")

    def _check_state(self, state, q, k):
        if state is None:
            return None, None
        if not isinstance(state, RoutingState):
            raise TypeError(f"state must be a RoutingState or None, got {type(state).__name__}.")
        (b, hq, _, d), hkv = q.shape, k.shape[1]
        for name, c, h in (("q_centroids", state.q_centroids, hq), ("k_centroids", state.k_centroids, hkv)):
            if c.dim() != 4 or c.shape[0] != b or c.shape[1] != h or c.shape[3] != d:
                raise ValueError(f"state.{name} must have shape [{b}, {h}, C, {d}], got {list(c.shape)}.")
        return state.q_centroids.flatten(0, 1).to(q.device), state.k_centroids.flatten(0, 1).to(q.device)

    def build_stateful(self, q, k, *, causal=False, layout=None, state=None):
        """``(mask, state)``: the step cache's warm-start protocol (it hands back the previous state)."""
        mask = self.build(q, k, causal=causal, layout=layout, state=state)
        return mask, mask.state

    def build(self, q, k, *, causal=False, layout=None, state=None) -> PermutedMask:
        """The routing mask for ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (``state``: warm-start centroids)."""
        check_qk(q, k)
        if causal:
            raise ValueError("kmeans_routing does not support causal=True (a permuted order has no causal "
                             "predicate); use it for bidirectional attention (video DiTs, encoders).")
        (b, hq, lq, d), (hkv, lk) = q.shape, k.shape[1:3]
        cq0, ck0 = self._check_state(state, q, k)
        iters = self.iters if state is None else self.warm_iters
        xq, xk = q.flatten(0, 1).float(), k.flatten(0, 1).float()  # [B*Hq, Lq, D], [B*Hkv, Lk, D]
        cq, aq = kmeans(xq, self.q_clusters, iters, metric=self.metric, init=self.init, seed=self.seed,
                        centroids=cq0)
        ck, ak = kmeans(xk, self.k_clusters, iters, metric=self.metric, init=self.init, seed=self.seed + 1,
                        centroids=ck0)
        n_cq, n_ck = cq.shape[1], ck.shape[1]
        # -- cluster pairs by top-p of centroid attention mass ---------------------------------------
        mq, _ = _cluster_means(xq, aq, n_cq)
        mk, size_k = _cluster_means(xk, ak, n_ck)
        group = hq // hkv
        mk_q = mk.view(b, hkv, n_ck, d).repeat_interleave(group, 1).flatten(0, 1)
        size_q = size_k.view(b, hkv, n_ck).repeat_interleave(group, 1).flatten(0, 1)
        scale = d ** -0.5 if self.scale is None else float(self.scale)
        pairs = top_p_pairs(mq, mk_q, size_q, self.top_p, scale)  # [B*Hq, Cq, Ck]
        # -- cluster order, then permutations: clusters contiguous (stable sort keeps token order) -----
        if self.cluster_order == "spectral":
            rank_q, rank_k = spectral_ranks(mq, mk, mk_q, size_q, scale, group)
            aq, ak = rank_q.gather(1, aq), rank_k.gather(1, ak)  # relabel: label = position in the order
            order_q, order_k = torch.argsort(rank_q, -1), torch.argsort(rank_k, -1)
            order_kq = order_k.view(b, hkv, n_ck).repeat_interleave(group, 1).flatten(0, 1)
            pairs = pairs.gather(1, order_q[..., None].expand(-1, -1, n_ck)).gather(
                2, order_kq[:, None, :].expand(-1, n_cq, -1))
        perm_q = torch.sort(aq, dim=-1, stable=True).indices  # [B*Hq, Lq]
        perm_k = torch.sort(ak, dim=-1, stable=True).indices
        # -- tiles of the permuted order holding a kept pair (ragged cluster boundaries) --------------
        bm, bn = self.block_pair
        inc_q = _incidence(aq.gather(1, perm_q), bm, n_cq)  # [B*Hq, NQB, Cq]
        inc_k = _incidence(ak.gather(1, perm_k), bn, n_ck)  # [B*Hkv, NKB, Ck]
        inc_k = inc_k.view(b, hkv, -1, n_ck).repeat_interleave(group, 1).flatten(0, 1)
        keep = (inc_q @ pairs.float() @ inc_k.transpose(1, 2)) > 0  # [B*Hq, NQB, NKB]
        inner = BlockSparseMask.from_dense(keep.view(b, hq, *keep.shape[1:]), (bm, bn), (lq, lk))
        new_state = RoutingState(cq.view(b, hq, n_cq, d), ck.view(b, hkv, n_ck, d))
        return PermutedMask(inner, perm_q.view(b, hq, lq), perm_k.view(b, hkv, lk), state=new_state)
