"""Token-exact masks: FlexAttention mask_mods (attention-gym style) converted exactly, on every path.

Each mask_mod is converted with the default ``BlockSparseMask.from_flex_block_mask`` and run on the
fused CPU path, the PyTorch reference and the Triton kernels (interpreter, small shapes), against an
fp64 oracle on the token mask evaluated independently (a plain vmap of the mask_mod) and against
eager ``flex_attention`` on the same BlockMask.
"""

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from oracle import check_close, check_lse, math_attention
from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn.flex import to_flex_block_mask


def _mods(q_len, kv_len, batch):
    """The mask_mods of the suite for one shape: name -> (mask_mod, depends on b, depends on h)."""
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    doc_q = torch.sort(torch.randint(0, 4, (q_len,), generator=gen)).values
    doc_k = torch.sort(torch.randint(0, 4, (kv_len,), generator=gen)).values
    valid = torch.tensor([kv_len, max(1, kv_len // 2)][:batch])
    prefix = max(1, kv_len // 3)
    width = 8  # 2-D grid of 8 columns

    mods = {
        "causal": (lambda b, h, q, kv: q >= kv, False, False),
        "sliding_window": (lambda b, h, q, kv: (q >= kv) & (q - kv <= 16), False, False),
        "prefix_lm": (lambda b, h, q, kv: (kv <= q) | (kv < prefix), False, False),
        "document": (lambda b, h, q, kv: doc_q[q] == doc_k[kv], False, False),
        "document_causal": (lambda b, h, q, kv: (doc_q[q] == doc_k[kv]) & (kv <= q), False, False),
        "dilated_window": (lambda b, h, q, kv: ((q - kv).abs() <= 24) & ((q - kv) % 3 == 0), False, False),
        "natten_2d": (lambda b, h, q, kv: ((q // width - kv // width).abs() <= 2) & ((q % width - kv % width).abs() <= 2),
                      False, False),
        "padding": (lambda b, h, q, kv: kv < valid[b], True, False),
        "per_head_window": (lambda b, h, q, kv: (q - kv).abs() <= 4 * (h + 1), False, True),
    }
    return mods


def _token_mask(mod, batch, heads, q_len, kv_len):
    """bool [batch, heads, Lq, Lk] by a plain nested vmap (independent of the package)."""
    fn = mod
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims)
    return fn(torch.arange(batch), torch.arange(heads), torch.arange(q_len), torch.arange(kv_len)).bool()


def _case(name, q_len, kv_len, batch=2, n_q_heads=4, n_kv_heads=1, block=32):
    mod, by_b, by_h = _mods(q_len, kv_len, batch)[name]
    mb, mh = (batch if by_b else 1), (n_q_heads if by_h else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = create_block_mask(mod, mb, mh, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    tok = _token_mask(mod, mb, mh, q_len, kv_len)
    return flex, tok


NAMES = list(_mods(8, 8, 1))
LENGTHS = [(1, 1), (17, 17), (97, 130), (130, 97), (257, 257), (1030, 1030)]


@pytest.mark.parametrize("lens", LENGTHS, ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_mask_mods_exact_on_the_torch_paths(name, lens):
    q_len, kv_len = lens
    head_dim = 80 if q_len == 97 else 64
    flex, tok = _case(name, q_len, kv_len, block=64 if q_len > 500 else 32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    assert torch.equal(mask.to_dense(), tok)  # conversion is exact at token level
    q = torch.randn(2, 4, q_len, head_dim)
    k, v = torch.randn(2, 1, kv_len, head_dim), torch.randn(2, 1, kv_len, head_dim)
    ref, ref_lse = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=torch.float32)
    out = sparse_attention(q, k, v, mask)  # fused CPU path
    check_close(out, ref, low)
    out_r, lse_r = sparse_attention(q, k, v.clone().requires_grad_(), mask, return_lse=True)  # reference path
    check_close(out_r, ref, low, name="reference")
    check_lse(lse_r.double(), ref_lse)
    assert (out[torch.isinf(ref_lse)] == 0).all(), "rows that see no key give 0"
    if q_len <= 257:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f_out = flex_attention(q, k.expand(2, 4, -1, -1), v.expand(2, 4, -1, -1), block_mask=flex)
        seen = ~torch.isinf(ref_lse)  # flex's empty rows are not defined the same way
        assert (out - f_out)[seen].abs().max().item() <= 1e-5 if seen.any() else True


INTERP = [("causal", (97, 130)), ("sliding_window", (130, 97)), ("prefix_lm", (97, 130)), ("document", (130, 97)),
          ("document_causal", (97, 97)), ("dilated_window", (97, 130)), ("natten_2d", (64, 64)),
          ("padding", (97, 130)), ("per_head_window", (17, 40))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,lens", INTERP, ids=[f"{n}-{a}x{b}" for n, (a, b) in INTERP])
def test_mask_mods_exact_in_the_triton_kernel(name, lens, dtype):
    q_len, kv_len = lens
    flex, tok = _case(name, q_len, kv_len, block=32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    head_dim = 80 if dtype == torch.float16 else 64
    q = torch.randn(2, 4, q_len, head_dim).to(dtype)
    k, v = torch.randn(2, 1, kv_len, head_dim).to(dtype), torch.randn(2, 1, kv_len, head_dim).to(dtype)
    out, lse = sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
    ref, ref_lse = math_attention(q, k, v, tok)
    check_close(out, ref, math_attention(q, k, v, tok, dtype=dtype)[0])
    check_lse(lse.double(), ref_lse)


GRAD = [("sliding_window", (97, 130), "torch"), ("document_causal", (97, 97), "torch"),
        ("per_head_window", (40, 33), "torch"), ("padding", (50, 70), "torch"),
        ("sliding_window", (70, 50), "triton"), ("document", (64, 64), "triton"),
        ("per_head_window", (33, 40), "triton"), ("padding", (40, 70), "triton")]


@pytest.mark.parametrize("name,lens,backend", GRAD, ids=[f"{n}-{a}x{b}-{k}" for n, (a, b), k in GRAD])
def test_mask_mods_gradients(name, lens, backend):
    q_len, kv_len = lens
    flex, tok = _case(name, q_len, kv_len, block=16 if backend == "triton" else 32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    q = torch.randn(2, 4, q_len, 32, requires_grad=True)
    k = torch.randn(2, 1, kv_len, 32, requires_grad=True)
    v = torch.randn(2, 1, kv_len, 32, requires_grad=True)
    out = sparse_attention(q, k, v, mask, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref, _ = math_attention(q, k, v, tok)
    ref_g = torch.autograd.grad(ref, (q, k, v), g.double())
    low, _ = math_attention(q, k, v, tok, dtype=torch.float32)
    low_g = torch.autograd.grad(low, (q, k, v), g)
    for n, a, b, c in zip("qkv", grads, ref_g, low_g):
        check_close(a, b, c, name=f"d{n}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document_causal", "padding", "per_head_window"])
def test_keys_outside_the_mask_never_reach_an_output(name, backend):
    """NaN and Inf in every key/value that no query sees, and in keys that only some rows see."""
    flex, tok = _case(name, 70, 90, block=32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    q = torch.randn(2, 4, 70, 32, requires_grad=True)
    k0, v0 = torch.randn(2, 1, 90, 32), torch.randn(2, 1, 90, 32)
    clean = sparse_attention(q, k0, v0, mask, backend=backend)
    seen = tok.expand(2, 4, 70, 90).any(2).any(1, keepdim=True)  # [2, 1, Lk] keys some query sees
    k, v = k0.clone(), v0.clone()
    k[~seen] = float("nan")
    v[~seen] = float("inf")
    k.requires_grad_()
    v.requires_grad_()
    out = sparse_attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    check_close(out, clean.double(), clean, factor=1.0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk[seen.expand_as(dk[..., 0])]).all()
    assert torch.isfinite(dv[seen.expand_as(dv[..., 0])]).all()
    # one key seen by some rows only: NaN exactly in the rows that see it
    j = int(torch.nonzero(seen[0, 0])[-1])
    v2 = v0.clone()
    v2[0, 0, j] = float("nan")
    out2 = sparse_attention(q.detach(), k0, v2, mask, backend=backend)
    sees_j = tok.expand(2, 4, 70, 90)[0, :, :, j]  # [Hq, Lq]
    assert torch.equal(torch.isnan(out2[0]).any(-1), sees_j)
    assert torch.isfinite(out2[1]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_native_masks_convert_to_flex_and_back(backend):
    """A per-head sliding window (bits), a document mask (segments) and a padding mask (ranges) built
    natively give FlexAttention's result through to_flex_block_mask, and convert back exactly."""
    q_len = kv_len = 96
    doc = torch.sort(torch.randint(0, 3, (kv_len,))).values
    per_head = BlockSparseMask.from_mask_mod(lambda b, h, q, kv: (q - kv).abs() <= 5 * (h + 1), 1, 4, q_len, kv_len,
                                             32)
    document = BlockSparseMask.full(q_len, kv_len, 32).with_predicates(q_segments=doc[None], kv_segments=doc[None])
    padding = BlockSparseMask.full(q_len, kv_len, 32).with_predicates(
        kv_range=torch.tensor([[0, 96], [0, 50]]), q_range=torch.tensor([[0, 96], [10, 96]]))
    window = BlockSparseMask.full(q_len, kv_len, 32).with_predicates(window=(20, 3))
    q = torch.randn(2, 4, q_len, 32)
    k, v = torch.randn(2, 4, kv_len, 32), torch.randn(2, 4, kv_len, 32)
    for mask, causal in ((per_head, False), (document, True), (padding, True), (window, False)):
        tok = mask.to_dense(causal=causal)
        ref, ref_lse = math_attention(q, k, v, tok)
        out = sparse_attention(q, k, v, mask, causal=causal, backend=backend)
        check_close(out, ref, math_attention(q, k, v, tok, dtype=torch.float32)[0])
        flex = to_flex_block_mask(mask, causal=causal, num_heads=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f_out = flex_attention(q, k, v, block_mask=flex)
        seen = ~torch.isinf(ref_lse)
        assert (f_out - ref)[seen].abs().max().item() <= 1e-5
        back = BlockSparseMask.from_flex_block_mask(flex)
        assert (back.to_dense() == tok).all()


def test_partial_flex_blocks_that_are_full_or_empty_are_recognized():
    """FlexAttention marks every block of a ragged edge partial: converted, a block whose mask_mod keeps
    all valid pairs is a full tile (no bits), one that keeps none is dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = create_block_mask(lambda b, h, q, kv: kv < 1000, 1, 1, 100, 70, device="cpu", BLOCK_SIZE=32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    assert not mask.has_bits and torch.equal(mask.to_block_dense(), torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = create_block_mask(lambda b, h, q, kv: (kv < 32) | (q < 0), 1, 1, 100, 100, device="cpu", BLOCK_SIZE=32)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    assert torch.equal(mask.to_block_dense()[0, 0, :, 0], torch.ones(4, dtype=torch.bool))
    assert int(mask.counts.sum()) == 4 and not mask.has_bits


def test_token_mask_constructor_is_exact_and_counts_density():
    tok = torch.rand(2, 3, 97, 130) < 0.3
    tok[..., :40] = True
    mask = BlockSparseMask.from_token_mask(tok, (32, 16))
    assert torch.equal(mask.to_dense(), tok)
    assert mask.kept_pairs() == int(tok.sum())
    assert mask.density() == pytest.approx(tok.double().mean().item(), abs=1e-12)
    i, j = torch.arange(97)[:, None], torch.arange(130)[None]
    causal = j <= i + 33
    assert torch.equal(mask.to_dense(causal=True), tok & causal)
    assert mask.density(causal=True) == pytest.approx((tok & causal).sum().item() / (6 * causal.sum().item()))
    assert mask.pair_fraction(causal=True) == pytest.approx((tok & causal).double().mean().item())


def test_lengths_not_multiple_of_the_block_are_not_refused():
    """torch marks every edge block of a ragged length partial; a block-aligned mask still converts."""
    keep = torch.rand(1, 2, 4, 3) < 0.6
    mask = BlockSparseMask.from_dense(keep, 32, seq_lens=(100, 70))
    flex = to_flex_block_mask(mask, num_heads=2)
    back = BlockSparseMask.from_flex_block_mask(flex)
    assert torch.equal(back.to_dense(), mask.to_dense())
    assert math.isclose(back.density(), mask.density())


def test_quality_report_is_token_exact():
    """attention_quality measures the pairs a token-exact mask keeps (not whole tiles), and its density is
    the mask's density (one definition)."""
    from sparse_attn import attention_quality

    flex, tok = _case("sliding_window", 97, 97)
    mask = BlockSparseMask.from_flex_block_mask(flex)
    q, k, v = torch.randn(1, 2, 97, 32), torch.randn(1, 2, 97, 32), torch.randn(1, 2, 97, 32)
    report = attention_quality(q, k, v, mask, causal=True)
    assert report["density_mean"] == pytest.approx(mask.density(causal=True), abs=1e-12)
    out = sparse_attention(q, k, v, mask, causal=True)
    ref, _ = math_attention(q, k, v, tok)
    dense, _ = math_attention(q, k, v, None, causal=True)
    expected = ((ref - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2)))[0]
    assert torch.allclose(report["error"][0], expected, atol=1e-5)
    assert (out.double() - ref).abs().max() < 1e-5
