"""Structural 1-D patterns: sliding window / band, sink + local (A-shape), vertical stripes, dense, skip.

Diagonals are bottom-right aligned like ``causal``: query ``i`` sits at key position
``i + (Lk - Lq)``; the offset of key ``j`` is ``d = j - (i + Lk - Lq)``.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from .._checks import check_positive_int
from ..mask import BlockSparseMask
from .base import StructuralPattern, as_layout, as_tuple, check_qk, register, tile_bounds


def _shift(q_len, kv_len):
    return 0 if q_len is None or kv_len is None else kv_len - q_len


def _band_tiles(q_len, kv_len, block_size, left, right, causal, device):
    """bool ``[NQB, NKB]``: tiles containing an offset ``d`` in ``[-left, right]`` (right <= 0 if causal)."""
    q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, block_size, device)
    shift = kv_len - q_len
    if causal:
        right = min(right, 0)
    d_min = k_first - q_last - shift
    d_max = k_last - q_first - shift
    return (d_max >= -left) & (d_min <= right)


@register("sliding_window")
@dataclass(frozen=True)
class SlidingWindow(StructuralPattern):
    """Diagonal band: key ``j`` is kept for query ``i`` iff ``-left <= j - (i + Lk - Lq) <= right``.

    Args:
        left, right: band half-widths in tokens (``causal`` cuts the right side).
        block_size: tile size of the produced mask.
        exact: token-exact band (default); False keeps every tile the band touches, whole.

    Example:
        >>> mask = SlidingWindow(left=128, right=128).build_for(1024, 1024)
    """

    left: int = 256
    right: int = 256
    block_size: int = 64
    exact: bool = True

    @property
    def token_exact(self) -> bool:
        return self.exact

    def __post_init__(self):
        check_positive_int(self.left, "left", allow_zero=True)
        check_positive_int(self.right, "right", allow_zero=True)
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018  (validates block_size)

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        shift, left, right = _shift(q_len, kv_len), self.left, self.right

        def mask_mod(b, h, q_idx, kv_idx):
            d = kv_idx - (q_idx + shift)
            return (d >= -left) & (d <= right)
        return mask_mod

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        return _band_tiles(q_len, kv_len, self.block_pair, self.left, self.right, causal, device)

    def build_for(self, q_len, kv_len, *, causal=False, layout=None, device=None) -> BlockSparseMask:
        """Token-exact: the band's tiles plus the window predicate (no over-attending at tile edges);
        ``exact=False`` keeps whole tiles."""
        mask = super().build_for(q_len, kv_len, causal=causal, layout=layout, device=device)
        return mask.with_predicates(window=(self.left, self.right)) if self.exact else mask

    def build(self, q, k, *, causal=False, layout=None):
        mask = super().build(q, k, causal=causal, layout=layout)
        return mask.with_predicates(window=(self.left, self.right)) if self.exact else mask


@register("sink_local")
@dataclass(frozen=True)
class SinkLocal(StructuralPattern):
    """A-shape (StreamingLLM): the first ``sink`` keys plus a band ``|d| <= window`` around the diagonal.

    With ``causal=True`` the band keeps only its left half, which is the StreamingLLM mask. Token-exact by
    default; ``exact=False`` keeps every tile the sinks and the band touch, whole.

    Example:
        >>> mask = SinkLocal(sink=64, window=256).build_for(2048, 2048, causal=True)
    """

    sink: int = 64
    window: int = 256
    block_size: int = 64
    exact: bool = True

    @property
    def token_exact(self) -> bool:
        return self.exact

    def __post_init__(self):
        check_positive_int(self.sink, "sink", allow_zero=True)
        check_positive_int(self.window, "window", allow_zero=True)
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        shift, sink, window = _shift(q_len, kv_len), self.sink, self.window

        def mask_mod(b, h, q_idx, kv_idx):
            d = kv_idx - (q_idx + shift)
            return (kv_idx < sink) | ((d >= -window) & (d <= window))
        return mask_mod

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        band = _band_tiles(q_len, kv_len, self.block_pair, self.window, self.window, causal, device)
        q_first, q_last, k_first, _ = tile_bounds(q_len, kv_len, self.block_pair, device)
        sink = k_first < self.sink
        if causal:
            sink = sink & (k_first <= q_last + (kv_len - q_len))
        return band | sink

    def full_map(self, q_len, kv_len, device=None):
        """bool ``[NQB, NKB]``: tiles every valid pair of which is kept (all sink keys, or inside the band)."""
        q_first, q_last, k_first, k_last = tile_bounds(q_len, kv_len, self.block_pair, device)
        shift = kv_len - q_len
        inside = (k_first - (q_last + shift) >= -self.window) & (k_last - (q_first + shift) <= self.window)
        return (k_last < self.sink) | inside

    def build_for(self, q_len, kv_len, *, causal=False, layout=None, device=None) -> BlockSparseMask:
        """Token-exact: sink and band edge tiles carry bit masks (no over-attending at tile edges);
        ``exact=False`` keeps the whole tiles the sink and the band touch (e.g. MoBA's own block)."""
        keep = self.block_map_for(q_len, kv_len, causal=causal, layout=layout, device=device)
        if not self.exact:
            return BlockSparseMask.from_dense(keep, self.block_pair, (q_len, kv_len))
        mod = self.mask_mod_for(q_len, kv_len)
        return BlockSparseMask.from_tile_predicate(lambda i, j: mod(0, 0, i, j), keep, self.block_pair,
                                                   (q_len, kv_len), full=self.full_map(q_len, kv_len, device))

    def build(self, q, k, *, causal=False, layout=None):
        check_qk(q, k)
        return self.build_for(q.shape[2], k.shape[2], causal=causal, layout=layout, device=q.device)


@register("vertical_stripes")
@dataclass(frozen=True)
class VerticalStripes(StructuralPattern):
    """Fixed global key columns (Sparse-vDiT M4): listed ``columns`` plus, with ``text``, every text token
    of a video layout (text tokens are global keys in video DiTs).

    Args:
        columns: key token indices kept for every query.
        text: also keep the text tokens of the layout (ignored for 1-D sequences).
        layout: default :class:`~sparse_attn.TokenLayout` when ``build`` gets none.

    Example:
        >>> mask = VerticalStripes(columns=(0, 1, 2, 3)).build_for(512, 512)
    """

    columns: Tuple[int, ...] = ()
    text: bool = True
    layout: Optional[object] = None
    block_size: int = 64

    def __post_init__(self):
        cols = as_tuple(list(self.columns)) if isinstance(self.columns, (list, tuple)) else self.columns
        if not isinstance(cols, tuple):
            raise TypeError(f"columns must be a sequence of ints, got {type(self.columns).__name__}.")
        for c in cols:
            check_positive_int(c, "columns[i]", allow_zero=True)
        object.__setattr__(self, "columns", tuple(sorted(set(cols))))
        object.__setattr__(self, "layout", as_layout(self.layout))
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def _layout(self, layout, q_len, kv_len):
        layout = as_layout(layout) or self.layout
        if layout is not None:
            layout.check_len(kv_len, "kv length")
        return layout

    def _column_table(self, kv_len, layout, device=None):
        n = kv_len if kv_len is not None else (max(self.columns) + 1 if self.columns else 1)
        if layout is not None:
            n = max(n, layout.seq_len)
        table = torch.zeros(n, dtype=torch.bool, device=device)
        cols = [c for c in self.columns if c < n]
        if cols:
            table[torch.tensor(cols, device=device)] = True
        if self.text and layout is not None and layout.is_video:
            table |= layout.is_text(torch.arange(n, device=device))
        return table

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        table = self._column_table(kv_len, layout if layout is not None else self.layout)
        n = table.shape[0]

        def mask_mod(b, h, q_idx, kv_idx):
            ok = kv_idx < n
            return ok & table.to(kv_idx.device)[torch.clamp(kv_idx, 0, n - 1)]
        return mask_mod

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        bm, bn = self.block_pair
        q_first, q_last, k_first, _ = tile_bounds(q_len, kv_len, self.block_pair, device)
        table = self._column_table(kv_len, layout, device)[:kv_len]
        n_kb = k_first.shape[1]
        pos = torch.where(table, torch.arange(kv_len, device=device), kv_len + q_len + 1)
        pos = torch.nn.functional.pad(pos, (0, n_kb * bn - kv_len), value=kv_len + q_len + 1)
        first_col = pos.reshape(n_kb, bn).amin(1)[None, :]  # [1, NKB]
        keep = (first_col < kv_len).expand(q_first.shape[0], n_kb)
        if causal:
            keep = keep & (first_col <= q_last + (kv_len - q_len))
        return keep


@register("dense")
@dataclass(frozen=True)
class Dense(StructuralPattern):
    """Every tile (Sparse-vDiT M0, or a per-head "dense" choice)."""

    block_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= 0) & (kv_idx >= 0)
        return mask_mod

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        return _band_tiles(q_len, kv_len, self.block_pair, kv_len + q_len, kv_len + q_len, causal, device)


@register("skip")
@dataclass(frozen=True)
class Skip(StructuralPattern):
    """No tile: the head's output is 0 (Sparse-vDiT M1 "skip head")."""

    block_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018

    def mask_mod_for(self, q_len=None, kv_len=None, layout=None):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx < 0) & (kv_idx < 0)
        return mask_mod

    def structure_map(self, q_len, kv_len, *, causal=False, layout=None, device=None):
        q_first, _, k_first, _ = tile_bounds(q_len, kv_len, self.block_pair, device)
        return torch.zeros((q_first.shape[0], k_first.shape[1]), dtype=torch.bool, device=device)
