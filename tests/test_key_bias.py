"""``sparse_attention(..., key_bias=)``: an additive per-key score bias, forward and backward, vs the fp64 oracle
(RELIABILITY.md rule: forward factor 2 (10 in fp32), gradients 3), on the Triton kernels under the interpreter and
on the PyTorch path; with and without masks, GQA, causal, bias per query head / kv head / broadcast."""

import math

import pytest
import torch

from oracle import causal_keep, check_close, expand_heads
from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention


def biased_attention(q, k, v, bias, keep, causal, scale, dtype):
    """Math attention in ``dtype`` with ``bias [B|1, H|1, Lk]`` added to the scores; empty rows give 0."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd, bd = (x.to(dtype) for x in (q, k, v, bias))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    if bd.shape[1] not in (1, q.shape[1]):
        bd = bd.repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2)) * scale + bd[:, :, None, :]
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool)
    if keep is not None:
        allowed = allowed & expand_heads(keep, q.shape[1], k.shape[1])
    if causal:
        allowed = allowed & causal_keep(q.shape[2], k.shape[2])
    allowed = allowed.expand(s.shape)
    seen = allowed.any(-1, keepdim=True)
    s = torch.where(allowed | ~seen, s, -math.inf)
    p = torch.softmax(s.float() if dtype == torch.float16 else s, dim=-1).to(dtype) * seen
    return p @ vd


def make_inputs(dtype, b=2, hq=4, hkv=2, lq=80, lk=96, d=16, bias_heads=2, bias_batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    bias = (3 * torch.randn(bias_batch, bias_heads, lk, generator=gen)).to(dtype)
    return q, k, v, bias


def block_mask(lq, lk, block, gen_seed=1, heads=1):
    gen = torch.Generator().manual_seed(gen_seed)
    keep = torch.rand(1, heads, math.ceil(lq / block), math.ceil(lk / block), generator=gen) < 0.5
    keep[..., 0] = True
    return BlockSparseMask.from_dense(keep, block, (lq, lk))


def run_and_check(q, k, v, bias, mask, causal, backend, dtype):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    o = sparse_attention(*leaves[:3], mask, causal=causal, backend=backend, key_bias=leaves[3])
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    keep = None if mask is None else mask.to_dense()
    scale = q.shape[-1] ** -0.5
    results = {}
    for name, dt in (("ref", torch.float64), ("lowp", dtype)):
        ls = [x.detach().to(dt).requires_grad_() for x in (q, k, v, bias)]
        out = biased_attention(*ls, keep, causal, scale, dt)
        results[name] = (out, torch.autograd.grad(out, ls, do.to(dt)))
    check_close(o, results["ref"][0], results["lowp"][0], "o")
    for name, g, r, lp in zip(("dq", "dk", "dv", "dbias"), grads, results["ref"][1], results["lowp"][1]):
        assert g.shape == r.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        check_close(g, r, lp, name, factor=3.0, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias_shape", [(2, 2), (1, 1), (2, 4)], ids=["per_kv_head", "broadcast", "per_q_head"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "block_mask"])
def test_key_bias_matches_oracle_fp32(backend, bias_shape, causal, masked):
    q, k, v, bias = make_inputs(torch.float32, bias_batch=bias_shape[0], bias_heads=bias_shape[1])
    mask = block_mask(80, 96, 32) if masked else None
    run_and_check(q, k, v, bias, mask, causal, backend, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_key_bias_fp16_with_token_predicates(backend):
    """fp16, a mask with in-tile bit masks and a window (partial tiles), per-query-head mask."""
    q, k, v, bias = make_inputs(torch.float16, bias_heads=4)
    gen = torch.Generator().manual_seed(3)
    token_keep = torch.rand(1, 4, 80, 96, generator=gen) < 0.6
    mask = BlockSparseMask.from_token_mask(token_keep, 32)
    assert mask.has_bits
    run_and_check(q, k, v, bias, mask, True, backend, torch.float16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_excluded_key_bias_never_reaches_an_output(backend):
    """NaN / +inf biases on keys the mask excludes change nothing; -inf on a kept key equals excluding it."""
    q, k, v, bias = make_inputs(torch.float32, bias_batch=1, bias_heads=1)
    keep = torch.ones(1, 1, 80, 96, dtype=torch.bool)
    keep[..., 40:50] = False  # keys 40..49 excluded for every query, inside tiles that are kept
    mask = BlockSparseMask.from_token_mask(keep, 32)
    base = sparse_attention(q, k, v, mask, backend=backend, key_bias=bias)
    poisoned = bias.clone()
    poisoned[..., 40:45] = float("nan")
    poisoned[..., 45:50] = float("inf")
    o = sparse_attention(q, k, v, mask, backend=backend, key_bias=poisoned)
    assert torch.equal(o, base)
    minus_inf = bias.clone()
    minus_inf[..., 40:50] = float("-inf")
    o_inf = sparse_attention(q, k, v, None, backend=backend, key_bias=minus_inf)
    torch.testing.assert_close(o_inf, base, atol=1e-5, rtol=1e-5)


def test_key_bias_gradient_sums_over_broadcast_dims():
    """The gradient of a broadcast bias is the sum of the per-(batch, query head) gradients."""
    q, k, v, bias = make_inputs(torch.float64, bias_batch=2, bias_heads=4)
    bias[:] = bias[:1, :1]  # the same values everywhere
    full = bias.clone().requires_grad_()
    one = bias[:1, :1].clone().requires_grad_()
    do = torch.randn(2, 4, 80, 16, dtype=torch.float64)
    (g_full,) = torch.autograd.grad(sparse_attention(q, k, v, key_bias=full), full, do)
    (g_one,) = torch.autograd.grad(sparse_attention(q, k, v, key_bias=one), one, do)
    torch.testing.assert_close(g_one, g_full.sum((0, 1), keepdim=True))


def test_key_bias_gradcheck_fp64():
    q, k, v, bias = make_inputs(torch.float64, b=1, hq=2, hkv=1, lq=20, lk=24, d=8, bias_heads=1, bias_batch=1)
    mask = block_mask(20, 24, 16)
    leaves = [x.requires_grad_() for x in (q, k, v, bias)]
    assert torch.autograd.gradcheck(
        lambda a, b_, c, d: sparse_attention(a, b_, c, mask, causal=True, key_bias=d), leaves)


def test_key_bias_errors_name_the_argument():
    q, k, v, bias = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="key_bias must have shape"):
        sparse_attention(q, k, v, key_bias=bias[..., :10])
    with pytest.raises(ValueError, match="key_bias must have shape"):
        sparse_attention(q, k, v, key_bias=torch.zeros(2, 3, 96))
    with pytest.raises(TypeError, match="key_bias must have a floating dtype"):
        sparse_attention(q, k, v, key_bias=torch.zeros(2, 2, 96, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_bias must be a torch.Tensor"):
        sparse_attention(q, k, v, key_bias=[0.0] * 96)
    stripe = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0]]]), (80, 96), 32)
    with pytest.raises(ValueError, match="key_bias is supported with a BlockSparseMask"):
        sparse_attention(q, k, v, stripe, key_bias=bias)


def test_key_bias_refused_with_varlen_kernels():
    from sparse_attn_kernels.block_sparse.fwd import block_sparse_fwd

    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    counts = torch.ones(1, 1, 1, dtype=torch.int32)
    indices = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="key_bias is not supported with packed"):
        block_sparse_fwd(q, q, q, counts, indices, 16, 16, False, 0.25, varlen=(cu, cu, 6, 6),
                         key_bias=torch.zeros(2, 2, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_key_bias_matches_oracle(dtype, causal):
    """On the chip (bf16 included, which the interpreter cannot run): forward and gradients, GQA, a bit mask."""
    q, k, v, bias = make_inputs(dtype, lq=300, lk=333, d=64, bias_heads=2)
    gen = torch.Generator().manual_seed(5)
    mask = BlockSparseMask.from_token_mask(torch.rand(1, 1, 300, 333, generator=gen) < 0.5, 64)
    q, k, v, bias = (x.cuda() for x in (q, k, v, bias))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    o = sparse_attention(*leaves[:3], mask.to("cuda"), causal=causal, key_bias=leaves[3])
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    keep = mask.to_dense().cuda()
    results = {}
    for name, dt in (("ref", torch.float64), ("lowp", dtype)):
        ls = [x.detach().to(dt).requires_grad_() for x in (q, k, v, bias)]
        out = biased_attention_on(ls, keep, causal, dt)
        results[name] = (out, torch.autograd.grad(out, ls, do.to(dt)))
    check_close(o, results["ref"][0], results["lowp"][0], "o")
    for name, g, r, lp in zip(("dq", "dk", "dv", "dbias"), grads, results["ref"][1], results["lowp"][1]):
        check_close(g, r, lp, name, factor=3.0, dtype=dtype)


def biased_attention_on(leaves, keep, causal, dtype):
    """:func:`biased_attention` on the leaves' device."""
    q, k, v, bias = leaves
    group = q.shape[1] // k.shape[1]
    kd, vd = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    bd = bias.repeat_interleave(q.shape[1] // bias.shape[1], 1) if bias.shape[1] not in (1, q.shape[1]) else bias
    s = (q @ kd.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bd[:, :, None, :]
    allowed = keep.expand(s.shape)
    if causal:
        allowed = allowed & causal_keep(q.shape[2], k.shape[2], q.device)
    seen = allowed.any(-1, keepdim=True)
    s = torch.where(allowed | ~seen, s, -math.inf)
    p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype) * seen
    return p @ vd
