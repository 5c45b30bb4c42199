"""k-means routing: k-means vs a plain reference, planted clusters, warm start, shapes and validity."""

import pytest
import torch

from oracle import check_close, math_attention
from sparse_attn import PermutedMask, sparse_attention
from sparse_attn.patterns import KMeansRouting, RoutingState, get_pattern, kmeans, pattern_from_json, planted_qkv
from sparse_attn.patterns.routing import top_p_pairs


def _kmeans_ref(x, cents, iters, metric):
    """One group at a time, one cluster at a time (plain Lloyd)."""
    out_c, out_a = [], []
    for g in range(x.shape[0]):
        xs = x[g].float()
        c = cents[g].float().clone()
        if metric == "cosine":
            xs = xs / xs.norm(dim=-1, keepdim=True)
            c = c / c.norm(dim=-1, keepdim=True)
        for it in range(iters + 1):
            d = torch.stack([((xs - c[j]) ** 2).sum(-1) for j in range(c.shape[0])], 1)
            a = d.argmin(1)
            if it == iters:
                break
            for j in range(c.shape[0]):
                if (a == j).any():
                    m = xs[a == j].mean(0)
                    c[j] = m / m.norm() if metric == "cosine" else m
        out_c.append(c)
        out_a.append(a)
    return torch.stack(out_c), torch.stack(out_a)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_matches_plain_reference(metric):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 8, generator=gen)
    init = x[:, :6].clone()
    c, a = kmeans(x, 6, 5, metric=metric, centroids=init)
    c_ref, a_ref = _kmeans_ref(x, init, 5, metric)
    assert torch.equal(a, a_ref)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_init_is_seeded(init):
    x = torch.randn(2, 300, 8)
    c1, a1 = kmeans(x, 5, 3, init=init, seed=4)
    c2, a2 = kmeans(x, 5, 3, init=init, seed=4)
    assert torch.equal(a1, a2) and torch.equal(c1, c2) and c1.shape == (2, 5, 8)


def test_top_p_pairs_matches_loop():
    gen = torch.Generator().manual_seed(1)
    cq, ck = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 7, 8, generator=gen)
    sizes = torch.randint(1, 50, (2, 7), generator=gen).float()
    got = top_p_pairs(cq, ck, sizes, 0.8, 0.5)
    for g in range(2):
        for a in range(5):
            p = torch.softmax(0.5 * ck[g] @ cq[g, a] + sizes[g].log(), 0)
            order = torch.argsort(p, descending=True)
            n = int((torch.cumsum(p[order], 0) < 0.8).sum()) + 1
            ref = torch.zeros(7, dtype=torch.bool)
            ref[order[:n]] = True
            assert torch.equal(got[g, a], ref)


@pytest.fixture(scope="module")
def planted():
    return planted_qkv("clusters", 2048, heads=2, seed=0)


def test_planted_clusters_recovered(planted):
    mask = KMeansRouting(q_clusters=16, k_clusters=16, top_p=0.9, block_size=32).build(planted.q, planted.k)
    qual = mask.quality(planted.q, planted.k, planted.v)
    assert qual["recall_min"] >= 0.95, qual["recall"]
    assert mask.density() <= 0.35


def test_warm_start_two_iterations_reaches_cold_quality(planted):
    pat = KMeansRouting(q_clusters=16, k_clusters=16, top_p=0.9, iters=20, warm_iters=2, block_size=32)
    cold = pat.build(planted.q, planted.k)
    cold_recall = cold.quality(planted.q, planted.k, planted.v)["recall_mean"]
    # the next "denoising step": slightly moved activations
    gen = torch.Generator().manual_seed(5)
    q2 = planted.q + 0.05 * torch.randn(planted.q.shape, generator=gen)
    k2 = planted.k + 0.05 * torch.randn(planted.k.shape, generator=gen)
    warm = pat.build(q2, k2, state=cold.state)
    assert warm.quality(q2, k2, planted.v)["recall_mean"] >= cold_recall - 0.01
    assert isinstance(warm.state, RoutingState)
    assert warm.state.q_centroids.shape == (1, 2, 16, 64)


@pytest.mark.parametrize("metric,init", [("cosine", "random"), ("l2", "kmeans++")])
def test_shapes_validity_and_attention(metric, init):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 96, 16, generator=gen)
    k, v = torch.randn(2, 2, 80, 16, generator=gen), torch.randn(2, 2, 80, 16, generator=gen)
    mask = KMeansRouting(q_clusters=5, k_clusters=4, metric=metric, init=init, block_size=16).build(q, k)
    assert isinstance(mask, PermutedMask)
    assert mask.perm_q.shape == (2, 4, 96) and mask.perm_k.shape == (2, 2, 80)
    assert mask.inner.batch_heads == (2, 4) and mask.inner.seq_lens == (96, 80)
    mask.inner.validate()
    o = sparse_attention(q, k, v, mask)
    tok = mask.to_dense()
    ref, _ = math_attention(q, k, v, tok)
    low, _ = math_attention(q, k, v, tok, dtype=torch.float32)
    check_close(o, ref, low)


def test_config_round_trip_and_errors():
    pat = get_pattern("kmeans_routing", q_clusters=8, metric="l2", init="kmeans++", top_p=0.8)
    assert pattern_from_json(pat.to_json()) == pat
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="causal=True"):
        pat.build(q, q, causal=True)
    with pytest.raises(ValueError, match="metric"):
        KMeansRouting(metric="dot")
    with pytest.raises(ValueError, match="top_p"):
        KMeansRouting(top_p=0)
    with pytest.raises(TypeError, match="state"):
        pat.build(q, q, state={"q": 1})
    with pytest.raises(ValueError, match="state.q_centroids"):
        pat.build(q, q, state=RoutingState(torch.zeros(1, 2, 8, 16), torch.zeros(1, 1, 8, 16)))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_triton_assignment_matches_twin(metric):
    from sparse_attn_kernels.reference_scoring import kmeans_assign_ref
    from sparse_attn_kernels.scoring.kmeans import kmeans_assign
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 100, 24, generator=gen)  # ragged token tile, padded head dim
    c = torch.randn(3, 37, 24, generator=gen)  # two centroid tiles, the second ragged
    if metric == "cosine":
        x, c = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(c, dim=-1)
    assert torch.equal(kmeans_assign(x, c, metric), kmeans_assign_ref(x, c, metric))


def test_kmeans_with_triton_scoring_matches_torch(monkeypatch):
    x = torch.randn(2, 80, 16)
    want = kmeans(x, 5, 3, seed=1)
    monkeypatch.setenv("SPARSE_ATTN_SCORING", "triton")
    got = kmeans(x, 5, 3, seed=1)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_step_cache_carries_centroids_between_builds():
    """The step cache hands the previous centroids back (warm start) and counts them in its memory."""
    from sparse_attn.cache import CachePolicy, StepCache
    from sparse_attn.patterns.routing import RoutingState

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    pattern = KMeansRouting(q_clusters=4, k_clusters=4)
    seen = []
    real = pattern.build

    def spy(q, k, *, causal=False, layout=None, state=None):
        seen.append(state)
        return real(q, k, causal=causal, layout=layout, state=state)

    object.__setattr__(pattern, "build", spy)
    cache = StepCache(CachePolicy(refresh_every=1))
    for step in range(3):
        cache.set_step(step)
        cache.get_mask(pattern, q, k, layer=0)
    assert seen[0] is None and all(isinstance(s, RoutingState) for s in seen[1:])
    assert cache.nbytes >= seen[-1].q_centroids.numel() * 4


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_of_a_group_does_not_depend_on_the_other_groups(init):
    """Same head, same seed: the same clusters whether it is clustered alone or with other heads/batch rows."""
    x = torch.randn(3, 200, 8, generator=torch.Generator().manual_seed(7))
    c_all, a_all = kmeans(x, 6, 4, init=init, seed=2)
    c_one, a_one = kmeans(x[2:], 6, 4, init=init, seed=2)
    assert torch.equal(a_all[2:], a_one)
    torch.testing.assert_close(c_all[2:], c_one)


def test_spectral_cluster_order_keeps_the_pairs_with_fewer_tiles(planted):
    """Same k-means, same kept cluster pairs (token level), fewer boundary tiles than the label order."""
    from sparse_attn.patterns.routing import _cluster_means
    cfg = dict(q_clusters=32, k_clusters=32, top_p=0.9, block_size=32)
    spectral = KMeansRouting(**cfg).build(planted.q, planted.k)
    label = KMeansRouting(cluster_order="label", **cfg).build(planted.q, planted.k)
    # the selected (query cluster, key cluster) pairs as a token mask, from the same k-means
    xq, xk = planted.q.flatten(0, 1), planted.k.flatten(0, 1)
    _, aq = kmeans(xq, 32, 0, centroids=spectral.state.q_centroids.flatten(0, 1))
    _, ak = kmeans(xk, 32, 0, centroids=spectral.state.k_centroids.flatten(0, 1))
    mq, _ = _cluster_means(xq, aq, 32)
    mk, sk = _cluster_means(xk, ak, 32)
    pairs = top_p_pairs(mq, mk, sk, 0.9, 64 ** -0.5)  # [H, Cq, Ck]
    core = pairs.gather(1, aq[..., None].expand(-1, -1, 32)).gather(2, ak[:, None, :].expand(-1, 2048, -1))
    for mask in (spectral, label):
        dense = mask.to_dense()[0]
        assert bool(dense[core].all())  # every selected pair is computed
    assert spectral.density() < 0.8 * label.density(), (spectral.density(), label.density())
    o_s = sparse_attention(planted.q, planted.k, planted.v, spectral)
    assert torch.isfinite(o_s).all()
    assert spectral.quality(planted.q, planted.k, planted.v)["recall_min"] >= 0.95
