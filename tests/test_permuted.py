"""PermutedMask: validation, to_dense in original order, gather -> kernel -> scatter against the fp64 oracle."""

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, PermutedMask, sparse_attention


def _perms(b, h, n, gen):
    return torch.argsort(torch.rand(b, h, n, generator=gen), dim=-1)


def _inner(b, h, lq, lk, block, gen, density=0.5):
    nq, nk = -(-lq // block), -(-lk // block)
    keep = torch.rand(b, h, nq, nk, generator=gen) < density
    keep[..., 0] = True
    return BlockSparseMask.from_dense(keep, block, (lq, lk))


def test_to_dense_is_inner_in_original_order():
    gen = torch.Generator().manual_seed(0)
    inner = _inner(2, 3, 40, 56, 8, gen)
    pq, pk = _perms(2, 1, 40, gen), _perms(1, 3, 56, gen)
    m = PermutedMask(inner, pq, pk)
    dense, tok = m.to_dense(), inner.to_dense()
    for b in range(2):
        for h in range(3):
            ref = torch.zeros(40, 56, dtype=torch.bool)
            ref[pq[b, 0][:, None], pk[0, h][None, :]] = tok[b, h]
            assert torch.equal(dense[b, h], ref)
    assert m.density() == pytest.approx(dense.float().mean().item())
    assert "PermutedMask" in repr(m)


def test_round_trip_scatter_gather_identity():
    gen = torch.Generator().manual_seed(1)
    pq = _perms(2, 3, 50, gen)
    m = PermutedMask(BlockSparseMask.full(50, 50, 16), pq)
    x = torch.randn(2, 3, 50, 4, generator=gen)
    back = x.take_along_dim(m.perm_q[..., None], 2).take_along_dim(m.inv_q[..., None], 2)
    assert torch.equal(back, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,perm_heads", [(4, 4, 4), (4, 2, 2), (4, 2, 4), (2, 1, 1)])
def test_forward_matches_oracle(dtype, hq, hkv, perm_heads):
    gen = torch.Generator().manual_seed(hq * 10 + hkv + perm_heads)
    b, lq, lk, d = 2, 72, 90, 16
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    inner = _inner(1, hq, lq, lk, 16, gen)
    m = PermutedMask(inner, _perms(b, 1 if perm_heads != hq else hq, lq, gen), _perms(1, perm_heads, lk, gen))
    o, lse = sparse_attention(q, k, v, m, return_lse=True)
    tok = m.to_dense()
    ref, ref_lse = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=dtype)
    check_close(o, ref, low)
    check_lse(lse, ref_lse)


def test_backward_matches_oracle():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = PermutedMask(_inner(1, 2, 64, 64, 16, gen), _perms(1, 2, 64, gen), _perms(1, 1, 64, gen))
    do = torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((sparse_attention(q, k, v, m, backend="torch") * do).sum(), (q, k, v))
    ref = torch.autograd.grad((math_attention(q, k, v, m.to_dense())[0] * do).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_errors():
    inner = BlockSparseMask.full(8, 8, 4)
    ok = torch.arange(8)
    with pytest.raises(TypeError, match="inner_mask"):
        PermutedMask("x", ok)
    with pytest.raises(TypeError, match="perm_q must have dtype torch.int64"):
        PermutedMask(inner, ok.int())
    with pytest.raises(ValueError, match="perm_q must be a permutation"):
        PermutedMask(inner, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="perm_k must have length 8"):
        PermutedMask(inner, ok, torch.arange(7))
    with pytest.raises(ValueError, match="perm_k may be omitted"):
        PermutedMask(BlockSparseMask.full(8, 12, 4), ok)
    m = PermutedMask(inner, ok)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="causal=True is not supported"):
        sparse_attention(q, q, q, m, causal=True)
    with pytest.raises(ValueError, match="seq_lens"):
        sparse_attention(q[:, :, :4], q, q, m)
    with pytest.raises(ValueError, match="perm_q heads"):
        sparse_attention(q, q, q, PermutedMask(inner, torch.arange(8).expand(1, 3, 8).contiguous()))


def test_triton_backend_matches_oracle():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=gen) for _ in range(3))
    m = PermutedMask(_inner(1, 2, 48, 48, 16, gen), _perms(1, 2, 48, gen))
    o = sparse_attention(q, k, v, m, backend="triton")
    tok = m.to_dense()
    check_close(o, math_attention(q, k, v, tok)[0], math_attention(q, k, v, tok, dtype=torch.float32)[0])


def test_attention_quality_accepts_a_permuted_mask():
    from sparse_attn import attention_quality

    q, k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    perm = torch.randperm(96)
    inner = BlockSparseMask.from_dense(torch.rand(1, 2, 3, 3) < 0.6, 32, seq_lens=(96, 96))
    mask = PermutedMask(inner, perm, perm)
    report = attention_quality(q, k, v, mask)
    direct = mask.quality(q, k, v)
    for key in ("recall", "error", "density"):
        assert torch.equal(report[key], direct[key]), key
    assert 0.0 < report["density_mean"] < 1.0
    with pytest.raises(ValueError, match="causal=True is not supported with a PermutedMask"):
        attention_quality(q, k, v, mask, causal=True)
