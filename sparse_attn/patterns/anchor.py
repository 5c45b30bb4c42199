"""AnchorAttention (Zhang et al., yuzhouzhang9/Anchor-Attention ``anchor_attn/src/ops/``), lowered to a
:class:`~sparse_attn.stripe_mask.StripeSparseMask` with per-query-block columns.

1. *Anchor*: each query row's exact maximum logit ``m_i = max_j q_i . k_j * scale`` over the sink (the first
   ``sink`` keys) and its local window (natural-log units).
2. *Stripes*: queries are pooled by ``pool`` rows (mean of ``q``, and mean of the rows' anchors, as the
   reference's ``get_q_mask``); a pool group keeps key ``j`` of its scan range iff
   ``mean(q) . k_j * scale + theta * ln 2 >= mean(m)``. The reference works in log2 units (``q`` is scaled by
   ``sm_scale * 1.44269504`` and ``theta = 12`` is added to log2 logits), so ``theta`` is given in log2 units
   here too and converted. A super-block keeps the union of its pool groups' keys.
3. *Mask*: sink (vertical columns) + local window (slashes) + the super-block's keys as block columns of each
   of its query blocks.

Deviations from the reference, on purpose:

* Local window: a band of ``window`` keys per row (slashes), not the whole super-block triangle: at
  ``L = 8k`` causal a dense 2048-row local triangle alone is 25% of the visible pairs.
* Scan range: with causal, pool group ``g`` (rows up to ``i_g``) scans keys ``sink <= j <= i_g + (Lk - Lq) -
  window``, every visible key outside its last row's band, so sink + band + scan covers all the visible
  keys of its rows. The reference scans ``range(BLOCK, start - BLOCK, BLOCK)`` (keys from the end of a
  128-key sink to one block *before* the super-block start), so the 128 keys just before each super-block
  are in neither its local region nor its scan: an off-by-one block we do not copy. Without causal the
  band is centred (``|j - i - (Lk - Lq)| < window``) and every non-sink key is scanned.
* Block columns that fall into a tile crossed by the band (a block-part tile of their query block) are
  dropped by the mask format (only global columns are consulted there): those keys lie within one tile of
  the band, so near-diagonal keys are kept only through the band.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .._checks import check_positive_int
from .base import as_tuple, check_qk, register
from .dynamic import ContentPattern, _check_scale, visible_tiles

# Bound, in elements, of the [B, Hq, rows, keys] score temporaries (processed in chunks).
CHUNK_ELEMS = 1 << 24
LN2 = math.log(2.0)


def _kv_for_q_heads(k, n_q_heads):
    """``k [B, Hkv, Lk, D]`` repeated to the query heads (GQA)."""
    return k if k.shape[1] == n_q_heads else k.repeat_interleave(n_q_heads // k.shape[1], dim=1)


@register("anchor")
@dataclass(frozen=True)
class Anchor(ContentPattern):
    """AnchorAttention: sink + local band + per-super-block key columns whose pooled logit comes within
    ``theta`` (log2 units) of the pooled anchor (see the module docstring for the rule and deviations).

    ``build`` returns a :class:`~sparse_attn.stripe_mask.StripeSparseMask` with ``block_columns``; inside
    unions and per-head mixes the pattern contributes its covering block map.

    Args:
        super_block: query rows sharing one column list (2048 in the paper); a multiple of ``block_size``
            and of ``pool``.
        sink: first keys always kept (vertical columns).
        window: keys of each row's local band (slashes; with causal the keys ``i + shift - window < j <=
            i + shift``, ``shift = Lk - Lq``).
        theta: margin in log2 units (12 in the reference code); ``theta * ln 2`` in logits.
        pool: query rows averaged per pool group (128 in the paper).
        block_size: tile of the mask (query blocks of the column lists).
        scale: logit scale (default ``1/sqrt(D)``).

    Example:
        >>> q, k = torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 1024, 64)
        >>> mask = Anchor(super_block=256, window=128).build(q, k, causal=True)
    """

    mask_kind: ClassVar[str] = "stripe"

    super_block: int = 2048
    sink: int = 64
    window: int = 256
    theta: float = 12.0
    pool: int = 128
    block_size: int = 64
    scale: Optional[float] = None

    def __post_init__(self):
        check_positive_int(self.super_block, "super_block")
        check_positive_int(self.sink, "sink", allow_zero=True)
        check_positive_int(self.window, "window")
        check_positive_int(self.pool, "pool")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not math.isfinite(self.theta):
            raise ValueError(f"theta must be a finite number (log2 units), got {self.theta!r}.")
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        bm, _ = self.block_pair
        if self.super_block % bm or self.super_block % self.pool:
            raise ValueError(f"super_block must be a multiple of the query block size ({bm}) and of pool "
                             f"({self.pool}), got {self.super_block}.")
        _check_scale(self.scale)

    # ---- step 1: anchors ----------------------------------------------------------------
    def _band(self, causal):
        """``(lo, hi)``: row ``i`` sees the band keys ``i + shift + lo <= j <= i + shift + hi``."""
        return (1 - self.window, 0) if causal else (1 - self.window, self.window - 1)

    def anchors(self, q, k, *, causal=False):
        """float32 ``[B, Hq, Lq]``: each row's max logit over the sink and its band (``-inf`` if it sees none)."""
        check_qk(q, k)
        batch, n_heads, q_len, _ = q.shape
        kv_len, scale = k.shape[2], self._scale(q)
        kq = _kv_for_q_heads(k, n_heads)
        shift = kv_len - q_len
        lo, hi = self._band(causal)
        n_sink = min(self.sink, kv_len)
        span = n_sink + 2 * self.window + 256
        rows = max(16, min(256, CHUNK_ELEMS // max(1, batch * n_heads * span)))  # [B, Hq, rows, <= span] scores
        out = []
        for r0 in range(0, q_len, rows):
            r1 = min(q_len, r0 + rows)
            i = torch.arange(r0, r1, device=q.device)[:, None]
            k0, k1 = max(0, r0 + shift + lo), min(kv_len, r1 - 1 + shift + hi + 1)
            keys = torch.cat([torch.arange(n_sink, device=q.device), torch.arange(max(k0, n_sink), max(k1, n_sink),
                                                                                  device=q.device)])
            j = keys[None, :]
            ok = (j < n_sink) | ((j >= i + shift + lo) & (j <= i + shift + hi))
            if causal:
                ok = ok & (j <= i + shift)
            s = torch.einsum("bhmd,bhnd->bhmn", q[:, :, r0:r1].float(), kq[:, :, keys].float()) * scale
            out.append(s.masked_fill(~ok, float("-inf")).amax(-1) if keys.numel() else
                       s.new_full((batch, n_heads, r1 - r0), float("-inf")))
        return torch.cat(out, dim=2)

    # ---- step 2: stripes -----------------------------------------------------------------
    def column_keep(self, q, k, *, causal=False, anchors=None):
        """bool ``[B, Hq, NSB, Lk]``: the keys each super-block keeps (sink and band excluded)."""
        check_qk(q, k)
        batch, n_heads, q_len, head_dim = q.shape
        kv_len, scale = k.shape[2], self._scale(q)
        m = self.anchors(q, k, causal=causal) if anchors is None else anchors
        p = self.pool
        n_g = -(-q_len // p)
        pad = n_g * p - q_len
        rows_ok = torch.nn.functional.pad(torch.ones(q_len, device=q.device), (0, pad)).view(n_g, p)
        fin = torch.isfinite(m)
        m_sum = torch.nn.functional.pad(torch.where(fin, m, 0.0), (0, pad)).view(batch, n_heads, n_g, p).sum(-1)
        m_cnt = torch.nn.functional.pad(fin.float(), (0, pad)).view(batch, n_heads, n_g, p).sum(-1)
        anchor = torch.where(m_cnt > 0, m_sum / m_cnt.clamp(min=1), float("inf"))  # [B, Hq, NG]; inf: no key
        qp = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(batch, n_heads, n_g, p, head_dim).sum(3)
        qp = qp / rows_ok.sum(-1)[:, None]  # [B, Hq, NG, D] mean over the group's rows
        kq = _kv_for_q_heads(k, n_heads).float()
        last = torch.clamp((torch.arange(n_g, device=q.device) + 1) * p, max=q_len) - 1  # [NG] last row
        j = torch.arange(kv_len, device=q.device)
        scan = (j[None, :] >= self.sink)
        if causal:
            scan = scan & (j[None, :] <= (last + (kv_len - q_len) - self.window)[:, None])  # [NG, Lk]
        n_sb = -(-q_len // self.super_block)
        per_sb = self.super_block // p
        keep = torch.zeros((batch, n_heads, n_sb, kv_len), dtype=torch.bool, device=q.device)
        step = max(1, CHUNK_ELEMS // max(1, batch * n_heads * kv_len))
        step = max(per_sb, step // per_sb * per_sb)  # whole super-blocks per chunk
        margin = float(self.theta) * LN2  # log2 units -> logits
        for g0 in range(0, n_g, step):
            g1 = min(n_g, g0 + step)
            s = torch.einsum("bhgd,bhnd->bhgn", qp[:, :, g0:g1], kq) * scale  # [B, Hq, G, Lk]
            sel = (s + margin >= anchor[:, :, g0:g1, None]) & scan[g0:g1]
            sb0 = g0 // per_sb
            n = -(-(g1 - g0) // per_sb)
            sel = torch.nn.functional.pad(sel, (0, 0, 0, n * per_sb - (g1 - g0)))
            keep[:, :, sb0:sb0 + n] = sel.view(batch, n_heads, n, per_sb, kv_len).any(3)
        return keep

    def selection(self, q, k, *, causal=False):
        """``(vertical [1, 1, NV], slash [1, 1, NS], block_columns [B, Hq, NQB, NC])`` int64 (-1 padding)."""
        check_qk(q, k)
        q_len, kv_len = q.shape[2], k.shape[2]
        dev = q.device
        shift = kv_len - q_len
        vertical = torch.arange(min(self.sink, kv_len), device=dev).view(1, 1, -1)
        lo, hi = self._band(causal)
        offs = torch.arange(-shift - hi, -shift - lo + 1, device=dev)  # s = i - j for j - i - shift in [lo, hi]
        offs = offs[(offs > -kv_len) & (offs < q_len)]
        keep = self.column_keep(q, k, causal=causal)  # [B, Hq, NSB, Lk]
        width = max(1, int(keep.sum(-1).max()))
        idx = torch.where(keep, torch.arange(kv_len, device=dev), kv_len)
        cols = torch.sort(idx, dim=-1).values[..., :width]
        cols = torch.where(cols < kv_len, cols, -1)
        bm = self.block_pair[0]
        sb_of = torch.arange(-(-q_len // bm), device=dev) * bm // self.super_block  # [NQB]
        return vertical, offs.view(1, 1, -1), cols.index_select(2, sb_of)

    def build(self, q, k, *, causal=False, layout=None):
        from ..stripe_mask import StripeSparseMask
        vertical, slash, cols = self.selection(q, k, causal=bool(causal))
        return StripeSparseMask.from_vertical_slash(vertical, slash, (q.shape[2], k.shape[2]), self.block_pair,
                                                    block_columns=cols)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        keep = self.build(q, k, causal=causal, layout=layout).covering_block_mask().to_block_dense()
        keep = keep.expand(q.shape[0], q.shape[1], *keep.shape[2:])
        if causal:
            keep = keep & visible_tiles(q.shape[2], k.shape[2], self.block_pair, True, q.device)
        return keep if forced is None else keep | forced
