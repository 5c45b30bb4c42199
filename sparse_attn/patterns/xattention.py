"""XAttention (Xu et al., ICML 2025, mit-han-lab/x-attention): tile importance from antidiagonal sums.

Queries and keys are cut in groups of ``stride`` tokens; the score of query group ``i`` and key group ``j``
is the mean logit along the antidiagonal of their ``stride x stride`` square, ``sum_t q[iS + t] .
k[jS + S - 1 - t] / S``. Every query and every key of a tile takes part once per square, so a key column
(vertical line) or a diagonal (slash) that mean pooling averages away still shows up; the cost is a
``1 / stride`` share of the ``q k^T`` product. A softmax over each query group's key groups, summed per
tile and averaged over the tile's query groups, estimates each tile's share of its query block's attention;
each query block keeps the fewest tiles whose share reaches ``threshold``.

``estimate="lattice"`` (this package's variant, preset ``xattention_lattice``) scores the same antidiagonal
pairs one by one: each query's softmax over its ``1 / stride`` sampled keys, so no logit is averaged before
the exponential (:func:`lattice_mass`).
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import check_positive_int
from .base import as_tuple, register
from .dynamic import ContentPattern, _check_scale, check_group, check_shares, group_mass

CHUNK_ELEMS = 1 << 24  # float32 scores of one chunk of query groups (64 MiB)
LATTICE_CHUNK_ELEMS = 1 << 21  # float32 scores of one chunk of the lattice estimate (8 MiB: stays in cache)


def _pad_rows(x, length):
    """``x [..., L, D]`` with zero rows appended up to ``length`` (no copy when ``L == length``)."""
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


def antidiagonal_scores(q, k, stride, scale):
    """Mean antidiagonal logits ``[B, Hkv, G, NQS, NKS]`` of ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``
    (``G = Hq / Hkv``, ``NQS = ceil(Lq / stride)``): group ``i`` of queries against group ``j`` of keys.
    Lengths that are not multiples of ``stride`` are padded with zero vectors (their pairs score 0)."""
    batch, n_q_heads, q_len, dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_qs, n_ks = -(-q_len // stride), -(-kv_len // stride)
    group = n_q_heads // n_kv_heads
    qs = _pad_rows(q.float(), n_qs * stride).reshape(batch, n_kv_heads, group * n_qs, stride * dim)
    ks = _pad_rows(k.float(), n_ks * stride).reshape(batch, n_kv_heads, n_ks, stride, dim)
    ks = ks.flip(3).reshape(batch, n_kv_heads, n_ks, stride * dim)  # keys of a group in reverse order
    # the query heads of a GQA group as rows of one product: K is never repeated
    s = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale / stride)  # [B, Hkv, G * NQS, NKS]
    return s.view(batch, n_kv_heads, group, n_qs, n_ks)


def lattice_mass(q, k, stride, scale, causal, block_pair):
    """Tile masses ``[B, Hq, NQB, NKB]`` from the antidiagonal lattice of single pairs: query ``i`` is scored
    against the keys ``j`` with ``(i + j) % stride == stride - 1`` only (a ``1 / stride`` share of the pairs,
    every query and every key in it), each query's softmax taken over its sampled keys, summed per tile.

    Unlike the antidiagonal sums, no logit is averaged before the exponential, so a peak keeps its weight.
    The residues ``i % stride`` run as one batched product; query blocks run in chunks of about
    ``LATTICE_CHUNK_ELEMS`` scores (cache-sized), each over the keys its rows can see."""
    bm, bn = block_pair
    st = stride
    batch, n_q_heads, q_len, dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group, shift, dev = n_q_heads // n_kv_heads, kv_len - q_len, q.device
    n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
    rm, rn = bm // st, bn // st
    # residue r pairs query rows S*a + r with key rows S*b + (S - 1 - r): keys grouped by residue, reversed
    kr = _pad_rows(k.float(), n_kb * bn).view(batch, n_kv_heads, n_kb * rn, st, dim).flip(3)
    kr = kr.permute(0, 1, 3, 2, 4).contiguous()  # [B, Hkv, S, NK, D]: once, not in every chunk's product
    qr = (_pad_rows(q.float(), n_qb * bm) * scale).view(batch, n_kv_heads, group, n_qb * rm, st, dim)
    res = torch.arange(st, device=dev)
    key_pos = (st - 1 - res)[:, None] + st * torch.arange(n_kb * rn, device=dev)[None, :]  # [S, NK]
    mass = torch.zeros(batch, n_kv_heads, group, n_qb, n_kb, dtype=torch.float32, device=dev)
    per_block = max(1, batch * n_q_heads * bm * n_kb * rn)
    step = max(1, LATTICE_CHUNK_ELEMS // per_block)
    for b0 in range(0, n_qb, step):
        b1 = min(n_qb, b0 + step)
        a0, n_a = b0 * rm, (b1 - b0) * rm
        kv_hi = kv_len if not causal else max(0, min(kv_len, b1 * bm + shift))  # keys these rows may see
        nkb = -(-kv_hi // bn)
        if nkb == 0:
            continue
        qc = qr[:, :, :, a0:a0 + n_a].permute(0, 1, 4, 2, 3, 5).reshape(batch, n_kv_heads, st, group * n_a, dim)
        s = torch.matmul(qc, kr[:, :, :, :nkb * rn].transpose(-1, -2))  # [B, Hkv, S, G*n_a, nk] (scaled)
        s = s.view(batch, n_kv_heads, st, group, n_a, nkb * rn)
        q_pos = st * (a0 + torch.arange(n_a, device=dev))[None, :] + res[:, None]  # [S, n_a]
        # keys every row of the chunk sees need no mask: only the tiles from the chunk's first diagonal on
        first = 0 if not causal else max(0, min(nkb, (b0 * bm + shift) // bn)) * rn
        kp = key_pos[:, first:nkb * rn]
        hidden = kp[:, None, :] >= kv_len  # [S, 1, nk']: padding keys
        if causal:
            hidden = hidden | (kp[:, None, :] > q_pos[:, :, None] + shift)
        if bool(hidden.any()):
            s[..., first:].masked_fill_(hidden[:, None], float("-inf"))
        # softmax shares per tile without normalizing every score: exp(s - max) in place, pooled per tile,
        # then divided by the row's total (rows that see nothing get 0)
        m = s.amax(-1, keepdim=True)
        s.sub_(torch.where(torch.isinf(m), torch.zeros_like(m), m)).exp_()
        pooled = s.view(batch, n_kv_heads, st, group, n_a, nkb, rn).sum(-1)  # [..., n_a, nkb]
        total = pooled.sum(-1, keepdim=True)
        pooled = pooled / torch.where(total > 0, total, torch.ones_like(total))
        if (b1 * bm) > q_len:  # padding query rows count 0
            pooled.masked_fill_((q_pos >= q_len)[:, None, :, None], 0.0)
        tile = pooled.view(batch, n_kv_heads, st, group, b1 - b0, rm, nkb).sum((2, 5))
        mass[:, :, :, b0:b1, :nkb] = tile.nan_to_num_(0.0)
    return (mass / bm).reshape(batch, n_q_heads, n_qb, n_kb)


ESTIMATES = ("antidiagonal", "lattice")


@register("xattention")
@dataclass(frozen=True)
class XAttention(ContentPattern):
    """Per query block, the fewest tiles whose antidiagonal-estimated attention share reaches ``threshold``.

    Args:
        threshold: share of each query block's estimated attention to keep, in (0, 1], or one per query head
            (XAttention: 0.9).
        stride: tokens per antidiagonal group; must divide the block size (XAttention: 8 or 16).
        estimate: ``"antidiagonal"`` (XAttention: softmax over the mean antidiagonal logits of the groups) or
            ``"lattice"`` (softmax over the single pairs of the antidiagonals: :func:`lattice_mass`).
        block_size: tile size (XAttention: 128).
        scale: logit scale (default ``1/sqrt(D)``).
        group: ``None`` selects per query head; ``"mean"`` once per kv head for its GQA group, by the group's
            mean estimated share (mask heads ``Hkv``: the group shares one K/V gather; a per-head ``threshold``
            then has one entry per kv head).

    With ``causal``, key groups after a query group's own are hidden, and each query block's diagonal and
    sink tiles are always kept (their share counts toward ``threshold``).

    Example:
        >>> mask = XAttention(threshold=0.9, stride=8).build(torch.randn(1, 2, 512, 64),
        ...                                                 torch.randn(1, 2, 512, 64), causal=True)
    """

    threshold: Union[float, Tuple] = 0.9
    stride: int = 8
    estimate: str = "antidiagonal"
    block_size: int = 64
    scale: Optional[float] = None
    group: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "threshold", check_shares(self.threshold, "threshold"))
        check_group(self.group, allowed=(None, "mean"))
        check_positive_int(self.stride, "stride")
        object.__setattr__(self, "block_size", as_tuple(self.block_size))
        bm, bn = self.block_pair
        if bm % self.stride or bn % self.stride:
            raise ValueError(f"stride must divide block_size {(bm, bn)}, got {self.stride}.")
        _check_scale(self.scale)
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {self.estimate!r}.")

    def estimated_mass(self, q, k, causal=False):
        """float32 ``[B, Hq, NQB, NKB]``: estimated share of each query block's attention per tile."""
        if self.estimate == "lattice":
            return lattice_mass(q, k, self.stride, self._scale(q), causal, self.block_pair)
        bm, bn = self.block_pair
        st = self.stride
        batch, n_q_heads, q_len, _ = q.shape
        n_kv_heads, kv_len = k.shape[1], k.shape[2]
        group = n_q_heads // n_kv_heads
        n_qb, n_kb = -(-q_len // bm), -(-kv_len // bn)
        n_qs, n_ks = -(-q_len // st), -(-kv_len // st)
        rm, rn = bm // st, bn // st  # stride groups per tile side
        i = torch.arange(n_qs, device=q.device)[:, None]
        j = torch.arange(n_ks, device=q.device)[None, :]
        hidden = torch.zeros(n_qs, n_ks, dtype=torch.bool, device=q.device)
        if causal:  # key group j holds a key some query of group i sees (bottom-right)
            hidden = j * st > torch.clamp(i * st + st - 1, max=q_len - 1) + (kv_len - q_len)
        mass = torch.zeros(batch, n_kv_heads, group, n_qb, n_kb, dtype=torch.float32, device=q.device)
        rows_per_chunk = max(rm, CHUNK_ELEMS // max(1, batch * n_q_heads * n_ks) // rm * rm)
        scale = self._scale(q)
        for b0 in range(0, n_qb, rows_per_chunk // rm):
            b1 = min(n_qb, b0 + rows_per_chunk // rm)
            t0, t1 = b0 * bm, min(q_len, b1 * bm)
            s = antidiagonal_scores(q[:, :, t0:t1], k, st, scale)  # [B, Hkv, G, n, NKS]
            g0 = b0 * rm
            if causal:
                s.masked_fill_(hidden[g0:g0 + s.shape[3]], float("-inf"))
            prob = torch.softmax(s, dim=-1).nan_to_num_(0.0)
            n = prob.shape[3]
            if n_kb * rn != n_ks or (b1 - b0) * rm != n:  # padded groups count 0
                prob = F.pad(prob, (0, n_kb * rn - n_ks, 0, (b1 - b0) * rm - n))
            cols = prob.view(batch, n_kv_heads, group, (b1 - b0) * rm, n_kb, rn).sum(-1)  # per key block
            mass[:, :, :, b0:b1] = cols.view(batch, n_kv_heads, group, b1 - b0, rm, n_kb).sum(4)
        return (mass / rm).reshape(batch, n_q_heads, n_qb, n_kb)

    def block_map(self, q, k, *, causal=False, layout=None, forced=None):
        mass = group_mass(self.estimated_mass(q, k, causal), k.shape[1], self.group)
        return self._select_share(mass, self.threshold, "threshold", q, k, causal, forced, 0 if causal else 1)


__all__ = ["XAttention", "antidiagonal_scores"]
