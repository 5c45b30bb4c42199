"""XAttention pattern: antidiagonal scores against a loop over the pairs, the selection rule, parameters."""

import pytest
import torch

from sparse_attn import get_pattern
from sparse_attn.patterns import XAttention
from sparse_attn.patterns.base import causal_anchors
from sparse_attn.patterns.xattention import antidiagonal_scores


def inputs(q_len=96, kv_len=96, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, q_len, dim, generator=gen, dtype=torch.float64),
            torch.randn(1, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64))


def loop_scores(q, k, stride, scale):
    """The mean antidiagonal logit of every (query group, key group) square, one pair at a time (zero past
    the lengths)."""
    heads, kv_heads, q_len, kv_len = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    n_qs, n_ks = -(-q_len // stride), -(-kv_len // stride)
    out = torch.zeros(heads, n_qs, n_ks, dtype=torch.float64)
    for h in range(heads):
        kh = h // (heads // kv_heads)
        for i in range(n_qs):
            for j in range(n_ks):
                for t in range(stride):
                    qi, kj = i * stride + t, j * stride + stride - 1 - t
                    if qi < q_len and kj < kv_len:
                        out[h, i, j] += float(q[0, h, qi] @ k[0, kh, kj])
    return out * scale / stride


@pytest.mark.parametrize("q_len,kv_len", [(96, 96), (90, 101)])
def test_antidiagonal_scores_equal_the_pair_loop(q_len, kv_len):
    q, k = inputs(q_len, kv_len)
    got = antidiagonal_scores(q, k, 8, 0.3)  # [1, Hkv, G, NQS, NKS] (float32)
    want = loop_scores(q, k, 8, 0.3)
    torch.testing.assert_close(got.reshape(want.shape).double(), want, atol=1e-5, rtol=1e-5)


def estimated_mass_by_loop(q, k, stride, block, causal):
    """Softmax over each query group's visible key groups, summed per tile, averaged over its query groups."""
    scores = loop_scores(q, k, stride, q.shape[-1] ** -0.5)  # [H, NQS, NKS]
    q_len, kv_len = q.shape[2], k.shape[2]
    n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
    mass = torch.zeros(q.shape[1], n_qb, n_kb, dtype=torch.float64)
    for i in range(scores.shape[1]):
        s = scores[:, i].clone()
        if causal:
            last = min(i * stride + stride - 1, q_len - 1) + kv_len - q_len
            s[:, torch.arange(s.shape[1]) * stride > last] = float("-inf")
        p = torch.softmax(s, -1)
        for j in range(s.shape[1]):
            mass[:, i * stride // block, j * stride // block] += p[:, j] / (block // stride)
    return mass


@pytest.mark.parametrize("causal", [False, True])
def test_estimated_mass_and_selection(causal):
    q, k = inputs(96, 96)
    pat = XAttention(threshold=0.6, stride=8, block_size=16)
    mass = pat.estimated_mass(q, k, causal)[0]  # [H, NQB, NKB]
    want = estimated_mass_by_loop(q, k, 8, 16, causal)
    torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-4)
    keep = pat.block_map(q, k, causal=causal)[0]
    if causal:  # diagonal and sink tiles always kept, nothing above the diagonal
        anchors = causal_anchors(96, 96, (16, 16))
        assert bool((keep | ~anchors).all())
        assert not bool((keep & torch.ones(6, 6, dtype=torch.bool).triu(1)).any())
    assert_threshold_rule(keep, want, 0.6, causal)


def assert_threshold_rule(keep, mass, threshold, causal):
    """The rule: per query block, the largest-mass tiles whose share first reaches the threshold (``keep``,
    ``mass`` ``[H, 6, 6]`` of a 96-token problem in 16-token tiles)."""
    forced = causal_anchors(96, 96, (16, 16)) if causal else torch.zeros(6, 6, dtype=torch.bool)
    for h in range(mass.shape[0]):
        for r in range(6):
            share = mass[h, r] / mass[h, r].sum()
            chosen = keep[h, r]
            extra = share.masked_fill(forced[r], -1.0)
            order = torch.sort(extra, descending=True, stable=True).indices
            base = float(share[forced[r]].sum())
            need = 0
            while base < threshold - 1e-6 and need < len(order) and extra[order[need]] > 0:
                base += float(share[order[need]])
                need += 1
            assert int(chosen.sum()) == int(forced[r].sum()) + max(need, 0 if causal else 1), (h, r)


@pytest.mark.parametrize("causal", [False, True])
def test_group_selection_by_the_groups_mean_share(causal):
    q, k = inputs(96, 96)  # 4 query heads on 2 kv heads
    want = estimated_mass_by_loop(q, k, 8, 16, causal).view(2, 2, 6, 6).mean(1)  # [Hkv, NQB, NKB]
    pat = XAttention(threshold=0.6, stride=8, block_size=16, group="mean")
    keep = pat.block_map(q, k, causal=causal)[0]
    assert keep.shape == (2, 6, 6)
    assert_threshold_rule(keep, want, 0.6, causal)
    mask = pat.build(q.float(), k.float(), causal=causal)
    assert mask.counts.shape[1] == 2 and torch.equal(mask.to_block_dense()[0], keep)


def test_a_planted_key_column_is_found_in_every_query_block():
    q, k = inputs(256, 256, heads=2, kv_heads=2, dim=16, seed=1)
    u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64), dim=0)
    q = q + 2.0 * u  # every query shares a direction ...
    k = k.clone()
    k[0, :, 150] = 80.0 * u  # ... that one key carries strongly: logit ~ 2 * 80 / 4 = 40 for every query
    keep = XAttention(threshold=0.5, stride=8, block_size=32).block_map(q, k, causal=True)[0]
    assert bool(keep[:, 5:, 150 // 32].all())  # query blocks 5..7 see key 150 and keep its tile


@pytest.mark.parametrize("kw,name", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"), (dict(threshold=[0.5, 2]), "threshold"),
    (dict(stride=0), "stride"), (dict(stride=24, block_size=64), "stride"), (dict(scale=-1.0), "scale"),
    (dict(group="softmax"), "group"),
])
def test_bad_parameters_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        XAttention(**kw)


def test_threshold_one_keeps_every_visible_tile_and_builds_a_mask():
    q, k = inputs(96, 96)
    mask = get_pattern("xattention", threshold=1.0, stride=8, block_size=16).build(q.float(), k.float(), causal=True)
    pairs = mask.to_dense(causal=True)  # [1, H, 96, 96]
    assert bool((pairs == torch.ones(96, 96, dtype=torch.bool).tril()).all())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,kv_len,chunk", [(96, 96, 1 << 21), (90, 101, 1 << 21), (96, 96, 1)])
def test_lattice_mass_equals_the_pair_loop(causal, q_len, kv_len, chunk, monkeypatch):
    import sparse_attn.patterns.xattention as xa

    monkeypatch.setattr(xa, "LATTICE_CHUNK_ELEMS", chunk)  # chunk=1: one query block per chunk
    q, k = inputs(q_len, kv_len)
    stride, block, scale = 8, 16, 8 ** -0.5
    got = XAttention(estimate="lattice", stride=stride, block_size=block).estimated_mass(q, k, causal)[0]
    n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
    want = torch.zeros(4, n_qb, n_kb, dtype=torch.float64)
    for h in range(4):
        for i in range(q_len):
            keys = [j for j in range(kv_len) if (i + j) % stride == stride - 1
                    and (not causal or j <= i + kv_len - q_len)]
            if keys:
                p = torch.softmax(torch.stack([q[0, h, i] @ k[0, h // 2, j] for j in keys]) * scale, 0)
                for j, pj in zip(keys, p):
                    want[h, i // block, j // block] += pj / block
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="estimate"):
        XAttention(estimate="pooled")
