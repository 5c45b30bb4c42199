"""Patterns estimated from exact attention statistics: exact block importance (SparseD), LSE-based block
mass with head-adaptive budgets (AdaSpa), and vertical+slash from the last queries (MInference).

None of them materializes ``Lq x Lk``: the first two run ``attention_lse`` (or reuse the LSE of a
dense pass, ``build(..., lse=...)``) then ``block_mass`` ``W = sum_tile exp(s - lse)``; vertical+slash
scores only the last ``last_q`` query rows.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple, Union

import torch

from .._checks import check_positive_int
from ..layout import resolve_layout
from ..mask import BlockSparseMask
from . import _scoring as S
from .base import as_tuple, causal_anchors, check_qk, drop_padding, register, tile_bounds, visible_area
from .dynamic import ContentPattern, _check_scale, visible_tiles


def _fraction(value, name, low=0.0, high=1.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}.")
    return float(value)


def _check_coverage(value):
    if value is not None:
        _fraction(value, "coverage")
        if value == 0:
            raise ValueError("coverage must be in (0, 1] or None, got 0.")


class _MassPattern(ContentPattern):
    def build(self, q, k, *, causal=False, layout=None, lse=None):
        """As :meth:`Pattern.build`; ``lse`` float32 ``[B, Hq, Lq]`` reuses the row LSE of a dense pass
        (same ``causal`` and scale) and skips pass 1."""
        check_qk(q, k)
        keep = self.block_map(q, k, causal=bool(causal), layout=layout, lse=lse)
        return BlockSparseMask.from_dense(drop_padding(keep, q, k, self.block_pair), self.block_pair,
                                          (q.shape[2], k.shape[2]))

    def _covering(self, w, visible, forced, anchors):
        """``coverage`` rule: per query block the fewest tiles (largest exact mass first) whose mass reaches
        ``coverage`` of the block's mass; anchors and forced tiles count toward it."""
        fz, _ = S.with_anchors(forced, anchors, w.shape)
        p = torch.full((w.shape[1],), float(self.coverage), dtype=w.dtype, device=w.device)
        return S.mass_rows(w.masked_fill(~visible, 0.0), p, fz, min_blocks=0)

    def _mass(self, q, k, causal, lse, kv_start=0):
        scale = self._scale(q)
        if lse is None:
            lse = S.attention_lse(q, k, scale, causal, kv_start)
        elif tuple(lse.shape) != tuple(q.shape[:3]):
            raise ValueError(f"lse must have shape {list(q.shape[:3])} ([B, Hq, Lq]), got {list(lse.shape)}.")
        bm, bn = self.block_pair
        return S.block_mass(q, k, lse.to(q.device), bm, bn, scale, causal, kv_start)  # [B, Hq, NQB, NKB]


@register("exact_importance")
@dataclass(frozen=True)
class ExactImportance(_MassPattern):
    """SparseD: block importance = mean attention probability over each tile (exact, from a dense pass);
    each query block keeps its top ``int(NKB * select) + 1`` key blocks.

    With ``causal`` the mean is over the pairs of the tile that causality leaves visible (the diagonal
    tile is not penalized for its hidden half), and each query block's diagonal and sink tiles are always
    kept, counted in its budget.

    A fixed share per query block suits the diffusion LMs SparseD targets; causal LMs mix diffuse and
    peaked heads, which a fixed share serves badly (+12% perplexity on SmolLM2 at 21% density where a
    mass threshold loses 2%): ``coverage`` replaces the share by the exact mass each query block keeps.

    Args:
        select: share of key blocks (0.3 in SparseD; 0.5 with block 32 for short prompts); with ``causal`` the
            share of the key blocks each query block can see.
        coverage: None (the ``select`` rule), or a share of each query block's exact attention mass: keep
            the fewest tiles, largest mass first, that reach it (``select`` is then unused).
        gen_len: with ``gen_len > 0`` the last ``gen_len`` keys (the generation region of a diffusion LM)
            are also selected in isolation: the rule is re-run with the softmax restricted to those keys
            over the blocks they occupy, and the result is ORed in.
        block_size: tile size (128 in SparseD for 4k-64k prompts).

    Example:
        >>> mask = ExactImportance(select=0.3, block_size=32).build(torch.randn(1, 2, 256, 32),
        ...                                                        torch.randn(1, 2, 256, 32))
    """

    select: float = 0.3
    gen_len: int = 0
    coverage: Optional[float] = None
    block_size: int = 128
    scale: Optional[float] = None

    def __post_init__(self):
        _fraction(self.select, "select")
        _check_coverage(self.coverage)
        check_positive_int(self.gen_len, "gen_len", allow_zero=True)
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018
        _check_scale(self.scale)

    def _importance(self, q, k, causal, lse, kv_start):
        """``(importance, visible, mass)``: mean probability per visible pair (-inf elsewhere, and on padding),
        the tiles a query block may select, and the exact mass ``[B, Hq, NQB, NKB]``."""
        q_len, kv_len = q.shape[2], k.shape[2]
        w = S.mask_padding(self._mass(q, k, causal, lse, kv_start), q_len, kv_len, *self.block_pair, 0.0)
        _, _, _, k_last = tile_bounds(q_len, kv_len, self.block_pair, q.device)
        area = visible_area(q_len, kv_len, self.block_pair, causal, q.device, kv_start)  # [NQB, NKB]
        ok = visible_tiles(q_len, kv_len, self.block_pair, causal, q.device) & (k_last >= kv_start)
        imp = (w / area.clamp_min(1.0)).masked_fill(~ok, float("-inf"))
        imp = S.mask_padding(imp, q_len, kv_len, *self.block_pair, float("-inf"))  # no budget on padding
        return imp, ok, w

    def _select(self, imp, ok, w, fz, anchors, n_heads):
        if self.coverage is not None:
            return self._covering(w, ok, fz, anchors)
        return S.topk_anchored(imp, self._budget(ok, n_heads), fz, anchors)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None, lse=None):
        kv_len, n_heads = k.shape[2], q.shape[1]
        imp, ok, w = self._importance(q, k, causal, lse, 0)
        fz = self._forced(forced, imp.shape)
        anchors = causal_anchors(q.shape[2], kv_len, self.block_pair, q.device) if causal else None
        keep = self._select(imp, ok, w, fz, anchors, n_heads)
        if 0 < self.gen_len < kv_len:
            imp_g, ok_g, w_g = self._importance(q, k, causal, None, kv_len - self.gen_len)
            keep = keep | self._select(imp_g, ok_g, w_g, fz, None, n_heads)
        return keep

    def _budget(self, ok, n_heads):
        """``int(n * select) + 1`` per query block, ``n`` = the key blocks it can see (NKB in SparseD)."""
        n = ok.sum(-1)  # [NQB]
        return (torch.floor(n.double() * self.select + 1e-9).long() + 1).expand(n_heads, -1)


@register("lse_mass")
@dataclass(frozen=True)
class LSEMass(_MassPattern):
    """AdaSpa: block mass ``W = sum_tile exp(s - LSE)`` per tile; each query block keeps its top
    ``round((1 - s_h) * NKB)`` blocks (with ``causal``: of the key blocks it can see), with head-adaptive
    sparsity ``s_h``.

    With ``adaptive``: every head starts at ``sparsity``; ``recall_h`` = kept W / total W; with ``n`` heads
    above ``recall_threshold`` (at most half the heads), the ``n`` highest-recall heads get ``high`` and the
    ``n`` lowest get ``low``. Text tokens of a video layout (text <-> video, text <-> text) are always kept
    when ``keep_text``. With ``causal`` each query block's diagonal and sink tiles are always kept, counted
    in its budget. ``coverage`` (a share of each query block's mass, None by default) replaces the budgets:
    each query block keeps the fewest tiles, largest mass first, that reach it (see :class:`ExactImportance`).

    Example:
        >>> mask = LSEMass(sparsity=0.8, block_size=32).build(torch.randn(1, 4, 256, 32), torch.randn(1, 4, 256, 32))
    """

    sparsity: float = 0.8
    high: float = 0.9
    low: float = 0.7
    recall_threshold: float = 0.8
    adaptive: bool = True
    keep_text: bool = True
    coverage: Optional[float] = None
    block_size: int = 64
    scale: Optional[float] = None

    def __post_init__(self):
        for name in ("sparsity", "high", "low", "recall_threshold"):
            _fraction(getattr(self, name), name)
        _check_coverage(self.coverage)
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018
        _check_scale(self.scale)

    @staticmethod
    def _budget(sparsity, visible):
        """``max(1, round((1 - s) * n))`` per query block ``[NQB]``, ``n`` = key blocks it can see."""
        return torch.clamp(torch.round((1.0 - sparsity) * visible.double()), min=1).long()

    def head_sparsity(self, w, keep_fn, visible):
        """float ``[Hq]``: the per-head sparsity AdaSpa assigns from the base selection's recall."""
        n_heads = w.shape[1]
        s = torch.full((n_heads,), float(self.sparsity), device=w.device)
        if not self.adaptive or n_heads < 2:
            return s
        base = keep_fn(self._budget(self.sparsity, visible).expand(n_heads, -1))
        recall = (w * base).sum((0, 2, 3)) / w.sum((0, 2, 3)).clamp_min(1e-30)  # [Hq]
        n = min(int((recall > self.recall_threshold).sum()), n_heads // 2)
        if n:
            order = torch.sort(recall, descending=True, stable=True).indices
            s[order[:n]] = float(self.high)
            s[order[-n:]] = float(self.low)
        return s

    def block_map(self, q, k, *, causal=False, layout=None, forced=None, lse=None):
        q_len, kv_len = q.shape[2], k.shape[2]
        w = self._mass(q, k, causal, lse)
        vis = visible_tiles(q_len, kv_len, self.block_pair, causal, q.device)
        fz = self._forced(forced, w.shape)
        if self.keep_text and layout is not None:
            lay = resolve_layout(layout, q_len)
            if lay.is_video:
                bm, bn = self.block_pair
                text = (lay.text_blocks(bm, w.shape[2], q.device)[:, None]
                        | lay.text_blocks(bn, w.shape[3], q.device)[None, :]) & vis
                fz = text.expand(w.shape) if fz is None else fz | text
        scores = S.mask_padding(w.masked_fill(~vis, float("-inf")), q_len, kv_len, *self.block_pair, float("-inf"))

        anchors = causal_anchors(q_len, kv_len, self.block_pair, q.device) if causal else None
        if self.coverage is not None:
            return self._covering(torch.nan_to_num(scores, neginf=0.0), vis, fz, anchors)

        def keep_fn(budget):
            return S.topk_anchored(scores, budget.long(), fz, anchors)

        visible = vis.sum(-1)  # [NQB]
        s = self.head_sparsity(w, keep_fn, visible)
        return keep_fn(torch.stack([self._budget(float(x), visible) for x in s.tolist()]))


@register("vertical_slash")
@dataclass(frozen=True)
class VerticalSlash(ContentPattern):
    """MInference vertical + slash: from the attention of the last ``last_q`` queries over all keys, keep the
    ``vertical`` key columns with the largest column sums and the ``slash`` diagonals with the largest sums.

    ``build`` returns a :class:`~sparse_attn.stripe_mask.StripeSparseMask`; inside unions and per-head
    mixes the pattern contributes its covering block map (every tile holding a kept pair).

    Args:
        vertical, slash: counts (int), fractions of ``Lk`` (float), or per-head sequences of either.
        last_q: trailing queries used for the estimate (64 in MInference).
        sink: the first ``sink`` keys are always columns; local: the ``local`` diagonals next to the main
            (bottom-right) diagonal are always slashes.

    Example:
        >>> mask = VerticalSlash(vertical=64, slash=128).build(torch.randn(1, 2, 1024, 64),
        ...                                                   torch.randn(1, 2, 1024, 64), causal=True)
    """

    mask_kind: ClassVar[str] = "stripe"

    vertical: Union[int, float, Tuple] = 1000
    slash: Union[int, float, Tuple] = 6096
    last_q: int = 64
    sink: int = 4
    local: int = 64
    block_size: int = 64
    scale: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "vertical", S.check_budget(as_tuple(self.vertical), "vertical"))
        object.__setattr__(self, "slash", S.check_budget(as_tuple(self.slash), "slash"))
        check_positive_int(self.last_q, "last_q")
        check_positive_int(self.sink, "sink", allow_zero=True)
        check_positive_int(self.local, "local", allow_zero=True)
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018
        _check_scale(self.scale)

    @staticmethod
    def _pick(scores, budget):
        """Top ``budget[h]`` finite entries per row of ``[B, H, N]``; unused slots repeat the first pick."""
        n_max = max(1, min(int(budget.max()), scores.shape[-1]))
        vals, idx = torch.topk(scores, n_max, dim=-1)
        ok = (vals > float("-inf")) & (torch.arange(n_max, device=scores.device) < budget.view(1, -1, 1))
        ok[..., 0] = True  # from_vertical_slash needs one entry per row; the best one is always kept
        return torch.where(ok, idx, idx[..., :1])

    def selection(self, q, k, *, causal=False):
        """``(vertical [B, Hq, NV], slash [B, Hq, NS])`` int64: key columns and offsets ``s = i - j``."""
        check_qk(q, k)
        q_len, kv_len, n_heads = q.shape[2], k.shape[2], q.shape[1]
        v_sc, s_sc = S.vertical_slash_scores(q, k, min(self.last_q, q_len), self._scale(q), causal)
        shift = kv_len - q_len
        if self.sink:
            v_sc[..., : self.sink] = float("inf")
        offs = torch.arange(q_len + kv_len - 1, device=q.device) - (kv_len - 1)  # slash offset per index
        if self.local:  # diagonals j = i + shift - t, t in [0, local): offsets -shift + t
            near = (offs >= -shift) & (offs < -shift + self.local)
            s_sc = s_sc.masked_fill(near, float("inf"))
        if causal:
            s_sc = s_sc.masked_fill(offs < -shift, float("-inf"))
            v_sc = v_sc.masked_fill(torch.arange(kv_len, device=q.device) > q_len - 1 + shift, float("-inf"))
        total = torch.tensor([kv_len], device=q.device)
        nv = S.budget_tensor(self.vertical, n_heads, total, "vertical", q.device)[:, 0].clamp(min=1)
        ns = S.budget_tensor(self.slash, n_heads, total, "slash", q.device)[:, 0].clamp(min=1)
        return self._pick(v_sc, nv), self._pick(s_sc, ns) - (kv_len - 1)

    def build(self, q, k, *, causal=False, layout=None):
        from ..stripe_mask import StripeSparseMask
        vertical, slash = self.selection(q, k, causal=bool(causal))
        return StripeSparseMask.from_vertical_slash(vertical, slash, (q.shape[2], k.shape[2]), self.block_pair)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        keep = self.build(q, k, causal=causal, layout=layout).covering_block_mask().to_block_dense()
        if causal:
            keep = keep & visible_tiles(q.shape[2], k.shape[2], self.block_pair, True, q.device)
        return keep if forced is None else keep | forced
