"""The CPU path built on PyTorch's fused CPU attention, called directly (no dispatch)."""

import math

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask
from sparse_attn_kernels.block_sparse.cpu import block_sparse_attn_cpu, block_sparse_fwd_cpu

CASES = [
    pytest.param(torch.float32, 2, 4, 2, 97, 200, 80, (16, 64), 0.5, True, 4, id="gqa-causal-lq<lk"),
    pytest.param(torch.float16, 1, 4, 1, 200, 97, 96, (32, 16), 0.5, True, 1, id="mqa-causal-lq>lk-fp16"),
    pytest.param(torch.bfloat16, 1, 4, 2, 130, 97, 64, (32, 32), 0.5, True, 2, id="bf16-maskheads=hkv"),
    pytest.param(torch.float32, 1, 2, 2, 64, 64, 32, (32, 32), 0.0, False, 2, id="empty-mask"),
    pytest.param(torch.float64, 1, 2, 1, 100, 70, 24, (20, 12), 0.5, True, 1, id="fp64-odd-blocks"),
    pytest.param(torch.float32, 2, 2, 2, 17, 1, 128, (16, 16), 1.0, False, 2, id="lk1"),
]


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 26], ids=["one-row-chunks", "one-chunk"])
@pytest.mark.parametrize("dtype,batch,hq,hkv,q_len,kv_len,head_dim,block,density,causal,mask_heads", CASES)
def test_cpu_path_matches_oracle(dtype, batch, hq, hkv, q_len, kv_len, head_dim, block, density, causal,
                                 mask_heads, chunk_bytes):
    q = torch.randn(batch, hq, q_len, head_dim).to(dtype)
    k, v = torch.randn(batch, hkv, kv_len, head_dim).to(dtype), torch.randn(batch, hkv, kv_len, head_dim).to(dtype)
    keep = torch.rand(1 if mask_heads == 1 else batch, mask_heads, math.ceil(q_len / block[0]),
                      math.ceil(kv_len / block[1])) < density
    mask = BlockSparseMask.from_dense(keep, block, seq_lens=(q_len, kv_len))
    out, lse = block_sparse_fwd_cpu(q, k, v, mask.counts, mask.indices, *block, causal, head_dim ** -0.5,
                                    chunk_bytes=chunk_bytes)
    ref, ref_lse = math_attention(q, k, v, mask.to_dense(), causal)
    check_close(out, ref, math_attention(q, k, v, mask.to_dense(), causal, dtype=dtype)[0])
    check_lse(lse.double(), ref_lse)
    assert (out[torch.isinf(ref_lse)] == 0).all()


@pytest.mark.parametrize("dtype,causal,chunk", [(torch.float64, True, False), (torch.float32, False, False),
                                                  (torch.bfloat16, True, False), (torch.float64, True, True)])
def test_cpu_path_gradients(dtype, causal, chunk, monkeypatch):
    if chunk:  # one row per chunk
        monkeypatch.setattr("sparse_attn_kernels.block_sparse.cpu.CHUNK_BYTES", 1)
    q = torch.randn(1, 4, 90, 32).to(dtype).requires_grad_()
    k = torch.randn(1, 2, 70, 32).to(dtype).requires_grad_()
    v = torch.randn(1, 2, 70, 32).to(dtype).requires_grad_()
    keep = torch.rand(1, 4, 3, 3) < 0.6
    keep[0, 0, 0] = False  # a row that sees nothing
    mask = BlockSparseMask.from_dense(keep, 32, seq_lens=(90, 70))
    out, _ = block_sparse_attn_cpu(q, k, v, mask.counts, mask.indices, 32, 32, causal)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref, _ = math_attention(q, k, v, mask.to_dense(), causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    low, _ = math_attention(q, k, v, mask.to_dense(), causal, dtype=dtype)
    low_grads = torch.autograd.grad(low, (q, k, v), g)
    for name, a, b, c in zip("qkv", grads, ref_grads, low_grads):
        check_close(a, b, c, name=f"d{name}", factor=3.0 if dtype != torch.float32 else 10.0)
    assert (grads[0][0, 0, :32] == 0).all(), "rows that see no key get zero dq"
    if causal:  # with Lq - Lk = 20 the first 20 rows see nothing
        assert (grads[0][0, :, :20] == 0).all()


def test_cpu_path_gradcheck():
    q = torch.randn(1, 2, 20, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 27, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 27, 16, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, 2, 3, 4) < 0.7
    mask = BlockSparseMask.from_dense(keep, (8, 8), seq_lens=(20, 27))

    def fn(q, k, v):
        return block_sparse_attn_cpu(q, k, v, mask.counts, mask.indices, 8, 8, True)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("hq,hkv,mask_heads,q_len,kv_len", [(4, 2, 2, 128, 192), (4, 2, 4, 192, 192),
                                                            (2, 2, 1, 64, 64)],
                         ids=["gqa-shared-lk>lq", "per-head", "one-tile"])
def test_causal_aligned_one_pass(hq, hkv, mask_heads, q_len, kv_len, monkeypatch):
    """Causality alone on an aligned grid runs one fused pass per chunk (diagonal tile last, a shared mask):
    checked against the oracle on rows with and without their diagonal tile and rows that see nothing, and
    it must hand over to the two-pass path when a key excluded by causality is not finite."""
    import sparse_attn_kernels.block_sparse.cpu as cpu

    calls = []
    one_pass = cpu._fwd_one_pass
    monkeypatch.setattr(cpu, "_fwd_one_pass", lambda *a: calls.append(1) or one_pass(*a))
    torch.manual_seed(0)
    q = torch.randn(2, hq, q_len, 32)
    k, v = torch.randn(2, hkv, kv_len, 32), torch.randn(2, hkv, kv_len, 32)
    keep = torch.rand(2, mask_heads, q_len // 32, kv_len // 32) < 0.6
    keep[:, :, 0] = False  # a row that sees nothing
    mask = BlockSparseMask.from_dense(keep, 32, seq_lens=(q_len, kv_len))
    out, lse = block_sparse_fwd_cpu(q, k, v, mask.counts, mask.indices, 32, 32, True, 32 ** -0.5)
    assert calls, "the one-pass path did not run"
    ref, ref_lse = math_attention(q, k, v, mask.to_dense(), True)
    check_close(out, ref, math_attention(q, k, v, mask.to_dense(), True, dtype=torch.float32)[0])
    check_lse(lse.double(), ref_lse)
    assert (out[torch.isinf(ref_lse)] == 0).all()
    # q as attention modules hand it over ([B, L, H, D] transposed): read in place, the same result
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    out_t, lse_t = block_sparse_fwd_cpu(q_t, k, v, mask.counts, mask.indices, 32, 32, True, 32 ** -0.5)
    assert torch.equal(out_t, out) and torch.equal(lse_t, lse)
    calls.clear()
    k[:, :, -1], v[:, :, -1] = float("nan"), float("inf")  # the last key: hidden from every row but the last
    out, _ = block_sparse_fwd_cpu(q, k, v, mask.counts, mask.indices, 32, 32, True, 32 ** -0.5)
    assert not calls
    dense = mask.to_dense()
    sees_last = dense.repeat_interleave(hq // dense.shape[1], 1)[..., -1].expand(2, hq, q_len).clone()
    sees_last[..., :-1] = False
    assert torch.isnan(out[sees_last]).all() and torch.isfinite(out[~sees_last]).all()


def test_softmax_rows_with_no_keys_gives_zero_and_minus_inf():
    """The PyTorch paths' softmax over an empty key set: o = 0, lse = -inf, shapes as with keys."""
    from sparse_attn_kernels._common.softmax import softmax_rows

    o, lse = softmax_rows(torch.empty(2, 3, 0), torch.empty(2, 0, 4))
    assert o.shape == (2, 3, 4) and lse.shape == (2, 3, 1)
    assert torch.equal(o, torch.zeros(2, 3, 4)) and bool(torch.isneginf(lse).all())
