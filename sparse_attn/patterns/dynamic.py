"""Content-based block selection from a pooled estimate: block top-k and block top-p (cumulative mass).

The estimate is ``scale * mean(q block) . mean(k block)`` per tile (Triton ``block_mean_pool`` +
``pooled_block_scores`` on CUDA, their references on CPU): ``O((Lq/bm) * (Lk/bn) * D)`` work,
a small fraction of dense attention. Masks have batch ``B`` and heads ``Hq``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .._checks import check_positive_int
from . import _scoring as S
from .base import Pattern, as_tuple, causal_anchors, causal_tiles, register


class ContentPattern(Pattern):
    """Shared plumbing of the content-based patterns."""

    def _scale(self, q):
        return q.shape[-1] ** -0.5 if self.scale is None else float(self.scale)

    def _forced(self, forced, shape):
        """``forced`` as bool ``shape``; per-query-head tiles forced on a per-kv-head selection are forced for
        the whole GQA group, per-kv-head ones on a per-query-head selection for each head of the group."""
        if forced is None:
            return None
        forced = forced.to(torch.bool)
        h_f, h = forced.shape[1], shape[1]
        if h_f not in (1, h) and h % h_f == 0:
            forced = forced.repeat_interleave(h // h_f, dim=1)
        elif h_f not in (1, h) and h_f % h == 0:
            forced = forced.view(forced.shape[0], h, h_f // h, *forced.shape[2:]).any(2)
        return forced.expand(shape)

    def _select_share(self, mass, shares, name, q, k, causal, forced, min_blocks, max_blocks=None):
        """Per query block the fewest largest-``mass`` tiles reaching the per-head ``shares`` (``name`` in errors);
        with ``causal`` the diagonal and sink tiles are kept and their mass counts."""
        p = torch.tensor(S.per_head(shares, mass.shape[1], name), dtype=mass.dtype, device=q.device)
        anchors = causal_anchors(q.shape[2], k.shape[2], self.block_pair, q.device) if causal else None
        fz, _ = S.with_anchors(self._forced(forced, mass.shape), anchors, mass.shape)
        return S.mass_rows(mass, p, fz, min_blocks, max_blocks)


def check_shares(value, name):
    """A share in (0, 1], or a per-head sequence of such (returned as a tuple); ValueError naming ``name``."""
    value = as_tuple(value)
    for v in (value if isinstance(value, tuple) else (value,)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(f"{name} must be in (0, 1] (or a per-head sequence of such), got {v!r}.")
    return value


def _check_scale(scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}.")


GROUPS = (None, "mean", "softmax")


def group_scores(scores, n_kv_heads, group):
    """One selection per kv head: ``scores [B, Hq, N, M]`` -> ``[B, Hkv, N, M]``, the GQA group's mean score
    (``"mean"``) or its summed softmax shares over the visible tiles (``"softmax"``: every head's ranking
    weighs alike, whatever its logit scale); ``-inf`` stays on hidden tiles. ``group=None``: unchanged."""
    n_q_heads = scores.shape[1]
    if group is None or n_q_heads == n_kv_heads:
        return scores
    b, _, n, m = scores.shape
    g = scores.view(b, n_kv_heads, n_q_heads // n_kv_heads, n, m)
    hidden = torch.isneginf(g[:, :, 0])
    if group == "mean":
        out = g.mean(2)
    else:
        out = torch.softmax(g, dim=-1).nan_to_num(0.0).sum(2)
    return out.masked_fill(hidden, float("-inf"))


def group_mass(mass, n_kv_heads, group):
    """One selection per kv head from shares: ``mass [B, Hq, N, M]`` -> ``[B, Hkv, N, M]``, the GQA group's mean
    share (``group="mean"``; a share again, so a threshold keeps its meaning). ``group=None``: unchanged."""
    n_q_heads = mass.shape[1]
    if group is None or n_q_heads == n_kv_heads:
        return mass
    return mass.view(mass.shape[0], n_kv_heads, n_q_heads // n_kv_heads, *mass.shape[2:]).mean(2)


def check_group(group, allowed=GROUPS):
    """ValueError naming ``group`` unless it is one of ``allowed`` (None: a selection per query head)."""
    if group not in allowed:
        raise ValueError(f"group must be one of {allowed} (None: a selection per query head), got {group!r}.")


def pooled_scores(q, k, block_size, causal, scale):
    """float32 ``[B, Hq, NQB, NKB]`` pooled estimate (``-inf`` on tiles hidden by causality)."""
    bm, bn = block_size
    qp = S.block_mean_pool(q, bm)  # [B, Hq, NQB, D]
    kp = S.block_mean_pool(k, bn)  # [B, Hkv, NKB, D]
    scores = S.pooled_block_scores(qp, kp, scale, q.shape[2], k.shape[2], bm, bn, causal)
    return S.mask_padding(scores, q.shape[2], k.shape[2], bm, bn, float("-inf"))


@register("block_topk")
@dataclass(frozen=True)
class BlockTopK(ContentPattern):
    """Per query block, the ``k`` key blocks with the largest pooled score ``mean(q_blk) . mean(k_blk)``.

    Args:
        k: blocks per query block: an int, a float fraction of the key blocks the query block can see
            (``ceil(k * visible)``; ``visible = NKB`` without causality), or a per-head sequence of either
            (length ``Hq``) for head-specific budgets. With ``causal`` each query block's diagonal and sink
            tiles are always kept and counted in ``k``.
        block_size: tile size.
        scale: score scale (default ``1/sqrt(D)``; it does not change the ranking).
        group: ``None`` selects per query head (mask heads ``Hq``); ``"mean"`` or ``"softmax"`` select once per
            kv head for its GQA group (mask heads ``Hkv``: the group's heads share one K/V gather), ranking
            tiles by the group's mean score or its summed per-head softmax shares (:func:`group_scores`);
            per-head budgets then have one entry per kv head.

    Example:
        >>> mask = BlockTopK(k=(4, 8)).build(torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64))
    """

    k: Union[int, float, Tuple] = 8
    block_size: int = 64
    scale: Optional[float] = None
    group: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "k", S.check_budget(as_tuple(self.k), "k"))
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018
        _check_scale(self.scale)
        check_group(self.group)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        scores = group_scores(pooled_scores(q, k, self.block_pair, causal, self._scale(q)), k.shape[1], self.group)
        visible = visible_tiles(q.shape[2], k.shape[2], self.block_pair, causal, q.device).sum(-1)
        budget = S.budget_tensor(self.k, scores.shape[1], visible, "k", q.device)
        anchors = causal_anchors(q.shape[2], k.shape[2], self.block_pair, q.device) if causal else None
        return S.topk_anchored(scores, budget, self._forced(forced, scores.shape), anchors)


@register("block_topp")
@dataclass(frozen=True)
class BlockTopP(ContentPattern):
    """Per query block, the fewest key blocks whose estimated softmax mass reaches ``p``.

    The estimate pools q and k over sub-blocks of ``estimate_block`` tokens (default: the block size);
    each pooled query row gets a softmax over the pooled keys of ``pooled score / temperature +
    log(keys in the sub-block)``, and a tile's mass is the mean over its query sub-blocks of the sum over its
    key sub-blocks. Sub-blocks smaller than the tile (e.g. 16 for 64-blocks) see tiles that straddle two
    regions, which a single pooled score averages away.

    Args:
        p: mass threshold in (0, 1], or one per query head.
        min_blocks, max_blocks: bounds on the selected blocks per row (forced tiles not counted).
        temperature: divides the pooled scores before the softmax (< 1 sharpens).
        estimate_block: pooling size of the estimate; must divide both block sizes (None: the block size).
        group: ``None`` selects per query head; ``"mean"`` once per kv head for its GQA group, by the group's
            mean estimated mass (mask heads ``Hkv``; a per-head ``p`` then has one entry per kv head).

    With ``causal`` each query block's diagonal and sink tiles are always kept (their mass counts toward ``p``).

    Example:
        >>> mask = BlockTopP(p=0.9, estimate_block=16).build(torch.randn(1, 2, 512, 64),
        ...                                                  torch.randn(1, 2, 512, 64), causal=True)
    """

    p: Union[float, Tuple] = 0.9
    min_blocks: int = 1
    max_blocks: Optional[int] = None
    temperature: float = 1.0
    estimate_block: Optional[int] = None
    block_size: int = 64
    scale: Optional[float] = None
    group: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "p", check_shares(self.p, "p"))
        check_group(self.group, allowed=(None, "mean"))
        check_positive_int(self.min_blocks, "min_blocks", allow_zero=True)
        if self.max_blocks is not None:
            check_positive_int(self.max_blocks, "max_blocks")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive float, got {self.temperature!r}.")
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        bm, bn = self.block_pair
        if self.estimate_block is not None:
            check_positive_int(self.estimate_block, "estimate_block")
            if bm % self.estimate_block or bn % self.estimate_block:
                raise ValueError(f"estimate_block must divide block_size {(bm, bn)}, got {self.estimate_block}.")
        _check_scale(self.scale)

    def estimated_mass(self, q, k, causal=False):
        """float32 ``[B, Hq, NQB, NKB]``: estimated share of each query block's softmax mass per tile."""
        bm, bn = self.block_pair
        sm, sn = (bm, bn) if self.estimate_block is None else (self.estimate_block,) * 2
        q_len, kv_len = q.shape[2], k.shape[2]
        scores = pooled_scores(q, k, (sm, sn), causal, self._scale(q)) / self.temperature  # [B, H, NQs, NKs]
        n_qs, n_ks = scores.shape[2], scores.shape[3]
        n_keys = torch.clamp(kv_len - torch.arange(n_ks, device=q.device) * sn, max=sn)
        prob = torch.softmax(scores + torch.log(n_keys.float()), dim=-1).nan_to_num(0.0)  # rows: hidden -> 0
        rm, rn = bm // sm, bn // sn
        n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
        prob = torch.nn.functional.pad(prob, (0, n_kb * rn - n_ks, 0, n_qb * rm - n_qs))
        tile = prob.reshape(*prob.shape[:2], n_qb, rm, n_kb, rn).sum(5).sum(3)  # [B, H, NQB, NKB]
        rows = torch.clamp(n_qs - torch.arange(n_qb, device=q.device) * rm, max=rm)  # sub-rows per block
        return tile / rows[:, None].to(tile.dtype)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        mass = group_mass(self.estimated_mass(q, k, causal), k.shape[1], self.group)
        return self._select_share(mass, self.p, "p", q, k, causal, forced, self.min_blocks, self.max_blocks)


def visible_tiles(q_len, kv_len, block_size, causal, device):
    """bool ``[NQB, NKB]``: all tiles, or those causality leaves visible."""
    if causal:
        return causal_tiles(q_len, kv_len, block_size, device)
    n_qb = -(-q_len // block_size[0])
    n_kb = -(-kv_len // block_size[1])
    return torch.ones((n_qb, n_kb), dtype=torch.bool, device=device)
