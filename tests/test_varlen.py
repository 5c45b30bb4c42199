"""Packed (varlen) batches and padded batches: each sequence gives what it gives alone, forward and backward."""

import pytest
import torch

from oracle import check_close
from sparse_attn import BlockSparseMask, sparse_attention, sparse_attention_varlen, stack_masks
from sparse_attn import ranges_from_attention_mask, ranges_from_lengths

LENS_Q = [17, 40, 1, 33]
LENS_K = [20, 40, 9, 33]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _alone(q, k, v, cu_q, cu_k, masks, causal, window, g):
    """Per sequence on its own: output rows and gradients summed over the sequences."""
    outs, grads = [], [torch.zeros_like(x) for x in (q, k, v)]
    for s, mask in enumerate(masks):
        qs, qe, ks, ke = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        o = sparse_attention(qq.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], mask,
                             causal=causal, window=window, backend="torch")
        o = o[0].transpose(0, 1)
        dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), g[qs:qe])
        grads[0][qs:qe] += dq
        grads[1][ks:ke] += dk
        grads[2][ks:ke] += dv
        outs.append(o)
    return torch.cat(outs), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal,window,sparse", [(False, (-1, -1), True), (True, (-1, -1), True),
                                                  (True, (5, -1), False), (False, (3, 7), True)])
def test_varlen_equals_each_sequence_alone(backend, causal, window, sparse):
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    q = torch.randn(int(cu_q[-1]), 4, 16, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 16, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 16, requires_grad=True)
    if sparse:
        masks = [BlockSparseMask.from_dense(torch.rand(1, 2, -(-a // 16), -(-b // 16)) < 0.7, 16, (a, b))
                 for a, b in zip(LENS_Q, LENS_K)]
        mask = stack_masks(masks, 40, 40)
    else:
        masks = [None] * len(LENS_Q)
        mask = None
    out, lse = sparse_attention_varlen(q, k, v, cu_q, cu_k, 40, 40, mask, causal=causal, window=window,
                                       backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref, ref_grads = _alone(q, k, v, cu_q, cu_k, masks, causal, window, g)
    check_close(out, ref.double(), ref, factor=1.0)
    for name, a, b in zip("qkv", grads, ref_grads):
        check_close(a, b.double(), b, name=f"d{name}", factor=1.0)


def test_varlen_errors():
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    q = k = v = torch.randn(30, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        sparse_attention_varlen(q, k, v, torch.tensor([0, 10, 20], dtype=torch.int32), cu, 20, 20)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        sparse_attention_varlen(q, k, v, cu, cu, 10, 20)
    with pytest.raises(ValueError, match="rank 3"):
        sparse_attention_varlen(q[None], k, v, cu, cu, 20, 20)
    with pytest.raises(ValueError, match="seq_lens"):
        sparse_attention_varlen(q, k, v, cu, cu, 20, 20, BlockSparseMask.full(30, 30, 16))
    with pytest.raises(ValueError, match="ranges or segments"):
        sparse_attention_varlen(q, k, v, cu, cu, 20, 20, BlockSparseMask.full(20, 20, 16).with_predicates(
            kv_range=torch.tensor([[0, 5]])))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(backend, side):
    """A padded batch (ranges from a 2-D padding mask) gives each row's own result on its real tokens,
    forward and backward, whatever the padding holds (NaN here)."""
    lengths, total = [50, 23, 64], 64
    ranges = ranges_from_lengths(lengths, total, side)
    real = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    if side == "left":
        real = real.flip(1)
    assert torch.equal(ranges_from_attention_mask(real), ranges)
    q = torch.randn(3, 4, total, 16)
    k, v = torch.randn(3, 2, total, 16), torch.randn(3, 2, total, 16)
    for x in (q, k, v):
        x.masked_fill_(~real[:, None, :, None], float("nan"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    keep = torch.rand(1, 2, 4, 4) < 0.7
    keep |= torch.eye(4, dtype=torch.bool)
    mask = BlockSparseMask.from_dense(keep, 16, (total, total)).with_predicates(padding=real)
    out = sparse_attention(q, k, v, mask, causal=True, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads)
    assert (out[~real[:, None, :, None].expand_as(out)] == 0).all(), "padded query rows give 0"
    for b, n in enumerate(lengths):
        s, e = ranges[b].tolist()
        tok = mask.to_dense(causal=True)[b:b + 1, :, s:e, s:e]  # the row's own pairs
        qq, kk, vv = (x[b:b + 1, :, s:e].detach().clone().requires_grad_() for x in (q, k, v))
        alone = BlockSparseMask.from_token_mask(tok, 16)
        o = sparse_attention(qq, kk, vv, alone, backend="torch")
        check_close(out[b:b + 1, :, s:e], o.double(), o, factor=1.0)
        ref_g = torch.autograd.grad(o, (qq, kk, vv), g[b:b + 1, :, s:e])
        for name, a, r in zip("qkv", grads, ref_g):
            check_close(a[b:b + 1, :, s:e], r.double(), r, name=f"d{name}", factor=1.0)
        if side == "left":  # with left padding the row's causal diagonal is the plain one
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            assert bool((~tok[0, 0] | (j <= i)).all())


def test_ranges_from_attention_mask_refuses_holes():
    with pytest.raises(ValueError, match="contiguous"):
        ranges_from_attention_mask(torch.tensor([[1, 0, 1, 1]]))
