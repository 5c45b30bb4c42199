"""Stripe-sparse forward: Triton kernel (interpreter: fp32/fp16) and the PyTorch path vs the fp64 oracle."""

import pytest
import torch

import sparse_attn_kernels.stripe_sparse.fwd as stripe_fwd
from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention, stripe_attention


def make_inputs(batch, n_q_heads, n_kv_heads, q_len, kv_len, head_dim, dtype):
    q = torch.randn(batch, n_q_heads, q_len, head_dim, dtype=dtype)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype)
    return q, k, v


def random_mask(mask_batch, mask_heads, q_len, kv_len, n_vertical, n_slash, block_size):
    vertical = torch.randint(0, kv_len, (mask_batch, mask_heads, n_vertical))
    slash = torch.randint(1 - kv_len, q_len, (mask_batch, mask_heads, n_slash))
    slash[..., 0] = 0
    if n_vertical > 1:
        vertical[..., 1] = vertical[..., 0]  # duplicate
    return StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(q_len, kv_len), block_size=block_size)


def check_against_oracle(q, k, v, mask, causal, backend, scale=None):
    o, lse = stripe_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=True, backend=backend)
    tok = mask.to_dense()
    ref, ref_lse = math_attention(q, k, v, tok, causal, scale)
    low, _ = math_attention(q, k, v, tok, causal, scale, dtype=q.dtype)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    check_close(o, ref, low)
    check_lse(lse, ref_lse)
    empty = torch.isinf(ref_lse)
    assert bool((o[empty] == 0).all()), "rows that see no key must be exactly 0"
    return o, lse


KERNEL_CASES = [  # batch, Hq, Hkv, Hm, Bm, Lq, Lk, D, block_size, causal, dtype
    pytest.param(1, 2, 2, 2, 1, 97, 97, 64, 32, False, torch.float32, id="fp32-odd"),
    pytest.param(2, 4, 2, 2, 2, 113, 200, 80, 32, True, torch.float16, id="fp16-gqa-hkv-causal-lq<lk"),
    pytest.param(1, 4, 1, 1, 1, 200, 113, 32, (64, 32), True, torch.float32, id="mqa-causal-lq>lk"),
    pytest.param(1, 4, 2, 4, 1, 130, 130, 16, 16, True, torch.float16, id="mask-per-qhead-d16"),
    pytest.param(1, 2, 2, 1, 1, 64, 150, 160, (16, 64), False, torch.float16, id="d160"),
    pytest.param(1, 1, 1, 1, 1, 17, 1, 96, 16, False, torch.float32, id="lk1"),
    pytest.param(1, 1, 1, 1, 1, 150, 257, 48, (32, 128), True, torch.float32, id="bn128-subtiles"),
]


@pytest.mark.parametrize("batch,n_q_heads,n_kv_heads,mask_heads,mask_batch,q_len,kv_len,head_dim,block_size,"
                         "causal,dtype", KERNEL_CASES)
def test_kernel_matches_oracle(batch, n_q_heads, n_kv_heads, mask_heads, mask_batch, q_len, kv_len, head_dim,
                               block_size, causal, dtype):
    q, k, v = make_inputs(batch, n_q_heads, n_kv_heads, q_len, kv_len, head_dim, dtype)
    mask = random_mask(mask_batch, mask_heads, q_len, kv_len, min(7, kv_len), 9, block_size)
    check_against_oracle(q, k, v, mask, causal, "triton")


def test_kernel_full_tiles_and_columns_inside_slash_blocks():
    # a dense band of slashes makes most tiles full (no in-tile masking); columns 3 and 40 fall inside
    # slash blocks, 120 is gathered
    q, k, v = make_inputs(1, 2, 2, 128, 128, 32, torch.float32)
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[3, 40, 120, 120]]]),
                                                torch.arange(-20, 50)[None, None], seq_lens=(128, 128),
                                                block_size=16)
    assert int(mask.block_full.sum()) > 0 and int(mask.col_counts.sum()) > 0
    for causal in (False, True):
        check_against_oracle(q, k, v, mask, causal, "triton")


def test_kernel_all_empty_rows():
    # slashes only above the diagonal + causal: every row of the first part is empty
    q, k, v = make_inputs(1, 2, 2, 80, 80, 32, torch.float16)
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[70]]]), torch.tensor([[[-5, -30]]]),
                                                seq_lens=(80, 80), block_size=32)
    o, lse = check_against_oracle(q, k, v, mask, True, "triton")
    assert bool(torch.isneginf(lse[..., :70]).all()) and bool((o[:, :, :70] == 0).all())
    empty = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.int64),
                                                 torch.zeros(1, 1, 0, dtype=torch.int64), seq_lens=(80, 80))
    o, lse = stripe_attention(q, k, v, empty, return_lse=True, backend="triton")
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())


def test_kernel_writes_every_output(monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(stripe_fwd.torch, "empty", nan_empty)
    q, k, v = make_inputs(1, 2, 2, 70, 90, 32, torch.float32)
    mask = random_mask(1, 1, 70, 90, 5, 6, 32)
    check_against_oracle(q, k, v, mask, False, "triton")


def test_kernel_strided_inputs_nan_padding_and_large_logits():
    batch, q_len, kv_len, heads, head_dim = 1, 90, 90, 2, 32
    packed = torch.randn(batch, q_len, 3, heads, head_dim + 8)
    packed[..., head_dim:] = float("nan")  # storage beyond the valid region
    q, k, v = (packed[:, :, i, :, :head_dim].transpose(1, 2) for i in range(3))  # [B, H, L, D] views
    q = q * 5.0
    mask = random_mask(1, 2, q_len, kv_len, 6, 8, 32)
    o, _ = check_against_oracle(q, k, v, mask, True, "triton")
    o2 = stripe_attention(q, k, v, mask, causal=True, backend="triton")
    assert torch.equal(o, o2), "forward must be bitwise repeatable"


def test_kernel_scale_and_sparse_attention_dispatch():
    q, k, v = make_inputs(1, 2, 1, 64, 64, 32, torch.float32)
    mask = random_mask(1, 1, 64, 64, 4, 5, 32)
    o, _ = check_against_oracle(q, k, v, mask, False, "triton", scale=0.3)
    o2 = sparse_attention(q, k, v, mask, scale=0.3, backend="triton")
    assert torch.equal(o, o2)


CPU_CASES = [  # dtype, batch, Hq, Hkv, Hm, Lq, Lk, causal
    pytest.param(torch.bfloat16, 2, 4, 2, 2, 113, 200, True, id="bf16-gqa"),
    pytest.param(torch.float16, 1, 2, 2, 1, 200, 113, True, id="fp16-lq>lk"),
    pytest.param(torch.float32, 1, 3, 3, 3, 97, 97, False, id="fp32"),
    pytest.param(torch.float64, 1, 2, 1, 1, 65, 33, False, id="fp64"),
]


@pytest.mark.parametrize("dtype,batch,n_q_heads,n_kv_heads,mask_heads,q_len,kv_len,causal", CPU_CASES)
def test_cpu_path_matches_oracle(dtype, batch, n_q_heads, n_kv_heads, mask_heads, q_len, kv_len, causal):
    q, k, v = make_inputs(batch, n_q_heads, n_kv_heads, q_len, kv_len, 64, dtype)
    mask = random_mask(batch, mask_heads, q_len, kv_len, 8, 10, 32)
    check_against_oracle(q, k, v, mask, causal, "torch")
    assert torch.equal(sparse_attention(q, k, v, mask, causal=causal, backend="torch"),
                       stripe_attention(q, k, v, mask, causal=causal, backend="torch"))


def test_cpu_path_small_chunks_and_block_size_8(monkeypatch):
    import sparse_attn_kernels.reference_stripe as ref

    q, k, v = make_inputs(1, 2, 2, 70, 70, 16, torch.float32)
    mask = random_mask(1, 2, 70, 70, 5, 6, 8)  # block size 8: the PyTorch path only
    o = stripe_attention(q, k, v, mask, causal=True)
    monkeypatch.setattr(ref, "CHUNK_BYTES", 1)
    assert torch.allclose(o, ref.stripe_sparse_fwd_ref(
        q, k, v, mask.block_counts, mask.block_indices, mask.block_full, mask.col_counts, mask.col_indices,
        mask.diag_keep, mask.col_keep, 8, 8, True, 0.25, chunk_bytes=1)[0], atol=1e-6)
    check_against_oracle(q, k, v, mask, True, "torch")


def test_empty_inputs():
    mask = random_mask(1, 1, 40, 40, 3, 3, 16)
    q, k, v = make_inputs(0, 2, 2, 40, 40, 32, torch.float32)
    assert stripe_attention(q, k, v, mask, backend="triton").shape == q.shape
    mask0 = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.int64),
                                                 torch.zeros(1, 1, 0, dtype=torch.int64), seq_lens=(0, 40))
    q, k, v = make_inputs(1, 2, 2, 0, 40, 32, torch.float32)
    o, lse = stripe_attention(q, k, v, mask0, return_lse=True)
    assert o.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    k0, v0 = (torch.randn(1, 2, 0, 32, requires_grad=True) for _ in range(2))
    q1 = torch.randn(1, 2, 5, 32, requires_grad=True)
    empty_k = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.int64),
                                                   torch.zeros(1, 1, 0, dtype=torch.int64), seq_lens=(5, 0))
    o, lse = stripe_attention(q1, k0, v0, empty_k, return_lse=True)
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())
    o.sum().backward()
    assert bool((q1.grad == 0).all())


def test_bad_inputs():
    q, k, v = make_inputs(1, 4, 2, 50, 60, 32, torch.float32)
    mask = random_mask(1, 2, 50, 60, 3, 3, 16)
    with pytest.raises(ValueError, match=r"mask was built for seq_lens=\(50, 60\)"):
        stripe_attention(q[:, :, :40], k, v, mask)
    with pytest.raises(ValueError, match="mask heads must be 1, 2 .* or 4"):
        stripe_attention(q, k, v, random_mask(1, 3, 50, 60, 3, 3, 16))
    with pytest.raises(ValueError, match="mask batch must be 1 or 1"):
        stripe_attention(q, k, v, random_mask(2, 1, 50, 60, 3, 3, 16))
    with pytest.raises(TypeError, match="mask must be a StripeSparseMask, got BlockSparseMask"):
        stripe_attention(q, k, v, BlockSparseMask.full(50, 60, 16))
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        stripe_attention(q.half(), k, v, mask)
    with pytest.raises(TypeError, match="q must have dtype in"):
        stripe_attention(q.double(), k.double(), v.double(), mask, backend="triton")
    with pytest.raises(TypeError, match="q must have dtype in"):
        stripe_attention(q.int(), k.int(), v.int(), mask)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        stripe_attention(q[:, :3], k, v, mask)
    with pytest.raises(ValueError, match="head dim must be in"):
        stripe_attention(q[..., :8], k[..., :8], v[..., :8], mask, backend="triton")
    with pytest.raises(ValueError, match="block_size must use sizes in"):
        stripe_attention(q, k, v, random_mask(1, 2, 50, 60, 3, 3, 8), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        stripe_attention(q, k, v, mask, backend="cuda")
    with pytest.raises(TypeError, match="scale must be a float"):
        stripe_attention(q, k, v, mask, scale="0.1")
    with pytest.raises(ValueError, match="rank 4"):
        stripe_attention(q[0], k, v, mask)
