"""GPU-only checks of the block-sparse forward: bf16/fp16/fp32 on the chip, no recompiles, int64 offsets.

Skipped without CUDA; run by benchmarks/gpu_check.py on the lent H100/H200.
"""

import math

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, sparse_attention

pytestmark = pytest.mark.gpu


def _case(dtype, batch, hq, hkv, q_len, kv_len, head_dim, block, density, causal, factor=None):
    dev = "cuda"
    q = torch.randn(batch, hq, q_len, head_dim, device=dev).to(dtype)
    k = torch.randn(batch, hkv, kv_len, head_dim, device=dev).to(dtype)
    v = torch.randn(batch, hkv, kv_len, head_dim, device=dev).to(dtype)
    keep = torch.rand(batch, hq, math.ceil(q_len / block[0]), math.ceil(kv_len / block[1]), device=dev) < density
    mask = BlockSparseMask.from_dense(keep, block, seq_lens=(q_len, kv_len))
    out, lse = sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
    tok = mask.to_dense()
    ref, ref_lse = math_attention(q, k, v, tok, causal)
    lowp, _ = math_attention(q, k, v, tok, causal, dtype=dtype)  # PyTorch under the same TF32 setting
    check_close(out, ref, lowp, factor=factor)
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("q_len,kv_len,head_dim,block,causal", [
    (1025, 1025, 128, (64, 64), True),
    (777, 1500, 64, (128, 128), False),
    (1500, 777, 80, (64, 32), True),
    (513, 513, 256, (32, 64), False),
    (300, 300, 96, (128, 64), True),
])
def test_gpu_matches_oracle(dtype, q_len, kv_len, head_dim, block, causal):
    _case(dtype, 2, 8, 2, q_len, kv_len, head_dim, block, 0.4, causal)


@pytest.mark.parametrize("q_len,kv_len,head_dim,block,causal", [
    (1025, 1025, 128, (128, 128), True),
    (513, 700, 64, (64, 64), False),
])
def test_gpu_fp32_tf32_follows_pytorch(q_len, kv_len, head_dim, block, causal):
    """With TF32 allowed for fp32 matmuls the kernel's dots use TF32, and the baseline is PyTorch's fp32 math
    under the same setting (docs/kernels.md, "fp32 and TF32"): the low-precision factor 2 applies."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        _case(torch.float32, 2, 8, 2, q_len, kv_len, head_dim, block, 0.4, causal, factor=2.0)
    finally:
        matmul.fp32_precision = saved


def test_gpu_no_recompile_across_lengths():
    """A sweep of sequence lengths reuses one compiled kernel per configuration."""
    from sparse_attn_kernels.block_sparse import fwd

    def n_compiled():  # the JIT cache layout differs across Triton versions
        fn = fwd._block_sparse_fwd_kernel
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            return sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
        return sum(len(c) for c in fn.cache.values())

    for length in (1000, 1024):  # warm up both divisibility classes of the pointers
        q = torch.randn(1, 4, length, 64, device="cuda", dtype=torch.bfloat16)
        sparse_attention(q, q, q, causal=True)
    before = n_compiled()
    for length in (1001, 1500, 2048, 3333, 4096, 5000):
        q = torch.randn(1, 4, length, 64, device="cuda", dtype=torch.bfloat16)
        sparse_attention(q, q, q, causal=True)
    torch.cuda.synchronize()
    assert n_compiled() == before, f"recompiled: {before} -> {n_compiled()} kernels"


@pytest.mark.slow
def test_gpu_int64_offsets():
    """B*H*L*D >= 2**31 elements: offsets must not overflow int32."""
    batch, heads, length, dim = 1, 64, 2 ** 18, 128  # 2**31 elements per tensor
    q = torch.randn(batch, heads, length, dim, device="cuda", dtype=torch.bfloat16)
    keep = torch.zeros(1, 1, length // 128, length // 128, dtype=torch.bool, device="cuda")
    keep[..., -1] = True  # the last key block only
    mask = BlockSparseMask.from_dense(keep, 128, seq_lens=(length, length))
    out = sparse_attention(q, q, q, mask)
    h, rows = heads - 1, slice(length - 128, length)
    qs = q[0, h, rows].float()
    ks = q[0, h, length - 128:].float()
    ref = torch.softmax(qs @ ks.T / dim ** 0.5, -1) @ ks
    assert torch.allclose(out[0, h, rows].float(), ref, atol=2e-2)
