"""Equal-size nearest-token routing (Routing Transformer); returns a :class:`~sparse_attn.RoutedMask`.

Per (batch, query head): queries and keys are unit-normalized and clustered TOGETHER by batched
k-means (shared centroids, as in the Routing Transformer). Each cluster then takes its ``W`` nearest
queries and its ``W`` nearest keys (top-``W`` cosine similarity to the centroid, sorted by position), so
every cluster has the same size: a token may be picked by several clusters (its output is the mean) or
by none (its output is 0). Attention is dense inside each cluster (the kernel runs one block-diagonal
mask over the gathered clusters).

``W`` defaults to ``ceil(L / C)`` rounded up to the tile size, so ``C * W >= L``. Causal attention
routes queries and keys as ONE set (a token's score is the mean of its query and key similarities), so
both have the same clusters and causality is the lower triangle inside each cluster; ``shared=True``
does the same without causality. When ``W`` would reach the sequence length, one cluster holds every
token (dense attention).
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .._checks import check_positive_int
from ..routed import RoutedMask
from .base import Pattern, check_qk, register
from .routing import _INITS, kmeans


@dataclass
class SharedCentroids:
    """Warm-start state: the k-means centroids ``[B, Hq, C, D]`` (float32, unit norm) shared by q and k."""

    centroids: torch.Tensor


def _round_up(n, m):
    return -(-n // m) * m


def nearest_tokens(scores, width):
    """int64 ``[G, C, W]``: per cluster, the positions of the ``width`` highest ``scores [G, L, C]``, sorted."""
    top = torch.topk(scores.transpose(1, 2), width, dim=-1).indices  # [G, C, W]
    return torch.sort(top, dim=-1).values


@register("equal_size_routing")
@dataclass(frozen=True)
class EqualSizeRouting(Pattern):
    """Routing Transformer routing: shared k-means centroids, each cluster takes its W nearest tokens.

    Args:
        clusters: C, clusters per (batch, query head).
        window: tokens per cluster W (a multiple of the tile size); default ``ceil(L / C)`` rounded up to it.
        shared: route queries and keys as one set (always on with ``causal=True``).
        iters: k-means iterations from a cold start; warm_iters: from ``state`` centroids.
        init: ``"random"`` or ``"kmeans++"`` (seeded by ``seed``).
        block_size: tile size of the inner block-diagonal mask.

    Example:
        >>> q, k = torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64)
        >>> mask = EqualSizeRouting(clusters=4, block_size=64).build(q, k, causal=True)
        >>> mask.n_clusters, mask.q_index.shape[-1]
        (4, 128)
    """

    mask_kind: ClassVar[str] = "routed"

    clusters: int = 16
    window: Optional[int] = None
    shared: bool = False
    iters: int = 10
    warm_iters: int = 2
    init: str = "random"
    seed: int = 0
    block_size: int = 64

    def __post_init__(self):
        check_positive_int(self.clusters, "clusters")
        check_positive_int(self.block_size, "block_size")
        for name in ("iters", "warm_iters", "seed"):
            check_positive_int(getattr(self, name), name, allow_zero=True)
        if self.window is not None:
            check_positive_int(self.window, "window")
            if self.window % max(self.block_pair):
                raise ValueError(f"window must be a multiple of the tile size {max(self.block_pair)}, got {self.window}.")
        if not isinstance(self.shared, bool):
            raise TypeError(f"shared must be a bool, got {type(self.shared).__name__}.")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}.")

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        raise NotImplementedError("equal_size_routing produces a RoutedMask (clusters of the original tokens); it "
                                  "has no block map and cannot be combined in Union/PerHead.")

    def _width(self, length, tile):
        w = self.window if self.window is not None else _round_up(math.ceil(length / self.clusters), tile)
        return w

    def _check_state(self, state, q):
        if state is None:
            return None
        if not isinstance(state, SharedCentroids):
            raise TypeError(f"state must be a SharedCentroids or None, got {type(state).__name__}.")
        b, hq, _, d = q.shape
        c = state.centroids
        if c.dim() != 4 or tuple(c.shape[:2]) != (b, hq) or c.shape[3] != d:
            raise ValueError(f"state.centroids must have shape [{b}, {hq}, C, {d}], got {list(c.shape)}.")
        return c.flatten(0, 1).to(q.device)

    def build_stateful(self, q, k, *, causal=False, layout=None, state=None):
        """``(mask, state)``: the step cache's warm-start protocol (it hands back the previous state)."""
        mask = self.build(q, k, causal=causal, layout=layout, state=state)
        return mask, mask.state

    def build(self, q, k, *, causal=False, layout=None, state=None) -> RoutedMask:
        """The routed mask for ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (``state``: warm-start centroids)."""
        check_qk(q, k)
        (b, hq, lq, d), (hkv, lk) = q.shape, k.shape[1:3]
        if lq == 0 or lk == 0:
            raise ValueError(f"equal_size_routing needs q_len and kv_len >= 1 (a cluster holds tokens), got {lq} "
                             f"and {lk}.")
        shared = self.shared or bool(causal)
        if shared and lq != lk:
            raise ValueError(f"shared routing (causal=True or shared=True) needs q_len == kv_len, got {lq} and {lk}.")
        bm, bn = self.block_pair
        w_q, w_k = self._width(lq, bm), self._width(lk, bn)
        if shared:
            w_q = w_k = max(w_q, w_k)
        if self.clusters == 1 or w_q >= lq or w_k >= lk:  # one cluster holds everything: dense attention
            iq = torch.arange(lq, device=q.device)[None, None, None]
            ik = torch.arange(lk, device=q.device)[None, None, None]
            return RoutedMask(iq, ik, self.block_size, (lq, lk), state=state)
        c0 = self._check_state(state, q)
        iters = self.iters if state is None else self.warm_iters
        xq = torch.nn.functional.normalize(q.float(), dim=-1).flatten(0, 1)  # [G, Lq, D], G = B * Hq
        xk = torch.nn.functional.normalize(k.float(), dim=-1).repeat_interleave(hq // hkv, 1).flatten(0, 1)
        cents, _ = kmeans(torch.cat([xq, xk], 1), self.clusters, iters, metric="cosine", init=self.init,
                          seed=self.seed, centroids=c0)  # [G, C, D]
        sq = xq @ cents.transpose(1, 2)  # [G, Lq, C]
        sk = xk @ cents.transpose(1, 2)  # [G, Lk, C]
        if shared:
            iq = ik = nearest_tokens((sq + sk) / 2, w_q)
        else:
            iq, ik = nearest_tokens(sq, w_q), nearest_tokens(sk, w_k)
        n_c = cents.shape[1]
        new_state = SharedCentroids(cents.view(b, hq, n_c, d))
        return RoutedMask(iq.view(b, hq, n_c, w_q), ik.view(b, hq, n_c, w_k), self.block_size, (lq, lk),
                          state=new_state)
