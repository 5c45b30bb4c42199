"""Forward of block-sparse attention vs the fp64 oracle: Triton kernel (interpreter on CPU) and PyTorch path."""

import math

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, sparse_attention

BACKENDS = ["triton", "torch"]


def random_mask(batch, heads, q_len, kv_len, block, density, generator=None):
    bm, bn = block
    keep = torch.rand(batch, heads, math.ceil(q_len / bm), math.ceil(kv_len / bn), generator=generator) < density
    return BlockSparseMask.from_dense(keep, block, seq_lens=(q_len, kv_len))


def run_case(backend, dtype, batch, hq, hkv, q_len, kv_len, head_dim, block, density, causal, mask_heads):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot run bf16 tl.dot (bf16 is covered on the GPU)")
    q = torch.randn(batch, hq, q_len, head_dim).to(dtype)
    k = torch.randn(batch, hkv, kv_len, head_dim).to(dtype)
    v = torch.randn(batch, hkv, kv_len, head_dim).to(dtype)
    mask = random_mask(1 if mask_heads == 1 else batch, mask_heads, q_len, kv_len, block, density)
    out, lse = sparse_attention(q, k, v, mask, causal=causal, return_lse=True, backend=backend)
    tok = mask.to_dense()
    ref, ref_lse = math_attention(q, k, v, tok, causal)
    lowp, _ = math_attention(q, k, v, tok, causal, dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    check_close(out, ref, lowp)
    check_lse(lse, ref_lse)
    empty = torch.isinf(ref_lse)
    assert (out[empty] == 0).all(), "rows that see no key must be exactly 0"
    return out


CASES = [
    # dtype, B, Hq, Hkv, Lq, Lk, D, block, density, causal, mask_heads
    pytest.param(torch.float32, 1, 2, 2, 128, 128, 64, (32, 32), 1.0, False, 1, id="full-fp32"),
    pytest.param(torch.float16, 1, 2, 2, 113, 113, 64, (32, 32), 0.3, False, 2, id="ragged113-fp16"),
    pytest.param(torch.float32, 2, 4, 2, 97, 200, 80, (16, 64), 0.5, True, 4, id="gqa-causal-lq<lk-d80"),
    pytest.param(torch.float16, 1, 4, 1, 200, 97, 96, (32, 16), 0.5, True, 1, id="mqa-causal-lq>lk-d96"),
    pytest.param(torch.float32, 1, 4, 2, 257, 257, 16, (64, 64), 0.9, True, 2, id="maskheads=hkv-d16"),
    pytest.param(torch.float16, 2, 2, 2, 17, 1, 128, (16, 16), 1.0, False, 2, id="lk1-d128"),
    pytest.param(torch.float32, 1, 1, 1, 1, 33, 160, (16, 32), 1.0, True, 1, id="lq1-d160"),
    pytest.param(torch.float16, 1, 2, 1, 100, 130, 256, (64, 128), 0.6, False, 1, id="block128-d256"),
    # 128-row blocks at D = 128 in fp16: 32-row K/V steps (config.fwd_tile)
    pytest.param(torch.float16, 1, 4, 1, 200, 260, 128, (128, 128), 0.6, True, 1, id="block128x128-d128-gqa4"),
    pytest.param(torch.float32, 1, 2, 2, 64, 64, 32, (32, 32), 0.0, False, 2, id="empty-mask"),
    pytest.param(torch.float16, 1, 2, 2, 150, 150, 48, (32, 32), 0.05, True, 2, id="sparse5pct-d48"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,batch,hq,hkv,q_len,kv_len,head_dim,block,density,causal,mask_heads", CASES)
def test_matches_oracle(backend, dtype, batch, hq, hkv, q_len, kv_len, head_dim, block, density, causal,
                        mask_heads):
    run_case(backend, dtype, batch, hq, hkv, q_len, kv_len, head_dim, block, density, causal, mask_heads)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_path_bf16(causal):
    run_case("torch", torch.bfloat16, 1, 4, 2, 130, 97, 64, (32, 32), 0.5, causal, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_default_and_causal_rows(backend):
    """mask=None is dense; causal with Lq > Lk leaves the first Lq-Lk rows empty (output 0, lse -inf)."""
    q = torch.randn(1, 2, 90, 32)
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    out, lse = sparse_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    ref, ref_lse = math_attention(q, k, v, None, True)
    check_close(out, ref, math_attention(q, k, v, None, True, dtype=torch.float32)[0])
    check_lse(lse, ref_lse)
    assert (out[:, :, :50] == 0).all() and torch.isneginf(lse[:, :, :50]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_not_copied_and_match(backend):
    """q, k, v as slices of a packed [B, L, 3, H, D] tensor, viewed as [B, H, L, D]."""
    packed = torch.randn(2, 120, 3, 2, 64)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask = random_mask(2, 2, 120, 120, (32, 32), 0.5)
    out = sparse_attention(q, k, v, mask, backend=backend)
    ref, _ = math_attention(q, k, v, mask.to_dense(), False)
    check_close(out, ref, math_attention(q, k, v, mask.to_dense(), False, dtype=torch.float32)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_beyond_valid_region_does_not_leak(backend):
    """NaN stored past Lk (in the padding of a larger buffer) must not reach the output."""
    big_k = torch.randn(1, 2, 128, 32)
    big_v = torch.randn(1, 2, 128, 32)
    big_k[:, :, 100:] = float("nan")
    big_v[:, :, 100:] = float("nan")
    k, v = big_k[:, :, :100], big_v[:, :, :100]
    q = torch.randn(1, 2, 100, 32) * 5  # large logits stay finite
    mask = random_mask(1, 1, 100, 100, (32, 32), 1.0)
    out, lse = sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, _ = math_attention(q, k, v, mask.to_dense(), False)
    check_close(out, ref, math_attention(q, k, v, mask.to_dense(), False, dtype=torch.float32)[0])


def test_triton_output_is_written_everywhere():
    """The kernel writes every element: an output buffer pre-filled with NaN would show holes."""
    from sparse_attn_kernels.block_sparse.fwd import block_sparse_fwd

    q, k, v = torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40)
    mask = random_mask(1, 2, 77, 77, (16, 16), 0.3)
    real_empty = torch.empty
    torch.empty = lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan"))
    try:
        out, lse = block_sparse_fwd(q, k, v, mask.counts, mask.indices, 16, 16, False, 40 ** -0.5)
    finally:
        torch.empty = real_empty
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_bitwise_repeatable(backend):
    q, k, v = torch.randn(1, 2, 96, 32), torch.randn(1, 2, 96, 32), torch.randn(1, 2, 96, 32)
    mask = random_mask(1, 2, 96, 96, (32, 32), 0.6)
    a = sparse_attention(q, k, v, mask, backend=backend)
    b = sparse_attention(q, k, v, mask, backend=backend)
    assert torch.equal(a, b)


def test_backends_agree_with_each_other():
    q, k, v = torch.randn(2, 4, 140, 64), torch.randn(2, 2, 140, 64), torch.randn(2, 2, 140, 64)
    mask = random_mask(2, 4, 140, 140, (32, 32), 0.4)
    a, la = sparse_attention(q, k, v, mask, causal=True, return_lse=True, backend="triton")
    b, lb = sparse_attention(q, k, v, mask, causal=True, return_lse=True, backend="torch")
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(torch.isinf(la), torch.isinf(lb))


@pytest.mark.parametrize("shape_q,shape_k", [((0, 2, 10, 32), (0, 2, 10, 32)), ((1, 2, 0, 32), (1, 2, 10, 32))])
def test_empty_inputs(shape_q, shape_k):
    q, k = torch.randn(shape_q), torch.randn(shape_k)
    out = sparse_attention(q, k, k)
    assert out.shape == q.shape


def test_zero_keys_give_zeros():
    q, k = torch.randn(1, 2, 10, 32), torch.randn(1, 2, 0, 32)
    out, lse = sparse_attention(q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_chunked_cpu_path_equals_unchunked():
    """A tiny chunk budget (many chunks) gives the same result as one chunk."""
    from sparse_attn_kernels.reference import block_sparse_fwd_ref

    q, k, v = torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32)
    mask = random_mask(1, 2, 100, 100, (16, 16), 0.5)
    args = (q, k, v, mask.counts, mask.indices, 16, 16, True, 32 ** -0.5)
    small = block_sparse_fwd_ref(*args, chunk_bytes=1)
    big = block_sparse_fwd_ref(*args)
    assert torch.allclose(small[0], big[0], atol=1e-6) and torch.equal(torch.isinf(small[1]), torch.isinf(big[1]))


def test_flex_attention_agrees_on_the_same_mask():
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attn.flex import to_flex_block_mask

    for causal, (q_len, kv_len) in [(False, (128, 128)), (True, (128, 96)), (True, (100, 130))]:
        q, k, v = torch.randn(1, 2, q_len, 32), torch.randn(1, 2, kv_len, 32), torch.randn(1, 2, kv_len, 32)
        keep = torch.rand(1, 2, math.ceil(q_len / 32), math.ceil(kv_len / 32)) < 0.6
        keep[..., 0] = True  # flex gives NaN-free zeros on empty rows only in recent versions
        mask = BlockSparseMask.from_dense(keep, 32, seq_lens=(q_len, kv_len))
        ours = sparse_attention(q, k, v, mask, causal=causal)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = flex_attention(q, k, v, block_mask=to_flex_block_mask(mask, causal=causal, num_heads=2))
        rows = torch.isfinite(theirs).all(-1)
        if causal and q_len > kv_len:
            rows[:, :, : q_len - kv_len] = False  # rows that see nothing: flex's value is not specified
        assert torch.allclose(ours[rows], theirs[rows], atol=1e-5), f"causal={causal} lens={(q_len, kv_len)}"
