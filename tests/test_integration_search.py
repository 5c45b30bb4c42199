"""Per-head search end to end: calibrate a model through an integration, plan, apply the plan to that model.

The layer ids that calibration hands to ``PatternSearch.observe`` must be the ones the integration later
asks ``plan.pattern_for`` for; the references below rebuild each layer's per-head masks by hand (one pattern
per head, math attention in fp64), so a plan applied to the wrong layer, head or call fails.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from sparse_attn import attention_quality
from sparse_attn.integrations import CalibrationConfig, SparseConfig, patch_sdpa
from sparse_attn.integrations.calibrate import calibrate
from sparse_attn.integrations.sdpa import as_config
from sparse_attn.patterns import BlockTopK, PatternSearch, SearchPlan, SinkLocal, SlidingWindow

from oracle import expand_heads, math_attention

CANDIDATES = [SlidingWindow(left=64, right=0, block_size=32), SinkLocal(sink=32, window=64, block_size=32),
              BlockTopK(k=3, block_size=32)]


class RecordingSearch(PatternSearch):
    """A PatternSearch that also records what each observe() call got (shapes and scale only)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def observe(self, layer, q, k, v, *, scale=None):
        self.seen.append((layer, tuple(q.shape), tuple(k.shape), scale))
        super().observe(layer, q, k, v, scale=scale)


def plan_keep(plan_layers, layer, q, k, causal):
    """Token-level keep ``[1|B, Hq, Lq, Lk]`` built head by head from the plan's table (None: dense layer)."""
    heads = plan_layers.get(str(layer))
    if heads is None or all(c["pattern"].name == "dense" for c in heads):
        return None
    n_q, n_kv = q.shape[1], k.shape[1]
    rows = []
    for h, c in enumerate(heads):
        tok = expand_heads(c["pattern"].build(q, k, causal=causal).to_dense(), n_q, n_kv)
        rows.append(tok[:, min(h, tok.shape[1] - 1)])
    return torch.stack(rows, 1)


# ---------------------------------------------------------------- transformers: tiny random Llama

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402

from _tiny_llama import tiny_llama  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from sparse_attn.integrations import transformers as hf  # noqa: E402

NAME, REF = "sparse_attn_search_test", "sparse_attn_search_ref"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture
def names():
    hf.register(None, name=NAME)
    yield
    hf.unregister(NAME)
    AttentionInterface._global_mapping.pop(REF, None)
    AttentionMaskInterface._global_mapping.pop(REF, None)


def reference_logits(model, ids, plan_layers, record=None):
    """Logits with each layer's attention = fp64 math attention under the plan's per-head masks (causal);
    ``record`` (a dict) gets each layer's ``(q, k, v)``."""
    def ref_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        assert attention_mask is None  # no padding: transformers' SDPA mask builder leaves causality to us
        if record is not None:
            record[module.layer_idx] = (query, key, value)
        keep = plan_keep(plan_layers, module.layer_idx, query, key, causal=True)
        out, _ = math_attention(query, key, value, keep, causal=True, scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(REF, ref_forward)
    AttentionMaskInterface.register(REF, sdpa_mask)
    model.set_attn_implementation(REF)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation("sdpa")


def run(model, ids, config):
    """Logits with ``config`` through the registered implementation, and the calls it counted."""
    hf.stats[NAME].clear()
    model.set_attn_implementation(NAME)
    try:
        with torch.no_grad(), hf.use(config):
            return model(ids).logits, dict(hf.stats[NAME])
    finally:
        model.set_attn_implementation("sdpa")


def test_llama_calibrate_plan_apply(llama, names, tmp_path):
    ids = torch.randint(0, 128, (1, 256))
    with torch.no_grad():
        dense = llama(ids).logits
    search = RecordingSearch(CANDIDATES, lam=1.0, eps=0.4, causal=True)
    cal = calibrate(search, min_seq_len=64)
    calibrated, counts = run(llama, ids, cal)
    assert torch.equal(calibrated, dense)  # calibration runs transformers' own SDPA: the dense logits, bitwise
    assert counts == {"dense:calibration": 2} and dict(cal.observed) == {0: 1, 1: 1}
    # GQA K/V reach the search unrepeated, with the model's softmax scale
    assert [s[:3] for s in search.seen] == [(i, (1, 4, 256, 16), (1, 2, 256, 16)) for i in (0, 1)]
    assert all(s[3] == pytest.approx(16 ** -0.5) for s in search.seen)

    plan = search.plan()
    assert sorted(plan.layers) == ["0", "1"] and all(len(plan.names(i)) == 4 for i in (0, 1))
    # each entry was measured on its own layer's activations (dense q, k, v captured independently)
    qkv = {}
    torch.testing.assert_close(reference_logits(llama, ids, {}, record=qkv), dense, atol=2e-5, rtol=1e-4)
    for layer, (q, k, v) in qkv.items():
        for h, c in enumerate(plan.layers[str(layer)]):
            qual = attention_quality(q, k, v, c["pattern"].build(q, k, causal=True), causal=True)
            assert c["error"] == pytest.approx(qual["error"][0, h].item(), rel=1e-4, abs=1e-6), (layer, h)
            assert c["density"] == pytest.approx(qual["density"][0, h].item(), rel=1e-6), (layer, h)
    assert plan.names(0) != plan.names(1)  # layers differ: a plan applied to the wrong layer would show
    assert plan.density() < 1 and all(r["error"] <= 0.4 for r in plan.table())
    sparse_layers = [i for i in (0, 1) if plan.pattern_for(i) is not None]
    assert sparse_layers  # else the check below proves nothing

    out, counts = run(llama, ids, SparseConfig(plan, min_seq_len=64))
    assert counts.get("sparse", 0) == len(sparse_layers) and counts.get("dense:dense layer", 0) == 2 - len(
        sparse_layers)
    ref = reference_logits(llama, ids, plan.layers)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3  # the plan is sparse enough to change the logits

    # (c) the plan round-trips through JSON and gives identical logits
    path = tmp_path / "plan.json"
    plan.save(path)
    again = SearchPlan.load(path)
    assert again.to_json() == plan.to_json() and json.loads(again.to_json())["layers"].keys() == {"0", "1"}
    out_again, _ = run(llama, ids, SparseConfig(again, min_seq_len=64))
    assert torch.equal(out_again, out)


def test_llama_dense_and_missing_layers(llama, names):
    ids = torch.randint(0, 128, (1, 192))
    with torch.no_grad():
        dense = llama(ids).logits
    search = PatternSearch(CANDIDATES, lam=1.0, eps=0.0, causal=True)  # nothing but dense is admissible
    run(llama, ids, calibrate(search, min_seq_len=64))
    all_dense = search.plan()
    assert all_dense.density() == 1.0 and all_dense.pattern_for(0) is None
    out, counts = run(llama, ids, SparseConfig(all_dense, min_seq_len=64))
    assert counts == {"dense:dense layer": 2} and torch.equal(out, dense)

    search = PatternSearch(CANDIDATES, lam=1.0, eps=0.5, causal=True)
    run(llama, ids, calibrate(search, min_seq_len=64))
    full = search.plan()
    partial = SearchPlan({"0": full.layers["0"]}, full.lam, full.eps)  # layer 1 never calibrated
    assert partial.pattern_for(0) is not None
    with pytest.raises(ValueError, match="no entry for it"):
        run(llama, ids, SparseConfig(partial, min_seq_len=64))
    out, counts = run(llama, ids, SparseConfig(partial.get, min_seq_len=64))  # opt-in: missing layers dense
    assert counts == {"sparse": 1, "dense:dense layer": 1}
    torch.testing.assert_close(out, reference_logits(llama, ids, partial.layers), atol=2e-5, rtol=1e-4)


def test_calibration_errors(llama, names):
    ids = torch.randint(0, 128, (1, 128))
    with pytest.raises(ValueError, match="causal=True"):  # a causal model searched as non-causal
        run(llama, ids, calibrate(PatternSearch(CANDIDATES), min_seq_len=64))
    with pytest.raises(TypeError, match="search must be"):
        calibrate(object())
    with pytest.raises(TypeError, match="search must be"):
        CalibrationConfig(min_seq_len=64)
    with pytest.raises(TypeError, match="min_seq_len"):
        calibrate(PatternSearch(CANDIDATES), min_seq_len=0.5)
    with pytest.raises(ValueError, match="backend"):
        calibrate(PatternSearch(CANDIDATES), backend="cuda")
    # overrides (dllm adds a cache) keep a calibration config, with the same search and counter
    cal = calibrate(PatternSearch(CANDIDATES))
    other = as_config(cal, min_seq_len=64)
    assert isinstance(other, CalibrationConfig) and other.search is cal.search and other.observed is cal.observed
    with pytest.raises(RuntimeError, match="builds no mask"):
        cal.pattern.build(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))


# ---------------------------------------------------------------- patch_sdpa: scoped modules, two calls each

class Block(torch.nn.Module):
    """GQA self-attention that calls SDPA twice (layer ids ``i`` and ``(i, 1)`` under a scoped patch)."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x, attn=F.scaled_dot_product_attention):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        a = attn(q, k, v, is_causal=True, enable_gqa=True)
        c = attn(2.0 * q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o((a + c).transpose(1, 2).reshape(b, n, -1))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, attn_for=None):
        for i, blk in enumerate(self.blocks):
            x = blk(x) if attn_for is None else blk(x, attn_for(i))
        return x


def test_patch_sdpa_scoped_calls_and_tuple_layer_ids():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 192, 64)
    modules = r"blocks\.\d+"
    with torch.no_grad():
        dense = net(x)
        search = RecordingSearch(CANDIDATES, lam=1.0, eps=0.5, causal=True)
        with patch_sdpa(calibrate(search, min_seq_len=64), model=net, modules=modules) as p:
            calibrated = net(x)
        assert torch.equal(calibrated, dense) and p.stats["fallback:calibration"] == 4
        assert [s[0] for s in search.seen] == [0, (0, 1), 1, (1, 1)]
        plan = SearchPlan.from_json(search.plan().to_json())  # tuple ids survive JSON as their str
        assert sorted(plan.layers) == ["(0, 1)", "(1, 1)", "0", "1"]
        n_sparse = sum(plan.pattern_for(i) is not None for i in (0, (0, 1), 1, (1, 1)))
        assert n_sparse >= 2
        with patch_sdpa(SparseConfig(plan, min_seq_len=64, backend="torch"), model=net, modules=modules) as p:
            out = net(x)
        assert p.stats["sparse"] == n_sparse

        def attn_for(i):
            calls = []

            def attn(q, k, v, is_causal, enable_gqa):
                layer = i if not calls else (i, len(calls))
                calls.append(layer)
                keep = plan_keep(plan.layers, layer, q, k, causal=True)
                return math_attention(q, k, v, keep, causal=True)[0].to(q.dtype)
            return attn
        ref = net(x, attn_for)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3


def test_patch_sdpa_key_padding_reaches_the_search_cropped():
    q, k, v = (torch.randn(1, 2, 192, 32) for _ in range(3))
    keep = torch.arange(192) < 150
    search = RecordingSearch([SlidingWindow(left=64, right=64, block_size=32)], eps=1.0, causal=False)
    with patch_sdpa(calibrate(search, min_seq_len=64)) as p:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None])
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None]))
    assert search.seen == [(0, (1, 2, 192, 32), (1, 2, 150, 32), None)] and p.stats["fallback:calibration"] == 1


# ---------------------------------------------------------------- diffusers: processors of a tiny Wan

def test_diffusers_calibrate_then_sparse_vdit():
    diffusers = pytest.importorskip("diffusers")
    from sparse_attn.integrations.diffusers import apply
    from sparse_attn.integrations.presets import sparse_vdit

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                            in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                            num_layers=2, rope_max_seq_len=32).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 16, 16, generator=gen), timestep=torch.full((1,), 500.0),
                  encoder_hidden_states=torch.randn(1, 16, 32, generator=gen), return_dict=False)
    with torch.no_grad():
        dense = model(**inputs)[0]
        with pytest.raises(ValueError, match="causal=False"):  # Wan's self-attention is not causal
            with apply(model, calibrate(PatternSearch(CANDIDATES, causal=True), min_seq_len=32)):
                model(**inputs)
        search = PatternSearch(CANDIDATES, lam=1.0, eps=0.6)
        with apply(model, calibrate(search, min_seq_len=32)) as handle:
            calibrated = model(**inputs)[0]
        assert torch.equal(calibrated, dense) and handle.stats["fallback:calibration"] == 2
        plan = search.plan()
        assert sorted(plan.layers) == ["0", "1"] and all(len(plan.names(i)) == 2 for i in (0, 1))
        n_sparse = sum(plan.pattern_for(i) is not None for i in (0, 1))
        with apply(model, sparse_vdit(plan, min_seq_len=32)) as handle:
            out = model(**inputs)[0]
    assert n_sparse >= 1 and handle.stats["sparse"] == n_sparse
    assert torch.isfinite(out).all() and not torch.equal(out, dense)


# ---------------------------------------------------------------- real weights: SmolLM2-135M

@pytest.mark.slow
def test_smollm2_searched_plan_perplexity(tmp_path, names, capsys):
    """Calibrate on 512 tokens of one essay, apply the plan (from its JSON file) on 512 tokens of another."""
    import math
    import time

    from _smollm2 import load_smollm2

    model, ids = load_smollm2()
    calib, held_out = ids[:, :512], ids[:, 2048:2560]
    assert held_out.shape[1] == 512
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads

    def perplexity():
        with torch.no_grad():
            return math.exp(model(held_out, labels=held_out).loss.item())

    dense = perplexity()
    search = PatternSearch([SlidingWindow(left=128, right=0), SinkLocal(sink=64, window=128), BlockTopK(k=3)],
                           lam=1.0, eps=0.1, causal=True)
    t0 = time.perf_counter()
    model.set_attn_implementation(NAME)
    with torch.no_grad(), hf.use(calibrate(search, min_seq_len=128)):
        model(calib)
    model.set_attn_implementation("sdpa")
    t_calib = time.perf_counter() - t0
    search.plan().save(tmp_path / "plan.json")
    plan = SearchPlan.load(tmp_path / "plan.json")
    hf.stats[NAME].clear()
    model.set_attn_implementation(NAME)
    with hf.use(SparseConfig(plan, min_seq_len=128)):
        planned = perplexity()
    model.set_attn_implementation("sdpa")
    n_sparse = sum(plan.pattern_for(i) is not None for i in range(n_layers))
    with capsys.disabled():
        print(f"\nSmolLM2-135M, search on 512 tokens ({t_calib:.1f} s), held-out 512 tokens: dense ppl {dense:.3f}, "
              f"planned ppl {planned:.3f} ({(planned / dense - 1) * 100:+.2f}%), plan density {plan.density():.3f}, "
              f"{n_sparse}/{n_layers} layers sparse")
    assert sorted(plan.layers, key=int) == [str(i) for i in range(n_layers)]
    assert all(len(plan.names(i)) == n_heads for i in range(n_layers))
    assert hf.stats[NAME]["sparse"] == n_sparse >= n_layers // 2
    assert plan.density() < 0.85
    assert abs(planned / dense - 1) <= 0.02
