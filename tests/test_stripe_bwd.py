"""Stripe-sparse backward: Triton kernels (interpreter: fp32/fp16) and the PyTorch path vs the fp64 oracle.

Tolerance: 3x the low-precision baseline (30x for fp32, whose baseline is nearly exact).
"""

import pytest
import torch

from oracle import check_close, math_attention
from sparse_attn import StripeSparseMask, stripe_attention
from test_stripe_fwd import make_inputs, random_mask


BWD_CASES = [  # batch, Hq, Hkv, Hm, Bm, Lq, Lk, D, block_size, causal, dtype
    pytest.param(1, 2, 2, 2, 1, 97, 97, 64, 32, False, torch.float32, id="fp32-odd"),
    pytest.param(2, 4, 2, 2, 2, 97, 120, 80, 32, True, torch.float16, id="fp16-gqa-hkv-causal-lq<lk"),
    pytest.param(1, 4, 1, 1, 1, 150, 113, 32, (64, 32), True, torch.float32, id="mqa-causal-lq>lk"),
    pytest.param(1, 4, 2, 4, 1, 70, 70, 16, 16, True, torch.float32, id="gqa-mask-per-qhead"),
    pytest.param(1, 1, 1, 1, 1, 70, 200, 48, (32, 128), True, torch.float16, id="bn128-subtiles"),
    # fp16 64-row blocks at D = 128: the dQ kernel gathers 32 columns per step (config.stripe_tiles)
    pytest.param(1, 4, 1, 1, 1, 130, 150, 128, 64, True, torch.float16, id="fp16-d128-b64-dq-narrow-columns"),
]


def grads_and_oracle(q, k, v, mask, causal, backend):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = stripe_attention(q, k, v, mask, causal=causal, backend=backend)
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), dout)
    tok = mask.to_dense()
    ref, _ = math_attention(q, k, v, tok, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    low, _ = math_attention(q, k, v, tok, causal, dtype=q.dtype)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    factor = 30.0 if q.dtype == torch.float32 else 3.0
    for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
        assert g.shape == r.shape and g.dtype == q.dtype
        check_close(g, r, lg, name=f"d{name}", factor=factor, dtype=q.dtype)
    return grads, dout


@pytest.mark.parametrize("batch,n_q_heads,n_kv_heads,mask_heads,mask_batch,q_len,kv_len,head_dim,block_size,"
                         "causal,dtype", BWD_CASES)
def test_kernel_backward_matches_oracle(batch, n_q_heads, n_kv_heads, mask_heads, mask_batch, q_len, kv_len,
                                        head_dim, block_size, causal, dtype):
    q, k, v = make_inputs(batch, n_q_heads, n_kv_heads, q_len, kv_len, head_dim, dtype)
    mask = random_mask(mask_batch, mask_heads, q_len, kv_len, 7, 9, block_size)
    grads_and_oracle(q, k, v, mask, causal, "triton")


def test_kernel_backward_empty_rows_columns_in_slash_blocks_deterministic():
    q, k, v = make_inputs(1, 2, 1, 96, 96, 32, torch.float32)
    # columns 3 and 40 lie inside slash blocks; rows before 60 see nothing under causal except column 3
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[3, 40, 90]]]), torch.tensor([[[-10, 0, 1, 2]]]),
                                                seq_lens=(96, 96), block_size=32)
    (dq, dk, dv), dout = grads_and_oracle(q, k, v, mask, True, "triton")
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    o2 = stripe_attention(q2, k2, v2, mask, causal=True, backend="triton")
    again = torch.autograd.grad(o2, (q2, k2, v2), dout)
    for a, b in zip((dq, dk, dv), again):
        assert torch.equal(a, b), "backward must be bitwise repeatable"
    empty = StripeSparseMask.from_vertical_slash(torch.tensor([[[95]]]), torch.tensor([[[-1]]]),
                                                 seq_lens=(96, 96), block_size=32)
    q3 = q.detach().requires_grad_()
    o3 = stripe_attention(q3, k, v, empty, causal=True, backend="triton")
    (dq3,) = torch.autograd.grad(o3, (q3,), torch.randn_like(o3))
    assert bool((o3[:, :, :95] == 0).all()) and bool((dq3[:, :, :95] == 0).all()) and bool(dq3.isfinite().all())


def test_cpu_path_gradients_match_oracle():
    q, k, v = make_inputs(1, 2, 1, 60, 75, 32, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = random_mask(1, 1, 60, 75, 5, 6, 16)
    o = stripe_attention(q, k, v, mask, causal=True)
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), dout)
    ref, _ = math_attention(q, k, v, mask.to_dense(), True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    low, _ = math_attention(q, k, v, mask.to_dense(), True, dtype=torch.float32)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
        check_close(g, r, lg, name=f"d{name}", factor=10.0 * 3)
