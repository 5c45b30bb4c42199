"""Hierarchical chunk selection (MoBA / DHSA top-k, VMoBA cumulative threshold), 1-D chunks.

Keys are cut into chunks of ``chunk_size`` tokens (a multiple of BLOCK_N, the last chunk may be
ragged). A chunk is represented by its mean key, length-normalized (DHSA: ``mean * sqrt(len)``, which
only matters for the ragged last chunk); a query block by its mean query. Per query block the chunk
scores ``g = mean(q_blk) . k_chunk`` select chunks:

* ``rule="topk"`` (MoBA/DHSA): the ``k`` best chunks other than the own chunk(s);
* ``rule="threshold"`` (VMoBA, ``tau``): min-max normalize ``g`` over the candidate chunks, then add
  chunks in descending order until their cumulative share of the normalized sum reaches ``tau``
  (the best candidate is always kept; the own chunk is kept outside the ranking).

The own chunk(s) (those holding the query block's diagonal key positions, bottom-right aligned) are
always kept. With ``causal`` only chunks that start at or before the block's last visible key compete,
and the tiles are ANDed with causal visibility. Masks have batch ``B`` and heads ``Hq``.

``video_chunk_select`` (VMoBA 1-D/2-D/3-D): chunks are boxes ``(ft, fh, fw)`` of a video
:class:`~sparse_attn.TokenLayout` (``(ft, H, W)``: temporal chunks; ``(F, fh, fw)``: spatial tiles across
frames; else cubes; edge boxes may be smaller). Tokens are permuted so that every box is contiguous and
the result is a :class:`~sparse_attn.PermutedMask`; text tokens form one chunk placed first, kept by
every query, and text query rows keep every chunk.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple
import torch

from .._checks import check_positive_int
from . import _scoring as S
from ..layout import resolve_layout
from ..mask import BlockSparseMask
from ..permuted import PermutedMask
from .base import Pattern, as_layout, as_tuple, causal_tiles, check_qk, register

_RULES = ("topk", "threshold")


def chunk_means(k, chunk, length_norm=True):
    """float32 ``[B, H, NC, D]``: mean key per chunk of ``chunk`` tokens (times ``sqrt(len)`` if ``length_norm``)."""
    b, h, length, d = k.shape
    n_c = math.ceil(length / chunk)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, n_c * chunk - length))
    sums = kp.view(b, h, n_c, chunk, d).sum(3)
    lens = torch.clamp(length - torch.arange(n_c, device=k.device) * chunk, max=chunk).float()
    means = sums / lens[:, None]
    return means * lens.sqrt()[:, None] if length_norm else means


def chunk_scores(q, k, block_m, chunk, length_norm=True):
    """float32 ``[B, Hq, NQB, NC]``: ``mean(q block) . chunk representation`` (GQA: kv heads repeated)."""
    qp = S.block_mean_pool(q, block_m)  # [B, Hq, NQB, D]
    kc = chunk_means(k, chunk, length_norm)  # [B, Hkv, NC, D]
    kc = kc.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return qp.float() @ kc.transpose(-1, -2)


def own_and_visible(q_len, kv_len, block_m, chunk, causal, device=None):
    """bool ``[NQB, NC]`` own chunks (holding the block's diagonal keys) and chunks a block may select."""
    n_qb, n_c = math.ceil(q_len / block_m), math.ceil(kv_len / chunk)
    shift = kv_len - q_len
    q_first = torch.arange(n_qb, device=device)[:, None] * block_m
    q_last = torch.clamp(q_first + block_m, max=q_len) - 1
    c_first = torch.arange(n_c, device=device)[None, :] * chunk
    c_last = torch.clamp(c_first + chunk, max=kv_len) - 1
    lo = torch.clamp(q_first + shift, min=0)
    hi = torch.clamp(q_last + shift, max=kv_len - 1)
    own = (c_first <= hi) & (c_last >= lo) & (hi >= 0)
    visible = (c_first <= q_last + shift) if causal else torch.ones_like(own)
    return own, visible


def select_chunks(g, own, cand, rule, k, tau):
    """bool like ``g [..., NC]``: own chunks plus the rule's choice among ``cand`` (bool, broadcastable)."""
    cand = cand & ~own & torch.isfinite(g)  # -inf: padding (patterns._scoring.padding)
    if rule == "topk":
        masked = g.masked_fill(~cand, -math.inf)
        n = min(k, g.shape[-1])
        top = torch.topk(masked, n, dim=-1).indices if n else masked[..., :0].long()
        pick = torch.zeros_like(cand.expand(g.shape)).scatter_(-1, top, True)
        return (pick & cand) | own
    big = torch.finfo(g.dtype).max
    lo = g.masked_fill(~cand, big).amin(-1, keepdim=True)
    hi = g.masked_fill(~cand, -big).amax(-1, keepdim=True)
    norm = ((g - lo) / (hi - lo).clamp_min(1e-12)).masked_fill(~cand, 0.0)  # [0, 1] on candidates
    total = norm.sum(-1, keepdim=True)
    vals, order = torch.sort(norm.masked_fill(~cand, -1.0), dim=-1, descending=True)
    vals = vals.clamp_min(0.0)
    before = torch.cumsum(vals, -1) - vals  # share of the strictly better chunks, before normalizing
    keep_sorted = (before < tau * total)
    keep_sorted[..., 0] = True
    pick = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return (pick & cand) | own


@register("chunk_select")
@dataclass(frozen=True)
class ChunkSelect(Pattern):
    """Per query block, key chunks by ``mean(q block) . mean(chunk keys)`` (MoBA / DHSA / VMoBA).

    Args:
        chunk_size: tokens per key chunk (a multiple of the key block size).
        rule: ``"topk"`` (``k`` chunks besides the own chunk) or ``"threshold"`` (VMoBA ``tau``).
        k: chunks per query block for ``"topk"``.
        tau: cumulative share of the min-max-normalized gate for ``"threshold"``.
        length_norm: chunk representation ``mean * sqrt(len)`` (DHSA).
        block_size: tile size (query block = query granularity).

    Example:
        >>> q = k = torch.randn(1, 2, 1024, 64)
        >>> mask = ChunkSelect(chunk_size=128, k=2).build(q, k, causal=True)
    """

    chunk_size: int = 256
    rule: str = "topk"
    k: int = 4
    tau: float = 0.25
    length_norm: bool = True
    block_size: int = 64

    def __post_init__(self):
        check_positive_int(self.chunk_size, "chunk_size")
        check_positive_int(self.k, "k", allow_zero=True)
        bn = self.block_pair[1]
        if self.chunk_size % bn:
            raise ValueError(f"chunk_size must be a multiple of BLOCK_N={bn}, got {self.chunk_size}.")
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be a float in [0, 1], got {self.tau!r}.")
        if not isinstance(self.length_norm, bool):
            raise TypeError(f"length_norm must be a bool, got {type(self.length_norm).__name__}.")

    def chunk_map(self, q, k, *, causal=False):
        """bool ``[B, Hq, NQB, NC]``: the chunks each query block keeps."""
        bm = self.block_pair[0]
        g = chunk_scores(q, k, bm, self.chunk_size, self.length_norm)
        g = S.mask_padding(g, q.shape[2], k.shape[2], bm, self.chunk_size, float("-inf"))  # no budget on padding
        own, visible = own_and_visible(q.shape[2], k.shape[2], bm, self.chunk_size, causal, q.device)
        return select_chunks(g, own, visible, self.rule, self.k, self.tau)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        bm, bn = self.block_pair
        chunks = self.chunk_map(q, k, causal=causal)
        n_kb = math.ceil(k.shape[2] / bn)
        keep = chunks.repeat_interleave(self.chunk_size // bn, dim=-1)[..., :n_kb]
        if causal:
            keep = keep & causal_tiles(q.shape[2], k.shape[2], (bm, bn), q.device)
        return keep if forced is None else keep | forced.to(torch.bool)


def box_chunk_ids(layout, chunk_shape, device=None):
    """int64 ``[L]`` chunk id per token: 0 for text, ``1 + box index`` for video tokens (boxes frame-major)."""
    ft, fh, fw = chunk_shape
    idx = torch.arange(layout.seq_len, device=device)
    t, y, x = layout.coords(idx.clamp(layout.video_start, layout.video_start + layout.video_len - 1))
    n_y, n_x = math.ceil(layout.height / fh), math.ceil(layout.width / fw)
    box = ((t // ft) * n_y + y // fh) * n_x + x // fw
    return torch.where(layout.is_text(idx), 0, box + 1)


def _incidence(ids, block, n_c):
    """float ``[NB, C]``: 1 where block ``nb`` (of the given order) holds a token of chunk ``c``."""
    n_b = math.ceil(ids.shape[0] / block)
    inc = torch.zeros(n_b, n_c, device=ids.device)
    inc[torch.arange(ids.shape[0], device=ids.device) // block, ids] = 1.0
    return inc


@register("video_chunk_select")
@dataclass(frozen=True)
class VideoChunkSelect(Pattern):
    """VMoBA-style chunk selection over 1-D/2-D/3-D boxes of a video layout; returns a PermutedMask.

    Args:
        chunk_shape: box ``(frames, rows, cols)`` per chunk.
        rule, k, tau, length_norm: as :class:`ChunkSelect` (own chunks: those of the query block's tokens).
        block_size: tile size of the inner mask (over the permuted order).
        layout: the video :class:`~sparse_attn.TokenLayout` (or pass ``layout=`` to ``build``).

    Example:
        >>> lay = TokenLayout.video(4, 8, 8, text_len=16)
        >>> q = k = torch.randn(1, 2, lay.seq_len, 32)
        >>> mask = VideoChunkSelect(chunk_shape=(1, 4, 4), k=3, block_size=16).build(q, k, layout=lay)
    """

    mask_kind: ClassVar[str] = "permuted"

    chunk_shape: Tuple = (1, 8, 8)
    rule: str = "threshold"
    k: int = 4
    tau: float = 0.25
    length_norm: bool = True
    block_size: int = 64
    layout: Optional[object] = None

    def __post_init__(self):
        object.__setattr__(self, "chunk_shape", as_tuple(self.chunk_shape))
        object.__setattr__(self, "layout", as_layout(self.layout))
        if not (isinstance(self.chunk_shape, tuple) and len(self.chunk_shape) == 3):
            raise ValueError(f"chunk_shape must be (frames, rows, cols), got {self.chunk_shape!r}.")
        for i, n in enumerate(self.chunk_shape):
            check_positive_int(n, f"chunk_shape[{i}]")
        check_positive_int(self.k, "k", allow_zero=True)
        if self.rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {self.rule!r}.")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be a float in [0, 1], got {self.tau!r}.")
        self.block_pair  # noqa: B018

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        raise NotImplementedError("video_chunk_select produces a PermutedMask; it has no block map of the "
                                  "original order and cannot be combined in Union/PerHead.")

    def _video_layout(self, layout, q, k):
        layout = resolve_layout(layout if layout is not None else self.layout, q.shape[2])
        if not layout.is_video:
            raise ValueError(f"layout must be a video TokenLayout (frames > 0), got {layout}.")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"q and k must have equal lengths for video_chunk_select, got {q.shape[2]} and "
                             f"{k.shape[2]}.")
        return layout

    def chunk_map(self, q, k, *, layout=None):
        """``(chunks bool [B, Hq, NQB, C], ids int64 [L] in the permuted order, perm int64 [L])``."""
        layout = self._video_layout(layout, q, k)
        ids = box_chunk_ids(layout, self.chunk_shape, q.device)
        perm = torch.sort(ids, stable=True).indices
        ids_p = ids[perm]
        n_c = int(ids.max()) + 1
        bm = self.block_pair[0]
        qp = S.block_mean_pool(q[:, :, perm], bm)  # [B, Hq, NQB, D]
        kf = k.float()
        sums = torch.zeros(*k.shape[:2], n_c, k.shape[3], device=k.device).index_add_(2, ids, kf)
        sizes = torch.bincount(ids, minlength=n_c).float()
        kc = sums / sizes.clamp_min(1)[:, None]
        if self.length_norm:
            kc = kc * sizes.sqrt()[:, None]
        kc = kc.repeat_interleave(q.shape[1] // k.shape[1], 1)
        g = qp.float() @ kc.transpose(-1, -2)  # [B, Hq, NQB, C]
        inc_q = _incidence(ids_p, bm, n_c) > 0  # [NQB, C]
        has_text = layout.text_len > 0
        text_col = torch.zeros(n_c, dtype=torch.bool, device=q.device)
        text_col[0] = has_text
        own = inc_q | text_col[None, :]
        cand = (sizes > 0)[None, :] & ~text_col[None, :]
        keep = select_chunks(g, own, cand, self.rule, self.k, self.tau)
        text_rows = inc_q[:, 0] & has_text  # query blocks holding text tokens see everything
        keep = keep | (text_rows[:, None] & (sizes > 0)[None, :])
        return keep, ids_p, perm

    def build(self, q, k, *, causal=False, layout=None) -> PermutedMask:
        check_qk(q, k)
        if causal:
            raise ValueError("video_chunk_select does not support causal=True (video attention is bidirectional).")
        keep, ids_p, perm = self.chunk_map(q, k, layout=layout)
        bm, bn = self.block_pair
        inc_k = _incidence(ids_p, bn, keep.shape[-1])  # [NKB, C]
        tiles = (keep.float() @ inc_k.t()) > 0  # [B, Hq, NQB, NKB]
        inner = BlockSparseMask.from_dense(tiles, (bm, bn), (q.shape[2], k.shape[2]))
        return PermutedMask(inner, perm, perm)
