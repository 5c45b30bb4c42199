"""Sparsifiner (Wei et al., CVPR 2023): a learned low-rank connectivity predictor picks each query token's keys.

Per head, a predictor projects q and k to a small rank ``r`` (learned ``[D, r]`` matrices ``wq``, ``wk``) and
scores every pair with ``scale * (q wq) . (k wk)``; each query token keeps its ``budget`` best-scored keys and
attention runs only on those pairs. The predictor is trained against the dense attention map
(:func:`distill_loss`: KL from the dense softmax to the softmax of the predicted logits) and applied at
inference. Cost of the prediction: ``O(L * D * r)`` for the projections plus ``O(Lq * Lk * r)`` for the scores,
``r / D`` of the dense ``q k^T``.

Untrained, the predictor is a Johnson-Lindenstrauss sketch: ``wq = wk = G / sqrt(r)`` with ``G`` Gaussian, so
``(q wq) . (k wk)`` is an unbiased estimate of ``q . k``; already a reasonable predictor, and the start of
training. Training pays off where q and k have a structure shared across inputs (a model's fixed
``W_q``/``W_k`` coordinates, outlier channels); on isotropic random inputs it can only match the sketch.

Lowering: per-token top-k becomes a token-exact :class:`~sparse_attn.BlockSparseMask` (tiles with any kept
pair, bit masks inside partial tiles), built one band of query blocks at a time so at most
``chunk_elems`` scores exist at once; ``exact=False`` keeps the covering tiles whole instead.

The pattern :class:`Sparsifiner` is a small JSON config, so it does not hold weights. It names them: a
predictor registered in this process (:func:`register_predictor`), or a file written by
:meth:`SparsifinerPredictor.save`; with neither it uses the seeded JL sketch (``seed``).
"""

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .._checks import check_bool, check_positive_int
from ..mask import BlockSparseMask, _as_pair
from ..token_tiles import EVAL_CHUNK_ELEMS, TileAccumulator
from . import _scoring as S
from .base import Pattern, as_tuple, check_qk, drop_padding, register


def _check_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    return value


def _check_scale(scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}.")


def _expand_kv(k, heads):
    """``k [B, Hkv, Lk, D]`` -> ``[B, heads, Lk, D]`` (GQA groups repeated; a view when ``Hkv == heads``)."""
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


class SparsifinerPredictor(nn.Module):
    """Low-rank connectivity predictor: ``logits = scale * (q wq) (k wk)^T`` per head.

    Args:
        heads: query heads ``Hq`` (keys with fewer heads are repeated per GQA group).
        head_dim: ``D``.
        rank: ``r``, the width of the projections (``r << D`` makes prediction cheap).
        seed: seed of the JL initialisation ``wq = wk = G / sqrt(r)``.

    Attributes:
        wq, wk: ``nn.Parameter`` float32 ``[heads, D, r]``.

    Example:
        >>> pred = SparsifinerPredictor(heads=2, head_dim=64, rank=16)
        >>> q = k = torch.randn(1, 2, 256, 64)
        >>> pred(q, k).shape, pred.mask(q, k, budget=0.1).density() < 0.2
        (torch.Size([1, 2, 256, 256]), True)
    """

    def __init__(self, heads: int, head_dim: int, rank: int, *, seed: int = 0):
        super().__init__()
        self.heads = check_positive_int(heads, "heads")
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.rank = check_positive_int(rank, "rank")
        self.seed = _check_int(seed, "seed")
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(heads, head_dim, rank, generator=gen) / math.sqrt(rank)  # [H, D, r]
        self.wq = nn.Parameter(g.clone())
        self.wk = nn.Parameter(g.clone())

    # ---- prediction -----------------------------------------------------------------------
    def _check(self, q, k):
        check_qk(q, k)
        if q.shape[1] != self.heads or q.shape[3] != self.head_dim:
            raise ValueError(f"q must have {self.heads} heads and head dim {self.head_dim} (the predictor's), "
                             f"got shape {list(q.shape)}.")

    def project(self, q, k) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(q wq [B, H, Lq, r], k wk [B, H, Lk, r])`` of ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``."""
        self._check(q, k)
        wq, wk = self.wq.to(q.device), self.wk.to(q.device)
        ql = torch.matmul(q.float(), wq)  # [B, H, Lq, D] @ [H, D, r] -> [B, H, Lq, r]
        kl = torch.matmul(_expand_kv(k, self.heads).float(), wk)  # [B, H, Lk, r]
        return ql, kl

    def forward(self, q, k) -> torch.Tensor:
        """float32 logits ``[B, H, Lq, Lk]`` (dense-score units: ``scale = D**-0.5``).

        Materializes all ``Lq * Lk`` logits per head: meant for training at vision lengths (<= 4096 tokens;
        pass a subset of query rows beyond that, see :func:`train_predictor`). :meth:`mask` never holds
        more than one band of rows.
        """
        ql, kl = self.project(q, k)
        return torch.matmul(ql, kl.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, H, Lq, Lk]

    @torch.no_grad()
    def mask(self, q, k, budget, *, block_size=64, causal=False, exact=True,
             chunk_elems=EVAL_CHUNK_ELEMS, granularity="token") -> BlockSparseMask:
        """The predicted per-token top-k, lowered to a :class:`~sparse_attn.BlockSparseMask`.

        Args:
            q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
            budget: keys per query: an int (capped at the visible keys), a float fraction in (0, 1] of the
                visible keys (``ceil(f * visible)``), or a per-head sequence of either.
            block_size: tile size of the mask.
            causal: only keys ``j <= i + Lk - Lq`` compete (fractions count the visible keys).
            exact: token-exact mask (bit masks in partial tiles); False keeps every covering tile whole.
            chunk_elems: at most this many scores are computed at once (bands of query blocks).
            granularity: ``"token"`` (each query's top-k keys) or ``"tile"``: each query block keeps the
                ``ceil(budget / BLOCK_N)`` key tiles (a fraction: that share of its visible tiles) holding the
                most predicted attention mass (the softmax of the predicted logits, summed over the tile), whole
                tiles that the block kernels skip the rest of; ``exact`` applies to ``"token"`` only.

        Returns:
            BlockSparseMask with batch ``B`` and heads ``H``. Under :func:`sparse_attn.patterns.padding`
            padded keys are never chosen and padded queries keep nothing.
        """
        budget = S.check_budget(as_tuple(budget), "budget")
        bm, bn = _as_pair(block_size)
        check_bool(causal, "causal")
        check_bool(exact, "exact")
        check_positive_int(chunk_elems, "chunk_elems")
        _check_granularity(granularity)
        ql, kl = self.project(q, k)
        if granularity == "tile":
            return _lower_tiles(ql, kl, budget, (bm, bn), causal, chunk_elems, self.head_dim ** -0.5)
        return _lower_topk(ql, kl, budget, (bm, bn), causal, exact, chunk_elems)


def _lower_topk(ql, kl, budget, block_size, causal, exact, chunk_elems):
    """Per-row top-``budget`` of ``ql kl^T`` as a mask, one band of query blocks at a time."""
    batch, heads, q_len, _ = ql.shape
    kv_len, device = kl.shape[2], ql.device
    bm, bn = block_size
    n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
    shift = kv_len - q_len
    rows = torch.arange(q_len, device=device)
    visible = (rows + shift + 1).clamp(0, kv_len) if causal else torch.full_like(rows, kv_len)  # [Lq]
    per_row = torch.minimum(S.budget_tensor(budget, heads, visible, "budget", device), visible)  # [H, Lq]
    pad = S._PADDING.get()
    cols = torch.arange(kv_len, device=device)
    acc = TileAccumulator((batch, heads), (n_qb, n_kb), (bm, bn), device)
    tiles = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.bool, device=device)
    band = max(1, chunk_elems // max(1, batch * heads * bm * kv_len))  # query blocks per band
    for qb0 in range(0, n_qb, band):
        r0, r1 = qb0 * bm, min(q_len, (qb0 + band) * bm)
        scores = torch.matmul(ql[:, :, r0:r1], kl.transpose(-1, -2))  # [B, H, R, Lk]
        if causal:
            scores = scores.masked_fill(cols[None, :] > rows[r0:r1, None] + shift, float("-inf"))
        if pad is not None:
            scores = _mask_padding(scores, pad, rows[r0:r1], cols)
        kb = per_row[:, r0:r1]  # [H, R]
        top = int(kb.max()) if kb.numel() else 0
        tok = torch.zeros(scores.shape, dtype=torch.bool, device=device)
        if top > 0:
            vals, idx = torch.topk(scores, top, dim=-1)  # [B, H, R, top], best first
            take = (torch.arange(top, device=device) < kb[None, :, :, None]) & torch.isfinite(vals)
            tok.scatter_(-1, idx, take)
        if exact:
            acc.add_rows(qb0, tok)
        else:
            nq = -(-(r1 - r0) // bm)
            t = torch.nn.functional.pad(tok, (0, n_kb * bn - kv_len, 0, nq * bm - (r1 - r0)))
            tiles[:, :, qb0:qb0 + nq] = t.view(batch, heads, nq, bm, n_kb, bn).any(5).any(3)
    if not exact:
        return BlockSparseMask.from_dense(tiles, (bm, bn), (q_len, kv_len))
    counts, indices, slots, words = acc.result()
    return BlockSparseMask(counts, indices, (bm, bn), (q_len, kv_len), bit_slots=slots, bit_words=words,
                           validate=False)


def _check_granularity(value):
    if value not in ("token", "tile"):
        raise ValueError(f"granularity must be 'token' or 'tile', got {value!r}.")


def _lower_tiles(ql, kl, budget, block_size, causal, chunk_elems, scale):
    """Per query block, the tiles of most predicted mass (``softmax(scale ql kl^T)`` summed over the tile)."""
    batch, heads, q_len, _ = ql.shape
    kv_len, device = kl.shape[2], ql.device
    bm, bn = block_size
    n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
    shift = kv_len - q_len
    rows, cols = torch.arange(q_len, device=device), torch.arange(kv_len, device=device)
    q_last = torch.clamp(torch.arange(n_qb, device=device) * bm + bm, max=q_len) - 1  # [NQB]
    k_first = torch.arange(n_kb, device=device) * bn
    vis_tiles = (k_first[None, :] <= q_last[:, None] + shift) if causal else torch.ones(n_qb, n_kb, dtype=torch.bool,
                                                                                         device=device)
    n_vis = vis_tiles.sum(-1)  # [NQB] visible tiles per query block
    per_block = torch.minimum(_tile_budget(budget, heads, n_vis, bn, device), n_vis)  # [H, NQB]
    pad = S._PADDING.get()
    keep = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.bool, device=device)
    band = max(1, chunk_elems // max(1, batch * heads * bm * kv_len))  # query blocks per band
    for qb0 in range(0, n_qb, band):
        r0, r1 = qb0 * bm, min(q_len, (qb0 + band) * bm)
        nq = -(-(r1 - r0) // bm)
        scores = torch.matmul(ql[:, :, r0:r1], kl.transpose(-1, -2)) * scale  # [B, H, R, Lk]
        if causal:
            scores = scores.masked_fill(cols[None, :] > rows[r0:r1, None] + shift, float("-inf"))
        if pad is not None:
            scores = _mask_padding(scores, pad, rows[r0:r1], cols)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows that see nothing: 0
        probs = torch.nn.functional.pad(probs, (0, n_kb * bn - kv_len, 0, nq * bm - (r1 - r0)))
        mass = probs.view(batch, heads, nq, bm, n_kb, bn).sum((3, 5))  # [B, H, nq, NKB]
        mass = mass.masked_fill(~vis_tiles[qb0:qb0 + nq], -1.0)  # never pick a tile no query may see
        kb = per_block[:, qb0:qb0 + nq]  # [H, nq]
        top = int(kb.max()) if kb.numel() else 0
        if top > 0:
            idx = torch.topk(mass, top, dim=-1).indices  # [B, H, nq, top]
            take = torch.arange(top, device=device) < kb[None, :, :, None]
            keep[:, :, qb0:qb0 + nq].scatter_(-1, idx, take)
    return BlockSparseMask.from_dense(keep, (bm, bn), (q_len, kv_len))


def _tile_budget(budget, heads, n_vis, block_n, device):
    """int64 ``[H, NQB]`` tiles per query block: an int budget of keys is ``ceil(keys / BLOCK_N)`` tiles, a
    fraction is that share of the block's visible tiles (at least 1)."""
    values = budget if isinstance(budget, tuple) else (budget,) * heads
    if len(values) != heads:
        raise ValueError(f"budget must have one value per query head ({heads}), got {len(values)}.")
    out = []
    for b in values:
        if isinstance(b, float):
            out.append(torch.clamp(torch.ceil(b * n_vis.double()).long(), min=1))
        else:
            out.append(torch.full_like(n_vis, -(-int(b) // block_n)))
    return torch.stack(out).to(device)


def _mask_padding(scores, pad, rows, cols):
    """``scores [B, H, R, Lk]`` with keys outside ``kv_range`` and rows outside ``q_range`` set to -inf."""
    q_range, kv_range = pad
    if kv_range is not None:
        r = kv_range.to(scores.device, torch.int64)[:, None, None, :]  # [B|1, 1, 1, 2]
        ok = (cols >= r[..., :1]) & (cols < r[..., 1:])  # [B|1, 1, 1, Lk]
        scores = scores.masked_fill(~ok, float("-inf"))
    if q_range is not None:
        r = q_range.to(scores.device, torch.int64)[:, None, None, :]
        ok = (rows[:, None] >= r[..., :1]) & (rows[:, None] < r[..., 1:])  # [B|1, 1, R, 1]
        scores = scores.masked_fill(~ok, float("-inf"))
    return scores


# ---- training -----------------------------------------------------------------------------
def distill_loss(logits, q, k, scale=None, *, causal=False, chunk_rows=1024) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(scale q k^T) || softmax(logits))``: the dense attention (detached) is
    the teacher of the predicted connectivity.

    Args:
        logits: ``[B, H, Lq, Lk]`` predicted logits (e.g. ``predictor(q, k)``).
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``: the inputs whose dense attention is the target.
        scale: softmax scale of the teacher (default ``1/sqrt(D)``).
        causal: teacher and prediction both restricted to ``j <= i + Lk - Lq``.
        chunk_rows: the teacher's probabilities are formed this many query rows at a time.

    Returns:
        float32 scalar tensor, differentiable in ``logits``.

    Example:
        >>> pred = SparsifinerPredictor(2, 32, 8)
        >>> q = k = torch.randn(1, 2, 64, 32)
        >>> distill_loss(pred(q, k), q, k).item() >= 0
        True
    """
    check_qk(q, k)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    expected = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]
    if list(logits.shape) != expected:
        raise ValueError(f"logits must have shape [B, H, Lq, Lk] = {expected}, got {list(logits.shape)}.")
    _check_scale(scale)
    check_bool(causal, "causal")
    check_positive_int(chunk_rows, "chunk_rows")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kx = _expand_kv(k, q.shape[1]).float()
    q_len, kv_len = q.shape[2], k.shape[2]
    total = logits.new_zeros((), dtype=torch.float32)
    for r0 in range(0, q_len, chunk_rows):
        r1 = min(q_len, r0 + chunk_rows)
        with torch.no_grad():
            s = torch.matmul(q[:, :, r0:r1].float(), kx.transpose(-1, -2)) * scale  # [B, H, R, Lk]
        pred = logits[:, :, r0:r1].float()
        if causal:
            hidden = torch.arange(kv_len, device=q.device)[None, :] > \
                torch.arange(r0, r1, device=q.device)[:, None] + (kv_len - q_len)
            s, pred = s.masked_fill(hidden, float("-inf")), pred.masked_fill(hidden, float("-inf"))
        log_p = torch.log_softmax(s, dim=-1)
        p = log_p.exp()
        log_pred = torch.log_softmax(pred, dim=-1)
        term = torch.where(p > 0, p * (log_p - log_pred), torch.zeros_like(p))  # 0 log 0 = 0 on hidden keys
        total = total + term.nan_to_num(0.0).sum()
    return total / (q.shape[0] * q.shape[1] * max(1, q_len))


def train_predictor(predictor, inputs, *, steps=50, lr=1e-2, rows=None, seed=0) -> list:
    """Fit ``predictor`` to the dense attention of ``inputs`` with Adam on :func:`distill_loss`.

    Args:
        predictor: a :class:`SparsifinerPredictor` (updated in place).
        inputs: a sequence of ``(q, k)`` pairs, cycled through (one per step).
        steps, lr: Adam steps and learning rate.
        rows: query rows sampled per step (None: all; set it at long sequences to bound memory).
        seed: seed of the row sampling.

    Returns:
        the loss of every step (floats).

    Example:
        >>> pred = SparsifinerPredictor(2, 32, 8)
        >>> q = k = torch.randn(1, 2, 64, 32)
        >>> losses = train_predictor(pred, [(q, k)], steps=5)
    """
    if not isinstance(predictor, SparsifinerPredictor):
        raise TypeError(f"predictor must be a SparsifinerPredictor, got {type(predictor).__name__}.")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs must hold at least one (q, k) pair, got none.")
    check_positive_int(steps, "steps")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be a positive float, got {lr!r}.")
    if rows is not None:
        check_positive_int(rows, "rows")
    gen = torch.Generator().manual_seed(_check_int(seed, "seed"))
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        q, k = inputs[step % len(inputs)]
        if rows is not None and rows < q.shape[2]:
            pick = torch.randperm(q.shape[2], generator=gen)[:rows].to(q.device)
            q = q[:, :, pick]
        loss = distill_loss(predictor(q, k), q, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ---- predictors by name or file -----------------------------------------------------------
_PREDICTORS = {}
_LOADED = {}


def register_predictor(name: str, predictor: SparsifinerPredictor) -> None:
    """Make ``predictor`` the one :class:`Sparsifiner` patterns with ``predictor=name`` use in this process
    (a later call with the same name replaces it; the instance is used live, so training updates it)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}.")
    if not isinstance(predictor, SparsifinerPredictor):
        raise TypeError(f"predictor must be a SparsifinerPredictor, got {type(predictor).__name__}.")
    _PREDICTORS[name] = predictor


def save_predictor(predictor: SparsifinerPredictor, path) -> None:
    """Write ``predictor`` (config and weights) to ``path``; :func:`load_predictor` reads it back."""
    if not isinstance(predictor, SparsifinerPredictor):
        raise TypeError(f"predictor must be a SparsifinerPredictor, got {type(predictor).__name__}.")
    cfg = {"heads": predictor.heads, "head_dim": predictor.head_dim, "rank": predictor.rank,
           "seed": predictor.seed}
    torch.save({"config": cfg, "state": {k: v.detach().cpu() for k, v in predictor.state_dict().items()}},
               os.fspath(path))


def load_predictor(path) -> SparsifinerPredictor:
    """The predictor saved at ``path`` by :func:`save_predictor` (cached until the file changes)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"weights must name an existing file written by save_predictor, got {path!r}.")
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _LOADED:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        pred = SparsifinerPredictor(**blob["config"])
        pred.load_state_dict(blob["state"])
        _LOADED[key] = pred.eval()
    return _LOADED[key]


@register("sparsifiner")
@dataclass(frozen=True)
class Sparsifiner(Pattern):
    """Per query token, the ``budget`` keys a low-rank predictor scores highest (token-exact by default).

    Args:
        budget: keys per query: int, float fraction in (0, 1] of the visible keys, or one per query head.
        rank: width of the JL sketch used when no trained predictor is named (must match a named one).
        block_size: tile size of the mask.
        seed: seed of the JL sketch.
        predictor: name given to :func:`register_predictor` (this process only), or None.
        weights: path of a file written by :func:`save_predictor`, or None (not both with ``predictor``).
        exact: token-exact mask; False keeps the covering tiles whole (``granularity="token"``).
        granularity: ``"token"`` (per query token, the default) or ``"tile"`` (per query block, the tiles of most
            predicted attention mass: whole tiles, which the block kernels run faster; see
            :meth:`SparsifinerPredictor.mask`).

    With ``causal`` only visible keys compete. The predictor is applied to the query heads (keys repeated
    per GQA group); a named one must have ``Hq`` heads and the inputs' head dim.

    Example:
        >>> mask = Sparsifiner(budget=0.1, rank=16).build(torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64))
    """

    budget: Union[int, float, Tuple] = 0.15
    rank: int = 16
    block_size: int = 64
    seed: int = 0
    predictor: Optional[str] = None
    weights: Optional[str] = None
    exact: bool = True
    granularity: str = "token"

    @property
    def token_exact(self) -> bool:
        return self.exact and self.granularity == "token"

    def __post_init__(self):
        object.__setattr__(self, "budget", S.check_budget(as_tuple(self.budget), "budget"))
        check_positive_int(self.rank, "rank")
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        self.block_pair  # noqa: B018  (validates block_size)
        _check_int(self.seed, "seed")
        for name in ("predictor", "weights"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name} must be a non-empty str or None, got {value!r}.")
        if self.predictor is not None and self.weights is not None:
            raise ValueError(f"predictor and weights are exclusive, got predictor={self.predictor!r} and "
                             f"weights={self.weights!r}.")
        check_bool(self.exact, "exact")
        _check_granularity(self.granularity)

    def get_predictor(self, heads: int, head_dim: int) -> SparsifinerPredictor:
        """The named (registered or saved) predictor, else the seeded JL sketch, for ``heads`` x ``head_dim``."""
        if self.predictor is not None:
            if self.predictor not in _PREDICTORS:
                raise ValueError(f"predictor must be a name given to register_predictor, got "
                                 f"{self.predictor!r}; registered: {sorted(_PREDICTORS)}.")
            pred = _PREDICTORS[self.predictor]
        elif self.weights is not None:
            pred = load_predictor(self.weights)
        else:
            return SparsifinerPredictor(heads, head_dim, self.rank, seed=self.seed)
        if (pred.heads, pred.head_dim, pred.rank) != (heads, head_dim, self.rank):
            raise ValueError(f"the named predictor must have heads={heads}, head_dim={head_dim} and rank={self.rank}"
                             f" (the inputs' and the pattern's), got {(pred.heads, pred.head_dim, pred.rank)}.")
        return pred

    def build(self, q, k, *, causal=False, layout=None):
        """Token-exact top-``budget`` mask (``[B, Hq]``), or its covering tiles with ``exact=False``."""
        check_qk(q, k)
        pred = self.get_predictor(q.shape[1], q.shape[3])
        mask = pred.mask(q, k, self.budget, block_size=self.block_pair, causal=bool(causal), exact=self.exact,
                         granularity=self.granularity)
        if self.token_exact:
            return mask
        keep = drop_padding(mask.to_block_dense(), q, k, self.block_pair)
        return BlockSparseMask.from_dense(keep, self.block_pair, (q.shape[2], k.shape[2]))

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        """bool ``[B, Hq, NQB, NKB]``: the tiles covering the predicted top-k (``| forced``)."""
        check_qk(q, k)
        pred = self.get_predictor(q.shape[1], q.shape[3])
        keep = pred.mask(q, k, self.budget, block_size=self.block_pair, causal=bool(causal),
                         exact=False, granularity=self.granularity).to_block_dense()
        return keep if forced is None else keep | forced.to(torch.bool)
