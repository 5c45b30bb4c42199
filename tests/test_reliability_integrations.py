"""Integration traps (issue #14): silent dense runs are reported, patched models compile."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparse_attn.cache import CachePolicy, StepCache
from sparse_attn.integrations.sdpa import (FULL_MASK, WARN_AFTER_DENSE_CALLS, DenseFallbackWarning, SparseConfig,
                                           patch_sdpa)
from sparse_attn.patterns import BlockTopK, SinkLocal

from _toy_patterns import BandPattern

transformers = pytest.importorskip("transformers")
from _tiny_llama import tiny_llama as _tiny_llama  # noqa: E402

from sparse_attn.integrations import transformers as hf  # noqa: E402

LAYERS = 2


def tiny_llama():
    return _tiny_llama(LAYERS, seed=0)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture
def name():
    yield "sparse_attn_reliability"
    if "sparse_attn_reliability" in hf._CONFIGS:
        hf.unregister("sparse_attn_reliability")


def _dense_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, DenseFallbackWarning)]


def _forwards_until_warning():
    return math.ceil(WARN_AFTER_DENSE_CALLS / LAYERS)


@pytest.mark.parametrize("case", ["short", "attention_mask", "full mask"])
def test_transformers_warns_once_when_every_call_ran_dense(llama, name, case):
    length = 128
    if case == "short":  # the LLM presets' min_seq_len (1024) on a short prompt
        config = SparseConfig(BlockTopK(k=1, block_size=32), min_seq_len=4 * length)
    elif case == "attention_mask":  # a mask with a hole (not padding ranges): transformers' own SDPA
        config = SparseConfig(BlockTopK(k=1, block_size=32), min_seq_len=length // 2)
    else:  # a window as long as the prompt: "sparse" calls that keep every pair
        config = SparseConfig(SinkLocal(sink=32, window=2 * length, block_size=32), min_seq_len=length // 2)
    ids = torch.randint(0, 128, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2] = 0
    kwargs = {"attention_mask": mask} if case == "attention_mask" else {}
    hf.register(config, name=name)
    llama.set_attn_implementation(name)
    try:
        with torch.no_grad():
            before = _dense_warnings(lambda: [llama(ids, **kwargs) for _ in range(_forwards_until_warning() - 1)])
            at = _dense_warnings(lambda: llama(ids, **kwargs))
            after = _dense_warnings(lambda: [llama(ids, **kwargs) for _ in range(2)])
    finally:
        llama.set_attn_implementation("sdpa")
    reason = FULL_MASK if case == "full mask" else case
    assert before == [] and after == [] and len(at) == 1
    message = str(at[0].message)
    assert f"'{reason}': " in message and "none sparse" in message and f"stats[{name!r}]" in message
    if case == "short":
        assert f"min_seq_len={4 * length}" in message


def test_transformers_does_not_warn_once_a_call_ran_sparse(llama, name):
    ids, short = torch.randint(0, 128, (1, 256)), torch.randint(0, 128, (1, 32))
    hf.register(SparseConfig(BandPattern(block=32, width=1), min_seq_len=64), name=name)
    llama.set_attn_implementation(name)
    try:
        with torch.no_grad():
            caught = _dense_warnings(lambda: [llama(ids)] + [llama(short) for _ in range(2 * _forwards_until_warning())])
    finally:
        llama.set_attn_implementation("sdpa")
    assert caught == [] and hf.stats[name]["dense:short"] >= WARN_AFTER_DENSE_CALLS


def test_patch_sdpa_warns_once_and_not_for_chosen_dense_calls():
    q = k = v = torch.randn(1, 2, 256, 32)
    with patch_sdpa(SparseConfig(BandPattern(), min_seq_len=512)) as p:
        before = _dense_warnings(lambda: [F.scaled_dot_product_attention(q, k, v)
                                          for _ in range(WARN_AFTER_DENSE_CALLS - 1)])
        with pytest.warns(DenseFallbackWarning, match=rf"'short': {WARN_AFTER_DENSE_CALLS}\}}.*min_seq_len=512"):
            F.scaled_dot_product_attention(q, k, v)
        after = _dense_warnings(lambda: F.scaled_dot_product_attention(q, k, v))
    assert before == [] and after == [] and p.stats["fallback:short"] == WARN_AFTER_DENSE_CALLS + 1
    # dense by the config's own choice (warm-up steps of the cache policy): no warning
    cache = StepCache(CachePolicy(warmup_steps=2 * WARN_AFTER_DENSE_CALLS))
    with patch_sdpa(SparseConfig(BandPattern(), cache=cache, min_seq_len=64)) as p:
        def steps():
            for step in range(2 * WARN_AFTER_DENSE_CALLS):
                p.step(step)
                F.scaled_dot_product_attention(q, k, v)
        assert _dense_warnings(steps) == []
    assert p.stats["fallback:dense step"] == 2 * WARN_AFTER_DENSE_CALLS


def test_patched_model_compiles_with_fullgraph_once_the_masks_are_built(name):
    """torch.compile(fullgraph=True) of a patched Llama: config lookup, mask reuse and the kernel in one graph."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 256))
    cache = StepCache()
    config = SparseConfig(BlockTopK(k=2, block_size=32) | SinkLocal(sink=32, window=32, block_size=32),
                          cache=cache, min_seq_len=64)
    hf.register(None, name=name)  # the config comes from use(): compiled code reads it too
    model.set_attn_implementation(name)
    try:
        with torch.no_grad(), hf.use(config):
            cache.set_step(0)  # steps driven: the next forwards at step 0 reuse the masks built now
            eager = model(ids).logits
            assert cache.stats.builds == LAYERS and hf.stats[name]["sparse"] == LAYERS
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            dense = model(ids).logits
    finally:
        model.set_attn_implementation("sdpa")
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compiled, dense, atol=1e-3)  # the compiled model ran sparse, not dense
    assert cache.stats.builds == LAYERS and cache.stats.reuses == LAYERS
    assert dict(hf.stats[name]) == {"sparse": 2 * LAYERS}


def test_svg2_preset_runs_with_registered_kmeans_routing():
    """docs/integrations.md: svg2 is k-means routing, dense for 20% of steps, rebuilt each step from warm centroids."""
    from sparse_attn.integrations.presets import get_preset

    steps = 5
    config = get_preset("svg2", num_steps=steps, min_seq_len=64, q_clusters=4, k_clusters=4)
    assert config.pattern.name == "kmeans_routing"
    q = k = v = torch.randn(1, 2, 256, 32)
    with torch.no_grad(), patch_sdpa(config) as p:
        for step in range(steps):
            p.step(step)
            F.scaled_dot_product_attention(q, k, v)
    warm = config.cache.policy.dense_steps(steps)
    assert 0 < warm < steps
    assert p.stats["fallback:dense step"] == warm and p.stats["sparse"] == steps - warm
    assert [s for _, s, _, _ in config.cache.build_log] == list(range(warm, steps))
    assert config.cache.state(0) is not None  # centroids carried to the next build
