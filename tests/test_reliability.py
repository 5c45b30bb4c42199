"""Regression tests of the reliability issue: the reproducers, each on every backend it names."""

import pytest
import torch

from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention

NAN = float("nan")
BACKENDS = ["torch", "triton"]


def test_reference_path_ignores_nan_values_outside_the_mask():
    """return_lse with gradients takes the reference path; its list padding used to read block 0."""
    keep = torch.tensor([[[[1, 1, 1], [0, 0, 1]]]], dtype=torch.bool)
    mask = BlockSparseMask.from_dense(keep, 32, (64, 96))
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    k, v = torch.randn(2, 1, 2, 96, 16)
    v[..., :32, :] = NAN
    o, lse = sparse_attention(q, k, v, mask, return_lse=True)
    assert torch.isfinite(o[:, :, 32:]).all() and torch.isfinite(lse[:, :, 32:]).all()
    assert torch.isnan(o[:, :, :32]).all()  # these rows do see the NaN values


@pytest.mark.parametrize("backend", BACKENDS)
def test_stripe_mask_ignores_keys_on_no_slash_and_no_column(backend):
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0, 1, 2]]]),
                                                seq_lens=(64, 64), block_size=32)
    q, k, v = torch.randn(3, 1, 2, 64, 16)
    v[:, :, 20] = NAN
    out = sparse_attention(q, k, v, mask, causal=True, backend=backend)
    assert int(out.isnan().any(-1).sum()) == 6  # rows 20, 21, 22 of both heads see key 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_future_keys_never_reach_an_output(backend):
    q, k, v = torch.randn(3, 1, 2, 64, 16)
    k[:, :, 40] = NAN
    out = sparse_attention(q, k, v, causal=True, backend=backend)
    assert int(out.isnan().any(-1).sum()) == 48  # rows 40..63 of both heads


@pytest.mark.parametrize("path", ["cpu", "reference", "triton"])
def test_a_nan_row_has_nan_lse(path):
    """An LSE merge would silently drop a NaN row that reported lse = -inf."""
    q, k, v = torch.randn(3, 1, 2, 64, 16)
    q[0, 0, 5] = NAN
    backend = "triton" if path == "triton" else "torch"
    if path == "reference":
        q.requires_grad_()
    o, lse = sparse_attention(q, k, v, BlockSparseMask.full(64, 64, 32), return_lse=True, backend=backend)
    assert torch.isnan(o[0, 0, 5]).all() and torch.isnan(lse[0, 0, 5])
    assert torch.isfinite(lse[0, 0, :5]).all() and torch.isfinite(o[0, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_query_heads_give_an_empty_output(backend):
    out, lse = sparse_attention(torch.randn(1, 0, 64, 32), torch.randn(1, 1, 64, 32), torch.randn(1, 1, 64, 32),
                                return_lse=True, backend=backend)
    assert out.shape == (1, 0, 64, 32) and lse.shape == (1, 0, 64)


def test_width_zero_mask_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match="W >= 1"):
        BlockSparseMask(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 0, dtype=torch.int32), 32,
                        (64, 64))


@pytest.mark.parametrize("seq_lens,error", [((100,), TypeError), (100, TypeError), ((100, -1), ValueError),
                                            ((100.0, 64), TypeError)])
def test_bad_seq_lens_name_the_argument(seq_lens, error):
    with pytest.raises(error, match="seq_lens"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, seq_lens=seq_lens)


@pytest.mark.parametrize("value", [torch.ones(2), None, "mask"])
def test_from_flex_block_mask_refuses_other_types(value):
    with pytest.raises(TypeError, match="BlockMask"):
        BlockSparseMask.from_flex_block_mask(value)


@pytest.mark.parametrize("kw", [dict(causal="False"), dict(return_lse="no"), dict(causal=1)])
def test_booleans_must_be_booleans(kw):
    q = k = v = torch.randn(1, 1, 64, 16)
    name = next(iter(kw))
    with pytest.raises(TypeError, match=name):
        sparse_attention(q, k, v, **kw)
    stripe = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0]]]), seq_lens=(64, 64),
                                                  block_size=32)
    with pytest.raises(TypeError, match=name):
        sparse_attention(q, k, v, stripe, **kw)
