"""SDPA drop-in: sparse_sdpa / patch_sdpa route, fall back, scope and restore."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as imported_early

import sparse_attn
from sparse_attn.cache import CachePolicy, StepCache
from sparse_attn.integrations.sdpa import SparseConfig, original_sdpa, patch_sdpa, sparse_sdpa

from _toy_patterns import BandPattern, DensePattern
from oracle import math_attention

SDPA = original_sdpa()


def test_exports_and_signature():
    assert sparse_attn.sparse_sdpa is sparse_sdpa and sparse_attn.patch_sdpa is patch_sdpa
    params = list(inspect.signature(sparse_sdpa).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
        ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)]


def test_outside_a_patch_it_is_sdpa():
    q, k, v = (torch.randn(2, 4, 200, 32) for _ in range(3))
    assert torch.equal(sparse_sdpa(q, k, v, is_causal=True), SDPA(q, k, v, is_causal=True))


@pytest.mark.parametrize("lq, lk, hq, hkv, causal", [
    (256, 256, 4, 4, False), (256, 256, 4, 4, True), (200, 333, 6, 2, False), (160, 300, 4, 1, True),
], ids=["plain", "causal", "gqa-lq<lk", "mqa-causal-topleft"])
def test_dense_pattern_matches_sdpa(lq, lk, hq, hkv, causal):
    q = torch.randn(2, hq, lq, 32)
    k, v = torch.randn(2, hkv, lk, 32), torch.randn(2, hkv, lk, 32)
    gqa = hq != hkv
    ref = SDPA(q, k, v, is_causal=causal, enable_gqa=gqa, scale=0.2)
    with patch_sdpa(SparseConfig(DensePattern(), min_seq_len=64)) as p:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, scale=0.2)
    assert p.stats["sparse"] == 1 and p.stats["fallback"] == 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_band_pattern_is_the_masked_attention():
    q, k, v = (torch.randn(1, 2, 256, 32, dtype=torch.float64) for _ in range(3))
    pat = BandPattern(block=32, width=1)
    with patch_sdpa(SparseConfig(pat, min_seq_len=64, backend="torch")):
        out = imported_early(q, k, v, is_causal=True)  # a name imported before the patch is caught too
    tok = pat.build(q, k).to_dense()
    ref, _ = math_attention(q, k, v, tok, causal=True)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, SDPA(q, k, v, is_causal=True))


def test_masks_over_max_density_run_the_original_sdpa():
    """A mask whose tiles take more than ``max_density`` of dense attention's work runs the original SDPA
    (bit for bit); under it, or without a limit, the call runs sparse."""
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    pat = BandPattern(block=32, width=1)
    share = pat.build(q, k).tile_share(causal=True)  # first, previous and diagonal tile: 21 x 32 x 32 / 32896
    assert share == pytest.approx(21 * 1024 / (256 * 257 / 2)) and share >= pat.build(q, k).density(causal=True)
    ref = SDPA(q, k, v, is_causal=True)
    with patch_sdpa(SparseConfig(pat, min_seq_len=64, max_density=0.6)) as p:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, ref) and p.stats["fallback:mask too dense"] == 1 and p.stats["sparse"] == 0
    for limit in (0.7, None):
        with patch_sdpa(SparseConfig(pat, min_seq_len=64, max_density=limit)) as p:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert p.stats["sparse"] == 1 and not torch.allclose(out, ref, atol=1e-3)
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="max_density"):
            SparseConfig(pat, max_density=bad)


@pytest.mark.parametrize("case", ["dropout", "float-mask", "bool-mask", "decode", "short", "causal-lq>lk",
                                  "heads-without-gqa", "value-dim"])
def test_fallbacks_are_the_original_sdpa(case):
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    kw, reason = {}, case
    if case == "dropout":
        kw, reason = {"dropout_p": 0.5}, "dropout"
    elif case in ("float-mask", "bool-mask"):
        m = torch.randn(256, 256) if case == "float-mask" else torch.rand(256, 256) > 0.3
        kw, reason = {"attn_mask": m}, "attn_mask"
    elif case == "decode":
        q = q[:, :, :1]
    elif case == "short":
        q, k, v = q[:, :, :100], k[:, :, :100], v[:, :, :100]
    elif case == "causal-lq>lk":
        k, v, kw, reason = k[:, :, :200], v[:, :, :200], {"is_causal": True}, "top-left causal with Lq > Lk"
    elif case == "heads-without-gqa":
        q, reason = torch.randn(1, 4, 256, 32), "heads"
    elif case == "value-dim":
        v, reason = torch.randn(1, 2, 256, 48), "shapes"
    pat = DensePattern()
    torch.manual_seed(1)
    if case == "heads-without-gqa":
        with pytest.raises(RuntimeError):  # the original SDPA's own error, not a recursion
            SDPA(q, k, v, **kw)
        with patch_sdpa(SparseConfig(pat, min_seq_len=128)) as p, pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, **kw)
    else:
        ref = SDPA(q, k, v, **kw)
        torch.manual_seed(1)
        with patch_sdpa(SparseConfig(pat, min_seq_len=128)) as p:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.equal(out, ref)
    assert pat.builds == 0 and p.stats["sparse"] == 0
    assert p.stats["fallback:" + reason] == 1, dict(p.stats)


def test_restores_on_exit_and_on_exception():
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    ref = SDPA(q, k, v)
    pat = BandPattern()
    with pytest.raises(KeyError):
        with patch_sdpa(SparseConfig(pat, min_seq_len=64)):
            F.scaled_dot_product_attention(q, k, v)
            raise KeyError("boom")
    assert pat.builds == 1
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), ref) and pat.builds == 1
    assert torch.equal(sparse_sdpa(q, k, v), ref)
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_nested_patches_and_direct_calls():
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    outer, inner = BandPattern(), DensePattern()
    with patch_sdpa(SparseConfig(outer, min_seq_len=64)) as po:
        with patch_sdpa(SparseConfig(inner, min_seq_len=64)) as pi:
            F.scaled_dot_product_attention(q, k, v)
            sparse_sdpa(q[:, :, :10], k, v)  # a direct call that falls back: no recursion
        F.scaled_dot_product_attention(q, k, v)
    assert (inner.builds, outer.builds) == (1, 1)
    assert pi.stats["fallback:short"] == 1 and po.stats["sparse"] == 1


class _Block(torch.nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, context=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if context is not None:
            _, k, v = self.qkv(context).view(b, context.shape[1], 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.ModuleList([_Block(), _Block()])
        self.cross_attn = _Block()

    def forward(self, x, context):
        for blk in self.self_attn:
            x = x + blk(x)
        return x + self.cross_attn(x, context)


def test_scoping_to_modules_and_per_layer_patterns():
    model = _Model()
    x, ctx = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    with torch.no_grad():
        ref = model(x, ctx)
        dense0, dense1 = DensePattern(), DensePattern()
        cfg = SparseConfig({0: dense0, 1: dense1}, min_seq_len=64)
        with patch_sdpa(cfg, model=model, modules=r"self_attn\.\d+") as p:
            out = model(x, ctx)
        assert p.layers == {"self_attn.0": 0, "self_attn.1": 1}
        assert (dense0.builds, dense1.builds) == (1, 1)
        assert p.stats["sparse"] == 2 and p.stats["fallback:outside the chosen modules"] == 1
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        only0 = DensePattern()
        with patch_sdpa(SparseConfig({0: only0}, min_seq_len=64), model=model,
                        modules=["self_attn.0", "self_attn.1"]) as p:
            model(x, ctx)
        assert only0.builds == 1 and p.stats["fallback:dense layer"] == 1
        # self-attention only: the cross-attention call (other key length) is left alone
        pat = DensePattern()
        with patch_sdpa(SparseConfig(pat, min_seq_len=64), self_attention_only=True) as p:
            model(x, ctx[:, :200])
        assert pat.builds == 2 and p.stats["fallback:cross-attention"] == 1
        assert torch.equal(model(x, ctx), ref)  # hooks removed: bit-identical again
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_step_cache_through_the_patch():
    model = _Model()
    x, ctx = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    pat = DensePattern()
    cache = StepCache(CachePolicy(warmup_steps=2, rebuild_steps=(4,)))
    with torch.no_grad(), patch_sdpa(SparseConfig(pat, cache=cache, min_seq_len=64)) as p:
        for step in range(6):
            p.step(step)
            model(x, ctx)
    assert sorted({s for _, s, _, _ in cache.build_log}) == [2, 4]
    assert pat.builds == 2 * 3 and cache.stats.dense == 2 * 3 and p.stats["fallback:dense step"] == 6


def test_bad_input():
    with pytest.raises(TypeError, match="pattern must be"):
        patch_sdpa(object())
    with pytest.raises(ValueError, match="needs a pattern"):
        SparseConfig()
    with pytest.raises(ValueError, match="modules needs model"):
        patch_sdpa(DensePattern(), modules=["a"])
    with pytest.raises(ValueError, match="chose no submodule"):
        with patch_sdpa(DensePattern(), model=_Model(), modules=["nope"]):
            pass
    with pytest.raises(TypeError, match="modules must be"):
        patch_sdpa(DensePattern(), model=_Model(), modules=3)
    with pytest.raises(ValueError, match="backend"):
        SparseConfig(DensePattern(), backend="cuda")
    with pytest.raises(TypeError, match=r"pattern\[0\]"):
        SparseConfig({0: "dense"})
    with pytest.raises(TypeError, match="min_seq_len"):
        SparseConfig(DensePattern(), min_seq_len=1.5)


def test_presets_registry():
    from sparse_attn.integrations.presets import PRESETS, get_preset, list_presets
    from sparse_attn.patterns import Dense, PerHead, SlidingWindow, list_patterns

    assert list_presets() == ["adaspa", "anchor", "dhsa", "flexprefill", "hip", "kinetics", "loki", "minference", "moba",
                              "quest", "sparse_vdit", "sparsed", "streamingllm", "svg2", "xattention", "xattention_lattice"]
    assert all(p.differs and p.source for p in PRESETS.values())
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("flash")
    ada = get_preset("adaspa", num_steps=50)
    assert (ada.cache.policy.warmup_steps, ada.cache.policy.rebuild_steps) == (10, (10, 30))
    sd = get_preset("sparsed", num_steps=64)
    assert sd.cache.policy.warmup_steps == int(64 * 0.2) + 1 and sd.pattern.block_pair == (128, 128)
    plan = {0: PerHead(patterns=(Dense(block_size=64), SlidingWindow(left=64, right=64, block_size=64))), 1: None}
    vdit = get_preset("sparse_vdit", plan=plan)
    assert vdit.pattern_for(1) is None and vdit.pattern_for(0) is plan[0]
    with pytest.raises(TypeError, match="plan must be"):
        get_preset("sparse_vdit", plan=Dense())
    if not any(n in list_patterns() for n in ("kmeans_routing", "kmeans", "routing", "svg2")):
        with pytest.raises(ValueError, match="k-means routing pattern"):
            get_preset("svg2")
    # the A-shape preset through the SDPA patch equals its own mask's masked attention
    cfg = get_preset("streamingllm", sink=64, window=128, min_seq_len=256, backend="torch")
    q, k, v = (torch.randn(1, 2, 512, 32, dtype=torch.float64) for _ in range(3))
    with patch_sdpa(cfg) as p:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref, _ = math_attention(q, k, v, cfg.pattern.build(q, k, causal=True).to_dense(), causal=True)
    torch.testing.assert_close(out, ref)
    assert p.stats["sparse"] == 1


def test_config_json_round_trip():
    import json

    from sparse_attn.layout import TokenLayout
    from sparse_attn.patterns import BlockTopK, SinkLocal

    plan = {0: SinkLocal(sink=64, window=128), 1: None, 2: BlockTopK(k=4)}
    cfg = SparseConfig(plan, cache=StepCache(CachePolicy(warmup_steps=3, rebuild_steps=(3, 9)), max_bytes=1 << 20),
                       min_seq_len=256, layout=TokenLayout.video(2, 4, 4), max_density=0.6)
    back = SparseConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.pattern == plan and back.cache.policy == cfg.cache.policy and back.cache.max_bytes == 1 << 20
    assert (back.min_seq_len, back.backend, back.layout, back.max_density) == (256, "auto", cfg.layout, 0.6)
    one = SparseConfig.from_dict(SparseConfig(SinkLocal()).to_dict())
    assert one.pattern == SinkLocal() and one.cache is None
    with pytest.raises(TypeError, match="no to_dict"):
        SparseConfig(DensePattern()).to_dict()
    with pytest.raises(ValueError, match="exactly one of"):
        SparseConfig.from_dict({"min_seq_len": 3})
    with pytest.raises(ValueError, match="unknown SparseConfig fields"):
        SparseConfig.from_dict({"pattern": None, "cache": 1})


def test_key_padding_suffix_runs_sparse_and_exact():
    q, k, v = (torch.randn(2, 2, 300, 32) for _ in range(3))
    pad = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    pad[..., 260:] = False  # the same padded suffix in every row (text padding at the end)
    ref = SDPA(q, k, v, attn_mask=pad)
    ragged = pad.clone()
    ragged[1, ..., 250:] = False  # rows differ: a key range per row, still exact
    ref_ragged = SDPA(q, k, v, attn_mask=ragged)
    pat = DensePattern()
    with patch_sdpa(SparseConfig(pat, min_seq_len=64)) as p:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
        out_ragged = F.scaled_dot_product_attention(q, k, v, attn_mask=ragged)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_ragged, ref_ragged, atol=2e-5, rtol=1e-4)
    assert p.stats["sparse"] == 2 and p.stats["fallback:attn_mask"] == 0 and pat.builds == 2


def test_scoped_patch_never_applies_one_input_s_content_mask_to_another():
    """Without step() calls, the second forward is a new input: the cache starts a new generation."""
    from sparse_attn.patterns import BlockTopK

    model, pattern = _Model(), BlockTopK(k=2, block_size=32)
    x1, x2, ctx = torch.randn(1, 256, 64), torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    scope = dict(model=model, modules=r"self_attn\.\d+")
    with torch.no_grad():
        with patch_sdpa(SparseConfig(pattern, min_seq_len=64), **scope):
            fresh = model(x2, ctx)  # built for x2 itself
        with patch_sdpa(SparseConfig(pattern, min_seq_len=64, cache=StepCache(CachePolicy())), **scope) as p:
            model(x1, ctx)
            cached = model(x2, ctx)
            cache = p.config.cache
        with patch_sdpa(SparseConfig(pattern, min_seq_len=64, cache=StepCache(CachePolicy())), **scope) as p:
            p.step(0)  # steps driven by hand: the second forward at step 0 is another call of it and reuses
            model(x1, ctx)
            stale = model(x2, ctx)
    assert not torch.allclose(stale, fresh, atol=1e-4)  # x1's masks give other outputs: the check can fail
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-5)
    assert cache.generation == 1 and cache.stats.reuses == 0 and p.config.cache.stats.reuses == 2


def _round_trip(cfg):
    import json

    saved = cfg.to_dict()
    back = type(cfg).from_dict(json.loads(json.dumps(saved)))  # a subclass (SparseDecodeConfig) loads its own
    assert back.to_dict() == saved  # policy, max_bytes, num_steps, num_layers, min_seq_len, backend, layout
    assert (back.cache is None) == (cfg.cache is None) and (cfg.cache is None or back.cache is not cfg.cache)
    return back


def _small_plan():
    from sparse_attn.patterns import PatternSearch, SlidingWindow

    search = PatternSearch([SlidingWindow(left=64, right=64)], lam=1.0, eps=1.0, include_skip=False)
    q = torch.randn(1, 2, 256, 32)
    search.observe(0, q, q, q)
    return search.plan()


def test_every_preset_round_trips_through_json():
    from sparse_attn.integrations.presets import get_preset, list_presets
    from sparse_attn.patterns import Dense, PerHead, SlidingWindow

    per_layer = {0: PerHead(patterns=(Dense(), SlidingWindow(left=64, right=64))), 1: None}
    needs = {"sparsed": [{"num_steps": 20}], "sparse_vdit": [{"plan": per_layer}, {"plan": _small_plan()}]}
    for name in list_presets():  # a new preset that needs arguments must be added to `needs`
        for kw in needs.get(name, [{}]):
            cfg = get_preset(name, **kw)
            back = _round_trip(cfg)
            assert back.pattern == cfg.pattern and type(back.pattern) is type(cfg.pattern), name
            if cfg.cache is not None:
                assert (back.cache.policy, back.cache.max_bytes, back.cache.num_steps) == (
                    cfg.cache.policy, cfg.cache.max_bytes, cfg.cache.num_steps), name


def test_plans_and_layer_ids_round_trip_through_json():
    from sparse_attn.integrations.calibrate import calibrate
    from sparse_attn.patterns import BlockTopK, PatternSearch, SearchPlan, SinkLocal

    plan = _small_plan()
    back = _round_trip(SparseConfig(plan, cache=StepCache(num_steps=7, num_layers=3)))
    assert isinstance(back.pattern, SearchPlan) and back.pattern == plan and back.cache.num_layers == 3
    lenient = _round_trip(SparseConfig(plan.get))
    assert lenient.pattern.__self__ == plan and lenient.pattern_for("absent") is None  # still plan.get
    ids = {0: SinkLocal(), "blk": BlockTopK(k=2), (3, 1): None, "7": SinkLocal(sink=32)}
    assert _round_trip(SparseConfig(ids)).pattern == ids  # int, str, tuple and digit-str ids keep their type
    with pytest.raises(TypeError, match="observes calibration calls and is not saved"):
        calibrate(PatternSearch([SinkLocal()])).to_dict()
    with pytest.raises(TypeError, match="only a pattern, a mapping layer -> pattern or a SearchPlan"):
        SparseConfig(lambda layer: None).to_dict()
