"""Step cache: policies build exactly when they say, entries are keyed by role and shape, memory is bounded."""

import json

import pytest
import torch

from sparse_attn.cache import BUILD, DENSE, REUSE, CachePolicy, StepCache

from _toy_patterns import DensePattern, StatefulPattern


def qk(length=128, heads=2, batch=1, dim=16):
    return torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim)


def run_steps(cache, pattern, steps, layers=2, roles=("cond",), q=None, k=None):
    """One call per (step, layer, role); returns the steps at which a build happened."""
    q, k = qk() if q is None else (q, k)
    for s in steps:
        cache.set_step(s)
        for layer in range(layers):
            for role in roles:
                cache.get_mask(pattern, q, k, layer=layer, role=role)
    return sorted({entry[1] for entry in cache.build_log if entry[0] == cache.generation})


@pytest.mark.parametrize("policy, expected", [
    (CachePolicy(), [0]),
    (CachePolicy(warmup_steps=10, rebuild_steps=(10, 30)), [10, 30]),  # AdaSpa
    (CachePolicy(warmup_fraction=0.2), [10]),  # SparseD-style: dense 20% then build once
    (CachePolicy(warmup_steps=5, refresh_every=10), [5, 15, 25, 35, 45]),
    (CachePolicy(reuse=False, warmup_steps=48), [48, 49]),
], ids=["once", "adaspa", "fraction", "refresh", "no-reuse"])
def test_builds_exactly_at_policy_steps(policy, expected):
    cache, pat = StepCache(policy, num_steps=50), DensePattern()
    assert run_steps(cache, pat, range(50)) == expected
    assert cache.stats.builds == len(expected) * 2 == pat.builds  # two layers, one role
    dense_steps = policy.dense_steps(50)
    assert cache.stats.dense == dense_steps * 2
    assert cache.stats.reuses == (50 - dense_steps) * 2 - cache.stats.builds


def test_policy_actions_and_json_round_trip():
    p = CachePolicy(warmup_steps=3, dense_layers=(0, -1), rebuild_steps=(7, 5), refresh_every=4)
    assert p.rebuild_steps == (5, 7)
    assert CachePolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.action(2, layer=1, num_layers=4) == DENSE
    assert p.action(3, layer=0, num_layers=4) == DENSE and p.action(3, layer=3, num_layers=4) == DENSE
    assert p.action(3, layer=1, num_layers=4) == BUILD
    assert p.action(4, built_step=3, layer=1, num_layers=4) == REUSE
    assert p.action(5, built_step=3, layer=1, num_layers=4) == BUILD  # rebuild step 5
    assert p.action(6, built_step=5, layer=1, num_layers=4) == REUSE
    assert p.action(9, built_step=8, layer=1, num_layers=4) == REUSE
    assert p.action(12, built_step=8, layer=1, num_layers=4) == BUILD  # refresh after 4


@pytest.mark.parametrize("kwargs, err, match", [
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"warmup_fraction": 1.5}, ValueError, "warmup_fraction"),
    ({"warmup_fraction": "0.2"}, TypeError, "warmup_fraction"),
    ({"rebuild_steps": (1.5,)}, TypeError, "rebuild_steps"),
    ({"reuse": 1}, TypeError, "reuse"),
])
def test_policy_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        CachePolicy(**kwargs)


def test_bad_cache_input():
    with pytest.raises(ValueError, match="unknown CachePolicy fields"):
        CachePolicy.from_dict({"warmup": 3})
    with pytest.raises(TypeError, match="policy must be a CachePolicy"):
        StepCache({"warmup_steps": 3})
    with pytest.raises(ValueError, match="needs the number of steps"):
        StepCache(CachePolicy(warmup_fraction=0.2)).get_mask(DensePattern(), *qk(), layer=0)
    with pytest.raises(ValueError, match="need num_layers"):
        StepCache(CachePolicy(dense_layers=(-1,))).get_mask(DensePattern(), *qk(), layer=0)
    with pytest.raises(TypeError, match="pattern must have a build"):
        StepCache().get_mask(object(), *qk(), layer=0)


def test_roles_get_separate_entries_unless_shared():
    cache, pat = StepCache(), DensePattern()
    q, k = qk()
    m_cond = cache.get_mask(pat, q, k, layer=0, role="cond")
    m_uncond = cache.get_mask(pat, q, k, layer=0, role="uncond")
    assert pat.builds == 2 and m_cond is not m_uncond and len(cache) == 2
    cache.set_step(1)
    assert cache.get_mask(pat, q, k, layer=0, role="cond") is m_cond
    assert cache.get_mask(pat, q, k, layer=0, role="uncond") is m_uncond
    shared, pat2 = StepCache(CachePolicy(share_roles=True)), DensePattern()
    assert shared.get_mask(pat2, q, k, layer=0, role="cond") is shared.get_mask(pat2, q, k, layer=0, role="uncond")
    assert pat2.builds == 1


def test_shape_change_invalidates():
    cache, pat = StepCache(), DensePattern()
    q, k = qk(128)
    m1 = cache.get_mask(pat, q, k, layer=0)
    cache.set_step(1)
    q2, k2 = qk(192)  # new resolution at a reuse step: never the stale mask
    m2 = cache.get_mask(pat, q2, k2, layer=0)
    assert m2.seq_lens == (192, 192) and m1.seq_lens == (128, 128)
    assert cache.stats.invalidations == 1 and pat.builds == 2
    m3 = cache.get_mask(pat, q2, k2, layer=0, causal=True)  # causality is part of the signature
    assert m3 is not m2 and cache.stats.invalidations == 2
    other = DensePattern()  # so is the pattern
    cache.get_mask(other, q2, k2, layer=0, causal=True)
    assert other.builds == 1 and cache.stats.invalidations == 3


def test_new_generation_resets():
    cache, pat = StepCache(CachePolicy(warmup_steps=2)), DensePattern()
    assert run_steps(cache, pat, range(5)) == [2]
    gen = cache.generation
    assert run_steps(cache, pat, range(5)) == [2]  # step 0 again: new generation, rebuilt
    assert cache.generation == gen + 1 and pat.builds == 4


def test_observe_timestep_roles_steps_and_generations():
    cache = StepCache(CachePolicy(warmup_steps=1))
    timesteps = [999.0, 800.0, 500.0]
    seen = []
    for _ in range(2):  # two generations
        for t in timesteps:
            seen.append((cache.observe_timestep(torch.tensor([t, t])), cache.observe_timestep(t), cache.step))
    assert seen[:3] == [("call0", "call1", 0), ("call0", "call1", 1), ("call0", "call1", 2)]
    assert seen[3:] == seen[:3] and cache.generation == 1
    with pytest.raises(TypeError, match="timestep"):
        cache.observe_timestep("999")


def test_warm_start_state_carried_between_builds_and_dropped_on_reset():
    cache = StepCache(CachePolicy(refresh_every=2))
    pat = StatefulPattern()
    q, k = qk()
    for s in range(5):
        cache.set_step(s)
        cache.get_mask(pat, q, k, layer=0)
    assert pat.seen_states == [None, 0, 1]  # builds at 0, 2, 4 see the previous state
    assert int(cache.state(0)[0]) == 2
    assert cache.nbytes >= 16 * 4
    cache.reset()
    assert cache.state(0) is None and len(cache) == 0 and cache.nbytes == 0


def test_memory_reported_and_bounded():
    pat = DensePattern(block=16)
    q, k = qk(256)
    one = StepCache()
    one.get_mask(pat, q, k, layer=0)
    per_entry = one.nbytes
    assert per_entry > 0
    cache = StepCache(max_bytes=3 * per_entry)
    for layer in range(5):
        cache.get_mask(pat, q, k, layer=layer)
    assert len(cache) == 3 and cache.nbytes <= 3 * per_entry and cache.stats.evictions == 2
    cache.set_step(1)
    cache.get_mask(pat, q, k, layer=0)  # evicted: built again, never a wrong mask
    assert cache.stats.builds == 6
    tiny = StepCache(max_bytes=1)
    tiny.get_mask(pat, q, k, layer=0)
    assert len(tiny) == 0 and tiny.nbytes == 0


@pytest.mark.parametrize("make", ["config", "sparse_vdit"])
def test_a_search_plan_reuses_its_masks(make):
    """plan.pattern_for makes a new (equal) PerHead at every call: the cache compares patterns by value."""
    from sparse_attn.integrations.presets import sparse_vdit
    from sparse_attn.integrations.sdpa import SparseConfig
    from sparse_attn.patterns import PatternSearch, SlidingWindow

    q, k = qk(256)
    search = PatternSearch([SlidingWindow(left=64, right=64)], lam=1.0, eps=1.0, include_skip=False)
    search.observe(0, q, k, k)
    plan = search.plan()
    assert plan.pattern_for(0) is not None and plan.pattern_for(0) is not plan.pattern_for(0)
    config = SparseConfig(plan, cache=StepCache()) if make == "config" else sparse_vdit(plan)
    steps = 5
    for step in range(steps):
        config.cache.set_step(step)
        config.cache.get_mask(config.pattern_for(0), q, k, layer=0)
    stats = config.cache.stats
    assert (stats.builds, stats.reuses, stats.invalidations) == (1, steps - 1, 0)
    other = SlidingWindow(left=32, right=32)  # an unequal pattern still invalidates the entry
    config.cache.get_mask(other, q, k, layer=0)
    assert (stats.builds, stats.invalidations) == (2, 1)


def test_without_steps_a_repeated_lookup_is_a_new_input():
    """Nobody drives the steps (LLM prefill): the second lookup of a key is the next prompt, a new generation."""
    cache, pat = StepCache(), StatefulPattern()
    q, k = qk()
    first = cache.get_mask(pat, q, k, layer=0)
    cache.get_mask(pat, q, k, layer=1)  # another layer of the same forward: no new generation
    assert cache.generation == 0 and pat.builds == 2
    q2, k2 = qk()  # the next prompt, same length
    second = cache.get_mask(pat, q2, k2, layer=0)
    assert second is not first and pat.builds == 3 and cache.generation == 1
    assert pat.seen_states == [None, None, None]  # warm-start state of the other prompt dropped too
    assert cache.stats.reuses == 0 and len(cache) == 1


def test_with_steps_a_repeated_lookup_in_one_step_is_reused():
    cache, pat = StepCache(), DensePattern()
    q, k = qk()
    cache.set_step(0)
    first = cache.get_mask(pat, q, k, layer=0)
    assert cache.get_mask(pat, q, k, layer=0) is first  # another call of step 0 (e.g. shared CFG roles)
    cache.set_step(1)
    assert cache.get_mask(pat, q, k, layer=0) is first and cache.generation == 0 and pat.builds == 1
