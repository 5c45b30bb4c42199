"""In-tile token predicates: what a *partial* tile applies inside itself, as raw tensors.

A kept tile is either *full* (every pair of it is attended, no in-tile masking) or *partial*.
The kernels and the PyTorch paths decide per tile, from its geometry and the data below,
whether it is partial, and apply these predicates only there:

- **band** ``(left, right)``: query ``i`` sees key ``j`` iff ``-left <= j - (i + shift_b) <= right``
  (``-1`` = unbounded side); ``causal`` is the band ``(-1, 0)``. ``shift_b`` is the bottom-right
  alignment: ``kv_end_b - q_end_b`` when ``q_range`` is given (each batch row's own sequence, as
  ``flash_attn_varlen_func``), else ``Lk - Lq``.
- **ranges** ``q_range``, ``kv_range`` int32 ``[B|1, 2]``: the valid ``[start, end)`` of each batch
  row (padding, left or right). Keys outside are never seen; query rows outside give 0.
- **segments** ``q_segments`` int32 ``[B|1, Lq]``, ``kv_segments`` int32 ``[B|1, Lk]``: document ids;
  ``i`` sees ``j`` iff their ids are equal.
- **bits** ``bit_slots`` int32 ``[Bm, Hm, NQB, W]`` (one per list entry, ``-1`` = no bit mask) and
  ``bit_words`` int32 ``[P, BLOCK_M, ceil(BLOCK_N / 32)]``: bit ``c % 32`` of word ``c // 32`` of
  row ``r`` in slot ``s`` says whether query ``r`` of the tile sees its key ``c``.
  ``bit_slots_t`` ``[Bm, Hm, NKB, Wt]`` is the same per key-major entry (for the dK/dV pass).

Everything here is plain data plus the vectorized PyTorch twins of the in-kernel tests.
"""

import sys
from typing import NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

#: an unbounded band side, as the kernels use it (lengths stay far below 2**30)
UNBOUNDED = 1 << 30


class TokenPredicates(NamedTuple):
    """The optional in-tile predicates of one attention call (see the module docstring)."""

    window: Tuple[int, int] = (-1, -1)
    q_range: Optional[Tensor] = None
    kv_range: Optional[Tensor] = None
    q_segments: Optional[Tensor] = None
    kv_segments: Optional[Tensor] = None
    bit_slots: Optional[Tensor] = None
    bit_words: Optional[Tensor] = None
    bit_slots_t: Optional[Tensor] = None


NO_PREDICATES = TokenPredicates()


def band(causal: bool, window=(-1, -1)) -> Tuple[int, int]:
    """``(left, right)`` of the band that ``causal`` and ``window`` leave (``-1`` = unbounded)."""
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def band_bounds(left: int, right: int) -> Tuple[int, int]:
    """The band as finite ints for the kernels: ``-1`` becomes :data:`UNBOUNDED`."""
    return (UNBOUNDED if left < 0 else left), (UNBOUNDED if right < 0 else right)


def words_per_row(block_n: int) -> int:
    """int32 words holding one tile row of ``block_n`` bits."""
    return -(-block_n // 32)


def pack_bits(keep: Tensor) -> Tensor:
    """bool ``[P, BLOCK_M, BLOCK_N]`` -> int32 words ``[P, BLOCK_M, ceil(BLOCK_N / 32)]`` (bit ``c % 32`` of word
    ``c // 32`` is column ``c``)."""
    p, bm, bn = keep.shape
    n_words = words_per_row(bn)
    x = keep.to(torch.bool)
    if n_words * 32 != bn:
        x = torch.nn.functional.pad(x, (0, n_words * 32 - bn))
    if sys.byteorder == "little":  # bytes of little-endian words: 8 bits per byte, one byte sum each
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=keep.device)
        byte = (x.reshape(p, bm, n_words * 4, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
        return byte.view(torch.int32).contiguous()
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=keep.device),
                                       torch.arange(32, device=keep.device))
    words = (x.to(torch.int64).view(p, bm, n_words, 32) * weights).sum(-1)  # [P, BM, WORDS] in [0, 2**32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as two's-complement int32
    return words.to(torch.int32).contiguous()


_BIT_TABLES = {}


def _bit_table(device) -> Tensor:
    """bool ``[256, 8]``: the 8 bits of every byte value, lowest first."""
    key = str(device)
    if key not in _BIT_TABLES:
        _BIT_TABLES[key] = (((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()).to(device)
    return _BIT_TABLES[key]


def unpack_bits(words: Tensor, block_n: int) -> Tensor:
    """int32 words ``[..., BLOCK_M, WORDS]`` -> bool ``[..., BLOCK_M, BLOCK_N]``."""
    if sys.byteorder == "little" and words.dtype == torch.int32:  # one table lookup per byte
        byte = words.contiguous().view(torch.uint8)  # [..., BM, 4 * WORDS]
        bits = _bit_table(words.device).index_select(0, byte.reshape(-1).int())
        return bits.view(*byte.shape[:-1], -1)[..., :block_n]
    shifts = torch.arange(32, dtype=words.dtype, device=words.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(words[..., None], shifts), 1)  # [..., BM, WORDS, 32]
    return bits.flatten(-2)[..., :block_n].bool()


def block_segment_bounds(segments: Tensor, block: int) -> Tuple[Tensor, Tensor]:
    """Smallest and largest segment id of each block: int32 ``[Bs, NB]`` twice (ragged last block)."""
    n = segments.shape[-1]
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    seg = segments.to(torch.int64)
    # pad values within int32 (pad's value goes through a float)
    lo = torch.nn.functional.pad(seg, (0, pad), value=float(torch.iinfo(torch.int32).max))
    hi = torch.nn.functional.pad(seg, (0, pad), value=float(torch.iinfo(torch.int32).min))
    lo = lo.view(*seg.shape[:-1], n_blocks, block).amin(-1)
    hi = hi.view(*seg.shape[:-1], n_blocks, block).amax(-1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def ranges_of(rng: Optional[Tensor], b_of: Tensor, length: int) -> Tensor:
    """int64 ``[C, 2]``: the valid ``[start, end)`` of the batch rows ``b_of [C]``."""
    if rng is None:
        return torch.tensor([[0, length]], dtype=torch.int64, device=b_of.device).expand(b_of.numel(), 2)
    rng = rng.to(device=b_of.device, dtype=torch.int64)
    return rng[b_of % rng.shape[0]]


def shift_of(preds: TokenPredicates, b_of: Tensor, q_len: int, kv_len: int) -> Tensor:
    """int64 ``[C]``: ``shift_b`` of the bottom-right alignment (module docstring) of the batch rows ``b_of``."""
    if preds.q_range is None:
        return torch.full((b_of.numel(),), kv_len - q_len, dtype=torch.int64, device=b_of.device)
    return ranges_of(preds.kv_range, b_of, kv_len)[:, 1] - ranges_of(preds.q_range, b_of, q_len)[:, 1]


def token_keep(preds: TokenPredicates, left: int, right: int, b_of: Tensor, q_pos: Tensor, k_pos: Tensor,
               q_len: int, kv_len: int) -> Tensor:
    """The closed-form predicates at token level (no tiles, no bits).

    Args:
        preds: the call's predicates; left, right: its band (:func:`band`).
        b_of: int64 ``[C]`` batch row of each work unit.
        q_pos: int64 ``[C, M]`` query positions; k_pos: int64 ``[C, N]`` key positions (may lie past
            the lengths: those pairs are dropped).

    Returns:
        bool ``[C, M, N]``.
    """
    device = q_pos.device
    qr = ranges_of(preds.q_range, b_of, q_len)  # [C, 2]
    kr = ranges_of(preds.kv_range, b_of, kv_len)
    q_ok = (q_pos >= qr[:, :1]) & (q_pos < qr[:, 1:]) & (q_pos < q_len)  # [C, M]
    k_ok = (k_pos >= kr[:, :1]) & (k_pos < kr[:, 1:]) & (k_pos < kv_len)  # [C, N]
    keep = q_ok[:, :, None] & k_ok[:, None, :]
    if left >= 0 or right >= 0:
        shift = shift_of(preds, b_of, q_len, kv_len)  # [C]
        d = k_pos[:, None, :] - q_pos[:, :, None] - shift[:, None, None]  # [C, M, N]
        if left >= 0:
            keep = keep & (d >= -left)
        if right >= 0:
            keep = keep & (d <= right)
    if preds.q_segments is not None:
        qs, ks = preds.q_segments.to(device), preds.kv_segments.to(device)
        qs, ks = qs[b_of % qs.shape[0]], ks[b_of % ks.shape[0]]  # [C, Lq], [C, Lk]
        q_id = torch.gather(qs, 1, q_pos.clamp(0, q_len - 1))
        k_id = torch.gather(ks, 1, k_pos.clamp(0, kv_len - 1))
        keep = keep & (q_id[:, :, None] == k_id[:, None, :])
    return keep


def classify_tiles(preds: TokenPredicates, left: int, right: int, b_of: Tensor, m_of: Tensor, kb: Tensor,
                   slots: Optional[Tensor], block_m: int, block_n: int, q_len: int,
                   kv_len: int) -> Tuple[Tensor, Tensor]:
    """Which list entries can hold a visible pair, and which are *full* (no in-tile masking).

    Args:
        b_of, m_of: int64 ``[R]`` batch row and query block of each row; kb: int64 ``[R, W]`` key blocks.
        slots: int ``[R, W]`` bit slots (``-1`` none) or None.

    Returns:
        ``(visible, full)``, bool ``[R, W]``; ``full`` implies ``visible``. ``visible`` is exact for the
        band and the ranges and conservative for segments and bits (a visible tile may still see nothing).
    """
    device = kb.device
    qr = ranges_of(preds.q_range, b_of, q_len)  # [R, 2]
    kr = ranges_of(preds.kv_range, b_of, kv_len)
    m0 = m_of * block_m
    m1 = torch.clamp(m0 + block_m, max=q_len)  # real rows of the block: [m0, m1)
    q0, q1 = torch.maximum(m0, qr[:, 0]), torch.minimum(m1, qr[:, 1])  # valid rows [q0, q1)   [R]
    n0 = kb * block_n  # [R, W]
    n1 = torch.clamp(n0 + block_n, max=kv_len)
    k0 = torch.maximum(n0, kr[:, :1])
    k1 = torch.minimum(n1, kr[:, 1:])  # valid keys [k0, k1)
    visible = (q1 > q0)[:, None] & (k1 > k0)
    full = ((m0 >= qr[:, 0]) & (m1 <= qr[:, 1]))[:, None] & (n0 >= kr[:, :1]) & (n0 + block_n <= kr[:, 1:]) \
        & (n0 + block_n <= kv_len)
    if left >= 0 or right >= 0:
        shift = shift_of(preds, b_of, q_len, kv_len)[:, None]  # [R, 1]
        d_lo = k0 - (q1[:, None] - 1) - shift  # smallest offset of a valid pair
        d_hi = (k1 - 1) - q0[:, None] - shift
        f_lo = n0 - (m1[:, None] - 1) - shift  # offsets over the whole tile (for "full")
        f_hi = (n0 + block_n - 1) - m0[:, None] - shift
        if left >= 0:
            visible = visible & (d_hi >= -left)
            full = full & (f_lo >= -left)
        if right >= 0:
            visible = visible & (d_lo <= right)
            full = full & (f_hi <= right)
    if preds.q_segments is not None:  # a tile is full only inside one segment on both sides
        q_lo, q_hi = (x.to(device=device, dtype=torch.int64) for x in block_segment_bounds(preds.q_segments, block_m))
        k_lo, k_hi = (x.to(device=device, dtype=torch.int64) for x in block_segment_bounds(preds.kv_segments, block_n))
        bq, bk = b_of % q_lo.shape[0], b_of % k_lo.shape[0]
        ql, qh = q_lo[bq, m_of][:, None], q_hi[bq, m_of][:, None]  # [R, 1]
        kl, kh = k_lo[bk[:, None], kb], k_hi[bk[:, None], kb]  # [R, W]
        visible = visible & (ql <= kh) & (kl <= qh)
        full = full & (ql == qh) & (kl == kh) & (ql == kl)
    if slots is not None:
        full = full & (slots < 0)
    return visible, full & visible


def flat(preds: TokenPredicates) -> tuple:
    """The predicates as custom-op arguments: ``(left, right, q_range, kv_range, q_segments, kv_segments,
    bit_slots, bit_words, bit_slots_t)`` (ints and optional tensors)."""
    return (int(preds.window[0]), int(preds.window[1]), *preds[1:])


def unflat(args) -> TokenPredicates:
    """Inverse of :func:`flat`."""
    left, right, *tensors = args
    return TokenPredicates((left, right), *tensors)


def _gathered_bits(preds: TokenPredicates, slots: Tensor, block_m: int, block_n: int) -> Tuple[Tensor, Tensor]:
    """bool ``[C, BLOCK_M, n * BLOCK_N]``: the bits of the entries ``slots [C, n]`` in gather order (all set
    where ``slot < 0``), unpacked straight into that layout (the words, 32x smaller, are permuted instead);
    and bool ``[C, BLOCK_M]``: the rows with no bit set in any of these tiles."""
    c, n = slots.shape
    n_words = words_per_row(block_n)
    words = preds.bit_words
    if words.shape[0] == 0:
        words = torch.zeros((1, block_m, n_words), dtype=torch.int32, device=slots.device)
    flat = slots.reshape(-1).long()
    w = words[flat.clamp(min=0)].view(c, n, block_m, n_words).permute(0, 2, 1, 3)  # [C, bm, n, WORDS]
    bits = unpack_bits(w, block_n).reshape(c, block_m, n * block_n)
    none = flat < 0
    if bool(none.any()):
        bits = bits | none.view(c, 1, n, 1).expand(c, 1, n, block_n).reshape(c, 1, n * block_n)
    # rows with no bit set in any of their tiles, from the words (32x less data than the bits)
    empty = ~((w != 0).any(-1).any(-1) | none.view(c, n).any(-1, keepdim=True))  # [C, bm]
    return bits, empty


def entries_keep(preds: TokenPredicates, left: int, right: int, b_of: Tensor, m_of: Tensor, kb: Tensor,
                 slots: Optional[Tensor], tok_m: Tensor, block_m: int, block_n: int, q_len: int,
                 kv_len: int, want_empty: bool = False):
    """Token pairs that attention sees in the listed tiles of some work rows.

    Args:
        b_of, m_of: int64 ``[C]`` batch row and query block of each work row.
        kb: int64 ``[C, n]`` key blocks gathered for each row (in order); slots: their bit slots or None.
        tok_m: int64 ``[M]`` row inside the query block of each of the ``M`` query rows (``G * BLOCK_M``
            for GQA-packed rows).

    Returns:
        bool ``[C, M, n * BLOCK_N]`` (keys in gather order); with ``want_empty`` also bool ``[C, M]``: the
        rows that see none of these pairs.
    """
    c = kb.shape[0]
    key_pos = (kb[:, :, None] * block_n + torch.arange(block_n, device=kb.device)).reshape(c, -1)  # [C, n*bn]
    q_pos = m_of[:, None] * block_m + tok_m  # [C, M]
    closed_form = (left >= 0 or right >= 0 or preds.q_range is not None or preds.kv_range is not None
                   or preds.q_segments is not None)
    if slots is None or closed_form:
        keep = token_keep(preds, left, right, b_of, q_pos, key_pos, q_len, kv_len)
    else:  # bits only: just the key length, and only where a tile reaches past it (rows past Lq are discarded)
        keep = (key_pos < kv_len)[:, None, :] if bool((key_pos >= kv_len).any()) else None
    empty = None
    if slots is not None:
        bits, bit_empty = _gathered_bits(preds, slots, block_m, block_n)  # [C, bm, n*bn], [C, bm]
        if tok_m.numel() != block_m or not bool((tok_m == torch.arange(block_m, device=tok_m.device)).all()):
            bits, bit_empty = bits[:, tok_m], bit_empty[:, tok_m]  # GQA-packed rows: one bit row per query row
        if keep is None:
            keep, empty = bits, bit_empty
        else:
            keep = keep & bits
    if want_empty:
        return keep, (~keep.any(-1) if empty is None else empty)
    return keep


def range_table(preds: TokenPredicates, batch: int, q_len: int, kv_len: int, device, cu_seqlens=None):
    """int32 ``[B, 5]`` per batch row: q_start, q_end, kv_start, kv_end, shift (what the kernels read),
    or None when no range applies.

    ``cu_seqlens = (cu_q, cu_k)`` (packed sequences) gives each row ``[0, len)`` and its own shift.
    """
    if cu_seqlens is not None:
        lq = (cu_seqlens[0][1:] - cu_seqlens[0][:-1]).to(device=device, dtype=torch.int64)
        lk = (cu_seqlens[1][1:] - cu_seqlens[1][:-1]).to(device=device, dtype=torch.int64)
        zero = torch.zeros_like(lq)
        return torch.stack([zero, lq, zero, lk, lk - lq], 1).to(torch.int32).contiguous()
    if preds.q_range is None and preds.kv_range is None:
        return None
    rows = torch.arange(batch, device=device)
    qr, kr = ranges_of(preds.q_range, rows, q_len), ranges_of(preds.kv_range, rows, kv_len)
    shift = shift_of(preds, rows, q_len, kv_len)
    return torch.cat([qr, kr, shift[:, None]], 1).to(torch.int32).contiguous()


def segment_tables(preds: TokenPredicates, block_m: int, block_n: int):
    """``(q_seg [Bs, Lq], kv_seg [Bs, Lk], q_bounds [Bs, NQB, 2], kv_bounds [Bs, NKB, 2])`` int32 for the
    kernels (the block bounds say which tiles are wholly inside one segment), or four Nones."""
    if preds.q_segments is None:
        return None, None, None, None
    qs = preds.q_segments.to(torch.int32).contiguous()
    ks = preds.kv_segments.to(torch.int32).contiguous()
    q_b = torch.stack(block_segment_bounds(qs, block_m), -1).contiguous()
    k_b = torch.stack(block_segment_bounds(ks, block_n), -1).contiguous()
    return qs, ks, q_b, k_b
