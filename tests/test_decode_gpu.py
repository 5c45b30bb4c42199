"""Decode kernel on the GPU: larger shapes, bf16, many splits; all pages = dense and paged = contiguous, bit for bit."""

import pytest
import torch

from oracle import check_close, check_lse, math_attention
from sparse_attn import sparse_attention_with_kvcache
from sparse_attn_kernels.reference_decode import visible_keys
from test_decode import poison_unseen, random_pages, to_paged

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len,dim,page_size", [(1, 128, 16), (4, 64, 64), (16, 256, 32)])
def test_decode_kernel_on_gpu(dtype, q_len, dim, page_size):
    batch, n_q_heads, n_kv_heads, length = 3, 32, 8, 3000
    seqlens = torch.tensor([3000, 1777, 17], dtype=torch.int32)
    q = torch.randn(batch, n_q_heads, q_len, dim).to(dtype)
    k, v = (torch.randn(batch, n_kv_heads, length, dim).to(dtype) for _ in range(2))
    pages = random_pages(batch, n_kv_heads, seqlens.long(), page_size, 0.2)
    keep = visible_keys(seqlens, (pages >= 0).sum(-1), pages, page_size, length, q_len, True)
    ref, ref_lse = math_attention(q, k, v, keep, dtype=torch.float64)
    lowp, _ = math_attention(q, k, v, keep, dtype=dtype)
    kp, vp = poison_unseen(k, keep.any(2)), poison_unseen(v, keep.any(2))
    cuda = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    o, lse = sparse_attention_with_kvcache(*cuda(q, kp, vp, seqlens), pages=pages.cuda(), page_size=page_size,
                                           return_lse=True)
    check_close(o.cpu(), ref, lowp, dtype=dtype)
    check_lse(lse.cpu(), ref_lse)
    gen = torch.Generator().manual_seed(0)
    (kpp, table), (vpp, _) = to_paged(kp, page_size, gen=gen), to_paged(vp, page_size, gen=torch.Generator().manual_seed(0))
    o_p = sparse_attention_with_kvcache(*cuda(q, kpp, vpp, seqlens), block_table=table.cuda(), pages=pages.cuda())
    assert torch.equal(o_p, o)
    every = torch.arange(-(-length // page_size), dtype=torch.int32)[None, None].repeat(batch, n_kv_heads, 1)
    dense = sparse_attention_with_kvcache(*cuda(q, k, v, seqlens), page_size=page_size)
    assert torch.equal(sparse_attention_with_kvcache(*cuda(q, k, v, seqlens), pages=every.cuda(),
                                                     page_size=page_size), dense)
