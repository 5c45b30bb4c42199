"""Property tests: random shapes, masks, dtypes, strides and NaN/Inf placements, every backend and mask kind.

Each case draws a problem from a seeded generator, builds a mask of one kind (tiles, tiles with token
predicates, bit-masked tiles, stripes, permuted), fills every key/value that no query sees with NaN or
Inf, and checks against an fp64 token-level oracle on the clean inputs: outputs finite where the oracle is,
exact zeros on empty rows, lse -inf exactly there and close elsewhere, errors within the tolerance rule.

CI runs ``SPARSE_ATTN_PROPERTY_CASES`` cases per backend (default 24, seeded); set it higher for a longer run.
"""

import math
import os

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, PermutedMask, StripeSparseMask, sparse_attention

N_CASES = int(os.environ.get("SPARSE_ATTN_PROPERTY_CASES", "24"))
KINDS = ("tiles", "predicates", "bits", "stripe", "permuted")


def _pick(gen, options):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _draw(seed, backend):
    """One random problem: (q, k, v, mask, causal, dtype, description)."""
    gen = torch.Generator().manual_seed(seed)
    kind = KINDS[seed % len(KINDS)]
    dtype = _pick(gen, [torch.float32, torch.float16] + ([torch.bfloat16, torch.float64] if backend == "torch" else []))
    batch, n_kv = _pick(gen, [1, 2]), _pick(gen, [1, 2])
    n_q = n_kv * _pick(gen, [1, 2, 4])
    q_len, kv_len = _pick(gen, [1, 17, 40, 97]), _pick(gen, [1, 23, 64, 113])
    if kind == "permuted":
        kv_len = q_len
    head_dim = _pick(gen, [16, 40, 64])
    block = (_pick(gen, [16, 32]), _pick(gen, [16, 32]))
    causal = bool(torch.randint(2, (1,), generator=gen)) and kind != "permuted"
    n_qb, n_kb = math.ceil(q_len / block[0]), math.ceil(kv_len / block[1])
    mask_heads = _pick(gen, [1, n_kv, n_q])
    density = _pick(gen, [0.0, 0.3, 0.9, 1.0])
    keep = torch.rand(_pick(gen, [1, batch]), mask_heads, n_qb, n_kb, generator=gen) < density
    if n_qb > 1 and keep.numel():
        keep[..., 0, :] = False  # a row of tiles that sees nothing
    mask = BlockSparseMask.from_dense(keep, block, (q_len, kv_len))
    if kind == "predicates":
        lo = torch.randint(0, max(1, kv_len // 2), (batch,), generator=gen)
        hi = torch.maximum(lo, kv_len - torch.randint(0, max(1, kv_len // 3), (batch,), generator=gen))
        seg_q = torch.sort(torch.randint(0, 3, (1, q_len), generator=gen)).values
        seg_k = torch.sort(torch.randint(0, 3, (1, kv_len), generator=gen)).values
        mask = mask.with_predicates(window=(_pick(gen, [-1, 5, 30]), _pick(gen, [-1, 0, 9])),
                                    kv_range=torch.stack([lo, hi], 1), q_segments=seg_q, kv_segments=seg_k)
    elif kind == "bits":
        tok = torch.rand(keep.shape[0], mask_heads, q_len, kv_len, generator=gen) < 0.5
        mask = BlockSparseMask.from_token_mask(tok & mask.to_dense(), block)
    elif kind == "stripe":
        vert = torch.randint(0, kv_len, (1, mask_heads, 3), generator=gen)
        slash = torch.randint(-(kv_len - 1), max(1, q_len), (1, mask_heads, 4), generator=gen)
        mask = StripeSparseMask.from_vertical_slash(vert, slash, seq_lens=(q_len, kv_len), block_size=block)
    elif kind == "permuted":
        perm = torch.stack([torch.randperm(q_len, generator=gen) for _ in range(n_q)])[None]
        mask = PermutedMask(mask if mask_heads in (1, n_q) else BlockSparseMask.from_dense(
            keep.repeat_interleave(n_q // mask_heads, 1), block, (q_len, kv_len)), perm, perm)
    q = torch.randn(batch, n_q, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv, kv_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_kv, kv_len, head_dim, generator=gen).to(dtype)
    if bool(torch.randint(2, (1,), generator=gen)):  # strided inputs: [B, L, H, D] storage seen as [B, H, L, D]
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    desc = (f"{kind} {dtype} B{batch} H{n_q}/{n_kv} L{q_len}x{kv_len} D{head_dim} block{block} "
            f"mask-heads {mask_heads} density {density} causal {causal}")
    return q, k, v, mask, causal, dtype, desc


def _token_mask(mask, causal, batch, n_q, n_kv):
    tok = mask.to_dense(causal=causal)
    tok = tok.expand(batch, *tok.shape[1:]) if tok.shape[0] == 1 else tok
    if tok.shape[1] not in (1, n_q):
        tok = tok.repeat_interleave(n_q // n_kv, 1)
    return tok


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_problem_matches_the_oracle(seed, backend):
    q, k, v, mask, causal, dtype, desc = _draw(seed + (1000 if backend == "triton" else 0), backend)
    batch, n_q, n_kv = q.shape[0], q.shape[1], k.shape[1]
    tok = _token_mask(mask, causal, batch, n_q, n_kv)  # [B, Hq|1, Lq, Lk]
    ref, ref_lse = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=dtype)
    # poison what no query sees: NaN keys, Inf values
    seen = tok.expand(batch, n_q, *tok.shape[2:]).reshape(batch, n_kv, -1, *tok.shape[2:]).any(2).any(2)
    k2, v2 = k.clone(), v.clone()
    k2[~seen] = float("nan")
    v2[~seen] = float("inf")
    out, lse = sparse_attention(q, k2, v2, mask, causal=causal, return_lse=True, backend=backend)
    empty = torch.isinf(ref_lse)
    assert torch.isfinite(out).all(), f"non-finite output: {desc}"
    assert (out[empty.expand_as(out[..., 0])] == 0).all(), f"empty rows not zero: {desc}"
    check_lse(lse.double(), ref_lse)
    check_close(out, ref, low, name=desc)
