"""Equal-size nearest-token routing (Routing Transformer) on planted equal-size clusters."""

import pytest
import torch

from oracle import check_close, math_attention, routed_reference
from sparse_attn import RoutedMask, sparse_attention
from sparse_attn.patterns import EqualSizeRouting, SharedCentroids, pattern_from_json


def balanced_clusters(n, groups, heads=2, dim=32, seed=0):
    """q/k/v ``[1, heads, n, dim]``: tokens randomly split into ``groups`` equal groups; a token's q and k
    are its group's direction plus noise, so it attends (sharply) to its own group only."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.stack([torch.randperm(n, generator=gen) % groups for _ in range(heads)])  # [H, n]
    topics = torch.nn.functional.normalize(torch.randn(heads, groups, dim, generator=gen), dim=-1)
    base = topics.gather(1, group[..., None].expand(-1, -1, dim))
    q = 8 * (base + 0.2 * torch.randn(heads, n, dim, generator=gen) / dim ** 0.5)
    k = 8 * (base + 0.2 * torch.randn(heads, n, dim, generator=gen) / dim ** 0.5)
    return q[None], k[None], torch.randn(1, heads, n, dim, generator=gen), group


@pytest.mark.parametrize("causal", [False, True])
def test_planted_equal_clusters_are_recovered(causal):
    q, k, v, group = balanced_clusters(512, 8)
    mask = EqualSizeRouting(clusters=8, init="kmeans++", block_size=16).build(q, k, causal=causal)
    assert isinstance(mask, RoutedMask) and mask.q_index.shape == (1, 2, 8, 64)
    for h in range(2):
        planted = {frozenset(torch.nonzero(group[h] == g).flatten().tolist()) for g in range(8)}
        assert {frozenset(c.tolist()) for c in mask.q_index[0, h]} == planted
        assert {frozenset(c.tolist()) for c in mask.k_index[0, h]} == planted
    qual = mask.quality(q, k, v, causal=causal)
    assert qual["recall_min"] >= 0.99 and qual["density_mean"] <= 0.13


def test_routed_output_matches_loop_oracle_gqa_causal():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 96, 16, generator=gen)
    k, v = torch.randn(1, 2, 96, 16, generator=gen), torch.randn(1, 2, 96, 16, generator=gen)
    mask = EqualSizeRouting(clusters=3, block_size=16).build(q, k, causal=True)
    assert mask.k_index.shape[1] == 4 and mask.q_index.shape[-1] == 32
    o = sparse_attention(q, k, v, mask, causal=True)
    ref = routed_reference(q, k, v, mask.q_index, mask.k_index, True)
    low = routed_reference(q, k, v, mask.q_index, mask.k_index, True, dtype=torch.float32)
    check_close(o, ref, low)


def test_window_and_separate_query_key_routing():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 80, 16, generator=gen), torch.randn(2, 2, 112, 16, generator=gen)
    mask = EqualSizeRouting(clusters=4, window=32, block_size=16).build(q, k)
    assert mask.q_index.shape == (2, 2, 4, 32) and mask.k_index.shape == (2, 2, 4, 32)
    assert not mask.shares_clusters()
    default = EqualSizeRouting(clusters=4, block_size=16).build(q, k)
    assert default.q_index.shape[-1] == 32 and default.k_index.shape[-1] == 32  # ceil(80/4)->32, ceil(112/4)->32


def test_short_sequence_is_one_dense_cluster():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=gen) for _ in range(3))
    mask = EqualSizeRouting(clusters=4, block_size=64).build(q, k, causal=True)
    assert mask.n_clusters == 1 and mask.density(causal=True) == 1.0
    ref, _ = math_attention(q, k, v, causal=True)
    low, _ = math_attention(q, k, v, causal=True, dtype=torch.float32)
    check_close(sparse_attention(q, k, v, mask, causal=True), ref, low)


def test_warm_start_from_centroids():
    q, k, v, _ = balanced_clusters(256, 4, seed=4)
    pat = EqualSizeRouting(clusters=4, init="kmeans++", warm_iters=0, block_size=16)
    cold = pat.build(q, k)
    assert isinstance(cold.state, SharedCentroids) and cold.state.centroids.shape == (1, 2, 4, 32)
    mask, state = pat.build_stateful(q, k, state=cold.state)  # 0 iterations: the carried centroids route
    assert torch.equal(mask.q_index, cold.q_index) and torch.equal(mask.k_index, cold.k_index)
    torch.testing.assert_close(state.centroids, cold.state.centroids)


def test_config_round_trip_and_errors():
    pat = EqualSizeRouting(clusters=8, window=128, shared=True, block_size=64)
    assert pattern_from_json(pat.to_json()) == pat
    with pytest.raises(ValueError, match="window must be a multiple"):
        EqualSizeRouting(window=100, block_size=64)
    with pytest.raises(ValueError, match="clusters"):
        EqualSizeRouting(clusters=0)
    with pytest.raises(TypeError, match="shared must be a bool"):
        EqualSizeRouting(shared=1)
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        EqualSizeRouting(clusters=2, block_size=16).build(q, torch.randn(1, 2, 96, 16), causal=True)
    with pytest.raises(TypeError, match="SharedCentroids"):
        EqualSizeRouting(clusters=2, block_size=16).build(q, q, state=torch.zeros(1))
    with pytest.raises(ValueError, match="state.centroids must have shape"):
        EqualSizeRouting(clusters=2, block_size=16).build(q, q, state=SharedCentroids(torch.zeros(1, 3, 2, 16)))
    with pytest.raises(ValueError, match="q_len and kv_len >= 1"):
        EqualSizeRouting(clusters=2, block_size=16).build(q[:, :, :0], q[:, :, :0])
    with pytest.raises(NotImplementedError, match="RoutedMask"):
        EqualSizeRouting().block_map(q, q)


def test_causal_sdpa_drop_in_with_step_cache_warm_start():
    """patch_sdpa routes a causal SDPA call through the routed mask; the step cache carries the centroids."""
    import torch.nn.functional as F

    from sparse_attn import patch_sdpa
    from sparse_attn.cache import CachePolicy, StepCache
    from sparse_attn.integrations.sdpa import SparseConfig

    q, k, v, _ = balanced_clusters(256, 4, seed=6)
    pat = EqualSizeRouting(clusters=4, init="kmeans++", block_size=16)
    cache = StepCache(CachePolicy(refresh_every=1))
    states = []
    for step in range(2):
        cache.set_step(step)
        with patch_sdpa(SparseConfig(pat, cache=cache, min_seq_len=64)) as patch:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert patch.stats["sparse"] == 1
        mask = cache.get_mask(pat, q, k, layer=0, causal=True)  # the entry the call used (same step)
        states.append(mask.state)
        ref = routed_reference(q, k, v, mask.q_index, mask.k_index, True)
        low = routed_reference(q, k, v, mask.q_index, mask.k_index, True, dtype=torch.float32)
        check_close(out, ref, low)
    assert isinstance(states[1], SharedCentroids) and states[0] is not states[1]
