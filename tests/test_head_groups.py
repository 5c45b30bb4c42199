"""Head groups: per_head mixing block-map, permuted and routed patterns; the search choosing routing."""

import pytest
import torch

from oracle import check_close, math_attention, routed_reference
from sparse_attn import BlockSparseMask, attention_quality, sparse_attention
from sparse_attn.head_groups import HeadGroupsMask
from sparse_attn.patterns import (EqualSizeRouting, KMeansRouting, PatternSearch, PerHead, SlidingWindow,
                                  planted_qkv)

WINDOW = SlidingWindow(left=32, right=32, block_size=16)
KMEANS = KMeansRouting(q_clusters=4, k_clusters=4, block_size=16)
EQUAL = EqualSizeRouting(clusters=3, block_size=16)


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 96, 16, generator=gen, dtype=dtype)
    k, v = torch.randn(1, 2, 96, 16, generator=gen, dtype=dtype), torch.randn(1, 2, 96, 16, generator=gen, dtype=dtype)
    return q, k, v


def _reference(mask, q, k, v, dtype):
    """Each head on its own in ``dtype``: masked softmax on the group's dense mask, or the routed loop."""
    outs = []
    for h in range(q.shape[1]):
        g = next(i for i, (heads, _) in enumerate(mask.groups) if h in heads.tolist())
        heads, m = mask.groups[g]
        pos = heads.tolist().index(h)
        qh, kh, vh = q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1]
        if hasattr(m, "q_index"):
            pick = lambda x: x[:, min(pos, x.shape[1] - 1)][:, None]  # noqa: E731
            outs.append(routed_reference(qh, kh, vh, pick(m.q_index), pick(m.k_index), dtype=dtype))
        else:
            tok = m.to_dense()
            outs.append(math_attention(qh, kh, vh, tok[:, min(pos, tok.shape[1] - 1)][:, None], dtype=dtype)[0])
    return torch.cat(outs, 1)


def test_per_head_with_routing_members_builds_head_groups_and_matches_oracle():
    q, k, v = _inputs()
    pat = PerHead(patterns=(KMEANS, WINDOW, EQUAL, WINDOW))
    mask = pat.build(q, k)
    assert isinstance(mask, HeadGroupsMask) and pat.mask_kind == "groups"
    assert [h.tolist() for h, _ in mask.groups] == [[0], [1, 3], [2]]
    assert [type(m).__name__ for _, m in mask.groups] == ["PermutedMask", "BlockSparseMask", "RoutedMask"]
    # each group's mask is its pattern built on ALL heads (as the search measures it), cut to the group's heads
    full = KMEANS.build(q, k)
    assert torch.equal(mask.groups[0][1].perm_q, full.perm_q[:, [0]])
    assert torch.equal(mask.groups[0][1].inner.to_block_dense(), full.inner.to_block_dense()[:, [0]])
    full = EQUAL.build(q, k)
    assert torch.equal(mask.groups[2][1].k_index, full.k_index[:, [2]])
    window = WINDOW.build(q, k).to_block_dense()
    assert torch.equal(mask.groups[1][1].to_block_dense(), window.expand(1, 2, -1, -1))
    for backend in ("torch", "triton"):
        out = sparse_attention(q, k, v, mask, backend=backend)
        check_close(out, _reference(mask, q, k, v, torch.float64), _reference(mask, q, k, v, torch.float32))
    qual = attention_quality(q, k, v, mask)
    for heads, m in mask.groups:  # the report of each group lands on its heads
        idx = heads
        part = attention_quality(q[:, idx], k[:, idx // 2], v[:, idx // 2], m)
        torch.testing.assert_close(qual["error"][:, idx], part["error"])
        torch.testing.assert_close(qual["density"][:, idx], part["density"])
    assert 0 < mask.density() < 1


def test_head_groups_backward_matches_reference():
    q, k, v = (x.requires_grad_() for x in _inputs(torch.float64, seed=1))
    mask = PerHead(patterns=(WINDOW, KMEANS, WINDOW, EQUAL)).build(q.detach(), k.detach())
    do = torch.randn_like(q)
    got = torch.autograd.grad((sparse_attention(q, k, v, mask, backend="torch") * do).sum(), (q, k, v))
    ref = torch.autograd.grad((_reference(mask, q, k, v, torch.float64) * do).sum(), (q, k, v))
    for name, g, r in zip("qkv", got, ref):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7, msg=f"d{name}")


def test_all_block_members_stay_one_block_mask():
    q, k, _ = _inputs()
    mask = PerHead(patterns=(WINDOW,) * 4).build(q, k)
    assert isinstance(mask, BlockSparseMask) and PerHead(patterns=(WINDOW,) * 4).mask_kind == "block"


def test_head_groups_mask_errors():
    full = BlockSparseMask.full(64, 64, 32)
    with pytest.raises(ValueError, match="exactly once"):
        HeadGroupsMask([([0, 1], None), ([1], full)], 3, (64, 64))
    with pytest.raises(ValueError, match="increasing"):
        HeadGroupsMask([([1, 0], None)], 2, (64, 64))
    with pytest.raises(ValueError, match="seq_lens"):
        HeadGroupsMask([([0], BlockSparseMask.full(32, 32, 32))], 1, (64, 64))
    m = HeadGroupsMask([([0], None), ([1], full)], 2, (64, 64))
    with pytest.raises(ValueError, match="2 query heads"):
        sparse_attention(*(torch.randn(1, 3, 64, 16) for _ in range(3)), m)


def test_search_picks_routing_for_cluster_heads_and_windows_for_local_heads():
    clusters = planted_qkv("clusters", 1024, heads=1, head_dim=32, seed=3, topics=8)
    local = planted_qkv("local", 1024, heads=1, head_dim=32, seed=4)
    q, k = torch.cat([clusters.q, local.q], 1), torch.cat([clusters.k, local.k], 1)
    v = torch.cat([clusters.v, local.v], 1)
    cands = [SlidingWindow(left=96, right=96, block_size=32),
             KMeansRouting(q_clusters=8, k_clusters=8, init="kmeans++", block_size=32)]
    search = PatternSearch(cands, lam=0.5, eps=0.1)
    search.observe(0, q, k, v)
    plan = search.plan()
    assert plan.names(0) == ["kmeans_routing", "sliding_window"]
    mask = plan.pattern_for(0).build(q, k)
    assert isinstance(mask, HeadGroupsMask)
    qual = attention_quality(q, k, v, mask)
    assert qual["error_max"] <= 0.1 and qual["density_mean"] < 0.5
    with pytest.raises(ValueError, match="causal"):
        PatternSearch(cands, causal=True)


def test_stripe_member_with_per_head_budgets_is_cut_from_the_all_heads_build():
    from sparse_attn.patterns import VerticalSlash
    q, k, v = _inputs(seed=5)
    vs = VerticalSlash(vertical=(4, 8, 12, 16), slash=(2, 4, 6, 8), last_q=16, block_size=16)  # per-head budgets
    mask = PerHead(patterns=(WINDOW, vs, WINDOW, vs)).build(q, k, causal=True)
    heads, part = mask.groups[1]
    full = vs.build(q, k, causal=True)
    assert heads.tolist() == [1, 3] and part.vertical_count.tolist() == full.vertical_count[:, [1, 3]].tolist()
    out = sparse_attention(q, k, v, mask, causal=True)
    ref, _ = math_attention(q, k, v, full.to_dense(), causal=True)
    low, _ = math_attention(q, k, v, full.to_dense(), causal=True, dtype=torch.float32)
    check_close(out[:, [1, 3]], ref[:, [1, 3]], low[:, [1, 3]])
