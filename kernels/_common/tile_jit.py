"""``@triton.jit`` helpers of the in-tile predicates (see ``predicates.py`` for their meaning).

Shared by the block-sparse forward, dQ and dK/dV kernels. Every predicate is behind a
constexpr switch, so a call that does not use it compiles none of its code.
"""

import triton
import triton.language as tl


@triton.jit
def row_bounds(ranges_ptr, b, q_len, kv_len, HAS_RANGE: tl.constexpr):
    """Valid ``[q_start, q_end)``, ``[kv_start, kv_end)`` and the diagonal shift of batch row ``b``.

    ``ranges`` is int32 ``[B, 5]``: q_start, q_end, kv_start, kv_end, shift (built by the launcher).
    """
    if HAS_RANGE:
        base = ranges_ptr + b * 5
        q_start = tl.load(base + 0)
        q_end = tl.minimum(tl.load(base + 1), q_len)
        kv_start = tl.load(base + 2)
        kv_end = tl.minimum(tl.load(base + 3), kv_len)
        shift = tl.load(base + 4)
    else:
        q_start = q_len * 0
        q_end = q_len
        kv_start = kv_len * 0
        kv_end = kv_len
        shift = kv_len - q_len
    return q_start, q_end, kv_start, kv_end, shift


@triton.jit
def list_span(idx_row, count, lo, hi, BLOCK: tl.constexpr):
    """``[first, end)`` of a sorted block list: the entries whose tokens ``[i*BLOCK, i*BLOCK + BLOCK)``
    meet ``[lo, hi]`` (a prefix lies wholly before ``lo``, a suffix wholly after ``hi``)."""
    first = count * 0  # int32 scalar tensors, loop-carried
    end = count * 0
    for c in range(0, count, 128):
        offs = c + tl.arange(0, 128)
        ok = offs < count
        blk = tl.load(idx_row + offs, mask=ok, other=0).to(tl.int64)
        first += tl.sum((ok & (blk * BLOCK + BLOCK - 1 < lo)).to(tl.int32), 0)
        end += tl.sum((ok & (blk * BLOCK <= hi)).to(tl.int32), 0)
    return first, tl.maximum(end, first)


@triton.jit
def tile_keep(q_idx, k_idx, kv_start, kv_end, shift, left, right, q_seg, kv_seg_ptr, words_ptr, slot, row0, col0,
              HAS_BAND: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BITS: tl.constexpr,
              BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """Which pairs of a partial tile are attended: bool, the broadcast shape of ``q_idx`` and ``k_idx``.

    Args:
        q_idx, k_idx: int token positions as 2-D broadcastable blocks (``[M, 1]`` and ``[1, N]`` or
            transposed); q_seg: the queries' segment ids in ``q_idx``'s shape (HAS_SEG).
        slot: the tile's bit slot (``-1``: none); row0, col0: the tile's first query and key.
    """
    keep = (k_idx >= kv_start) & (k_idx < kv_end)
    if HAS_BAND:
        d = k_idx - q_idx - shift
        keep = keep & (d >= -left) & (d <= right)
    if HAS_SEG:
        k_seg = tl.load(kv_seg_ptr + k_idx, mask=(k_idx >= kv_start) & (k_idx < kv_end), other=-1)
        keep = keep & (q_seg == k_seg)
    if HAS_BITS:
        if slot >= 0:
            col = k_idx - col0  # the key's column in its mask block, k_idx's shape
            # the row's WORDS words are loaded in q_idx's shape and selected per column: no per-pair gather
            row_words = words_ptr + slot.to(tl.int64) * (BLOCK_M * WORDS) + (q_idx - row0) * WORDS
            word = tl.zeros_like(keep.to(tl.int32))
            for w in tl.static_range(WORDS):
                word = tl.where(col // 32 == w, tl.load(row_words + w), word)
            keep = keep & (((word >> (col % 32)) & 1) != 0)
    return keep


@triton.jit
def finite_rows(x):
    """int32 ``[N]``: 1 where row ``n`` of ``x [N, D]`` is all finite (``|x| < inf`` is false for NaN)."""
    return tl.min((tl.abs(x.to(tl.float32)) < float("inf")).to(tl.int32), 1)


@triton.jit
def packed_offsets(cu_q_ptr, cu_k_ptr, b, VARLEN: tl.constexpr):
    """First token row of batch row ``b``'s sequence in packed (varlen) q and k; 0 without packing."""
    q_tok = b * 0
    k_tok = b * 0
    if VARLEN:
        q_tok = tl.load(cu_q_ptr + b).to(tl.int64)
        k_tok = tl.load(cu_k_ptr + b).to(tl.int64)
    return q_tok, k_tok


@triton.jit
def visible_span(idx_row, count, lo, hi, first_valid, last_valid, BLOCK: tl.constexpr, ACTIVE: tl.constexpr):
    """``[first, end)`` of the list entries that meet tokens ``[lo, hi]`` (all entries unless ``ACTIVE``);
    empty when the program's own tokens ``[first_valid, last_valid]`` are empty."""
    first = count * 0
    if ACTIVE:
        first, count = list_span(idx_row, count, lo, hi, BLOCK)
        if last_valid < first_valid:
            count = first
    return first, count


@triton.jit
def segment_bounds(segb_ptr, blk, HAS_SEG: tl.constexpr):
    """Smallest and largest segment id of block ``blk`` (from ``[.., NB, 2]`` bounds); zeros without segments."""
    lo = blk * 0
    hi = blk * 0
    if HAS_SEG:
        lo = tl.load(segb_ptr + blk * 2)
        hi = tl.load(segb_ptr + blk * 2 + 1)
    return lo, hi


@triton.jit
def tile_needs_mask(row0, col0, kv_start, kv_end, shift, left, right, q_lo, q_hi, k_lo, k_hi, slot,
                    ROWS: tl.constexpr, COLS: tl.constexpr, HAS_BAND: tl.constexpr, HAS_SEG: tl.constexpr,
                    HAS_BITS: tl.constexpr):
    """Whether the tile of query rows ``[row0, row0 + ROWS)`` and keys ``[col0, col0 + COLS)`` is partial: it
    crosses a key range end, a band edge, a segment boundary, or carries bits."""
    needs = (col0 + COLS > kv_end) | (col0 < kv_start)
    if HAS_BAND:
        needs = needs | (col0 - (row0 + ROWS - 1) - shift < -left) | (col0 + COLS - 1 - row0 - shift > right)
    if HAS_SEG:
        needs = needs | (q_lo != q_hi) | (k_lo != k_hi) | (k_lo != q_lo)
    if HAS_BITS:
        needs = needs | (slot >= 0)
    return needs


@triton.jit
def visible_keys(m0, q_start, q_end, kv_start, kv_end, shift, left, right, BLOCK_M: tl.constexpr,
                 HAS_BAND: tl.constexpr):
    """The valid query rows ``[first_q, last_q]`` of the block starting at ``m0`` and the keys ``[lo, hi]``
    they can see (band: ``-left <= j - (i + shift) <= right``)."""
    first_q = tl.maximum(m0, q_start)
    last_q = tl.minimum(m0 + BLOCK_M, q_end) - 1
    lo = kv_start
    hi = kv_end - 1
    if HAS_BAND:
        lo = tl.maximum(lo, first_q + shift - left)
        hi = tl.minimum(hi, last_q + shift + right)
    return first_q, last_q, lo, hi
