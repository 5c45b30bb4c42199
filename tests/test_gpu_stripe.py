"""GPU-only checks of the stripe-sparse kernels: bf16/fp16/fp32 on the chip, backward, no recompiles.

Skipped without CUDA. Not yet run: the sessions that wrote them had no device.
"""

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import StripeSparseMask, stripe_attention

pytestmark = pytest.mark.gpu


def _inputs(dtype, batch, hq, hkv, q_len, kv_len, head_dim, n_vertical, n_slash, mask_heads, block):
    dev = "cuda"
    q = torch.randn(batch, hq, q_len, head_dim, device=dev).to(dtype)
    k = torch.randn(batch, hkv, kv_len, head_dim, device=dev).to(dtype)
    v = torch.randn(batch, hkv, kv_len, head_dim, device=dev).to(dtype)
    vertical = torch.randint(0, kv_len, (batch, mask_heads, n_vertical), device=dev)
    local = torch.arange(0, n_slash // 2, device=dev).expand(batch, mask_heads, -1)
    far = torch.randint(1 - kv_len, q_len, (batch, mask_heads, n_slash - n_slash // 2), device=dev)
    mask = StripeSparseMask.from_vertical_slash(vertical, torch.cat([local, far], -1), seq_lens=(q_len, kv_len),
                                                block_size=block)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("q_len,kv_len,head_dim,block,causal,mask_heads", [
    (1025, 1025, 128, (64, 64), True, 2),
    (777, 1500, 64, (128, 128), False, 8),
    (1500, 777, 80, (64, 32), True, 1),
    (513, 513, 256, (32, 64), False, 2),
])
def test_gpu_forward_backward_match_oracle(dtype, q_len, kv_len, head_dim, block, causal, mask_heads):
    q, k, v, mask = _inputs(dtype, 2, 8, 2, q_len, kv_len, head_dim, 40, 60, mask_heads, block)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = stripe_attention(q, k, v, mask, causal=causal, return_lse=True)
    tok = mask.to_dense()
    ref, ref_lse = math_attention(q, k, v, tok, causal)
    lowp, _ = math_attention(q, k, v, tok, causal, dtype=dtype)
    check_close(out, ref, lowp)
    check_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    low_grads = torch.autograd.grad(lowp, (q, k, v), dout)
    for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
        check_close(g, r, lg, name=f"d{name}", factor=30.0 if dtype == torch.float32 else 3.0, dtype=dtype)


def test_gpu_fp32_tf32_follows_pytorch():
    """TF32 allowed: forward and gradients against PyTorch's fp32 math under the same setting (factors 2 and 3)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        q, k, v, mask = _inputs(torch.float32, 2, 8, 2, 1025, 1025, 128, 40, 60, 2, (64, 64))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out, lse = stripe_attention(q, k, v, mask, causal=True, return_lse=True)
        tok = mask.to_dense()
        ref, ref_lse = math_attention(q, k, v, tok, True)
        lowp, _ = math_attention(q, k, v, tok, True, dtype=torch.float32)
        check_close(out, ref, lowp, factor=2.0)
        check_lse(lse, ref_lse)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
        low_grads = torch.autograd.grad(lowp, (q, k, v), dout)
        for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
            check_close(g, r, lg, name=f"d{name}", factor=3.0, dtype=torch.float32)
    finally:
        matmul.fp32_precision = saved


def test_gpu_no_recompile_across_lengths():
    from sparse_attn_kernels.stripe_sparse import fwd

    def n_compiled():
        fn = fwd._stripe_sparse_fwd_kernel
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            return sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
        return sum(len(c) for c in fn.cache.values())

    def run(length):
        q, k, v, mask = _inputs(torch.bfloat16, 1, 4, 4, length, length, 64, 8, 8, 1, 64)
        stripe_attention(q, k, v, mask, causal=True)

    for length in (1000, 1024):
        run(length)
    before = n_compiled()
    for length in (1001, 1500, 2048, 3333):
        run(length)
    assert n_compiled() == before


def test_gpu_refuses_what_cannot_fit_the_chip():
    """fp32 at head dim 256 with 128-row blocks: no dQ configuration fits 227 KiB, so the backward refuses it."""
    q, k, v, mask = _inputs(torch.float32, 1, 2, 2, 256, 256, 256, 8, 8, 1, (128, 128))
    q.requires_grad_()
    out = stripe_attention(q, k, v, mask, causal=True)
    with pytest.raises(ValueError, match="block_size"):
        out.sum().backward()
