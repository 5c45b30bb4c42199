"""Inputs, masks and the correctness check of one benchmark case.

The check runs before any timing: every implementation's output (and, for
forward+backward, its gradients) is compared on a sample of query rows with
math attention in float64 on the same (rounded) inputs, using the tolerance rule
of the test suite (``max|out - ref| <= factor * max|out_lowp - ref| + floor``,
where ``out_lowp`` is the same math in the input dtype). Sampling rows keeps the
check cheap at 64k tokens while still catching a fast wrong kernel.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..mask import BlockSparseMask
from .sweeps import Case

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}
FWD_FACTOR = {torch.float32: 10.0}  # default 2.0; fp32's baseline is nearly exact
GRAD_FACTOR = 3.0


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def make_qkv(case: Case, device, seed: int = 0):
    """Random q ``[B, H, L, D]`` and k, v ``[B, Hkv, L, D]`` in the case's dtype."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast at 128k tokens
    dtype = dtype_of(case.dtype)
    shape_q = (case.batch, case.heads, case.seq_len, case.head_dim)
    shape_kv = (case.batch, case.n_kv_heads, case.seq_len, case.head_dim)
    return tuple(torch.randn(s, generator=gen, device=device).to(dtype) for s in (shape_q, shape_kv, shape_kv))


def random_block_mask(case: Case, device, seed: int = 0) -> BlockSparseMask:
    """Per head, ``max(1, round(density * NKB))`` random key blocks for every query block.

    With ``causal`` the blocks are drawn among those that the causal predicate can see.
    """
    n_qb = math.ceil(case.seq_len / case.block)
    n_kb = n_qb
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    scores = torch.rand((1, case.heads, n_qb, n_kb), generator=gen).to(device)  # same mask on every device
    if case.causal:
        visible = torch.arange(n_kb, device=device)[None, :] <= torch.arange(n_qb, device=device)[:, None]
        scores = torch.where(visible, scores, -1.0)
        per_row = visible.sum(-1).clamp(min=1)  # [NQB]
    else:
        per_row = torch.full((n_qb,), n_kb, device=device)
    want = torch.clamp(torch.round(case.density * per_row.float()).long(), min=1)  # [NQB]
    rank = scores.argsort(-1, descending=True).argsort(-1)  # rank of each block in its row
    keep = rank < want[None, None, :, None]
    return BlockSparseMask.from_dense(keep, case.block, (case.seq_len, case.seq_len))


def dense_flops(case: Case) -> float:
    """FLOPs of dense attention (4 * B * H * Lq * Lk * D forward; backward counts 2.5x forward)."""
    fwd = 4.0 * case.batch * case.heads * case.seq_len * case.seq_len * case.head_dim
    return fwd * (3.5 if case.mode == "fwdbwd" else 1.0)


@dataclass
class RowSample:
    """Query rows used by the check, their token-level mask, and the reference outputs."""

    rows: torch.Tensor  # [S] query positions
    keep: Optional[torch.Tensor]  # bool [Bm, Hm, S, Lk] or None (dense)


def sample_rows(case: Case, device, n_rows: int, seed: int = 0) -> torch.Tensor:
    """Sorted distinct query positions, always including the first and the last row."""
    n_rows = min(n_rows, case.seq_len)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    rows = torch.randperm(case.seq_len, generator=gen)[: max(n_rows - 2, 0)]
    rows = torch.unique(torch.cat([rows, torch.tensor([0, case.seq_len - 1])]))
    return rows.to(device)


def block_keep_rows(mask: BlockSparseMask, rows: torch.Tensor) -> torch.Tensor:
    """Token-level keep of the sampled rows: bool ``[Bm, Hm, S, Lk]``."""
    blocks = mask.to_block_dense()[:, :, rows // mask.block_size[0]]  # [Bm, Hm, S, NKB]
    return blocks.repeat_interleave(mask.block_size[1], dim=-1)[..., : mask.kv_len]


def token_exact_mask(case: Case, device, seed: int = 0):
    """``(mask, mask_mod)`` of a ``document`` or ``window`` case: the token-exact mask (segments / window
    predicate) and the same predicate as a FlexAttention ``mask_mod`` (causal included)."""
    n, causal = case.seq_len, case.causal
    if case.kind == "document":
        gen = torch.Generator(device="cpu").manual_seed(seed + 3)
        cuts = torch.sort(torch.randperm(n - 1, generator=gen)[: max(case.docs, 1) - 1] + 1).values
        doc = torch.zeros(n, dtype=torch.int32)
        doc[cuts] = 1
        doc = torch.cumsum(doc, 0).to(torch.int32).to(device)
        mask = BlockSparseMask.from_segments(doc[None], doc[None], case.block)

        def mask_mod(b, h, q_idx, kv_idx):
            keep = doc[q_idx] == doc[kv_idx]
            return keep & (kv_idx <= q_idx) if causal else keep
    else:
        left = case.window
        tiles = _band_blocks(n, case.block, left, device)  # the call's causal flag cuts the upper half
        mask = BlockSparseMask.from_dense(tiles, case.block, (n, n)).with_predicates(
            window=(left, -1 if causal else left))

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            return (d <= left) & (d >= 0) if causal else d.abs() <= left
    return mask, mask_mod


def _band_blocks(n, block, left, device):
    """bool ``[1, 1, NB, NB]``: tiles meeting the band ``|i - j| <= left``."""
    nb = -(-n // block)
    first = torch.arange(nb, device=device) * block
    last = torch.clamp(first + block, max=n) - 1
    return ((first[None, :] - last[:, None] <= left) & (first[:, None] - last[None, :] <= left))[None, None]


def token_keep_rows(mask: BlockSparseMask, rows: torch.Tensor) -> torch.Tensor:
    """Token-level keep of the sampled rows of a token-exact mask: bool ``[Bm, Hm, S, Lk]``."""
    return torch.cat([mask.rows_to_dense(int(r), int(r) + 1) for r in rows.tolist()], dim=2)


def partial_tile_share(mask: BlockSparseMask, causal: bool) -> float:
    """Share of the visible kept tiles that are partial (apply predicates in the kernel)."""
    *_, visible, full, _ = mask._rows(causal)
    n = int(visible.sum())
    return (n - int(full.sum())) / n if n else 0.0


def expand_heads(keep: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Broadcast a ``[Bm, Hm, ...]`` mask over query heads (Hm in 1, Hkv, Hq)."""
    hm = keep.shape[1]
    return keep if hm in (1, n_q_heads) else keep.repeat_interleave(n_q_heads // hm, dim=1)


def math_rows(q, k, v, rows, keep, causal, dtype):
    """Math attention of the sampled query rows in ``dtype``: ``[B, Hq, S, D]``; empty rows give 0."""
    group = q.shape[1] // k.shape[1]
    qs = q[:, :, rows].to(dtype)
    ks = k.to(dtype).repeat_interleave(group, 1)
    vs = v.to(dtype).repeat_interleave(group, 1)
    s = (qs @ ks.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, Hq, S, Lk]
    ok = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if keep is not None:
        ok = ok & expand_heads(keep, q.shape[1])
    if causal:
        j = torch.arange(k.shape[2], device=q.device)
        ok = ok & (j[None, :] <= rows[:, None] + (k.shape[2] - q.shape[2]))
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s.float() if dtype == torch.float16 else s, dim=-1).to(dtype).nan_to_num(0.0)
    return p @ vs


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def within_rule(err: float, base: float, dtype, factor: float) -> bool:
    return err == err and err <= factor * base + FLOOR[dtype]  # err == err rejects NaN


# ---- stripe (vertical + slash) problems -------------------------------------------------------
def stripe_indices(case: Case, device, seed: int = 0):
    """Per head: ``verticals`` key columns (column 0, the sink, always) and ``slashes`` diagonal offsets
    (the main diagonal and its nearest neighbours always, the rest spread at random over ``[0, L)``).
    With neither budget set, each is ``density * L / 2``.

    Returns:
        vertical int64 ``[1, H, NV]`` and slash int64 ``[1, H, NS]`` (offset s: key j = i - s), sorted.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 3)
    n = case.seq_len
    nv, ns = min(case.verticals, n), min(case.slashes, n)
    if nv == ns == 0:  # no budget given: split the case's density evenly between columns and diagonals
        nv = ns = max(1, min(n, round(case.density * n / 2)))
    vert, slash = [], []
    for _ in range(case.heads):  # a few heads; the values, not the loop, are the workload
        cols = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=gen)[: nv - 1]])
        local = torch.arange(min(ns, 64))
        far = local.numel() + torch.randperm(max(n - local.numel(), 0), generator=gen)[: ns - local.numel()]
        vert.append(torch.sort(cols[:nv]).values)
        slash.append(torch.sort(torch.cat([local, far])).values)
    return torch.stack(vert)[None].to(device), torch.stack(slash)[None].to(device)


def stripe_tables(vertical, slash, seq_len):
    """bool tables: ``is_vertical[Hm, Lk]`` and ``is_slash[Hm, 2L - 1]`` (offset s at index s + L - 1)."""
    hm = vertical.shape[1]
    is_vert = torch.zeros((hm, seq_len), dtype=torch.bool, device=vertical.device)
    is_vert.scatter_(1, vertical[0], True)
    is_slash = torch.zeros((hm, 2 * seq_len - 1), dtype=torch.bool, device=slash.device)
    is_slash.scatter_(1, slash[0] + seq_len - 1, True)
    return is_vert, is_slash


def stripe_keep_rows(is_vert, is_slash, rows, seq_len):
    """Token-level keep of the sampled rows ``[1, Hm, S, Lk]``: j is a column or i - j is an offset."""
    j = torch.arange(seq_len, device=rows.device)
    offset = rows[:, None] - j[None, :] + seq_len - 1  # [S, Lk]
    return (is_vert[:, None, :] | is_slash[:, offset])[None]


def stripe_cover_mask(is_vert, is_slash, case: Case) -> BlockSparseMask:
    """Smallest block mask that contains the stripe pattern (tiles holding a column or crossed by a slash)."""
    n, bs = case.seq_len, case.block
    nb = math.ceil(n / bs)
    hm = is_vert.shape[0]
    pad = nb * bs - n
    col_any = torch.nn.functional.pad(is_vert, (0, pad)).reshape(hm, nb, bs).any(-1)  # [Hm, NKB]
    csum = torch.nn.functional.pad(torch.cumsum(is_slash.long(), -1), (1, 0))  # [Hm, 2L]
    qb = torch.arange(nb, device=is_vert.device)
    q0, q1 = qb * bs, torch.clamp(qb * bs + bs, max=n) - 1
    k0, k1 = q0, q1
    lo = (q0[:, None] - k1[None, :] + n - 1).clamp(0, 2 * n - 2)  # smallest offset index in the tile
    hi = (q1[:, None] - k0[None, :] + n - 1).clamp(0, 2 * n - 2)
    crossed = (csum[:, hi + 1] - csum[:, lo]) > 0  # [Hm, NQB, NKB]
    keep = crossed | col_any[:, None, :]
    return BlockSparseMask.from_dense(keep[None], bs, (n, n))
