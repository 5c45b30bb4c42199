"""Block-sparse mask format: what a pattern decided, as data that kernels consume.

Normative description: docs/masks.md. A mask is tiles (sorted key-block lists per query block)
plus optional token-level predicates that make it exact inside the tiles: a band (sliding window),
per-batch valid ranges (padding), segment ids (documents) and bit masks of single tiles.
"""

import math
import warnings
from typing import Optional, Tuple

import torch

from sparse_attn_kernels._common.predicates import (TokenPredicates, band, block_segment_bounds, classify_tiles,
                                                    entries_keep, token_keep, unpack_bits, words_per_row)

from ._checks import check_int_tensor, check_positive_int
from .token_tiles import (EVAL_CHUNK_ELEMS, TileAccumulator, eval_mask_mod, eval_mask_mod_tiles, lists_from_bool,
                          ranges_from_attention_mask, ranges_from_lengths)

_ASCII_LIMIT = 64  # block maps up to this many blocks per side are drawn in repr
COUNT_CHUNK_ELEMS = 1 << 24  # token pairs evaluated per chunk when counting pairs of partial tiles

__all__ = ["BlockSparseMask", "TiledMask", "lists_from_bool", "transpose_lists", "ranges_from_attention_mask",
           "ranges_from_lengths"]


def _as_pair(block_size, name="block_size") -> Tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise TypeError(f"{name} must be an int or a pair (BLOCK_M, BLOCK_N), got {block_size!r}.")
    return (check_positive_int(block_size[0], f"{name}[0]"), check_positive_int(block_size[1], f"{name}[1]"))


def _seq_lens(seq_lens, name="seq_lens") -> Tuple[int, int]:
    if not (isinstance(seq_lens, (tuple, list)) and len(seq_lens) == 2):
        raise TypeError(f"{name} must be a pair (q_len, kv_len) of ints, got {seq_lens!r}.")
    return (check_positive_int(seq_lens[0], f"{name}[0]", allow_zero=True),
            check_positive_int(seq_lens[1], f"{name}[1]", allow_zero=True))


def _window(window) -> Tuple[int, int]:
    if window is None:
        return (-1, -1)
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise TypeError(f"window must be a pair (left, right) of ints (-1 = unbounded), got {window!r}.")
    out = []
    for side, value in zip(("left", "right"), window):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window {side} must be an int (-1 = unbounded), got {type(value).__name__}.")
        if value < -1:
            raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {value}.")
        out.append(value)
    return tuple(out)


def _meet(a: int, b: int) -> int:
    """The tighter of two band sides (-1 = unbounded)."""
    return b if a < 0 else (a if b < 0 else min(a, b))


class TiledMask:
    """Geometry shared by the mask types: ``block_size``, ``seq_lens`` and a lead tensor ``[Bm, Hm, NQB]``."""

    block_size: Tuple[int, int]
    seq_lens: Tuple[int, int]

    def _lead(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def q_len(self) -> int:
        return self.seq_lens[0]

    @property
    def kv_len(self) -> int:
        return self.seq_lens[1]

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(NQB, NKB)``."""
        return (math.ceil(self.q_len / self.block_size[0]), math.ceil(self.kv_len / self.block_size[1]))

    @property
    def device(self) -> torch.device:
        return self._lead().device

    @property
    def batch_heads(self) -> Tuple[int, int]:
        """``(Bm, Hm)``: 1 means broadcast."""
        return tuple(self._lead().shape[:2])

    @property
    def predicate_batch(self) -> int:
        """Batch size of the token predicates (1 when none is per batch row)."""
        return 1


_PRED_TENSORS = ("bit_slots", "bit_words", "q_range", "kv_range", "q_segments", "kv_segments")


class BlockSparseMask(TiledMask):
    """Which (query block, key block) tiles attention computes, per batch and head, exact at token level.

    Attributes:
        counts: int32 ``[Bm, Hm, NQB]``, ``Bm`` in ``(1, B)``, ``Hm`` in ``(1, Hkv, Hq)``.
        indices: int32 ``[Bm, Hm, NQB, W]``, each row's first ``counts`` entries are the
            kept key blocks in strictly increasing order; the rest is padding (0).
        block_size: ``(BLOCK_M, BLOCK_N)``.
        seq_lens: ``(q_len, kv_len)``; the last block of either side may be ragged.
        bit_slots, bit_words: optional bit masks of partial tiles: int32 ``[Bm, Hm, NQB, W]`` (``-1``: no
            bits for this entry) and int32 ``[P, BLOCK_M, ceil(BLOCK_N / 32)]``.
        window: ``(left, right)``: key ``j`` seen by query ``i`` iff ``-left <= j - (i + shift) <= right``
            (``-1`` = unbounded; ``(-1, -1)`` = no band).
        q_range, kv_range: optional int32 ``[B|1, 2]`` valid ``[start, end)`` of each batch row.
        q_segments, kv_segments: optional int32 ``[B|1, Lq]`` / ``[B|1, Lk]`` document ids.

    Example:
        >>> keep = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]
        >>> mask = BlockSparseMask.from_dense(keep, block_size=64, seq_lens=(100, 128))
        >>> mask.counts.tolist()
        [[[1, 2]]]
    """

    def __init__(self, counts, indices, block_size, seq_lens, *, bit_slots=None, bit_words=None, window=None,
                 q_range=None, kv_range=None, q_segments=None, kv_segments=None, validate: bool = True):
        self.block_size = _as_pair(block_size)
        self.seq_lens = _seq_lens(seq_lens)
        check_int_tensor(counts, "counts", ndim=3)
        check_int_tensor(indices, "indices", ndim=4)
        self.counts = counts.to(torch.int32).contiguous()
        self.indices = indices.to(torch.int32).contiguous()
        self.window = _window(window)
        if (bit_slots is None) != (bit_words is None):
            raise ValueError("bit_slots and bit_words must be given together (or neither).")
        if (q_segments is None) != (kv_segments is None):
            raise ValueError("q_segments and kv_segments must be given together (or neither).")
        for name, x, ndim in (("bit_slots", bit_slots, 4), ("bit_words", bit_words, 3), ("q_range", q_range, 2),
                              ("kv_range", kv_range, 2), ("q_segments", q_segments, 2),
                              ("kv_segments", kv_segments, 2)):
            if x is not None:
                check_int_tensor(x, name, ndim=ndim)
                x = x.to(torch.int32).contiguous()
            setattr(self, name, x)
        self._kv_major = None
        if validate:
            self.validate()

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_dense(cls, block_bool, block_size, seq_lens=None):
        """Build from a boolean block map ``[B|1, H|1, ceil(Lq/BLOCK_M), ceil(Lk/BLOCK_N)]`` (whole tiles).

        ``seq_lens`` defaults to full blocks (``NQB*BLOCK_M, NKB*BLOCK_N``).
        """
        if not isinstance(block_bool, torch.Tensor):
            raise TypeError(f"block_bool must be a torch.Tensor, got {type(block_bool).__name__}.")
        if block_bool.dim() != 4:
            raise ValueError(f"block_bool must have shape [B|1, H|1, NQB, NKB], got {list(block_bool.shape)}.")
        bm, bn = _as_pair(block_size)
        if seq_lens is None:
            seq_lens = (block_bool.shape[2] * bm, block_bool.shape[3] * bn)
        seq_lens = _seq_lens(seq_lens)
        expected = (math.ceil(seq_lens[0] / bm), math.ceil(seq_lens[1] / bn))
        if tuple(block_bool.shape[2:]) != expected:
            raise ValueError(
                f"block_bool must have {expected[0]} x {expected[1]} blocks for seq_lens={tuple(seq_lens)} and "
                f"block_size={(bm, bn)}, got {tuple(block_bool.shape[2:])}.")
        counts, indices = lists_from_bool(block_bool.to(torch.bool))
        return cls(counts, indices, (bm, bn), seq_lens, validate=False)

    @classmethod
    def full(cls, q_len, kv_len, block_size=64, device=None):
        """Every block kept (dense attention), broadcast over batch and heads."""
        bm, bn = _as_pair(block_size)
        keep = torch.ones((1, 1, math.ceil(q_len / bm), math.ceil(kv_len / bn)), dtype=torch.bool, device=device)
        return cls.from_dense(keep, (bm, bn), (q_len, kv_len))

    @classmethod
    def from_token_mask(cls, token_mask, block_size):
        """Exact mask of a bool token mask ``[B|1, H|1, Lq, Lk]``: tiles with a kept pair are kept, tiles
        entirely kept are full, the others carry their bits. Memory is that of the token mask (small inputs)."""
        if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 4:
            raise ValueError(f"token_mask must be a bool tensor [B|1, H|1, Lq, Lk], got "
                             f"{list(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__}.")
        bm, bn = _as_pair(block_size)
        q_len, kv_len = token_mask.shape[2:]
        n_blocks = (math.ceil(q_len / bm), math.ceil(kv_len / bn))
        acc = TileAccumulator(token_mask.shape[:2], n_blocks, (bm, bn), token_mask.device)
        acc.add_rows(0, token_mask.to(torch.bool))
        return cls._from_accumulator(acc, (bm, bn), (q_len, kv_len))

    @classmethod
    def from_mask_mod(cls, mask_mod, batch, heads, q_len, kv_len, block_size=64, device=None):
        """Exact mask of a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (evaluated with
        ``torch.vmap``, in bands of query blocks so memory stays bounded).

        Args:
            batch, heads: the mask's ``Bm`` and ``Hm`` (1 when the ``mask_mod`` ignores ``b`` / ``h``).
        """
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}.")
        bm, bn = _as_pair(block_size)
        batch, heads = check_positive_int(batch, "batch"), check_positive_int(heads, "heads")
        q_len, kv_len = _seq_lens((q_len, kv_len))
        n_blocks = (math.ceil(q_len / bm), math.ceil(kv_len / bn))
        acc = TileAccumulator((batch, heads), n_blocks, (bm, bn), device)
        band_blocks = max(1, EVAL_CHUNK_ELEMS // max(1, batch * heads * bm * kv_len))
        for qb0 in range(0, n_blocks[0], band_blocks):
            rows = torch.arange(qb0 * bm, min(q_len, (qb0 + band_blocks) * bm), device=device)
            tok = eval_mask_mod(mask_mod, batch, heads, rows, kv_len, device)
            acc.add_rows(qb0, tok)
        return cls._from_accumulator(acc, (bm, bn), (q_len, kv_len))

    @classmethod
    def from_segments(cls, q_segments, kv_segments, block_size, *, seq_lens=None):
        """Document masking (packed sequences): query ``i`` sees key ``j`` iff their segment ids are equal.

        Args:
            q_segments, kv_segments: int ``[B|1, Lq]`` / ``[B|1, Lk]`` ids, non-decreasing along tokens (each
                document contiguous); the tiles kept are those where both sides' id ranges meet, and the
                segment predicate makes them exact.
        """
        bm, bn = _as_pair(block_size)
        for name, seg in (("q_segments", q_segments), ("kv_segments", kv_segments)):
            check_int_tensor(seg, name, ndim=2)
            if bool((seg[:, 1:] < seg[:, :-1]).any()):
                raise ValueError(f"{name} must be non-decreasing along tokens (contiguous documents).")
        q_lo, q_hi = block_segment_bounds(q_segments, bm)  # [Bs, NQB]
        k_lo, k_hi = block_segment_bounds(kv_segments, bn)  # [Bs, NKB]
        tiles = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
        lens = (q_segments.shape[1], kv_segments.shape[1]) if seq_lens is None else seq_lens
        return cls.from_dense(tiles[:, None], (bm, bn), lens).with_predicates(q_segments=q_segments,
                                                                                kv_segments=kv_segments)

    @classmethod
    def from_tile_evaluator(cls, evaluate, tiles, block_size, seq_lens, *, full=None):
        """Exact mask from a per-tile token evaluator, called only on candidate tiles not known to be full.

        Args:
            evaluate: ``evaluate(b, h, qb, kb) -> bool [P, BLOCK_M, BLOCK_N]`` for int64 ``[P]`` tile indices.
            tiles: bool ``[Bm, Hm, NQB, NKB]``: tiles that may hold a kept pair (others are dropped).
            full: optional bool, same shape: tiles known to be entirely kept (not evaluated).
        """
        bm, bn = _as_pair(block_size)
        q_len, kv_len = _seq_lens(seq_lens)
        tiles = tiles.to(torch.bool)
        full = torch.zeros_like(tiles) if full is None else (full.to(torch.bool).expand(tiles.shape) & tiles)
        acc = TileAccumulator(tiles.shape[:2], tiles.shape[2:], (bm, bn), tiles.device)
        acc.keep |= full
        b, h, qb, kb = (tiles & ~full).nonzero(as_tuple=True)
        step = max(1, EVAL_CHUNK_ELEMS // (bm * bn))
        for a in range(0, qb.numel(), step):
            sl = slice(a, a + step)
            rows = qb[sl, None] * bm + torch.arange(bm, device=tiles.device)  # [P, BM]
            cols = kb[sl, None] * bn + torch.arange(bn, device=tiles.device)  # [P, BN]
            valid = (rows < q_len)[:, :, None] & (cols < kv_len)[:, None, :]
            got = evaluate(b[sl], h[sl], qb[sl], kb[sl]) & valid
            acc.add_tiles((b[sl], h[sl], qb[sl], kb[sl]), got, valid)
        return cls._from_accumulator(acc, (bm, bn), (q_len, kv_len))

    @classmethod
    def from_tile_predicate(cls, predicate, tiles, block_size, seq_lens, *, full=None):
        """Exact mask of a vectorized token predicate, evaluated only on candidate tiles.

        Args:
            predicate: ``predicate(q_idx, kv_idx) -> bool`` on broadcasting int64 tensors (``[P, BM, 1]``,
                ``[P, 1, BN]``), the same for every batch row and head.
            tiles: bool ``[Bm, Hm, NQB, NKB]``: tiles that may hold a kept pair (others are dropped).
            full: optional bool, same shape: tiles known to be entirely kept (not evaluated).
        """
        bm, bn = _as_pair(block_size)

        def evaluate(b, h, qb, kb):
            rows = qb[:, None] * bm + torch.arange(bm, device=qb.device)
            cols = kb[:, None] * bn + torch.arange(bn, device=qb.device)
            return predicate(rows[:, :, None], cols[:, None, :])
        return cls.from_tile_evaluator(evaluate, tiles, (bm, bn), seq_lens, full=full)

    @classmethod
    def _from_accumulator(cls, acc, block_size, seq_lens):
        counts, indices, slots, words = acc.result()
        return cls(counts, indices, block_size, seq_lens, bit_slots=slots, bit_words=words, validate=False)

    @classmethod
    def from_flex_block_mask(cls, block_mask, *, partial="exact", batch=None, num_heads=None):
        """Convert a ``torch.nn.attention.flex_attention.BlockMask``, exactly.

        Full blocks are kept as full tiles. The ``mask_mod`` is evaluated on every partial block: a block
        it keeps whole becomes a full tile, one it keeps nowhere is dropped, the rest keep their bits.
        The ``mask_mod`` is evaluated at the block mask's own batch/head indices; a broadcast
        BlockMask (B or H = 1) whose ``mask_mod`` depends on ``b``/``h`` needs ``batch`` / ``num_heads``.

        Args:
            partial: ``"exact"`` (default); ``"keep"`` keeps partial blocks whole (over-attends: warns).
        """
        from torch.nn.attention.flex_attention import BlockMask, noop_mask
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, got "
                            f"{type(block_mask).__name__}.")
        if partial not in ("exact", "keep", "error"):
            raise ValueError(f"partial must be 'exact' or 'keep', got {partial!r}.")
        bm, bn = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        n_qb, n_kb = math.ceil(q_len / bm), math.ceil(kv_len / bn)

        def scatter(num, idx):
            lead = num.shape[:2]
            if batch is not None and lead[0] == 1:
                num, idx = num.expand(batch, *num.shape[1:]), idx.expand(batch, *idx.shape[1:])
            if num_heads is not None and lead[1] == 1:
                num, idx = num.expand(num.shape[0], num_heads, *num.shape[2:]), \
                    idx.expand(idx.shape[0], num_heads, *idx.shape[2:])
            keep = torch.zeros((*num.shape, n_kb + 1), dtype=torch.bool, device=num.device)
            slot = torch.arange(idx.shape[-1], device=num.device)
            ok = slot < num[..., None]
            target = torch.where(ok, idx.long().clamp(0, n_kb), n_kb)
            return keep.scatter_(-1, target, True)[..., :n_qb, :n_kb]

        part = scatter(block_mask.kv_num_blocks, block_mask.kv_indices)
        whole = torch.zeros_like(part)
        if block_mask.full_kv_num_blocks is not None:
            whole = scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        part = part & ~whole
        if block_mask.mask_mod is noop_mask or not bool(part.any()):
            return cls.from_dense(part | whole, (bm, bn), (q_len, kv_len))
        if partial == "keep":
            warnings.warn("from_flex_block_mask(partial='keep') keeps FlexAttention's partial blocks whole, so "
                          "attention over-attends the pairs their mask_mod drops; the default is exact.",
                          UserWarning, stacklevel=2)
            return cls.from_dense(part | whole, (bm, bn), (q_len, kv_len))
        acc = TileAccumulator(part.shape[:2], (n_qb, n_kb), (bm, bn), part.device)
        acc.keep |= whole
        b, h, qb, kb = part.nonzero(as_tuple=True)
        tiles, valid = eval_mask_mod_tiles(block_mask.mask_mod, b, h, qb, kb, (bm, bn), (q_len, kv_len))
        acc.add_tiles((b, h, qb, kb), tiles, valid)
        return cls._from_accumulator(acc, (bm, bn), (q_len, kv_len))

    # ---- predicates ---------------------------------------------------------------------
    @property
    def has_bits(self) -> bool:
        return self.bit_slots is not None

    @property
    def has_predicates(self) -> bool:
        """True when anything beyond whole tiles applies (band, ranges, segments or bits)."""
        return (self.window != (-1, -1) or self.has_bits or self.q_range is not None or self.kv_range is not None
                or self.q_segments is not None)

    @property
    def predicate_batch(self) -> int:
        sizes = [x.shape[0] for x in (self.q_range, self.kv_range, self.q_segments, self.kv_segments) if x is not None]
        return max(sizes, default=1)

    def token_predicates(self, kv_major: bool = False) -> TokenPredicates:
        """The mask's predicates as kernel data (with the key-major bit slots when ``kv_major``)."""
        slots_t = self.bit_slots_t() if (kv_major and self.has_bits) else None
        return TokenPredicates(self.window, self.q_range, self.kv_range, self.q_segments, self.kv_segments,
                               self.bit_slots, self.bit_words, slots_t)

    def _fields(self) -> dict:
        return dict(bit_slots=self.bit_slots, bit_words=self.bit_words, window=self.window, q_range=self.q_range,
                    kv_range=self.kv_range, q_segments=self.q_segments, kv_segments=self.kv_segments)

    def with_predicates(self, *, window=None, q_range=None, kv_range=None, q_segments=None, kv_segments=None,
                        padding=None) -> "BlockSparseMask":
        """The same tiles with more predicates ANDed in (a window meets the existing one, ranges intersect).

        Args:
            window: ``(left, right)`` band, ``-1`` = unbounded side.
            q_range, kv_range: int ``[B|1, 2]`` valid ``[start, end)`` per batch row.
            q_segments, kv_segments: int ``[B|1, Lq]`` / ``[B|1, Lk]`` document ids (attend iff equal).
            padding: shorthand for a 2-D padding mask ``[B, L]`` (real tokens True; left or right padding)
                of a self-attention call (``Lq == Lk``): sets both ranges.
        """
        fields = self._fields()
        if padding is not None:
            if self.q_len != self.kv_len:
                raise ValueError(f"padding= needs Lq == Lk, got seq_lens={self.seq_lens}; pass q_range and "
                                 f"kv_range instead.")
            rng = ranges_from_attention_mask(padding, "padding").to(self.device)
            q_range = rng if q_range is None else q_range
            kv_range = rng if kv_range is None else kv_range
        if window is not None:
            new = _window(window)
            fields["window"] = (_meet(self.window[0], new[0]), _meet(self.window[1], new[1]))
        for name, rng in (("q_range", q_range), ("kv_range", kv_range)):
            if rng is None:
                continue
            check_int_tensor(rng, name, ndim=2)
            old = fields[name]
            if old is not None:
                rng = torch.stack([torch.maximum(old[:, 0], rng[:, 0]), torch.minimum(old[:, 1], rng[:, 1])], 1)
                rng[:, 1] = torch.maximum(rng[:, 0], rng[:, 1])
            fields[name] = rng
        if q_segments is not None or kv_segments is not None:
            if self.q_segments is not None:
                raise ValueError("this mask already has segment ids; combine them into one id per token first.")
            fields.update(q_segments=q_segments, kv_segments=kv_segments)
        return BlockSparseMask(self.counts, self.indices, self.block_size, self.seq_lens, **fields)

    def map_heads(self, fn) -> "BlockSparseMask":
        """A mask whose per-head lists are ``fn(x)`` of this one's (``fn`` maps ``[Bm, Hm, ...]`` tensors
        along dim 1, e.g. selecting or repeating heads); predicates and bits carry over."""
        fields = self._fields()
        if self.bit_slots is not None:
            fields["bit_slots"] = fn(self.bit_slots)
        return BlockSparseMask(fn(self.counts), fn(self.indices), self.block_size, self.seq_lens, validate=False,
                               **fields)

    # ---- views --------------------------------------------------------------------------
    def _lead(self) -> torch.Tensor:
        return self.counts

    def to(self, device) -> "BlockSparseMask":
        """A copy on ``device`` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self._fields().items()}
        return BlockSparseMask(self.counts.to(device), self.indices.to(device), self.block_size, self.seq_lens,
                               validate=False, **fields)

    def to_block_dense(self) -> torch.Tensor:
        """bool ``[Bm, Hm, NQB, NKB]``: True where a tile is kept."""
        n_kb = self.num_blocks[1]
        slot = torch.arange(self.indices.shape[-1], device=self.device)
        ok = slot < self.counts[..., None]
        target = torch.where(ok, self.indices.long(), n_kb)
        keep = torch.zeros((*self.counts.shape, n_kb + 1), dtype=torch.bool, device=self.device)
        return keep.scatter_(-1, target, True)[..., :n_kb]

    def slot_map(self) -> torch.Tensor:
        """int64 ``[Bm, Hm, NQB, NKB]``: the bit slot of every tile, ``-1`` where it has no bits or is not kept."""
        n_kb = self.num_blocks[1]
        ok = torch.arange(self.indices.shape[-1], device=self.device) < self.counts[..., None]
        slot = torch.full((*self.counts.shape, n_kb + 1), -1, dtype=torch.int64, device=self.device)
        if self.has_bits:  # list padding goes to a spare column
            slot.scatter_(-1, torch.where(ok, self.indices.long(), n_kb), self.bit_slots.long())
        return slot[..., :n_kb]

    def to_dense(self, causal: bool = False) -> torch.Tensor:
        """Token-level bool ``[Bm', Hm, Lq, Lk]`` (for tests and small inputs): the pairs attention sees.

        ``Bm'`` is ``max(Bm, predicate batch)``. With ``causal`` the bottom-right causal predicate is ANDed
        in, as in :func:`sparse_attention`.
        """
        return self.rows_to_dense(0, self.q_len, causal=causal)

    def rows_to_dense(self, r0: int, r1: int, causal: bool = False) -> torch.Tensor:
        """:meth:`to_dense` of the query rows ``r0:r1`` only: bool ``[Bm', Hm, r1 - r0, Lk]`` (exact)."""
        bm, bn = self.block_size
        rows = torch.arange(r0, r1, device=self.device)
        qb = rows // bm  # [R]
        tiles = self.to_block_dense()  # [Bm, Hm, NQB, NKB]
        tok = tiles[:, :, qb].repeat_interleave(bn, dim=3)[..., : self.kv_len]  # [Bm, Hm, R, Lk]
        if self.has_bits:
            slot = self.slot_map()[:, :, qb]  # [Bm, Hm, R, NKB]
            words = self.bit_words[slot.clamp(min=0), (rows % bm)[:, None]]  # [Bm, Hm, R, NKB, WORDS]
            bits = unpack_bits(words[..., None, :], bn)[..., 0, :]  # [Bm, Hm, R, NKB, BN]
            bits = bits | (slot < 0)[..., None]
            tok = tok & bits.flatten(-2)[..., : self.kv_len]
        left, right = band(causal, self.window)
        batch = max(self.counts.shape[0], self.predicate_batch)
        if left >= 0 or right >= 0 or self.q_range is not None or self.kv_range is not None \
                or self.q_segments is not None:
            q_pos = rows.expand(batch, -1)
            k_pos = torch.arange(self.kv_len, device=self.device).expand(batch, -1)
            pred = token_keep(self.token_predicates(), left, right, torch.arange(batch, device=self.device), q_pos,
                              k_pos, self.q_len, self.kv_len)  # [B', R, Lk]
            tok = tok & pred[:, None]
        return tok

    def full_tiles(self, causal: bool = False) -> torch.Tensor:
        """bool ``[Bm', Hm, NQB, NKB]``: tiles every valid pair of which attention sees (no in-tile masking)."""
        n_qb, n_kb = self.num_blocks
        _, _, kb, _, _, full, (_, _, _, batch, heads) = self._rows(causal)
        out = torch.zeros((batch * heads * n_qb, n_kb + 1), dtype=torch.bool, device=self.device)
        out.scatter_(1, torch.where(full, kb, n_kb), True)
        return out[:, :n_kb].view(batch, heads, n_qb, n_kb)

    def visible_tiles(self, causal: bool = False) -> torch.Tensor:
        """bool ``[Bm', Hm, NQB, NKB]``: kept tiles that can hold a visible pair (exact for the band, ``causal``
        and ranges; conservative for segments and bits)."""
        n_qb, n_kb = self.num_blocks
        _, _, kb, _, visible, _, (_, _, _, batch, heads) = self._rows(causal)
        out = torch.zeros((batch * heads * n_qb, n_kb + 1), dtype=torch.bool, device=self.device)
        out.scatter_(1, torch.where(visible, kb, n_kb), True)
        return out[:, :n_kb].view(batch, heads, n_qb, n_kb)

    def slice(self, q_start: int, q_end: int, k_start: int, k_end: int, *, causal: bool = False) -> "BlockSparseMask":
        """This mask restricted to queries ``q_start:q_end`` x keys ``k_start:k_end``, exactly.

        The result is a mask for ``seq_lens = (q_end - q_start, k_end - k_start)`` with
        ``result.to_dense() == self.to_dense(causal)[..., q_start:q_end, k_start:k_end]``. Everything is
        evaluated in global coordinates: the band, ``causal`` (folded in, since ``causal=True`` on the
        slice would align to the slice's own bottom-right corner), ranges, segments and bits. Full tiles stay
        full; the partial tiles of the slice carry bit masks and the slice has no other predicate.

        Args:
            q_start, q_end: query span; both multiples of ``BLOCK_M``, or ``q_end == q_len``.
            k_start, k_end: key span; both multiples of ``BLOCK_N``, or ``k_end == kv_len``.
            causal: fold the global bottom-right causal predicate in (then run the slice with ``causal=False``).

        Example:
            >>> m = BlockSparseMask.full(100, 100, 32)
            >>> m.slice(32, 100, 0, 64, causal=True).seq_lens
            (68, 64)
        """
        bm, bn = self.block_size
        q0, q1 = _slice_span(q_start, q_end, bm, self.q_len, "q")
        k0, k1 = _slice_span(k_start, k_end, bn, self.kv_len, "k")
        rows, cols = slice(q0 // bm, -(-q1 // bm)), slice(k0 // bn, -(-k1 // bn))
        tiles = self.visible_tiles(causal)[:, :, rows, cols]
        full = self.full_tiles(causal)[:, :, rows, cols]

        def evaluate(b, h, qb, kb):
            return self.tile_tokens(b, h, qb + rows.start, kb + cols.start, causal)
        return BlockSparseMask.from_tile_evaluator(evaluate, tiles, (bm, bn), (q1 - q0, k1 - k0), full=full)

    def tile_tokens(self, b, h, qb, kb, causal: bool = False) -> torch.Tensor:
        """bool ``[P, BLOCK_M, BLOCK_N]``: the pairs attention sees in tiles ``(b, h, qb, kb)`` (int64 ``[P]``),
        False where the tile is not kept or past the lengths (exact: bits and predicates applied)."""
        bm, bn = self.block_size
        bt, h = b % self.counts.shape[0], h % self.counts.shape[1]
        tiles = self.to_block_dense()
        kept = tiles[bt, h, qb, kb]  # [P]
        rows = qb[:, None] * bm + torch.arange(bm, device=self.device)  # [P, BM]
        cols = kb[:, None] * bn + torch.arange(bn, device=self.device)  # [P, BN]
        left, right = band(causal, self.window)
        pred = token_keep(self.token_predicates(), left, right, b, rows, cols, self.q_len, self.kv_len)
        out = pred & kept[:, None, None]
        if self.has_bits:
            s = self.slot_map()[bt, h, qb, kb]  # [P]
            bits = unpack_bits(self.bit_words[s.clamp(min=0)], bn) | (s < 0)[:, None, None]
            out = out & bits
        return out

    def _rows(self, causal: bool):
        """Per (batch, head, query block) row: b_of, m_of ``[R]``, kb, slots ``[R, W]``, visible, full ``[R, W]``."""
        batch = max(self.counts.shape[0], self.predicate_batch)
        n_qb = self.num_blocks[0]
        heads, width = self.counts.shape[1], self.indices.shape[-1]
        count = self.counts.expand(batch, heads, n_qb).reshape(-1).long()
        kb = self.indices.expand(batch, heads, n_qb, width).reshape(-1, width).long()
        ok = torch.arange(width, device=self.device) < count[:, None]
        slots = None
        if self.has_bits:
            slots = self.bit_slots.expand(batch, heads, n_qb, width).reshape(-1, width).long().masked_fill(~ok, -1)
        b_of = torch.arange(batch, device=self.device).repeat_interleave(heads * n_qb)
        m_of = torch.arange(n_qb, device=self.device).repeat(batch * heads)
        preds = self.token_predicates()
        left, right = band(causal, self.window)
        visible, full = classify_tiles(preds, left, right, b_of, m_of, kb, slots, *self.block_size, self.q_len,
                                       self.kv_len)
        return b_of, m_of, kb, slots, visible & ok, full & ok, (preds, left, right, batch, heads)

    def kept_pairs(self, causal: bool = False) -> int:
        """Number of (batch, head, query, key) pairs attention sees, summed over ``[Bm', Hm]`` (exact)."""
        if self.q_len == 0 or self.kv_len == 0 or self.counts.numel() == 0:
            return 0
        bm, bn = self.block_size
        b_of, m_of, kb, slots, visible, full, (preds, left, right, _, _) = self._rows(causal)
        rows = torch.clamp(self.q_len - m_of * bm, max=bm)  # [R]
        total = int((full.sum(1) * rows).sum().item()) * bn
        part = visible & ~full
        r_idx, w_idx = part.nonzero(as_tuple=True)
        step = max(1, COUNT_CHUNK_ELEMS // (bm * bn))
        tok_m = torch.arange(bm, device=self.device)
        for a in range(0, r_idx.numel(), step):
            r, w = r_idx[a:a + step], w_idx[a:a + step]
            keep = entries_keep(preds, left, right, b_of[r], m_of[r], kb[r, w][:, None],
                                None if slots is None else slots[r, w][:, None], tok_m, bm, bn, self.q_len,
                                self.kv_len)
            total += int(keep.sum().item())
        return total

    def _visible_pairs(self, causal: bool) -> int:
        if not causal:
            return self.q_len * self.kv_len
        i = torch.arange(self.q_len)
        return int(torch.clamp(i + (self.kv_len - self.q_len) + 1, 0, self.kv_len).sum().item())

    def density(self, causal: bool = False) -> float:
        """Share of the visible pairs that attention computes: kept pairs / ``Lq * Lk``, or / the causally
        visible pairs with ``causal`` (the share of the work of dense, causal attention). Averaged over
        batch and heads; exact at token level. :meth:`pair_fraction` divides by ``Lq * Lk`` always."""
        b, h = max(self.counts.shape[0], self.predicate_batch), self.counts.shape[1]
        visible = self._visible_pairs(causal) * b * h
        return self.kept_pairs(causal) / visible if visible else 0.0

    def tile_share(self, causal: bool = False) -> float:
        """Kept tiles x tile area / the visible pairs (causally visible with ``causal``; tiles wholly above the
        causal diagonal are not counted, as no kernel computes them), averaged over batch and heads: the share
        of dense attention's work the kernels do, counting every computed tile whole. An upper bound of
        :meth:`density` from the block lists alone (no pair is evaluated: cheap enough for every call)."""
        bm, bn = self.block_size
        visible = self._visible_pairs(causal) * self.counts.shape[0] * self.counts.shape[1]
        if not visible:
            return 0.0
        if not causal:
            return float(self.counts.sum()) * bm * bn / visible
        width = self.indices.shape[-1]
        kept = torch.arange(width, device=self.device) < self.counts[..., None].long()  # [Bm, Hm, NQB, W]
        q_last = torch.clamp((torch.arange(self.counts.shape[-1], device=self.device) + 1) * bm, max=self.q_len) - 1
        seen = self.indices.long() * bn <= (q_last + self.kv_len - self.q_len)[:, None]  # bottom-right causal
        return float((kept & seen).sum()) * bm * bn / visible

    def pair_fraction(self, causal: bool = False) -> float:
        """Kept pairs / all ``Lq * Lk`` pairs (with ``causal``, still over all pairs)."""
        b, h = max(self.counts.shape[0], self.predicate_batch), self.counts.shape[1]
        n = self.q_len * self.kv_len * b * h
        return self.kept_pairs(causal) / n if n else 0.0

    def kv_major(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key-major (transposed) lists for the backward pass, derived once and cached.

        Returns:
            counts int32 ``[Bm, Hm, NKB]`` and sorted query-block indices int32 ``[Bm, Hm, NKB, Wt]``.
        """
        if self._kv_major is None:
            self._kv_major = transpose_lists(self.counts, self.indices, self.num_blocks[1], self.bit_slots)
        return self._kv_major[:2]

    def bit_slots_t(self) -> Optional[torch.Tensor]:
        """The bit slots of the key-major entries, int32 ``[Bm, Hm, NKB, Wt]`` (None without bits)."""
        if not self.has_bits:
            return None
        self.kv_major()
        return self._kv_major[2]

    # ---- checks and printing -----------------------------------------------------------
    def validate(self) -> "BlockSparseMask":
        """Check shapes and index values; raise ``ValueError`` naming what is wrong."""
        n_qb, n_kb = self.num_blocks
        if self.counts.shape[2] != n_qb:
            raise ValueError(f"counts must have {n_qb} query blocks for q_len={self.q_len} and "
                             f"BLOCK_M={self.block_size[0]}, got shape {list(self.counts.shape)}.")
        if tuple(self.indices.shape[:3]) != tuple(self.counts.shape):
            raise ValueError(f"indices must have shape {list(self.counts.shape)} + [W], "
                             f"got {list(self.indices.shape)}.")
        if self.indices.shape[3] < 1:
            raise ValueError(f"indices must have a list width W >= 1, got shape {list(self.indices.shape)}.")
        for name in _PRED_TENSORS:
            x = getattr(self, name)
            if x is not None and x.device != self.counts.device:
                raise ValueError(f"{name} and counts must be on one device, got {x.device} and {self.counts.device}.")
        if self.indices.device != self.counts.device:
            raise ValueError(f"indices and counts must be on one device, got {self.indices.device} "
                             f"and {self.counts.device}.")
        self._validate_predicates()
        width = self.indices.shape[3]
        if self.counts.numel() == 0:
            return self
        lo, hi = int(self.counts.min()), int(self.counts.max())
        if lo < 0 or hi > min(width, n_kb):
            raise ValueError(f"counts must lie in [0, min(W={width}, NKB={n_kb})], got values in [{lo}, {hi}].")
        ok = torch.arange(width, device=self.device) < self.counts[..., None]
        bad = ok & ((self.indices < 0) | (self.indices >= n_kb))
        if bool(bad.any()):
            raise ValueError(f"indices must lie in [0, NKB={n_kb}) for kv_len={self.kv_len} and "
                             f"BLOCK_N={self.block_size[1]}, got {int(self.indices[bad][0])}.")
        rising = self.indices[..., 1:] > self.indices[..., :-1]
        if bool((ok[..., 1:] & ~rising).any()):
            raise ValueError("indices must be strictly increasing within each row's first counts entries.")
        if self.has_bits:
            n_slots = self.bit_words.shape[0]
            s = self.bit_slots[ok]
            if s.numel() and (int(s.min()) < -1 or int(s.max()) >= n_slots):
                raise ValueError(f"bit_slots must lie in [-1, {n_slots}) (bit_words has {n_slots} tiles), got "
                                 f"values in [{int(s.min())}, {int(s.max())}].")
        return self

    def _validate_predicates(self):
        bm, bn = self.block_size
        if self.has_bits:
            if tuple(self.bit_slots.shape) != tuple(self.indices.shape):
                raise ValueError(f"bit_slots must have the shape of indices {list(self.indices.shape)}, got "
                                 f"{list(self.bit_slots.shape)}.")
            expected = [bm, words_per_row(bn)]
            if list(self.bit_words.shape[1:]) != expected:
                raise ValueError(f"bit_words must have shape [P, {expected[0]}, {expected[1]}] for block_size "
                                 f"{self.block_size}, got {list(self.bit_words.shape)}.")
        batches = {x.shape[0] for x in (self.q_range, self.kv_range, self.q_segments, self.kv_segments)
                   if x is not None} | {self.counts.shape[0]}
        if len(batches - {1}) > 1:
            raise ValueError(f"the mask's batch dims (counts, ranges, segments) must be 1 or one batch size, got "
                             f"{sorted(batches)}.")
        for name, rng, length in (("q_range", self.q_range, self.q_len), ("kv_range", self.kv_range, self.kv_len)):
            if rng is None:
                continue
            if rng.shape[1] != 2:
                raise ValueError(f"{name} must have shape [B|1, 2] (start, end), got {list(rng.shape)}.")
            if rng.numel() and (int(rng.min()) < 0 or int(rng.max()) > length or bool((rng[:, 0] > rng[:, 1]).any())):
                raise ValueError(f"{name} must hold 0 <= start <= end <= {length}, got {rng.tolist()}.")
        for name, seg, length in (("q_segments", self.q_segments, self.q_len),
                                  ("kv_segments", self.kv_segments, self.kv_len)):
            if seg is not None and seg.shape[1] != length:
                raise ValueError(f"{name} must have shape [B|1, {length}], got {list(seg.shape)}.")

    def _describe_predicates(self) -> str:
        parts = []
        if self.window != (-1, -1):
            parts.append(f"window={self.window}")
        for name in ("q_range", "kv_range"):
            x = getattr(self, name)
            if x is not None:
                parts.append(f"{name}[{x.shape[0]}]")
        if self.q_segments is not None:
            parts.append(f"segments[{self.q_segments.shape[0]}]")
        if self.has_bits:
            parts.append(f"bits={self.bit_words.shape[0]} tiles")
        return ", ".join(parts)

    def __repr__(self) -> str:
        n_qb, n_kb = self.num_blocks
        preds = self._describe_predicates()
        head = (f"BlockSparseMask(batch_heads={self.batch_heads}, seq_lens={self.seq_lens}, "
                f"block_size={self.block_size}, blocks={n_qb}x{n_kb}, width={self.indices.shape[-1]}, "
                f"density={self.density():.3f}{', ' + preds if preds else ''}, device={self.device})")
        if self.counts.numel() == 0 or n_qb > _ASCII_LIMIT or n_kb > _ASCII_LIMIT:
            return head
        _, m_of, kb, _, visible, full, (_, _, _, batch, heads) = self._rows(False)
        art = [["."] * n_kb for _ in range(n_qb)]
        for r in range(n_qb):  # batch 0, head 0: '#' full tile, '+' partial tile
            for w in torch.nonzero(visible[r]).flatten().tolist():
                art[r][int(kb[r, w])] = "#" if bool(full[r, w]) else "+"
        lines = "\n".join("  " + "".join(row) for row in art)
        return f"{head}\n[batch 0, head 0: '#' full, '+' partial]\n{lines}"


def _slice_span(start, end, block, length, side):
    """Check a ``[start, end)`` span of a slice: inside ``[0, length]``, ends on tile borders (or at ``length``)."""
    start = check_positive_int(start, f"{side}_start", allow_zero=True)
    end = check_positive_int(end, f"{side}_end", allow_zero=True)
    if not start <= end <= length:
        raise ValueError(f"{side}_start:{side}_end must satisfy 0 <= start <= end <= {length}, got {start}:{end}.")
    for name, x in ((f"{side}_start", start), (f"{side}_end", end)):
        if x % block and x != length:
            raise ValueError(f"{name} must be a multiple of the block size {block} (or the length {length}), "
                             f"got {x}.")
    return start, end


def transpose_lists(counts, indices, n_kb, payload=None):
    """Query-major lists -> key-major lists, vectorized (sort of the kept entries).

    Args:
        counts: int32 ``[Bm, Hm, NQB]``; indices: int32 ``[Bm, Hm, NQB, W]``; n_kb: number of key blocks.
        payload: optional int32 ``[Bm, Hm, NQB, W]`` carried along with each entry (bit slots).

    Returns:
        counts_t int32 ``[Bm, Hm, NKB]`` and indices_t int32 ``[Bm, Hm, NKB, Wt]`` (sorted query blocks),
        plus the payload in key-major order (``-1`` in padding) when one is given.
    """
    bm_, hm_, n_qb, width = indices.shape
    device = indices.device
    ok = torch.arange(width, device=device) < counts[..., None]  # [Bm, Hm, NQB, W]
    q_blk = torch.arange(n_qb, device=device)[:, None].expand(n_qb, width)
    # key k*NQB + q orders entries by key block, then query block; dropped slots sort last
    key = torch.where(ok, indices.long() * n_qb + q_blk, n_kb * n_qb).reshape(bm_, hm_, -1)
    key, order = torch.sort(key, dim=-1)
    counts_t = torch.zeros((bm_, hm_, n_kb + 1), dtype=torch.int64, device=device)
    counts_t.scatter_add_(-1, key // max(n_qb, 1) if n_qb else key, torch.ones_like(key))
    counts_t = counts_t[..., :n_kb]
    width_t = max(1, int(counts_t.max().item()) if counts_t.numel() else 1)
    starts = torch.cumsum(counts_t, -1) - counts_t  # [Bm, Hm, NKB]
    kept = key < n_kb * n_qb
    kb = torch.where(kept, key // max(n_qb, 1), 0)
    rank = torch.arange(key.shape[-1], device=device) - torch.gather(starts, -1, kb)
    pos = torch.where(kept, kb * width_t + rank, n_kb * width_t)
    out = torch.zeros((bm_, hm_, n_kb * width_t + 1), dtype=torch.int32, device=device)
    out.scatter_(-1, pos, (key % max(n_qb, 1)).to(torch.int32))
    indices_t = out[..., :-1].reshape(bm_, hm_, n_kb, width_t)
    if payload is None:
        return counts_t.to(torch.int32).contiguous(), indices_t.contiguous()
    moved = torch.gather(payload.expand(indices.shape).reshape(bm_, hm_, -1).to(torch.int32), -1, order)
    out_p = torch.full((bm_, hm_, n_kb * width_t + 1), -1, dtype=torch.int32, device=device)
    out_p.scatter_(-1, pos, torch.where(kept, moved, -1))
    out_p[..., -1] = -1
    return (counts_t.to(torch.int32).contiguous(), indices_t.contiguous(),
            out_p[..., :-1].reshape(bm_, hm_, n_kb, width_t).contiguous())
