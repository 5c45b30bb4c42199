"""StripeSparseMask with per-query-block columns (``block_columns``): semantics, exact methods, both backends.

The reference is a direct dense construction: query ``i`` sees key ``j`` iff ``j`` is a vertical column, ``i - j``
a slash, or ``j`` a block column of ``i``'s query block whose tile is not crossed by a slash.
"""

import math

import pytest
import torch

from oracle import check_close, math_attention
from sparse_attn import StripeSparseMask, sparse_attention
from sparse_attn.head_groups import select_heads
from sparse_attn.quality import attention_quality


def random_case(mask_batch, mask_heads, q_len, kv_len, block_size, n_cols=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bm = block_size if isinstance(block_size, int) else block_size[0]
    vertical = torch.randint(0, kv_len, (mask_batch, mask_heads, 3), generator=gen)
    slash = torch.randint(1 - kv_len, q_len, (mask_batch, mask_heads, 4), generator=gen)
    slash[..., 0] = kv_len - q_len  # the bottom-right diagonal
    cols = torch.randint(-1, kv_len, (mask_batch, mask_heads, math.ceil(q_len / bm), n_cols), generator=gen)
    cols[..., 0] = vertical[..., :1, None].expand_as(cols[..., 0:1])[..., 0]  # a vertical column again: dropped
    return vertical, slash, cols


def direct_dense(vertical, slash, cols, q_len, kv_len, block_size):
    """bool ``[Bm, Hm, Lq, Lk]`` from the definition (plain loops over lists, dense tiles)."""
    bm, bn = (block_size, block_size) if isinstance(block_size, int) else block_size
    n_b = max(vertical.shape[0], slash.shape[0], cols.shape[0])
    n_h = max(vertical.shape[1], slash.shape[1], cols.shape[1])
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    out = torch.zeros(n_b, n_h, q_len, kv_len, dtype=torch.bool)
    for b in range(n_b):
        for h in range(n_h):
            col = torch.zeros(kv_len, dtype=torch.bool)
            col[vertical[b % vertical.shape[0], h % vertical.shape[1]]] = True
            on_slash = torch.isin(i - j, slash[b % slash.shape[0], h % slash.shape[1]])
            keep = col[None, :] | on_slash
            c = cols[b % cols.shape[0], h % cols.shape[1]]
            for m in range(c.shape[0]):
                r = slice(m * bm, min(q_len, (m + 1) * bm))
                for key in c[m].tolist():
                    if key < 0:
                        continue
                    kb = slice(key // bn * bn, min(kv_len, (key // bn + 1) * bn))
                    if not bool(on_slash[r, kb].any()):  # tiles crossed by a slash keep only slash | vertical
                        keep[r, key] = True
            out[b, h] = keep
    return out


SHAPES = [  # mask_batch, mask_heads, Lq, Lk, block_size
    pytest.param(1, 2, 100, 120, 16, id="lq<lk"),
    pytest.param(2, 1, 97, 64, (32, 16), id="lq>lk-rect"),
    pytest.param(1, 1, 64, 64, 32, id="square-all-tiles-crossed"),
    pytest.param(1, 1, 128, 128, 16, id="square"),
]


@pytest.mark.parametrize("mask_batch,mask_heads,q_len,kv_len,block_size", SHAPES)
def test_dense_density_flex_covering(mask_batch, mask_heads, q_len, kv_len, block_size):
    vertical, slash, cols = random_case(mask_batch, mask_heads, q_len, kv_len, block_size)
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), block_size, block_columns=cols)
    mask.validate()
    want = direct_dense(vertical, slash, cols, q_len, kv_len, block_size)
    assert torch.equal(mask.to_dense(), want)
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    vis = j <= i + (kv_len - q_len)
    assert torch.equal(mask.to_dense(causal=True), want & vis)
    assert mask.density() == pytest.approx(want.double().mean().item(), abs=1e-12)
    causal_density = (want & vis).double().sum((2, 3)).mean().item() / int(vis.sum())
    assert mask.density(causal=True) == pytest.approx(causal_density, abs=1e-12)
    # the stored lists are the kept remainder: no vertical column, none inside a block-part tile
    plain = StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), block_size).to_dense()
    assert bool((mask.block_column_counts > 0).any()) == bool((want & ~plain).any())
    bm = mask.block_size[0]
    rows = torch.clamp(q_len - torch.arange(mask.num_blocks[0]) * bm, max=bm)  # rows of each query block
    assert int((mask.block_column_counts * rows).sum()) == int((want & ~plain).sum())
    assert int(mask.col_counts.sum()) >= int(mask.block_column_counts.sum())
    # flex mask_mod, covering tiles, rows_to_dense
    mod = mask.flex_mask_mod(causal=True)
    for b in range(mask.batch_heads[0]):
        for h in range(mask.batch_heads[1]):
            got = mod(torch.tensor(b), torch.tensor(h), i, j)
            assert torch.equal(got, want[b, h] & vis)
    cover = mask.covering_block_mask().to_dense()
    assert not bool((want & ~cover).any())
    assert torch.equal(mask.rows_to_dense(16, 48), want[:, :, 16:48])
    assert "block_columns=" in repr(mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_batch,mask_heads,q_len,kv_len,block_size", SHAPES)
def test_slice_is_exact(mask_batch, mask_heads, q_len, kv_len, block_size, causal):
    vertical, slash, cols = random_case(mask_batch, mask_heads, q_len, kv_len, block_size, seed=1)
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), block_size, block_columns=cols)
    dense = mask.to_dense(causal)
    bm, bn = (block_size, block_size) if isinstance(block_size, int) else block_size
    spans = [(0, q_len, 0, kv_len), (bm, q_len, bn, kv_len), (0, bm * (q_len // bm // 2 or 1), bn, 2 * bn),
             (bm, 2 * bm, 0, kv_len), (bm, bm, 0, kv_len)]
    for q0, q1, k0, k1 in spans:
        part = mask.slice(q0, q1, k0, k1, causal=causal)
        part.validate()
        assert torch.equal(part.to_dense().expand_as(dense[..., q0:q1, k0:k1]), dense[..., q0:q1, k0:k1]), \
            (q0, q1, k0, k1, type(part).__name__)


def test_without_block_columns_unchanged():
    vertical, slash, cols = random_case(1, 2, 100, 120, 16)
    plain = StripeSparseMask.from_vertical_slash(vertical, slash, (100, 120), 16)
    assert plain.block_columns is None and plain.block_column_counts is None and not plain.has_block_columns
    assert "block_columns" not in repr(plain)
    padding = torch.full_like(cols, -1)
    empty = StripeSparseMask.from_vertical_slash(vertical, slash, (100, 120), 16, block_columns=padding)
    for name in StripeSparseMask._FIELDS:
        assert torch.equal(getattr(plain, name), getattr(empty, name)), name
    assert empty.density() == plain.density()
    again = plain.map_fields(lambda x: x.clone())
    assert again.block_columns is None and torch.equal(again.col_indices, plain.col_indices)


def test_bad_block_columns():
    v, s = torch.tensor([[[0]]]), torch.tensor([[[0]]])
    with pytest.raises(ValueError, match="block_columns must have NQB"):
        StripeSparseMask.from_vertical_slash(v, s, (64, 64), 16,
                                             block_columns=torch.zeros(1, 1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="block_columns must hold key indices"):
        StripeSparseMask.from_vertical_slash(v, s, (64, 64), 16, block_columns=torch.full((1, 1, 4, 2), 64))
    with pytest.raises(TypeError, match="block_columns must have dtype"):
        StripeSparseMask.from_vertical_slash(v, s, (64, 64), 16, block_columns=torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="block_columns must have heads"):
        StripeSparseMask.from_vertical_slash(torch.zeros(1, 2, 1, dtype=torch.long), s, (64, 64), 16,
                                             block_columns=torch.zeros(1, 3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="given together"):
        mask = StripeSparseMask.from_vertical_slash(v, s, (64, 64), 16)
        StripeSparseMask(**{k: getattr(mask, k) for k in StripeSparseMask._FIELDS},
                         block_columns=torch.zeros(1, 1, 4, 1, dtype=torch.int32), block_size=16, seq_lens=(64, 64))


def check_attention(backend, dtype, batch, n_q_heads, n_kv_heads, mask_heads, q_len, kv_len, head_dim, block_size,
                    causal):
    torch.manual_seed(0)
    vertical, slash, cols = random_case(1, mask_heads, q_len, kv_len, block_size, n_cols=10, seed=2)
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), block_size, block_columns=cols)
    assert int(mask.block_column_counts.sum()) > 0  # the block columns' own dK/dV path is exercised
    q = torch.randn(batch, n_q_heads, q_len, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype, requires_grad=True)
    o = sparse_attention(q, k, v, mask, causal=causal, backend=backend)
    dout = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), dout)
    tok = direct_dense(vertical, slash, cols, q_len, kv_len, block_size)
    ref, _ = math_attention(q, k, v, tok, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    low, _ = math_attention(q, k, v, tok, causal, dtype=dtype)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    factor = 30.0 if dtype == torch.float32 else 3.0
    check_close(o, ref, low, name="o", factor=factor, dtype=dtype)
    for name, g, r, lg in zip("qkv", grads, ref_grads, low_grads):
        check_close(g, r, lg, name=f"d{name}", factor=factor, dtype=dtype)
    # a NaN key/value outside the mask (of every row of every head) changes nothing
    outside = ~tok.any(dim=(0, 1, 2))
    if bool(outside.any()):
        j = int(torch.nonzero(outside)[0])
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, :, j], v2[:, :, j] = float("nan"), float("nan")
        o2 = sparse_attention(q.detach(), k2, v2, mask, causal=causal, backend=backend)
        assert torch.equal(o2, o.detach())
    return mask


CASES = [  # dtype, batch, Hq, Hkv, Hm, Lq, Lk, D, block_size, causal
    pytest.param(torch.float32, 1, 2, 2, 2, 97, 97, 32, 16, False, id="fp32"),
    pytest.param(torch.float32, 2, 4, 2, 2, 80, 112, 16, (32, 16), True, id="fp32-gqa-causal-lq<lk"),
    pytest.param(torch.float16, 1, 2, 1, 1, 96, 80, 32, 16, True, id="fp16-mqa-causal-lq>lk"),
]


@pytest.mark.parametrize("dtype,batch,n_q_heads,n_kv_heads,mask_heads,q_len,kv_len,head_dim,block_size,causal",
                         CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_matches_dense_oracle(backend, dtype, batch, n_q_heads, n_kv_heads, mask_heads, q_len, kv_len,
                                        head_dim, block_size, causal):
    if backend == "torch" and dtype == torch.float16:
        dtype = torch.float32
    check_attention(backend, dtype, batch, n_q_heads, n_kv_heads, mask_heads, q_len, kv_len, head_dim, block_size,
                    causal)


def test_triton_per_query_head_mask_with_gqa():
    check_attention("triton", torch.float32, 1, 4, 2, 4, 64, 64, 16, 16, True)


def test_quality_head_selection_and_slices_read_block_columns():
    q_len = kv_len = 96
    vertical, slash, cols = random_case(1, 2, q_len, kv_len, 16, seed=3)
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, (q_len, kv_len), 16, block_columns=cols)
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    for causal in (False, True):
        qual = attention_quality(q, k, v, mask, causal=causal)
        assert qual["density_mean"] == pytest.approx(mask.density(causal), abs=1e-9)
    one = select_heads(mask, torch.tensor([1]), 2, 2)
    assert torch.equal(one.to_dense(), mask.to_dense()[:, 1:2])
    from sparse_attn.distributed.ulysses import mask_heads
    assert torch.equal(mask_heads(mask, 1, 2).to_dense(), mask.to_dense()[:, 1:2])
