"""BiFormer region routing (bi-level routing attention, Zhu et al. 2023), over an image or video layout.

The token grid of a :class:`~sparse_attn.TokenLayout` is cut into regions, boxes of
``region_shape = (frames, rows, cols)`` tokens (``(1, rh, rw)`` on an image ``TokenLayout.video(1, H, W)``;
boxes at the grid edge may be smaller). Per batch:

1. region means of the queries and of the keys, ``qr [Hq, C, D]`` and ``kr [Hkv, C, D]``;
2. region affinity ``A = sum_h qr_h . kr_h^T`` ``[C, C]``: the routing is SHARED BY HEADS, as in BiFormer,
   where it is computed on the full embedding before the head split (the concatenated-head dot product
   is the sum of the per-head ones; with GQA each kv head's means serve its query heads);
3. each query region routes to its ``topk`` key regions by ``A`` (plus its own region with ``keep_own``);
4. every token attends to all tokens of its region's routed regions.

Tokens are permuted so that every region is contiguous (a window partition; the permutation is shared
by q and k, by every batch and head), and the result is a :class:`~sparse_attn.PermutedMask` whose inner
block mask has one row set per batch (routing depends on content) and one head (shared by heads).
Regions whose size is not a multiple of the block size leave ragged tile boundaries: a tile is kept
when any of its (query region, key region) pairs is kept, an exact superset of the routing (as
:mod:`~sparse_attn.patterns.routing` does).

Text tokens (``layout.text_len > 0``) form one extra region, kept by every query region outside the
``topk`` budget; text query rows keep every key (as ``video_chunk_select``). Non-causal only.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from .._checks import check_positive_int
from ..layout import resolve_layout
from ..mask import BlockSparseMask
from ..permuted import PermutedMask
from .base import Pattern, as_layout, as_tuple, check_qk, register
from .hierarchical import _incidence, box_chunk_ids


def region_means(x, ids, n_regions):
    """float ``[B, H, C, D]``: mean of ``x [B, H, L, D]`` over the tokens of each region (``ids int64 [L]``);
    empty regions give 0. Computed in float32 (float64 for float64 inputs)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    sums = torch.zeros(*x.shape[:2], n_regions, x.shape[3], dtype=dt, device=x.device)
    sums.index_add_(2, ids, x.to(dt))
    sizes = torch.zeros(n_regions, dtype=dt, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=dt))
    return sums / sizes.clamp_min(1)[:, None]


def region_affinity(q, k, ids, n_regions):
    """float ``[B, C, C]``: ``A[b, a, c] = sum_h mean_q(region a) . mean_k(region c)`` over query heads
    (kv-head means repeated for their GQA group), for ``q [B, Hq, L, D]`` and ``k [B, Hkv, L, D]``."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qr = region_means(q, ids, n_regions).view(b, hkv, hq // hkv, n_regions, d).sum(2)  # [B, Hkv, C, D]
    kr = region_means(k, ids, n_regions)  # [B, Hkv, C, D]
    return torch.einsum("bhad,bhcd->bac", qr, kr)


@register("region_routing")
@dataclass(frozen=True)
class RegionRouting(Pattern):
    """BiFormer bi-level routing: each region attends to its ``topk`` regions; returns a PermutedMask.

    Args:
        region_shape: region box ``(frames, rows, cols)`` of the layout's grid; ``(rows, cols)`` means
            ``(1, rows, cols)``. A 7x7 grid of regions on a 56x56 image is ``(1, 8, 8)``.
        topk: key regions routed per query region (by region affinity, shared by heads; clamped to the
            number of regions). BiFormer: ``topks=[1, 4, 16, -2]`` over its 4 stages of 7x7 regions (-2: dense).
        keep_own: also keep the query region itself when it is not among its ``topk`` (BiFormer's plain
            top-k usually contains it, as a region's queries match its own keys best; keeping it guarantees
            local attention). ``topk=0`` with ``keep_own`` is plain window attention.
        block_size: tile size of the inner mask (over the permuted order); blocks of a region's size avoid
            ragged tiles.
        layout: the image/video :class:`~sparse_attn.TokenLayout` (or pass ``layout=`` to ``build``).

    Example:
        >>> lay = TokenLayout.video(1, 16, 16)
        >>> q = k = torch.randn(1, 2, lay.seq_len, 32)
        >>> mask = RegionRouting(region_shape=(4, 4), topk=3, block_size=16).build(q, k, layout=lay)
        >>> mask.inner.batch_heads  # one row set per batch, shared by heads
        (1, 1)
    """

    mask_kind: ClassVar[str] = "permuted"

    region_shape: Tuple = (1, 8, 8)
    topk: int = 4
    keep_own: bool = True
    block_size: int = 64
    layout: Optional[object] = None

    def __post_init__(self):
        shape = as_tuple(self.region_shape)
        if isinstance(shape, tuple) and len(shape) == 2:
            shape = (1,) + shape
        if not (isinstance(shape, tuple) and len(shape) == 3):
            raise ValueError(f"region_shape must be (frames, rows, cols) or (rows, cols), got {self.region_shape!r}.")
        for i, n in enumerate(shape):
            check_positive_int(n, f"region_shape[{i}]")
        object.__setattr__(self, "region_shape", tuple(int(n) for n in shape))
        object.__setattr__(self, "layout", as_layout(self.layout))
        check_positive_int(self.topk, "topk", allow_zero=True)
        if not isinstance(self.keep_own, bool):
            raise TypeError(f"keep_own must be a bool, got {type(self.keep_own).__name__} ({self.keep_own!r}).")
        if self.topk == 0 and not self.keep_own:
            raise ValueError("topk must be >= 1 when keep_own=False (no region would be routed), got topk=0.")
        self.block_pair  # noqa: B018  (validates block_size)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        raise NotImplementedError("region_routing produces a PermutedMask; it has no block map of the original "
                                  "order and cannot be combined in Union/PerHead.")

    def _layout(self, layout, q, k):
        layout = resolve_layout(layout if layout is not None else self.layout, q.shape[2])
        if not layout.is_video:
            raise ValueError(f"layout must be an image/video TokenLayout (frames > 0), got {layout}; pass "
                             f"layout=TokenLayout.video(1, H, W) for an image.")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"q and k must have equal lengths for region_routing, got {q.shape[2]} and "
                             f"{k.shape[2]}.")
        return layout

    def region_map(self, q, k, *, layout=None):
        """The routing at region level.

        Args:
            q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]``; layout: as in :meth:`build`.

        Returns:
            ``(routed bool [B, C, C], ids int64 [L], perm int64 [L])``: ``routed[b, a, c]`` when query region
            ``a`` attends to key region ``c``; ``ids`` the region of every token in the ORIGINAL order
            (``0`` = text, empty without text; ``1 + box`` frame-major); ``perm`` the stable sort of ``ids``.
        """
        check_qk(q, k)
        layout = self._layout(layout, q, k)
        ids = box_chunk_ids(layout, self.region_shape, q.device)
        ft, rh, rw = self.region_shape
        n_c = 1 + -(-layout.frames // ft) * -(-layout.height // rh) * -(-layout.width // rw)  # no device sync
        aff = region_affinity(q, k, ids, n_c)  # [B, C, C]
        video = torch.arange(n_c, device=q.device) > 0  # every box holds tokens; region 0 is text (or empty)
        top = torch.topk(aff.masked_fill(~video, -torch.inf), min(self.topk, n_c - 1), dim=-1).indices  # [B, C, n]
        routed = torch.zeros(aff.shape, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        if self.keep_own:
            routed |= torch.eye(n_c, dtype=torch.bool, device=q.device)
        present = video | (layout.text_len > 0)
        routed[:, :, 0] = True  # text keys: kept by every region
        routed[:, 0] = True  # text queries: every key
        routed &= present[:, None] & present  # (no text: region 0 is empty)
        return routed, ids, torch.sort(ids, stable=True).indices

    def build(self, q, k, *, causal=False, layout=None) -> PermutedMask:
        """The routing mask for ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]`` on ``layout`` (or ``self.layout``).

        Returns:
            :class:`~sparse_attn.PermutedMask` with ``perm_q = perm_k`` of shape ``[1, 1, L]`` and an inner
            mask of batch ``B``, heads 1.
        """
        check_qk(q, k)
        if causal:
            raise ValueError("region_routing does not support causal=True (regions of an image/video grid are "
                             "routed bidirectionally, and a permuted order has no causal predicate).")
        routed, ids, perm = self.region_map(q, k, layout=layout)
        bm, bn = self.block_pair
        ids_p = ids[perm]
        inc_q = _incidence(ids_p, bm, routed.shape[-1])  # [NQB, C]
        inc_k = _incidence(ids_p, bn, routed.shape[-1])  # [NKB, C]
        tiles = (inc_q @ routed.float() @ inc_k.t()) > 0  # [B, NQB, NKB]: any kept (region, region) pair
        length = q.shape[2]
        inner = BlockSparseMask.from_dense(tiles[:, None], (bm, bn), (length, length))
        return PermutedMask(inner, perm, perm)
