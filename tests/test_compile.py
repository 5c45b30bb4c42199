"""sparse_attention under torch.compile: one graph (no breaks), same outputs and gradients as eager."""

import pytest
import torch

from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn_kernels._common.predicates import NO_PREDICATES, flat


class TinyAttention(torch.nn.Module):
    """Projections + sparse attention (GQA 2:1) + output projection."""

    def __init__(self, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, backend="torch", causal=True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = torch.nn.Linear(dim, n_heads * head_dim)
        self.wkv = torch.nn.Linear(dim, 2 * n_kv_heads * head_dim)
        self.wo = torch.nn.Linear(n_heads * head_dim, dim)
        self.backend, self.causal = backend, causal

    def forward(self, x, mask):
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)  # strided [B, H, L, D]
        kv = self.wkv(x).view(b, length, 2, self.n_kv_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # slices of a packed KV
        o = sparse_attention(q, k, v, mask, causal=self.causal, backend=self.backend)
        return self.wo(o.transpose(1, 2).reshape(b, length, -1))


def _mask(length, block, heads, seed, cache_kv_major):
    gen = torch.Generator().manual_seed(seed)
    n = -(-length // block)
    keep = torch.rand(1, heads, n, n, generator=gen) < 0.5
    keep[..., torch.arange(n), torch.arange(n)] = True
    mask = BlockSparseMask.from_dense(keep, block, (length, length))
    if cache_kv_major:
        mask.kv_major()
    return mask


def _eager_and_compiled(model, x, mask, compiler):
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(x, mask)
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1
    results = []
    # compiled first: an uncached mask.kv_major() must be derived inside the graph, not by eager
    for fn in (torch.compile(model, fullgraph=True, backend=compiler), model):
        model.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out = fn(xi, mask)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    return results[::-1]  # (eager, compiled)


@pytest.mark.parametrize("backend,compiler,cache", [
    pytest.param("torch", "inductor", True, id="torch-inductor"),
    pytest.param("triton", "inductor", True, id="triton-interp-inductor"),
    pytest.param("triton", "aot_eager", False, id="triton-interp-uncached-kv-major"),
])
def test_compiled_module_matches_eager(backend, compiler, cache):
    torch.manual_seed(0)
    model = TinyAttention(backend=backend)
    length = 96
    x = torch.randn(2, length, 64)
    mask = _mask(length, 32, 4, seed=1, cache_kv_major=cache)
    if not cache:
        assert mask._kv_major is None
    (o_e, dx_e, dp_e), (o_c, dx_c, dp_c) = _eager_and_compiled(model, x, mask, compiler)
    torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(dp_c, dp_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_dense_no_mask():
    """mask=None builds its lists inside the compiled region without .item()."""
    torch.manual_seed(0)
    model = TinyAttention(backend="torch", causal=False)
    x = torch.randn(1, 70, 64)
    (o_e, dx_e, _), (o_c, dx_c, _) = _eager_and_compiled(model, x, None, "aot_eager")
    torch.testing.assert_close(o_c, o_e)
    torch.testing.assert_close(dx_c, dx_e)


def test_fake_impls_match_real_outputs():
    """torch.library.opcheck: schemas, fake (meta) implementations and autograd registrations."""
    from sparse_attn_kernels.block_sparse import op  # noqa: F401  (registers the Triton ops)

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 40, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 40, 16, generator=gen, requires_grad=True)
    mask = _mask(40, 16, 1, seed=3, cache_kv_major=True)
    ref_args = (q, k, v, mask.counts, mask.indices, 16, 16, True, 0.25, *flat(NO_PREDICATES))
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_attn_fwd_ref, ref_args)
    tri_args = (q, k, v, mask.counts, mask.indices, *mask.kv_major(), 16, 16, True, 0.25, *flat(NO_PREDICATES),
                None, None, 0, 0)
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_attn_fwd, tri_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_impls_match_real_outputs_with_key_bias():
    """opcheck of both forward ops with a differentiable key_bias (its gradient through the fake backward too)."""
    from sparse_attn_kernels.block_sparse import op  # noqa: F401  (registers the Triton ops)

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 40, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 40, 16, generator=gen, requires_grad=True)
    bias = torch.randn(1, 1, 40, generator=gen, requires_grad=True)
    mask = _mask(40, 16, 1, seed=3, cache_kv_major=True)
    ref_args = (q, k, v, mask.counts, mask.indices, 16, 16, True, 0.25, *flat(NO_PREDICATES), bias)
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_attn_fwd_ref, ref_args)
    tri_args = (q, k, v, mask.counts, mask.indices, *mask.kv_major(), 16, 16, True, 0.25, *flat(NO_PREDICATES),
                None, None, 0, 0, bias)
    torch.library.opcheck(torch.ops.sparse_attn.block_sparse_attn_fwd, tri_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
