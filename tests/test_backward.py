"""Gradients of sparse_attention vs the fp64 oracle (factor 3), for the Triton kernels under the
interpreter (fp32/fp16) and the PyTorch path (fp32/fp16/bf16), plus gradcheck in fp64."""

import math

import pytest
import torch

from oracle import causal_keep, check_close, expand_heads
from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn_kernels.block_sparse import bwd as bwd_mod
from sparse_attn_kernels.reference import block_sparse_attn_ref


# ---- oracle gradients: math attention with rows that see no key kept finite -----------------------
def math_attention_safe(q, k, v, token_mask, causal, scale, dtype):
    """Like ``oracle.math_attention`` but differentiable on rows that see no key (o = 0, grads = 0)."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if token_mask is not None:
        keep = keep & expand_heads(token_mask, q.shape[1], k.shape[1])
    if causal:
        keep = keep & causal_keep(q.shape[2], k.shape[2], q.device)
    keep = keep.expand(s.shape)
    seen = keep.any(-1, keepdim=True)
    s = torch.where(keep | ~seen, s, -math.inf)  # empty rows: a finite softmax, zeroed below
    p = torch.softmax(s.float() if dtype == torch.float16 else s, dim=-1).to(dtype) * seen
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
    return p @ vd, torch.where(seen[..., 0], lse, 0.0)


def oracle_grads(q, k, v, do, token_mask, causal, scale, dtype, dlse=None):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o, lse = math_attention_safe(*leaves, token_mask, causal, scale, dtype)
    outs, grads = [o], [do.to(dtype)]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse.to(dtype))
    return torch.autograd.grad(outs, leaves, grads)


def make_mask(batch_m, heads_m, q_len, kv_len, block, density, gen, empty_q_block=None, unused_k_block=None):
    bm, bn = block
    keep = torch.rand(batch_m, heads_m, math.ceil(q_len / bm), math.ceil(kv_len / bn), generator=gen) < density
    keep[..., 0, 0] = True  # never an all-empty mask
    if empty_q_block is not None:
        keep[..., empty_q_block, :] = False
    if unused_k_block is not None:
        keep[..., unused_k_block] = False
    return BlockSparseMask.from_dense(keep, (bm, bn), (q_len, kv_len))


def run_case(case, backend, dtype, dout_layout="contiguous", with_lse=False, device="cpu"):
    gen = torch.Generator().manual_seed(1234)
    b, hq, hkv, hm, bmask = case["b"], case["hq"], case["hkv"], case["hm"], case.get("bmask", 1)
    q_len, kv_len, d = case["lq"], case["lk"], case["d"]
    q = torch.randn(b, hq, q_len, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(b, hkv, kv_len, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(b, hkv, kv_len, d, generator=gen).to(device, dtype).requires_grad_()
    mask = None
    if case.get("density") is not None:
        mask = make_mask(bmask, hm, q_len, kv_len, case["block"], case["density"], gen,
                         case.get("empty_q_block"), case.get("unused_k_block")).to(device)
    causal = case["causal"]
    o, lse = sparse_attention(q, k, v, mask, causal=causal, backend=backend, return_lse=True)
    if dout_layout == "transposed":  # a [B, L, H, D] buffer seen as [B, H, L, D]
        do = torch.randn(b, q_len, hq, d, generator=gen).to(device, dtype).transpose(1, 2)
    elif dout_layout == "strided":  # every other element of the last dim
        do = torch.randn(b, hq, q_len, 2 * d, generator=gen).to(device, dtype)[..., ::2]
    else:
        do = torch.randn(b, hq, q_len, d, generator=gen).to(device, dtype)
    outs, grads = [o], [do]
    dlse = None
    if with_lse:
        dlse = torch.randn(b, hq, q_len, generator=gen).to(device)
        outs.append(lse)
        grads.append(torch.where(torch.isinf(lse), 0.0, dlse))
    got = torch.autograd.grad(outs, (q, k, v), grads)

    token = mask.to_dense() if mask is not None else None
    scale = d ** -0.5
    ref = oracle_grads(q, k, v, do, token, causal, scale, torch.float64, dlse)
    low = oracle_grads(q, k, v, do, token, causal, scale, dtype, dlse)
    for name, g, r, lp, x in zip(("dq", "dk", "dv"), got, ref, low, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        check_close(g, r, lp, name=name, factor=3.0, dtype=dtype)
    return mask, got, o


def _c(**kw):
    return kw


# b, hq:hkv, mask heads (hm), lengths, head dim, block size, density, causal
CASES = [
    pytest.param(_c(b=1, hq=4, hkv=1, hm=4, lq=97, lk=113, d=80, block=(32, 64), density=0.5, causal=True),
                 id="gqa4to1-maskHq-causal-97x113-d80"),
    pytest.param(_c(b=1, hq=4, hkv=1, hm=1, lq=113, lk=97, d=16, block=(16, 16), density=0.4, causal=True),
                 id="mqa-mask1-causal-113x97-d16"),
    pytest.param(_c(b=2, hq=8, hkv=2, hm=2, bmask=2, lq=64, lk=80, d=32, block=(16, 32), density=0.3,
                    causal=False), id="gqa4to1-maskHkv-batchmask-64x80-d32"),
    pytest.param(_c(b=1, hq=2, hkv=2, hm=2, lq=128, lk=200, d=128, block=(64, 32), density=0.5, causal=False),
                 id="mha-maskH-128x200-d128"),
    pytest.param(_c(b=1, hq=2, hkv=1, hm=1, lq=100, lk=130, d=64, block=None, density=None, causal=True),
                 id="dense-causal-100x130-d64"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("case", CASES)
def test_triton_grads_match_oracle(case, dtype):
    run_case(case, "triton", dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", CASES)
def test_torch_grads_match_oracle(case, dtype):
    run_case(case, "torch", dtype)


EMPTY_ROWS = _c(b=1, hq=4, hkv=2, hm=2, lq=113, lk=80, d=32, block=(32, 16), density=0.6, causal=True,
                empty_q_block=1, unused_k_block=2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_rows_give_zero_grads(backend):
    """A query block with no key and (causal, Lq > Lk) top rows that see nothing: dq = 0 exactly, all finite."""
    mask, (dq, dk, dv), o = run_case(EMPTY_ROWS, backend, torch.float32)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, 32:64] == 0).all() and (o[:, :, 32:64] == 0).all()
    assert (dq[:, :, :113 - 80] == 0).all()  # bottom-right causal: row i sees j <= i - 33
    assert (dk[:, :, 32:48] == 0).all() and (dv[:, :, 32:48] == 0).all()  # key block 2 unused


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noncontiguous_dout(backend, layout):
    case = _c(b=1, hq=2, hkv=1, hm=1, lq=97, lk=97, d=32, block=(32, 32), density=0.6, causal=True)
    run_case(case, backend, torch.float16 if backend == "triton" else torch.float32, dout_layout=layout)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lse_gradient(backend):
    """lse (return_lse=True) is differentiable too: d lse / d s = P."""
    case = _c(b=1, hq=2, hkv=1, hm=2, lq=70, lk=90, d=16, block=(32, 32), density=0.5, causal=True)
    run_case(case, backend, torch.float32, with_lse=True)


def test_triton_every_gradient_element_written(monkeypatch):
    """NaN-poisoned gradient buffers: every element must be written, zeros included."""
    def poisoned(x):
        out = torch.empty_like(x) if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype)
        return out.fill_(float("nan"))
    monkeypatch.setattr(bwd_mod, "_grad_like", poisoned)
    _, grads, _ = run_case(EMPTY_ROWS, "triton", torch.float16)
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_backward_deterministic():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 96, 32, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 96, 32, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 96, 32, generator=gen, requires_grad=True)
    mask = make_mask(1, 4, 96, 96, (32, 32), 0.6, gen)
    do = torch.randn(1, 4, 96, 32, generator=gen)
    runs = [torch.autograd.grad(sparse_attention(q, k, v, mask, backend="triton"), (q, k, v), do) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_backward_of_empty_inputs_is_zero():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, requires_grad=True)
    v = torch.randn(1, 2, 0, 16, requires_grad=True)
    o = sparse_attention(q, k, v, backend="torch")
    o.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def _tiny_fp64(seed, hq=4, hkv=2, q_len=11, kv_len=9, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, q_len, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hkv, kv_len, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, hkv, kv_len, d, generator=gen, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, hq, math.ceil(q_len / 4), math.ceil(kv_len / 4), generator=gen) < 0.6
    keep[..., -1] = True  # with bottom-right causal (Lq > Lk) the first rows still see nothing
    return q, k, v, BlockSparseMask.from_dense(keep, 4, (q_len, kv_len))


@pytest.mark.parametrize("causal", [pytest.param(True, id="causal"), pytest.param(False, id="full")])
def test_gradcheck_torch_fp64(causal):
    """Analytical (chunked recompute backward) vs numerical gradients through sparse_attention."""
    q, k, v, mask = _tiny_fp64(3)
    fn = lambda q, k, v: sparse_attention(q, k, v, mask, causal=causal, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_gradcheck_ref_lse_fp64():
    """Through lse as well (sparse_attention returns lse in float32, so check the fp64 op itself)."""
    q, k, v, mask = _tiny_fp64(4)

    def fn(q, k, v):
        o, lse = block_sparse_attn_ref(q, k, v, mask.counts, mask.indices, 4, 4, True, 0.3)
        return o, torch.where(torch.isinf(lse), 0.0, lse)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_gradcheck_ref_direct_chunked():
    """The reference backward with a tiny chunk budget (one unit per chunk) still matches."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = BlockSparseMask.from_dense(torch.rand(1, 1, 3, 3, generator=gen) < 0.7, 4, (10, 10))
    from sparse_attn_kernels import reference
    o, lse = block_sparse_attn_ref(q, k, v, mask.counts, mask.indices, 4, 4, True, 0.5)
    do = torch.randn_like(o)
    full = torch.autograd.grad(o, (q, k, v), do)
    small = reference.block_sparse_bwd_ref(do, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(),
                                           mask.counts, mask.indices, 4, 4, True, 0.5, chunk_bytes=1)
    for a, b in zip(full, small):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_triton_inference_skips_kv_major():
    """Without a gradient the key-major lists are neither built nor needed."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    mask = make_mask(1, 1, 64, 64, (32, 32), 0.6, gen)
    with torch.no_grad():
        o = sparse_attention(q, k, v, mask, backend="triton")
    assert mask._kv_major is None and torch.isfinite(o).all()


def test_backward_without_key_major_lists_raises():
    from sparse_attn_kernels.block_sparse.op import block_sparse_attn

    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 1, 32, 16, generator=gen, requires_grad=True) for _ in range(3))
    mask = make_mask(1, 1, 32, 32, (16, 16), 1.0, gen)
    o, _ = block_sparse_attn(q, k, v, mask.counts, mask.indices, 16, 16)
    with pytest.raises(ValueError, match="counts_t and indices_t"):
        o.sum().backward()


GPU_CASES = [
    pytest.param(_c(b=2, hq=8, hkv=2, hm=8, lq=1024, lk=1024, d=128, block=(128, 128), density=0.3, causal=True),
                 id="gqa4to1-maskHq-causal-1024-d128-b128"),
    pytest.param(_c(b=1, hq=4, hkv=1, hm=1, lq=1000, lk=1537, d=80, block=(64, 128), density=0.2, causal=True,
                    empty_q_block=3), id="mqa-causal-1000x1537-d80-emptyrows"),
    pytest.param(_c(b=1, hq=4, hkv=4, hm=4, lq=777, lk=513, d=64, block=(64, 64), density=0.5, causal=False),
                 id="mha-777x513-d64"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_triton_grads_match_oracle(case, dtype):
    run_case(case, "triton", dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_triton_backward_deterministic():
    case = GPU_CASES[0].values[0]
    grads = [run_case(case, "triton", torch.bfloat16, device="cuda")[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
