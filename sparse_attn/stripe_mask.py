"""Stripe-sparse mask: vertical key columns plus diagonal slashes, at token granularity.

Semantics (normative description: docs/masks.md, StripeSparseMask): query ``i`` sees key ``j`` iff ``j`` is one
of the vertical columns, or ``i - j`` is one of the slash offsets; ANDed with the bottom-right
causal predicate ``j <= i + (Lk - Lq)`` when attention runs with ``causal=True``.

The mask holds the semantic lists and their lowered form, which the kernels consume:

* the *block part*: per query block, the sorted key blocks that at least one slash crosses
  (``block_counts``/``block_indices``), with a flag ``block_full`` for tiles in which every
  (query, key) pair lies on a slash (no in-tile masking needed). In the other tiles a pair is
  kept iff its diagonal is a slash (``diag_keep``) or its key is a vertical column (``col_keep``);
* the *column part*: per query block, the sorted vertical columns whose key block is not in the
  block part (``col_counts``/``col_indices``), gathered by the kernel token by token.

Every pair is computed by exactly one of the two parts. Lowering is vectorized on the
tensors' device (prefix sums over the diagonal indicator, cumsum compaction).
"""

import math
from typing import Optional, Tuple

import torch

from ._checks import check_int_tensor, check_positive_int
from .mask import BlockSparseMask, TiledMask, _as_pair, _slice_span, transpose_lists

_ASCII_LIMIT = 64
# Bound, in elements, of the [rows, NQB, NKB] temporaries of the lowering (processed in chunks of rows).
LOWER_CHUNK_ELEMS = 1 << 26


def _broadcast_bh(vertical, slash):
    """Common (Bm, Hm) of the two lists, each dim 1 or equal."""
    dims = []
    for axis, name in ((0, "batch"), (1, "heads")):
        a, b = vertical.shape[axis], slash.shape[axis]
        if a != b and 1 not in (a, b):
            raise ValueError(f"vertical and slash must have matching or broadcastable {name} (1 or equal), "
                             f"got shapes {list(vertical.shape)} and {list(slash.shape)}.")
        dims.append(max(a, b))
    return tuple(dims)


def _sorted_unique(x):
    """Row-wise sorted unique values of int64 ``[R, N]``: (values ``[R, W]`` padded with 0, counts ``[R]``)."""
    n_rows, n = x.shape
    if n == 0:
        return x.new_zeros((n_rows, 0)), torch.zeros(n_rows, dtype=torch.int64, device=x.device)
    xs = torch.sort(x, dim=-1).values
    dup = torch.zeros_like(xs, dtype=torch.bool)
    dup[:, 1:] = xs[:, 1:] == xs[:, :-1]
    counts = (~dup).sum(-1)
    big = torch.iinfo(torch.int64).max
    xs = torch.sort(torch.where(dup, big, xs), dim=-1).values
    width = int(counts.max().item())
    xs = xs[:, :width]
    slot = torch.arange(width, device=x.device)
    return torch.where(slot < counts[:, None], xs, 0), counts


def _compact(keep, *values):
    """Row-wise compaction of each of ``values`` where ``keep`` (all ``[..., N]``), order preserved.

    Returns (counts int64 ``[...]``, then one packed ``[..., W]`` tensor per value, padded with 0),
    ``W = max(1, max count)``.
    """
    counts = keep.sum(-1)
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    target = torch.where(keep, torch.cumsum(keep, dim=-1) - 1, width)
    packed = []
    for val in values:
        out = torch.zeros((*keep.shape[:-1], width + 1), dtype=val.dtype, device=keep.device)
        packed.append(out.scatter_(-1, target, val.expand_as(keep))[..., :width])
    return (counts, *packed)


def _indicator(lists, counts, size):
    """int8 ``[R, size]``: 1 at the first ``counts`` entries of each row of ``lists`` ``[R, W]``."""
    n_rows = lists.shape[0]
    out = torch.zeros((n_rows, size + 1), dtype=torch.int8, device=lists.device)
    slot = torch.arange(lists.shape[1], device=lists.device)
    target = torch.where(slot < counts[:, None], lists, size)
    out.scatter_(-1, target, torch.ones_like(target, dtype=torch.int8))
    return out[:, :size].contiguous()


def lower_vertical_slash(vertical, vertical_count, slash, slash_count, block_size, seq_lens):
    """Lower normalized vertical/slash lists to the kernel layout (vectorized, on their device).

    Args:
        vertical: int64 ``[R, NVw]`` sorted unique key columns (first ``vertical_count`` entries valid).
        vertical_count: int64 ``[R]``.
        slash: int64 ``[R, NSw]`` sorted unique offsets ``s`` (key ``j = i - s``).
        slash_count: int64 ``[R]``.
        block_size: ``(BLOCK_M, BLOCK_N)``; seq_lens: ``(Lq, Lk)``, both > 0.

    Returns:
        dict of int32 ``block_counts [R, NQB]``, ``block_indices [R, NQB, W]``, int8 ``block_full
        [R, NQB, W]``, int32 ``col_counts [R, NQB]``, ``col_indices [R, NQB, CW]``, int8 ``diag_keep
        [R, Lq + Lk - 1]`` (index ``s + Lk - 1``) and int8 ``col_keep [R, Lk]``.
    """
    bm, bn = block_size
    q_len, kv_len = seq_lens
    device = vertical.device
    n_rows = vertical.shape[0]
    n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)
    n_diag = q_len + kv_len - 1
    diag_keep = _indicator(slash + (kv_len - 1), slash_count, n_diag)  # [R, ND]
    col_keep = _indicator(vertical, vertical_count, kv_len)  # [R, Lk]

    # Tile (m, kb) holds the diagonals d = i - j in [r0 - c1, r1 - c0] (valid rows/keys only): it is
    # in the block part iff one of them is a slash, and full iff all of them are.
    r0 = torch.arange(n_qb, device=device) * bm
    r1 = torch.clamp(r0 + bm, max=q_len) - 1
    c0 = torch.arange(n_kb, device=device) * bn
    c1 = torch.clamp(c0 + bn, max=kv_len) - 1
    d_lo = (r0[:, None] - c1[None, :] + (kv_len - 1)).reshape(-1)  # [NQB*NKB], index into diag_keep
    d_hi = (r1[:, None] - c0[None, :] + (kv_len - 1)).reshape(-1)
    span = (d_hi - d_lo + 1).reshape(n_qb, n_kb)
    d_hi1 = d_hi + 1

    vslot = torch.arange(vertical.shape[1], device=device)
    kb_all = torch.arange(n_kb, device=device, dtype=torch.int32)
    step = max(1, LOWER_CHUNK_ELEMS // max(1, n_qb * max(n_kb, vertical.shape[1])))
    parts = []
    for a in range(0, n_rows, step):  # chunks of (batch, head) rows bound the temporaries
        b = min(n_rows, a + step)
        prefix = torch.zeros((b - a, n_diag + 1), dtype=torch.int32, device=device)
        prefix[:, 1:] = torch.cumsum(diag_keep[a:b], dim=-1, dtype=torch.int32)
        hits = (prefix[:, d_hi1] - prefix[:, d_lo]).reshape(b - a, n_qb, n_kb)  # [C, NQB, NKB]
        keep = hits > 0
        full = (hits == span).to(torch.int8)
        cnt, idx, fl = _compact(keep, kb_all, full)
        # vertical columns whose key block the block part already computes are dropped
        v = vertical[a:b]
        covered = torch.gather(keep, 2, (v // bn)[:, None, :].expand(-1, n_qb, -1))  # [C, NQB, NVw]
        vkeep = (vslot < vertical_count[a:b, None])[:, None, :] & ~covered
        ccnt, cidx = _compact(vkeep, v[:, None, :].to(torch.int32))
        parts.append((cnt, idx, fl, ccnt, cidx))

    def cat(k):
        width = max(p[k].shape[-1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[-1])) for p in parts])

    return dict(
        block_counts=torch.cat([p[0] for p in parts]).to(torch.int32), block_indices=cat(1), block_full=cat(2),
        col_counts=torch.cat([p[3] for p in parts]).to(torch.int32), col_indices=cat(4),
        diag_keep=diag_keep, col_keep=col_keep)


class StripeSparseMask(TiledMask):
    """Vertical columns + diagonal slashes at token granularity, with their lowered kernel layout.

    Build it with :meth:`from_vertical_slash`. All tensors are on one device; ``Bm`` is 1 or the
    batch, ``Hm`` is 1, the key/value heads or the query heads.

    Attributes:
        vertical: int32 ``[Bm, Hm, NVw]`` sorted unique key columns; ``vertical_count`` int32 ``[Bm, Hm]``.
        slash: int32 ``[Bm, Hm, NSw]`` sorted unique offsets (key ``j = i - s``); ``slash_count`` ``[Bm, Hm]``.
        block_counts: int32 ``[Bm, Hm, NQB]``; block_indices: int32 ``[Bm, Hm, NQB, W]`` sorted key
            blocks crossed by a slash; block_full: int8 ``[Bm, Hm, NQB, W]``, 1 where every pair of the
            tile lies on a slash.
        col_counts: int32 ``[Bm, Hm, NQB]``; col_indices: int32 ``[Bm, Hm, NQB, CW]`` sorted vertical
            columns outside the block part of that query block.
        diag_keep: int8 ``[Bm, Hm, Lq + Lk - 1]``, 1 at index ``s + Lk - 1`` for each slash ``s``.
        col_keep: int8 ``[Bm, Hm, Lk]``, 1 at each vertical column.
        block_size: ``(BLOCK_M, BLOCK_N)``; seq_lens: ``(Lq, Lk)``.

    Example:
        >>> vertical = torch.tensor([[[0, 5, 5]]])  # sink token 0 and column 5
        >>> slash = torch.tensor([[[0, 1]]])  # main diagonal and its neighbour
        >>> mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(100, 100), block_size=32)
        >>> mask.vertical.tolist(), mask.block_counts.tolist()
        ([[[0, 5]]], [[[1, 2, 2, 2]]])
    """

    _FIELDS = ("vertical", "vertical_count", "slash", "slash_count", "block_counts", "block_indices", "block_full",
               "col_counts", "col_indices", "diag_keep", "col_keep")

    def __init__(self, *, vertical, vertical_count, slash, slash_count, block_counts, block_indices, block_full,
                 col_counts, col_indices, diag_keep, col_keep, block_size, seq_lens, validate: bool = True):
        self.block_size = _as_pair(block_size)
        if not (isinstance(seq_lens, (tuple, list)) and len(seq_lens) == 2):
            raise TypeError(f"seq_lens must be a pair (q_len, kv_len), got {seq_lens!r}.")
        self.seq_lens = (check_positive_int(seq_lens[0], "seq_lens[0]", allow_zero=True),
                         check_positive_int(seq_lens[1], "seq_lens[1]", allow_zero=True))
        self.vertical, self.vertical_count = vertical, vertical_count
        self.slash, self.slash_count = slash, slash_count
        self.block_counts, self.block_indices, self.block_full = block_counts, block_indices, block_full
        self.col_counts, self.col_indices = col_counts, col_indices
        self.diag_keep, self.col_keep = diag_keep, col_keep
        self._kv_major = None
        if validate:
            self.validate()

    # ---- constructor ------------------------------------------------------------------
    @classmethod
    def from_vertical_slash(cls, vertical, slash, seq_lens, block_size=64):
        """Build and lower a vertical+slash mask.

        Args:
            vertical: int32/int64 ``[B|1, H|1, NV]`` key indices in ``[0, Lk)``, any order, duplicates allowed.
            slash: int32/int64 ``[B|1, H|1, NS]`` diagonal offsets ``s`` in ``[-(Lk - 1), Lq - 1]``: query
                ``i`` sees key ``i - s`` (``s = 0`` is the main diagonal ``j = i``; negative offsets reach
                keys after the query). Duplicates allowed.
            seq_lens: ``(Lq, Lk)``.
            block_size: int or ``(BLOCK_M, BLOCK_N)`` tile of the block part.

        Returns:
            StripeSparseMask with ``Bm``/``Hm`` the broadcast of the two lists' leading dims.

        Example:
            >>> v = torch.tensor([[[3, 0]]]); s = torch.tensor([[[0]]])
            >>> StripeSparseMask.from_vertical_slash(v, s, seq_lens=(8, 8), block_size=16).density()
            0.34375
        """
        check_int_tensor(vertical, "vertical", ndim=3)
        check_int_tensor(slash, "slash", ndim=3)
        if vertical.device != slash.device:
            raise ValueError(f"vertical and slash must be on one device, got {vertical.device} and {slash.device}.")
        bm, bn = _as_pair(block_size)
        if not (isinstance(seq_lens, (tuple, list)) and len(seq_lens) == 2):
            raise TypeError(f"seq_lens must be a pair (q_len, kv_len), got {seq_lens!r}.")
        q_len = check_positive_int(seq_lens[0], "seq_lens[0]", allow_zero=True)
        kv_len = check_positive_int(seq_lens[1], "seq_lens[1]", allow_zero=True)
        n_b, n_h = _broadcast_bh(vertical, slash)
        v = vertical.long().expand(n_b, n_h, vertical.shape[2]).reshape(n_b * n_h, -1)
        s = slash.long().expand(n_b, n_h, slash.shape[2]).reshape(n_b * n_h, -1)
        if v.numel():
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= kv_len:
                raise ValueError(f"vertical must hold key indices in [0, Lk={kv_len}), got values in [{lo}, {hi}].")
        if s.numel():
            lo, hi = int(s.min()), int(s.max())
            if q_len == 0 or kv_len == 0 or lo < 1 - kv_len or hi > q_len - 1:
                raise ValueError(f"slash must hold offsets in [-(Lk - 1), Lq - 1] = [{1 - kv_len}, {q_len - 1}] "
                                 f"for seq_lens={(q_len, kv_len)}, got values in [{lo}, {hi}].")
        v, v_count = _sorted_unique(v)
        s, s_count = _sorted_unique(s)
        n_qb = math.ceil(q_len / bm)
        if q_len and kv_len:
            low = lower_vertical_slash(v, v_count, s, s_count, (bm, bn), (q_len, kv_len))
        else:
            rows, dev = n_b * n_h, v.device
            z = lambda *shape, dt=torch.int32: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
            low = dict(block_counts=z(rows, n_qb), block_indices=z(rows, n_qb, 1), block_full=z(rows, n_qb, 1,
                       dt=torch.int8), col_counts=z(rows, n_qb), col_indices=z(rows, n_qb, 1),
                       diag_keep=z(rows, max(0, q_len + kv_len - 1), dt=torch.int8), col_keep=z(rows, kv_len,
                       dt=torch.int8))
        fields = dict(vertical=v.to(torch.int32), vertical_count=v_count.to(torch.int32), slash=s.to(torch.int32),
                      slash_count=s_count.to(torch.int32), **low)
        fields = {k: x.reshape(n_b, n_h, *x.shape[1:]).contiguous() for k, x in fields.items()}
        return cls(**fields, block_size=(bm, bn), seq_lens=(q_len, kv_len), validate=False)

    # ---- views --------------------------------------------------------------------------
    def _lead(self) -> torch.Tensor:
        return self.block_counts

    def to(self, device) -> "StripeSparseMask":
        """A copy on ``device`` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return StripeSparseMask(**{k: getattr(self, k).to(device) for k in self._FIELDS},
                                block_size=self.block_size, seq_lens=self.seq_lens, validate=False)

    def block_part(self) -> BlockSparseMask:
        """The block part as a :class:`BlockSparseMask` (tiles crossed by a slash, without in-tile masking)."""
        return BlockSparseMask(self.block_counts, self.block_indices, self.block_size, self.seq_lens, validate=False)

    def covering_block_mask(self) -> BlockSparseMask:
        """Every tile holding at least one kept pair (block part plus the blocks of the columns).

        Running :func:`sparse_attention` with it computes whole tiles: a superset of this mask, for
        comparison with a block-granular kernel.
        """
        keep = self.block_part().to_block_dense()  # [Bm, Hm, NQB, NKB]
        n_kb = self.num_blocks[1]
        col_blocks = self.col_keep.reshape(*self.col_keep.shape[:2], -1)
        pad = n_kb * self.block_size[1] - self.kv_len
        col_blocks = torch.nn.functional.pad(col_blocks, (0, pad)).reshape(*col_blocks.shape[:2], n_kb, -1)
        keep = keep | (col_blocks.amax(-1) > 0)[:, :, None, :]
        return BlockSparseMask.from_dense(keep, self.block_size, self.seq_lens)

    def slice(self, q_start: int, q_end: int, k_start: int, k_end: int, *, causal: bool = False):
        """This mask restricted to queries ``q_start:q_end`` x keys ``k_start:k_end``, exactly.

        ``result.to_dense() == self.to_dense(causal)[..., q_start:q_end, k_start:k_end]``. Columns and slashes
        are shifted into the slice's coordinates (slash ``s`` becomes ``s - (q_start - k_start)``), so the
        result is a :class:`StripeSparseMask` unless ``causal`` cuts through the slice: the stripe format has
        no shifted causal edge, so such a slice is returned as an exact :class:`BlockSparseMask` (covering
        tiles with bit masks). A slice whose bottom-right corner lies on the global diagonal
        (``k_end - q_end == kv_len - q_len``) can instead be taken with ``causal=False`` and run with
        ``causal=True``, keeping the stripe form.

        Args:
            q_start, q_end: query span; both multiples of ``BLOCK_M``, or ``q_end == q_len``.
            k_start, k_end: key span; both multiples of ``BLOCK_N``, or ``k_end == kv_len``.
            causal: fold the global bottom-right causal predicate in.
        """
        bm, bn = self.block_size
        q0, q1 = _slice_span(q_start, q_end, bm, self.q_len, "q")
        k0, k1 = _slice_span(k_start, k_end, bn, self.kv_len, "k")
        shift = self.kv_len - self.q_len
        if causal and k1 - 1 > q0 + shift and q1 > q0 and k1 > k0:  # the causal edge cuts the slice
            return self._slice_as_blocks(q0, q1, k0, k1)
        n_b, n_h = self.batch_heads
        lq, lk = q1 - q0, k1 - k0
        v, s = self.vertical.long().reshape(n_b * n_h, -1), self.slash.long().reshape(n_b * n_h, -1)
        v_ok = (torch.arange(v.shape[1], device=self.device) < self.vertical_count.reshape(-1, 1)) & (v >= k0) \
            & (v < k1)
        s = s - (q0 - k0)
        s_ok = (torch.arange(s.shape[1], device=self.device) < self.slash_count.reshape(-1, 1)) & (s > -lk) & (s < lq)
        v_cnt, v = _compact(v_ok, v - k0)
        s_cnt, s = _compact(s_ok, s)
        if lq == 0 or lk == 0:
            return StripeSparseMask.from_vertical_slash(v[:, :0].view(n_b, n_h, 0), s[:, :0].view(n_b, n_h, 0),
                                                        (lq, lk), (bm, bn))
        low = lower_vertical_slash(v, v_cnt, s, s_cnt, (bm, bn), (lq, lk))
        fields = dict(vertical=v.to(torch.int32), vertical_count=v_cnt.to(torch.int32), slash=s.to(torch.int32),
                      slash_count=s_cnt.to(torch.int32), **low)
        fields = {k: x.reshape(n_b, n_h, *x.shape[1:]).contiguous() for k, x in fields.items()}
        return StripeSparseMask(**fields, block_size=(bm, bn), seq_lens=(lq, lk), validate=False)

    def _slice_as_blocks(self, q0, q1, k0, k1) -> BlockSparseMask:
        """The causal slice as an exact block mask: covering tiles, evaluated token by token in global coordinates."""
        bm, bn = self.block_size
        rows, cols = slice(q0 // bm, -(-q1 // bm)), slice(k0 // bn, -(-k1 // bn))
        tiles = self.covering_block_mask().visible_tiles(causal=True)[:, :, rows, cols]
        diag, col = self.diag_keep.bool(), self.col_keep.bool()
        shift = self.kv_len - self.q_len

        def evaluate(b, h, qb, kb):
            i = ((qb + rows.start) * bm)[:, None] + torch.arange(bm, device=qb.device)  # [P, BM]
            j = ((kb + cols.start) * bn)[:, None] + torch.arange(bn, device=qb.device)  # [P, BN]
            d = (i[:, :, None] - j[:, None, :] + self.kv_len - 1).clamp(0, diag.shape[-1] - 1)
            keep = col[b[:, None], h[:, None], j.clamp(max=self.kv_len - 1)][:, None, :] \
                | diag[b[:, None, None], h[:, None, None], d]
            return keep & (j[:, None, :] <= i[:, :, None] + shift)
        return BlockSparseMask.from_tile_evaluator(evaluate, tiles, (bm, bn), (q1 - q0, k1 - k0))

    def kv_major(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block part transposed (key-major), for the backward pass; derived once and cached.

        Returns:
            counts int32 ``[Bm, Hm, NKB]`` and sorted query-block indices int32 ``[Bm, Hm, NKB, Wt]``.
        """
        if self._kv_major is None:
            self._kv_major = transpose_lists(self.block_counts, self.block_indices, self.num_blocks[1])
        return self._kv_major

    def flex_mask_mod(self, causal: bool = False, num_heads: Optional[int] = None):
        """A token-exact FlexAttention ``mask_mod`` for this mask (for comparisons and benchmarks).

        Args:
            causal: also AND ``kv_idx <= q_idx + (Lk - Lq)``.
            num_heads: query heads of the attention call (default ``Hm``); a mask given per key/value
                head or broadcast from 1 is mapped onto them.

        Example:
            >>> from torch.nn.attention.flex_attention import create_block_mask  # doctest: +SKIP
            >>> bm = create_block_mask(mask.flex_mask_mod(causal=True), B, Hq, Lq, Lk)  # doctest: +SKIP
        """
        q_len, kv_len = self.seq_lens
        n_b, n_h = self.batch_heads
        num_heads = n_h if num_heads is None else num_heads
        if num_heads % n_h:
            raise ValueError(f"num_heads must be a multiple of the mask heads ({n_h}), got {num_heads}.")
        div = num_heads // n_h
        diag, col = self.diag_keep.bool(), self.col_keep.bool()
        n_diag, shift = max(1, q_len + kv_len - 1), kv_len - q_len

        def mask_mod(b, h, q_idx, kv_idx):
            bb, hh = b % n_b, h // div
            on_col = col[bb, hh, torch.clamp(kv_idx, 0, kv_len - 1)]
            on_slash = diag[bb, hh, torch.clamp(q_idx - kv_idx + kv_len - 1, 0, n_diag - 1)]
            keep = (on_col | on_slash) & (q_idx < q_len) & (kv_idx < kv_len)
            return keep & (kv_idx <= q_idx + shift) if causal else keep

        return mask_mod

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Bm, Hm, Lq, Lk]`` (for tests and small inputs).

        With ``causal`` the bottom-right causal predicate ``j <= i + (Lk - Lq)`` is ANDed in.
        """
        i = torch.arange(self.q_len, device=self.device)[:, None]
        j = torch.arange(self.kv_len, device=self.device)[None, :]
        keep = self.col_keep.bool()[:, :, None, :].expand(-1, -1, self.q_len, -1)
        if self.q_len and self.kv_len:
            keep = keep | self.diag_keep.bool()[:, :, (i - j + self.kv_len - 1)]
        if causal:
            keep = keep & (j <= i + (self.kv_len - self.q_len))
        return keep

    def density(self, causal: bool = False) -> float:
        """Share of the visible (query, key) token pairs that attention computes (kept / ``Lq * Lk``, or /
        the causally visible pairs with ``causal``, as :meth:`BlockSparseMask.density`), averaged over
        ``(Bm, Hm)``.

        Exact and computed from the lists (no dense map): ``|V| * rows + sum of slash lengths``
        minus the pairs that lie on both a column and a slash.
        """
        q_len, kv_len = self.seq_lens
        if q_len == 0 or kv_len == 0:
            return 0.0
        shift = kv_len - q_len
        v, s = self.vertical.long(), self.slash.long()
        v_ok = torch.arange(v.shape[-1], device=self.device) < self.vertical_count[..., None]
        s_ok = torch.arange(s.shape[-1], device=self.device) < self.slash_count[..., None]
        if causal:  # column v is seen by rows i >= v - shift; slash s is kept whole iff s >= -shift
            v_rows = q_len - torch.clamp(v - shift, min=0)
            s_ok = s_ok & (s >= -shift)
        else:
            v_rows = torch.full_like(v, q_len)
        s_len = torch.clamp(torch.clamp(kv_len + s, max=q_len) - torch.clamp(s, min=0), min=0)
        row = v[..., :, None] + s[..., None, :]  # the pair (v + s, v) lies on column v and slash s
        both = (row >= 0) & (row < q_len) & v_ok[..., :, None] & s_ok[..., None, :]
        pairs = (v_rows * v_ok).sum() + (s_len * s_ok).sum() - both.sum()
        visible = q_len * kv_len
        if causal:
            visible = int(torch.clamp(torch.arange(q_len) + shift + 1, 0, kv_len).sum())
        return pairs.item() / (self.block_counts.shape[0] * self.block_counts.shape[1] * max(1, visible))

    # ---- checks and printing -----------------------------------------------------------
    def validate(self) -> "StripeSparseMask":
        """Check shapes, dtypes and index values of the lowered layout; raise ``ValueError``/``TypeError``."""
        q_len, kv_len = self.seq_lens
        n_qb, n_kb = self.num_blocks
        expect = {"vertical_count": 2, "slash_count": 2, "vertical": 3, "slash": 3, "block_counts": 3,
                  "col_counts": 3, "block_indices": 4, "block_full": 4, "col_indices": 4, "diag_keep": 3,
                  "col_keep": 3}
        for name, ndim in expect.items():
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
            want = torch.int8 if name in ("block_full", "diag_keep", "col_keep") else torch.int32
            if x.dtype != want:
                raise TypeError(f"{name} must have dtype {want}, got {x.dtype}.")
            if x.dim() != ndim:
                raise ValueError(f"{name} must have rank {ndim}, got shape {list(x.shape)}.")
            if x.device != self.device:
                raise ValueError(f"{name} must be on {self.device} like block_counts, got {x.device}.")
            if tuple(x.shape[:2]) != self.batch_heads:
                raise ValueError(f"{name} must have leading dims {self.batch_heads}, got {list(x.shape)}.")
        lead = list(self.batch_heads)
        for name, shape in (("block_counts", lead + [n_qb]), ("col_counts", lead + [n_qb]),
                            ("diag_keep", lead + [max(0, q_len + kv_len - 1)]), ("col_keep", lead + [kv_len])):
            if list(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {list(getattr(self, name).shape)}.")
        for cnt, idx, hi, name in ((self.block_counts, self.block_indices, n_kb, "block_indices"),
                                   (self.col_counts, self.col_indices, kv_len, "col_indices")):
            if tuple(idx.shape[:3]) != tuple(cnt.shape):
                raise ValueError(f"{name} must have shape {list(cnt.shape)} + [W], got {list(idx.shape)}.")
            if cnt.numel() == 0:
                continue
            width = idx.shape[-1]
            lo_c, hi_c = int(cnt.min()), int(cnt.max())
            if lo_c < 0 or hi_c > min(width, hi):
                raise ValueError(f"counts of {name} must lie in [0, {min(width, hi)}], got [{lo_c}, {hi_c}].")
            ok = torch.arange(width, device=self.device) < cnt[..., None]
            bad = ok & ((idx < 0) | (idx >= hi))
            if bool(bad.any()):
                raise ValueError(f"{name} must lie in [0, {hi}), got {int(idx[bad][0])}.")
            if bool((ok[..., 1:] & ~(idx[..., 1:] > idx[..., :-1])).any()):
                raise ValueError(f"{name} must be strictly increasing within each row's first counts entries.")
        if tuple(self.block_full.shape) != tuple(self.block_indices.shape):
            raise ValueError(f"block_full must have shape {list(self.block_indices.shape)}, "
                             f"got {list(self.block_full.shape)}.")
        return self

    def __repr__(self) -> str:
        n_qb, n_kb = self.num_blocks
        head = (f"StripeSparseMask(batch_heads={self.batch_heads}, seq_lens={self.seq_lens}, "
                f"block_size={self.block_size}, blocks={n_qb}x{n_kb}, verticals={int(self.vertical_count.max())}, "
                f"slashes={int(self.slash_count.max())}, width={self.block_indices.shape[-1]}, "
                f"col_width={self.col_indices.shape[-1]}, density={self.density():.3f}, device={self.device})")
        if n_qb == 0 or n_kb == 0 or n_qb > _ASCII_LIMIT or n_kb > _ASCII_LIMIT:
            return head
        # '#' full tile, '+' partial tile of the block part, '|' tile reached by gathered columns only
        art = [["."] * n_kb for _ in range(n_qb)]
        cnt, idx, full = (x[0, 0].cpu().tolist() for x in (self.block_counts, self.block_indices, self.block_full))
        ccnt, cidx = self.col_counts[0, 0].cpu().tolist(), self.col_indices[0, 0].cpu().tolist()
        for m in range(n_qb):
            for c in cidx[m][: ccnt[m]]:
                art[m][c // self.block_size[1]] = "|"
            for kb, f in zip(idx[m][: cnt[m]], full[m][: cnt[m]]):
                art[m][kb] = "#" if f else "+"
        body = "\n".join("  " + "".join(r) for r in art)
        return f"{head}\n[batch 0, head 0]  # full, + partial tile, | gathered columns\n{body}"
