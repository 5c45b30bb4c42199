"""Stripe-sparse mask: vertical key columns plus diagonal slashes, at token granularity.

Semantics (normative description: docs/masks.md, StripeSparseMask): query ``i`` sees key ``j`` iff ``j`` is one
of the vertical columns, or ``i - j`` is one of the slash offsets, or (optional) ``j`` is one of the
*block columns* of the query block of ``i`` (per-query-block key columns, e.g. AnchorAttention's stripes
per super-block); ANDed with the bottom-right causal predicate ``j <= i + (Lk - Lq)`` when attention runs
with ``causal=True``. Block columns are normalized when the mask is built: sorted, unique, minus the
vertical columns, and minus the keys whose tile is in the block part of that query block (there the
kernels consult only the global ``col_keep``), so the stored lists are exactly what is computed.

The mask holds the semantic lists and their lowered form, which the kernels consume:

* the *block part*: per query block, the sorted key blocks that at least one slash crosses
  (``block_counts``/``block_indices``), with a flag ``block_full`` for tiles in which every
  (query, key) pair lies on a slash (no in-tile masking needed). In the other tiles a pair is
  kept iff its diagonal is a slash (``diag_keep``) or its key is a vertical column (``col_keep``);
* the *column part*: per query block, the sorted vertical columns whose key block is not in the
  block part, merged with that query block's block columns (``col_counts``/``col_indices``), gathered
  by the kernel token by token.

Every pair is computed by exactly one of the two parts. Lowering is vectorized on the
tensors' device (prefix sums over the diagonal indicator, cumsum compaction).
"""

import math
from typing import Optional, Tuple

import torch

from ._checks import check_int_tensor, check_positive_int
from .mask import BlockSparseMask, TiledMask, _as_pair, _slice_span, transpose_lists
from .token_tiles import compact_rows

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


def _broadcast_extra(dims, block_columns):
    """Common (Bm, Hm) of ``dims`` and the leading dims of ``block_columns`` (each 1 or equal)."""
    out = []
    for axis, (name, a) in enumerate(zip(("batch", "heads"), dims)):
        b = block_columns.shape[axis]
        if a != b and 1 not in (a, b):
            raise ValueError(f"block_columns must have {name} 1 or {a} (broadcastable with vertical and slash), "
                             f"got shape {list(block_columns.shape)}.")
        out.append(max(a, b))
    return tuple(out)


def _sorted_unique_padded(x):
    """Row-wise sorted unique values of int64 ``[..., N]`` ignoring entries < 0 (padding).

    Returns (counts int64 ``[...]``, values ``[..., W]`` padded with 0), ``W = max(1, max count)``.
    """
    big = torch.iinfo(torch.int64).max
    xs = torch.sort(torch.where(x < 0, big, x), dim=-1).values
    ok = xs != big
    ok[..., 1:] &= xs[..., 1:] != xs[..., :-1]
    return compact_rows(ok, xs)


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


def _indicator(lists, counts, size):
    """int8 ``[R, size]``: 1 at the first ``counts`` entries of each row of ``lists`` ``[R, W]``."""
    n_rows = lists.shape[0]
    out = torch.zeros((n_rows, size + 1), dtype=torch.int8, device=lists.device)
    slot = torch.arange(lists.shape[1], device=lists.device)
    target = torch.where(slot < counts[:, None], lists, size)
    out.scatter_(-1, target, torch.ones_like(target, dtype=torch.int8))
    return out[:, :size].contiguous()


def lower_vertical_slash(vertical, vertical_count, slash, slash_count, block_size, seq_lens, block_columns=None,
                         block_column_counts=None):
    """Lower normalized vertical/slash lists to the kernel layout (vectorized, on their device).

    Args:
        vertical: int64 ``[R, NVw]`` sorted unique key columns (first ``vertical_count`` entries valid).
        vertical_count: int64 ``[R]``.
        slash: int64 ``[R, NSw]`` sorted unique offsets ``s`` (key ``j = i - s``).
        slash_count: int64 ``[R]``.
        block_size: ``(BLOCK_M, BLOCK_N)``; seq_lens: ``(Lq, Lk)``, both > 0.
        block_columns: optional int64 ``[R, NQB, NEw]`` sorted unique keys per query block (first
            ``block_column_counts [R, NQB]`` entries valid), merged into the column part; entries that are
            vertical columns or whose key block is in the block part of their query block are dropped.

    Returns:
        dict of int32 ``block_counts [R, NQB]``, ``block_indices [R, NQB, W]``, int8 ``block_full
        [R, NQB, W]``, int32 ``col_counts [R, NQB]``, ``col_indices [R, NQB, CW]``, int8 ``diag_keep
        [R, Lq + Lk - 1]`` (index ``s + Lk - 1``) and int8 ``col_keep [R, Lk]``; with ``block_columns``
        also the normalized (kept) lists int32 ``block_columns [R, NQB, NEw']`` and ``block_column_counts``.
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
    n_extra = 0 if block_columns is None else block_columns.shape[-1]
    step = max(1, LOWER_CHUNK_ELEMS // max(1, n_qb * max(n_kb, vertical.shape[1] + n_extra)))
    parts = []
    for a in range(0, n_rows, step):  # chunks of (batch, head) rows bound the temporaries
        b = min(n_rows, a + step)
        prefix = torch.zeros((b - a, n_diag + 1), dtype=torch.int32, device=device)
        prefix[:, 1:] = torch.cumsum(diag_keep[a:b], dim=-1, dtype=torch.int32)
        hits = (prefix[:, d_hi1] - prefix[:, d_lo]).reshape(b - a, n_qb, n_kb)  # [C, NQB, NKB]
        keep = hits > 0
        full = (hits == span).to(torch.int8)
        cnt, idx, fl = compact_rows(keep, kb_all, full)
        # vertical columns whose key block the block part already computes are dropped
        v = vertical[a:b]
        covered = torch.gather(keep, 2, (v // bn)[:, None, :].expand(-1, n_qb, -1))  # [C, NQB, NVw]
        vkeep = (vslot < vertical_count[a:b, None])[:, None, :] & ~covered
        if block_columns is None:
            ccnt, cidx = compact_rows(vkeep, v[:, None, :].to(torch.int32))
            parts.append((cnt, idx, fl, ccnt, cidx))
            continue
        e = block_columns[a:b]  # [C, NQB, NEw]
        e_ok = torch.arange(n_extra, device=device) < block_column_counts[a:b, :, None]
        e_ok &= ~torch.gather(col_keep[a:b], 1, e.reshape(b - a, -1)).reshape(e.shape).bool()
        e_ok &= ~torch.gather(keep, 2, e // bn)  # inside a block-part tile of its own query block
        ecnt, eidx = compact_rows(e_ok, e.to(torch.int32))
        big = torch.iinfo(torch.int64).max  # merge: both lists are sorted and disjoint
        merged = torch.cat([torch.where(vkeep, v[:, None, :], big), torch.where(e_ok, e, big)], dim=-1)
        merged = torch.sort(merged, dim=-1).values
        ccnt, cidx = compact_rows(merged != big, merged.to(torch.int64))
        parts.append((cnt, idx, fl, ccnt, cidx.to(torch.int32), ecnt, eidx))

    def cat(k):
        width = max(p[k].shape[-1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[-1])) for p in parts])

    out = dict(
        block_counts=torch.cat([p[0] for p in parts]).to(torch.int32), block_indices=cat(1), block_full=cat(2),
        col_counts=torch.cat([p[3] for p in parts]).to(torch.int32), col_indices=cat(4),
        diag_keep=diag_keep, col_keep=col_keep)
    if block_columns is not None:
        out.update(block_columns=cat(6), block_column_counts=torch.cat([p[5] for p in parts]).to(torch.int32))
    return out


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
            columns outside the block part of that query block, merged with its block columns.
        block_columns: None, or int32 ``[Bm, Hm, NQB, NEw]`` sorted unique extra key columns per query block
            (normalized: none is a vertical column or lies in a block-part tile of its query block);
            ``block_column_counts`` int32 ``[Bm, Hm, NQB]`` (None with it).
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
    # None when absent; code copying a mask field by field uses map_fields (or skips the None ones)
    _OPTIONAL_FIELDS = ("block_columns", "block_column_counts")

    def __init__(self, *, vertical, vertical_count, slash, slash_count, block_counts, block_indices, block_full,
                 col_counts, col_indices, diag_keep, col_keep, block_size, seq_lens, block_columns=None,
                 block_column_counts=None, validate: bool = True):
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
        if (block_columns is None) != (block_column_counts is None):
            raise ValueError("block_columns and block_column_counts must be given together (or both None).")
        self.block_columns, self.block_column_counts = block_columns, block_column_counts
        self._kv_major = None
        if validate:
            self.validate()

    # ---- constructor ------------------------------------------------------------------
    @classmethod
    def from_vertical_slash(cls, vertical, slash, seq_lens, block_size=64, block_columns=None):
        """Build and lower a vertical+slash mask, optionally with per-query-block columns.

        Args:
            vertical: int32/int64 ``[B|1, H|1, NV]`` key indices in ``[0, Lk)``, any order, duplicates allowed.
            slash: int32/int64 ``[B|1, H|1, NS]`` diagonal offsets ``s`` in ``[-(Lk - 1), Lq - 1]``: query
                ``i`` sees key ``i - s`` (``s = 0`` is the main diagonal ``j = i``; negative offsets reach
                keys after the query). Duplicates allowed.
            seq_lens: ``(Lq, Lk)``.
            block_size: int or ``(BLOCK_M, BLOCK_N)`` tile of the block part.
            block_columns: None, or int ``[B|1, H|1, NQB, NC]`` extra key columns per query block
                (``NQB = ceil(Lq / BLOCK_M)``; keys in ``[0, Lk)``, -1 = padding, any order, duplicates
                allowed): query ``i`` also sees the block columns of block ``i // BLOCK_M``. Those that are
                vertical columns, or whose key block is in the block part of their query block (a tile
                crossed by a slash, where only global columns are consulted), are dropped: the stored
                ``block_columns`` is the kept, sorted remainder.

        Returns:
            StripeSparseMask with ``Bm``/``Hm`` the broadcast of the lists' leading dims.

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
        n_qb = math.ceil(q_len / bm)
        extra = extra_cnt = None
        if block_columns is not None:
            check_int_tensor(block_columns, "block_columns", ndim=4)
            if block_columns.device != vertical.device:
                raise ValueError(f"block_columns must be on {vertical.device} like vertical, got "
                                 f"{block_columns.device}.")
            if block_columns.shape[2] != n_qb:
                raise ValueError(f"block_columns must have NQB = ceil(Lq / BLOCK_M) = {n_qb} query blocks in "
                                 f"dim 2, got shape {list(block_columns.shape)}.")
            n_b, n_h = _broadcast_extra((n_b, n_h), block_columns)
            e = block_columns.long()
            if e.numel():
                lo, hi = int(e.min()), int(e.max())
                if lo < -1 or hi >= kv_len:
                    raise ValueError(f"block_columns must hold key indices in [0, Lk={kv_len}) or -1 (padding), "
                                     f"got values in [{lo}, {hi}].")
            e = e.expand(n_b, n_h, n_qb, e.shape[3]).reshape(n_b * n_h, n_qb, e.shape[3])
            extra_cnt, extra = _sorted_unique_padded(e)
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
        if q_len and kv_len:
            low = lower_vertical_slash(v, v_count, s, s_count, (bm, bn), (q_len, kv_len), extra, extra_cnt)
        else:
            rows, dev = n_b * n_h, v.device
            z = lambda *shape, dt=torch.int32: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
            low = dict(block_counts=z(rows, n_qb), block_indices=z(rows, n_qb, 1), block_full=z(rows, n_qb, 1,
                       dt=torch.int8), col_counts=z(rows, n_qb), col_indices=z(rows, n_qb, 1),
                       diag_keep=z(rows, max(0, q_len + kv_len - 1), dt=torch.int8), col_keep=z(rows, kv_len,
                       dt=torch.int8))
            if extra is not None:
                low.update(block_columns=z(rows, n_qb, 1), block_column_counts=z(rows, n_qb))
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
        return self.map_fields(lambda x: x.to(device))

    def map_fields(self, fn) -> "StripeSparseMask":
        """A mask whose tensors are ``fn(tensor)`` (e.g. a head slice ``x[:, lo:hi]``); absent fields stay None.

        ``fn`` must keep the semantics consistent (apply the same selection to every field's leading dims).
        """
        fields = {k: getattr(self, k) for k in self._FIELDS + self._OPTIONAL_FIELDS}
        return StripeSparseMask(**{k: (None if x is None else fn(x)) for k, x in fields.items()},
                                block_size=self.block_size, seq_lens=self.seq_lens, validate=False)

    @property
    def has_block_columns(self) -> bool:
        """Whether the mask holds per-query-block columns (``block_columns`` is not None)."""
        return self.block_columns is not None

    def block_column_keep(self) -> Optional[torch.Tensor]:
        """bool ``[Bm, Hm, NQB, Lk]``: the block columns of each query block as an indicator (None without)."""
        if self.block_columns is None:
            return None
        n_b, n_h, n_qb, width = self.block_columns.shape
        out = torch.zeros((n_b, n_h, n_qb, self.kv_len + 1), dtype=torch.bool, device=self.device)
        ok = torch.arange(width, device=self.device) < self.block_column_counts[..., None]
        target = torch.where(ok, self.block_columns.long(), self.kv_len)
        return out.scatter_(-1, target, True)[..., : self.kv_len]

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
        if self.block_columns is not None:  # the key blocks of each query block's block columns
            width = self.block_columns.shape[-1]
            ok = torch.arange(width, device=self.device) < self.block_column_counts[..., None]
            blk = torch.where(ok, self.block_columns.long() // self.block_size[1], n_kb)
            extra = torch.zeros((*blk.shape[:3], n_kb + 1), dtype=torch.bool, device=self.device)
            keep = keep | extra.scatter_(-1, blk, True)[..., :n_kb]
        return BlockSparseMask.from_dense(keep, self.block_size, self.seq_lens)

    def slice(self, q_start: int, q_end: int, k_start: int, k_end: int, *, causal: bool = False):
        """This mask restricted to queries ``q_start:q_end`` x keys ``k_start:k_end``, exactly.

        ``result.to_dense() == self.to_dense(causal)[..., q_start:q_end, k_start:k_end]``. Columns and slashes
        (and block columns, whose query blocks are cut with the rows) are shifted into the slice's coordinates
        (slash ``s`` becomes ``s - (q_start - k_start)``), so the
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
        v_cnt, v = compact_rows(v_ok, v - k0)
        s_cnt, s = compact_rows(s_ok, s)
        e = e_cnt = None
        if self.block_columns is not None:  # the slice's query blocks, keys shifted into [0, lk)
            qb = slice(q0 // bm, -(-q1 // bm))
            e = self.block_columns[:, :, qb].long().reshape(n_b * n_h, qb.stop - qb.start, self.block_columns.shape[-1])
            e_ok = (torch.arange(e.shape[-1], device=self.device)
                    < self.block_column_counts[:, :, qb].reshape(n_b * n_h, -1, 1)) & (e >= k0) & (e < k1)
            e_cnt, e = compact_rows(e_ok, e - k0)
        if lq == 0 or lk == 0:
            extra = None if e is None else torch.full((n_b, n_h, e.shape[1], 1), -1, dtype=torch.int64,
                                                      device=self.device)
            return StripeSparseMask.from_vertical_slash(v[:, :0].view(n_b, n_h, 0), s[:, :0].view(n_b, n_h, 0),
                                                        (lq, lk), (bm, bn), block_columns=extra)
        low = lower_vertical_slash(v, v_cnt, s, s_cnt, (bm, bn), (lq, lk), e, e_cnt)
        fields = dict(vertical=v.to(torch.int32), vertical_count=v_cnt.to(torch.int32), slash=s.to(torch.int32),
                      slash_count=s_cnt.to(torch.int32), **low)
        fields = {k: x.reshape(n_b, n_h, *x.shape[1:]).contiguous() for k, x in fields.items()}
        return StripeSparseMask(**fields, block_size=(bm, bn), seq_lens=(lq, lk), validate=False)

    def to_block_mask(self, causal: bool = False) -> BlockSparseMask:
        """The same pairs as an exact :class:`BlockSparseMask`: the covering tiles, those wholly on slashes
        (and, with ``causal``, wholly below the diagonal) full, the others with bit masks; with ``causal``
        the bottom-right causal predicate is folded into the bits.

        ``to_block_mask(causal).to_dense() == to_dense(causal)``. The CPU path of :func:`stripe_attention`
        runs it on the fused block-sparse CPU path. Memory: 512 bytes per partial 64x64 tile.
        """
        return self._slice_as_blocks(0, self.q_len, 0, self.kv_len, causal=causal)

    def _slice_as_blocks(self, q0, q1, k0, k1, causal=True) -> BlockSparseMask:
        """The slice as an exact block mask (causal folded in when asked): covering tiles, those wholly on
        slashes and visible full, the others evaluated token by token in global coordinates."""
        bm, bn = self.block_size
        rows, cols = slice(q0 // bm, -(-q1 // bm)), slice(k0 // bn, -(-k1 // bn))
        tiles = self.covering_block_mask().visible_tiles(causal=causal)[:, :, rows, cols]
        full = self._full_tiles(causal)[:, :, rows, cols]
        diag, col = self.diag_keep.bool(), self.col_keep.bool()
        extra = self.block_column_keep()  # [Bm, Hm, NQB, Lk] or None
        shift = self.kv_len - self.q_len

        def evaluate(b, h, qb, kb):
            i = ((qb + rows.start) * bm)[:, None] + torch.arange(bm, device=qb.device)  # [P, BM]
            j = ((kb + cols.start) * bn)[:, None] + torch.arange(bn, device=qb.device)  # [P, BN]
            d = (i[:, :, None] - j[:, None, :] + self.kv_len - 1).clamp(0, diag.shape[-1] - 1)
            jc = j.clamp(max=self.kv_len - 1)
            keep = col[b[:, None], h[:, None], jc][:, None, :] | diag[b[:, None, None], h[:, None, None], d]
            if extra is not None:  # one query block per tile
                keep = keep | extra[b[:, None], h[:, None], (qb + rows.start)[:, None], jc][:, None, :]
            return keep & (j[:, None, :] <= i[:, :, None] + shift) if causal else keep
        return BlockSparseMask.from_tile_evaluator(evaluate, tiles, (bm, bn), (q1 - q0, k1 - k0), full=full)

    def _full_tiles(self, causal):
        """bool ``[Bm, Hm, NQB, NKB]``: tiles of the block part wholly on slashes, within the sequence and (with
        ``causal``) wholly visible: kept whole without evaluating their pairs."""
        bm, bn = self.block_size
        n_qb, n_kb = self.num_blocks
        width = self.block_indices.shape[-1]
        ok = (torch.arange(width, device=self.device) < self.block_counts[..., None]) & (self.block_full > 0)
        blk = torch.where(ok, self.block_indices.long(), n_kb)
        full = torch.zeros((*blk.shape[:3], n_kb + 1), dtype=torch.bool, device=self.device)
        full = full.scatter_(-1, blk, True)[..., :n_kb]
        qb, kb = torch.arange(n_qb, device=self.device)[:, None], torch.arange(n_kb, device=self.device)[None, :]
        inside = ((qb + 1) * bm <= self.q_len) & ((kb + 1) * bn <= self.kv_len)  # no ragged edge
        if causal:  # the tile's last key is seen by its first query
            inside = inside & ((kb + 1) * bn - 1 <= qb * bm + (self.kv_len - self.q_len))
        return full & inside

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
        extra = self.block_column_keep()
        n_diag, shift = max(1, q_len + kv_len - 1), kv_len - q_len
        bm, n_qb = self.block_size[0], self.num_blocks[0]

        def mask_mod(b, h, q_idx, kv_idx):
            bb, hh = b % n_b, h // div
            kc = torch.clamp(kv_idx, 0, kv_len - 1)
            on_col = col[bb, hh, kc]
            on_slash = diag[bb, hh, torch.clamp(q_idx - kv_idx + kv_len - 1, 0, n_diag - 1)]
            if extra is not None:
                on_col = on_col | extra[bb, hh, torch.clamp(q_idx // bm, 0, max(0, n_qb - 1)), kc]
            keep = (on_col | on_slash) & (q_idx < q_len) & (kv_idx < kv_len)
            return keep & (kv_idx <= q_idx + shift) if causal else keep

        return mask_mod

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Bm, Hm, Lq, Lk]`` (for tests and small inputs).

        With ``causal`` the bottom-right causal predicate ``j <= i + (Lk - Lq)`` is ANDed in.
        """
        return self.rows_to_dense(0, self.q_len, causal)

    def rows_to_dense(self, r0: int, r1: int, causal: bool = False) -> torch.Tensor:
        """:meth:`to_dense` of the query rows ``r0:r1`` only: bool ``[Bm, Hm, r1 - r0, Lk]`` (exact)."""
        i = torch.arange(r0, r1, device=self.device)[:, None]
        j = torch.arange(self.kv_len, device=self.device)[None, :]
        keep = self.col_keep.bool()[:, :, None, :].expand(-1, -1, r1 - r0, -1)
        if r1 > r0 and self.kv_len:
            keep = keep | self.diag_keep.bool()[:, :, (i - j + self.kv_len - 1)]
            if self.block_columns is not None:
                keep = keep | self.block_column_keep()[:, :, i[:, 0] // self.block_size[0]]
        if causal:
            keep = keep & (j <= i + (self.kv_len - self.q_len))
        return keep

    def density(self, causal: bool = False) -> float:
        """Share of the visible (query, key) token pairs that attention computes (kept / ``Lq * Lk``, or /
        the causally visible pairs with ``causal``, as :meth:`BlockSparseMask.density`), averaged over
        ``(Bm, Hm)``.

        Exact and computed from the lists (no dense map): ``|V| * rows + sum of slash lengths``
        minus the pairs that lie on both a column and a slash, plus the rows of each query block that
        see each of its block columns.
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
        if self.block_columns is not None:  # disjoint from columns and slashes (normalized at build time)
            bm = self.block_size[0]
            e = self.block_columns.long()
            e_ok = torch.arange(e.shape[-1], device=self.device) < self.block_column_counts[..., None]
            r0 = (torch.arange(e.shape[2], device=self.device) * bm)[:, None]  # [NQB, 1]
            r1 = torch.clamp(r0 + bm, max=q_len)
            lo = torch.maximum(r0, e - shift) if causal else r0.expand_as(e)
            pairs = pairs + (torch.clamp(r1 - lo, min=0) * e_ok).sum()
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
        if self.block_columns is not None:
            expect.update(block_columns=4, block_column_counts=3)
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
        lists = [(self.block_counts, self.block_indices, n_kb, "block_indices"),
                 (self.col_counts, self.col_indices, kv_len, "col_indices")]
        if self.block_columns is not None:
            if list(self.block_column_counts.shape) != lead + [n_qb]:
                raise ValueError(f"block_column_counts must have shape {lead + [n_qb]}, "
                                 f"got {list(self.block_column_counts.shape)}.")
            lists.append((self.block_column_counts, self.block_columns, kv_len, "block_columns"))
        for cnt, idx, hi, name in lists:
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
                f"col_width={self.col_indices.shape[-1]}, "
                + (f"block_columns={int(self.block_column_counts.max()) if self.block_column_counts.numel() else 0}, "
                   if self.block_columns is not None else "")
                + f"density={self.density():.3f}, device={self.device})")
        if n_qb == 0 or n_kb == 0 or n_qb > _ASCII_LIMIT or n_kb > _ASCII_LIMIT:
            return head
        # '#' full tile, '+' partial tile of the block part, '|' tile reached by gathered columns only
        # (vertical or block columns)
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
