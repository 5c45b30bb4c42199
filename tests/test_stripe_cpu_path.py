"""The CPU path of ``stripe_attention``: the stripe mask lowered to an exact block mask with bits
(``StripeSparseMask.to_block_mask``) and run on the fused block-sparse CPU path."""

import pytest
import torch

from oracle import check_close, math_attention
from sparse_attn import StripeSparseMask, sparse_attention
from sparse_attn.stripe_ops import stripe_attention
from sparse_attn_kernels.reference_stripe import stripe_sparse_fwd_ref

SHAPES = [  # Hm, Lq, Lk, block_size
    pytest.param(2, 100, 100, 16, id="square-ragged"),
    pytest.param(1, 70, 130, (16, 32), id="lq<lk-rect"),
    pytest.param(3, 96, 64, 32, id="lq>lk"),
]


def _mask(mask_heads, q_len, kv_len, block_size, seed=0, block_columns=False):
    gen = torch.Generator().manual_seed(seed)
    vertical = torch.randint(0, kv_len, (1, mask_heads, 4), generator=gen)
    d0 = q_len - kv_len  # the bottom-right diagonal (key j = i - s)
    band = torch.arange(d0, d0 + 40).expand(1, mask_heads, 40)  # it and 39 below: whole tiles on slashes
    below = torch.randint(d0 + 41, q_len, (1, mask_heads, 2), generator=gen)
    above = torch.randint(1 - kv_len, d0, (1, mask_heads, 1), generator=gen)  # hidden by causality
    slash = torch.cat([above, band, below], dim=-1)
    cols = None
    if block_columns:
        bm = block_size if isinstance(block_size, int) else block_size[0]
        cols = torch.randint(-1, kv_len, (1, mask_heads, -(-q_len // bm), 5), generator=gen)
    vertical = torch.sort(vertical, dim=-1).values
    return StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), block_size, block_columns=cols)


@pytest.mark.parametrize("block_columns", [False, True], ids=["stripes", "block-columns"])
@pytest.mark.parametrize("mask_heads,q_len,kv_len,block_size", SHAPES)
def test_to_block_mask_keeps_exactly_the_same_pairs(mask_heads, q_len, kv_len, block_size, block_columns):
    mask = _mask(mask_heads, q_len, kv_len, block_size, block_columns=block_columns)
    for causal in (False, True):
        block = mask.to_block_mask(causal=causal)
        assert block.block_size == mask.block_size and block.seq_lens == mask.seq_lens
        assert torch.equal(block.to_dense(), mask.to_dense(causal=causal)), causal
        assert block.density(causal=causal) == pytest.approx(mask.density(causal=causal), abs=1e-12)


def test_to_block_mask_of_every_diagonal_is_all_full_tiles():
    """Slashes on every diagonal keep every pair: the lowered mask has no bits to evaluate (the dense case)."""
    n = 128
    mask = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.long),
                                                torch.arange(1 - n, n)[None, None], (n, n), 32)
    block = mask.to_block_mask(causal=True)
    assert block.density(causal=True) == 1.0
    assert block.bit_words is None or block.bit_words.shape[0] <= n // 32  # only the diagonal tiles carry bits


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_heads,q_len,kv_len,block_size", SHAPES)
def test_cpu_path_matches_oracle_and_reference_and_ignores_excluded_keys(mask_heads, q_len, kv_len, block_size,
                                                                         causal):
    torch.manual_seed(1)
    n_q_heads, n_kv_heads = 6, (3 if mask_heads == 3 else 2)
    if mask_heads not in (1, n_kv_heads, n_q_heads):
        n_kv_heads = mask_heads
    mask = _mask(mask_heads, q_len, kv_len, block_size, seed=2)
    q = torch.randn(2, n_q_heads, q_len, 32, requires_grad=True)
    k = torch.randn(2, n_kv_heads, kv_len, 32, requires_grad=True)
    v = torch.randn(2, n_kv_heads, kv_len, 32, requires_grad=True)
    o, lse = stripe_attention(q, k, v, mask, causal=causal, return_lse=True)
    tok = mask.to_dense(causal=causal)
    if tok.shape[1] not in (1, n_q_heads):  # per kv head: repeat over the group
        tok = tok.repeat_interleave(n_q_heads // tok.shape[1], dim=1)
    ref, ref_lse = math_attention(q, k, v, tok, False)
    low, _ = math_attention(q, k, v, tok, False, dtype=torch.float32)
    check_close(o, ref, low, name="o", factor=30.0)
    seen = torch.isfinite(ref_lse)
    assert torch.allclose(lse[seen].double(), ref_lse[seen], atol=1e-4)
    r_o, r_lse = stripe_sparse_fwd_ref(q.detach(), k.detach(), v.detach(), mask.block_counts, mask.block_indices,
                                       mask.block_full, mask.col_counts, mask.col_indices, mask.diag_keep,
                                       mask.col_keep, *mask.block_size, causal, 32 ** -0.5)
    assert torch.allclose(o.detach(), r_o, atol=1e-5) and torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
        check_close(g, r, lg, name=f"d{name}", factor=30.0)
    # keys the first query row that sees any key does not see (in any head): poisoned (NaN keys, Inf values);
    # rows that see none of them are unchanged bit for bit, the others are NaN
    first = int(torch.nonzero(tok.any(dim=(0, 1, 3)))[0])
    poison = ~tok[:, :, first].any(dim=(0, 1))  # [Lk]
    assert bool(poison.any()) and not bool(poison.all())
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, poison], v2[:, :, poison] = float("nan"), float("inf")
    with torch.no_grad():
        o1 = sparse_attention(q, k, v, mask, causal=causal)
        o2 = sparse_attention(q, k2, v2, mask, causal=causal)
    hit = (tok & poison).any(-1).expand(2, n_q_heads, q_len)  # [B, Hq, Lq]
    assert not bool(hit.all())
    assert torch.equal(o2[~hit], o1[~hit])
    assert bool(o2[hit].isnan().all())
