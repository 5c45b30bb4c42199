"""StripeSparseMask: normalization, lowering (compared exactly with a plain-Python builder), views, errors."""

import math

import pytest
import torch

import sparse_attn.stripe_mask as stripe_mask
from sparse_attn import BlockSparseMask, StripeSparseMask


def loop_lowering(vertical, slash, q_len, kv_len, bm, bn):
    """Plain-Python statement of the lowering for one (batch, head) row."""
    cols, offs = sorted(set(vertical)), sorted(set(slash))
    on_slash = set(offs)
    rows = []
    for m in range(math.ceil(q_len / bm)):
        qs = range(m * bm, min(q_len, m * bm + bm))
        blocks = sorted({(i - s) // bn for s in offs for i in qs if 0 <= i - s < kv_len})
        full = [int(all(i - j in on_slash for i in qs for j in range(kb * bn, min(kv_len, kb * bn + bn))))
                for kb in blocks]
        rows.append((blocks, full, [c for c in cols if c // bn not in blocks]))
    return cols, offs, rows


def padded(lists, width, dtype=torch.int32):
    return torch.tensor([x + [0] * (width - len(x)) for x in lists], dtype=dtype).reshape(len(lists), width)


def expected_tensors(vertical, slash, q_len, kv_len, bm, bn):
    """Lowered tensors of the loop builder, flattened over (batch, head) rows."""
    n_b, n_h = max(vertical.shape[0], slash.shape[0]), max(vertical.shape[1], slash.shape[1])
    v = vertical.expand(n_b, n_h, -1).reshape(n_b * n_h, -1).tolist()
    s = slash.expand(n_b, n_h, -1).reshape(n_b * n_h, -1).tolist()
    built = [loop_lowering(a, b, q_len, kv_len, bm, bn) for a, b in zip(v, s)]
    w = max(1, max(len(r[0]) for x in built for r in x[2]))
    cw = max(1, max(len(r[2]) for x in built for r in x[2]))
    return dict(
        vertical=padded([x[0] for x in built], max(len(x[0]) for x in built)),
        vertical_count=torch.tensor([len(x[0]) for x in built], dtype=torch.int32),
        slash=padded([x[1] for x in built], max(len(x[1]) for x in built)),
        slash_count=torch.tensor([len(x[1]) for x in built], dtype=torch.int32),
        block_counts=torch.tensor([[len(r[0]) for r in x[2]] for x in built], dtype=torch.int32),
        block_indices=torch.stack([padded([r[0] for r in x[2]], w) for x in built]),
        block_full=torch.stack([padded([r[1] for r in x[2]], w, torch.int8) for x in built]),
        col_counts=torch.tensor([[len(r[2]) for r in x[2]] for x in built], dtype=torch.int32),
        col_indices=torch.stack([padded([r[2] for r in x[2]], cw) for x in built]),
    )


def dense_semantics(vertical, slash, q_len, kv_len):
    """Token map of the definition: j in V or i - j in S."""
    n_b, n_h = max(vertical.shape[0], slash.shape[0]), max(vertical.shape[1], slash.shape[1])
    out = torch.zeros(n_b, n_h, q_len, kv_len, dtype=torch.bool)
    for b in range(n_b):
        for h in range(n_h):
            vs = set(vertical[min(b, vertical.shape[0] - 1), min(h, vertical.shape[1] - 1)].tolist())
            ss = set(slash[min(b, slash.shape[0] - 1), min(h, slash.shape[1] - 1)].tolist())
            for i in range(q_len):
                for j in range(kv_len):
                    out[b, h, i, j] = j in vs or (i - j) in ss
    return out


CASES = [  # (Lq, Lk, block_size, vertical shape, slash shape)
    pytest.param(97, 97, 32, (1, 2, 6), (1, 2, 5), id="odd-square"),
    pytest.param(17, 113, (16, 32), (2, 1, 9), (2, 3, 4), id="short-q"),
    pytest.param(113, 40, (32, 16), (1, 1, 3), (1, 1, 12), id="short-k"),
    pytest.param(64, 64, 16, (1, 1, 0), (1, 1, 7), id="no-vertical"),
    pytest.param(50, 70, 16, (1, 2, 5), (1, 1, 0), id="no-slash"),
]


@pytest.mark.parametrize("q_len,kv_len,block_size,v_shape,s_shape", CASES)
def test_lowering_matches_loop_builder(q_len, kv_len, block_size, v_shape, s_shape):
    vertical = torch.randint(0, kv_len, v_shape)
    slash = torch.randint(1 - kv_len, q_len, s_shape)
    if vertical.shape[-1] > 2:
        vertical[..., 1] = vertical[..., 0]  # duplicates
    if slash.shape[-1] > 3:
        slash[..., :3] = torch.tensor([0, 1, 0])  # duplicates and the main diagonal
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(q_len, kv_len), block_size=block_size)
    bm, bn = mask.block_size
    want = expected_tensors(vertical, slash, q_len, kv_len, bm, bn)
    for name, ref in want.items():
        got = getattr(mask, name)
        got = got.reshape(got.shape[0] * got.shape[1], *got.shape[2:])
        assert got.dtype == ref.dtype, name
        assert torch.equal(got, ref), f"{name}: {got.tolist()} != {ref.tolist()}"
    assert torch.equal(mask.to_dense(), dense_semantics(vertical, slash, q_len, kv_len))
    mask.validate()


def lowered_dense(mask):
    """Token map rebuilt from the lowered form; also asserts each pair is in exactly one part."""
    bm, bn = mask.block_size
    q_len, kv_len = mask.seq_lens
    n_b, n_h = mask.batch_heads
    hits = torch.zeros(n_b, n_h, q_len, kv_len, dtype=torch.int32)
    for b in range(n_b):
        for h in range(n_h):
            diag, col = mask.diag_keep[b, h].tolist(), mask.col_keep[b, h].tolist()
            for m in range(mask.num_blocks[0]):
                qs = range(m * bm, min(q_len, m * bm + bm))
                for t in range(int(mask.block_counts[b, h, m])):
                    kb = int(mask.block_indices[b, h, m, t])
                    for i in qs:
                        for j in range(kb * bn, min(kv_len, kb * bn + bn)):
                            hits[b, h, i, j] += int(diag[i - j + kv_len - 1] or col[j])
                for t in range(int(mask.col_counts[b, h, m])):
                    hits[b, h, m * bm: m * bm + len(qs), int(mask.col_indices[b, h, m, t])] += 1
    assert int(hits.max()) <= 1, "a pair is computed twice"
    return hits.bool()


def test_lowered_form_covers_each_pair_once():
    vertical = torch.tensor([[[0, 3, 40, 41, 77, 5]]])  # 3, 5 and 40, 41 fall inside slash blocks
    slash = torch.tensor([[[0, 1, 2, 35, -20, 60]]])
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(90, 80), block_size=16)
    assert torch.equal(lowered_dense(mask), mask.to_dense())
    assert int(mask.block_full.sum()) == 0
    band = StripeSparseMask.from_vertical_slash(torch.tensor([[[2]]]), torch.arange(-40, 40)[None, None],
                                                seq_lens=(64, 64), block_size=16)
    assert int(band.block_full.sum()) > 0  # tiles inside the band need no in-tile masking
    assert torch.equal(lowered_dense(band), band.to_dense())


def test_lowering_in_chunks_is_identical(monkeypatch):
    vertical = torch.randint(0, 120, (2, 3, 10))
    slash = torch.randint(-50, 100, (2, 3, 8))
    one = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(100, 120), block_size=32)
    monkeypatch.setattr(stripe_mask, "LOWER_CHUNK_ELEMS", 1)
    many = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(100, 120), block_size=32)
    for name in StripeSparseMask._FIELDS:
        assert torch.equal(getattr(one, name), getattr(many, name)), name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [(70, 70), (40, 90), (90, 40)])
def test_density_matches_dense_map(lens, causal):
    q_len, kv_len = lens
    vertical = torch.randint(0, kv_len, (2, 2, 6))
    slash = torch.randint(1 - kv_len, q_len, (1, 2, 7))
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=lens, block_size=32)
    dense = mask.to_dense(causal=causal)
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None]
    visible = int((j <= i + kv_len - q_len).sum()) if causal else q_len * kv_len  # density: kept / visible pairs
    assert mask.density(causal=causal) == pytest.approx(dense.sum().item() / (4 * visible), abs=1e-12)


def test_causal_to_dense_is_bottom_right():
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[9]]]), torch.tensor([[[-3, 0]]]),
                                                seq_lens=(4, 10), block_size=16)
    dense = mask.to_dense(causal=True)[0, 0]
    i = torch.arange(4)[:, None]
    j = torch.arange(10)[None, :]
    assert torch.equal(dense, ((j == 9) | (i - j == -3) | (i == j)) & (j <= i + 6))


def test_covering_block_mask_and_block_part():
    vertical = torch.tensor([[[0, 70]]])
    slash = torch.tensor([[[0, 33]]])
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(100, 100), block_size=32)
    cover = mask.covering_block_mask()
    assert isinstance(cover, BlockSparseMask)
    assert bool((cover.to_dense() | ~mask.to_dense()).all())
    assert torch.equal(mask.block_part().counts, mask.block_counts)


def test_repr_to_and_validate():
    mask = StripeSparseMask.from_vertical_slash(torch.tensor([[[0, 5]]]), torch.tensor([[[0, 1]]]),
                                                seq_lens=(100, 100), block_size=32)
    text = repr(mask)
    assert text.startswith("StripeSparseMask(batch_heads=(1, 1), seq_lens=(100, 100), block_size=(32, 32)")
    assert "verticals=2" in text and "slashes=2" in text and "\n" in text
    assert mask.to("cpu") is mask
    assert mask.to(torch.device("cpu")).validate() is mask
    bad = StripeSparseMask(**{k: getattr(mask, k).clone() for k in mask._FIELDS}, block_size=32,
                           seq_lens=(100, 100), validate=False)
    bad.col_indices[0, 0, 2] = torch.tensor([5, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="col_indices must be strictly increasing"):
        bad.validate()
    bad.block_indices[0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match="block_indices must lie in"):
        bad.validate()


def test_empty_lengths_and_lists():
    mask = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.int64),
                                                torch.zeros(1, 1, 0, dtype=torch.int64), seq_lens=(0, 5))
    assert mask.to_dense().shape == (1, 1, 0, 5) and mask.density() == 0.0
    mask = StripeSparseMask.from_vertical_slash(torch.zeros(1, 1, 0, dtype=torch.int64),
                                                torch.zeros(1, 1, 0, dtype=torch.int64), seq_lens=(33, 33),
                                                block_size=16)
    assert not mask.to_dense().any() and int(mask.block_counts.sum()) == 0


@pytest.mark.parametrize("vertical,slash,err,match", [
    (torch.tensor([[[0, 50]]]), torch.tensor([[[0]]]), ValueError, r"vertical must hold key indices in \[0, Lk=50\)"),
    (torch.tensor([[[-1]]]), torch.tensor([[[0]]]), ValueError, "vertical must hold key indices"),
    (torch.tensor([[[0]]]), torch.tensor([[[40]]]), ValueError, r"slash must hold offsets in .* \[-49, 39\]"),
    (torch.tensor([[[0]]]), torch.tensor([[[-50]]]), ValueError, "slash must hold offsets"),
    (torch.tensor([[[0.0]]]), torch.tensor([[[0]]]), TypeError, "vertical must have dtype torch.int32 or torch.int64"),
    (torch.tensor([[0]]), torch.tensor([[[0]]]), ValueError, "vertical must have rank 3"),
    (torch.zeros(2, 1, 1, dtype=torch.int64), torch.zeros(3, 1, 1, dtype=torch.int64), ValueError,
     "broadcastable batch"),
    ([[[0]]], torch.tensor([[[0]]]), TypeError, "vertical must be a torch.Tensor"),
])
def test_bad_inputs(vertical, slash, err, match):
    with pytest.raises(err, match=match):
        StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(40, 50), block_size=16)


def test_bad_block_size_and_lengths():
    v, s = torch.tensor([[[0]]]), torch.tensor([[[0]]])
    with pytest.raises(TypeError, match="block_size"):
        StripeSparseMask.from_vertical_slash(v, s, seq_lens=(8, 8), block_size=(16, 16, 16))
    with pytest.raises(TypeError, match="seq_lens"):
        StripeSparseMask.from_vertical_slash(v, s, seq_lens=8)
    with pytest.raises(ValueError, match="seq_lens"):
        StripeSparseMask.from_vertical_slash(v, s, seq_lens=(-1, 8))


@pytest.mark.parametrize("causal", [False, True])
def test_flex_mask_mod_is_token_exact(causal):
    from torch.nn.attention.flex_attention import create_mask

    vertical = torch.randint(0, 50, (1, 2, 4))
    slash = torch.randint(-49, 40, (1, 2, 5))
    mask = StripeSparseMask.from_vertical_slash(vertical, slash, seq_lens=(40, 50), block_size=16)
    dense = create_mask(mask.flex_mask_mod(causal=causal, num_heads=4), 1, 4, 40, 50, device="cpu")
    assert torch.equal(dense, mask.to_dense(causal=causal).repeat_interleave(2, dim=1))
