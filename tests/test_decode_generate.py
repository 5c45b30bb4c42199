"""transformers generate() with sparse decode steps: all pages = dense tokens (dynamic and static caches), a budget
runs sparse, short contexts stay dense, chunked prefill keeps its prefill pattern; page selection patterns."""

import pytest
import torch

from _tiny_llama import tiny_llama
from sparse_attn.integrations import transformers as hf
from sparse_attn.integrations.presets import get_preset
from sparse_attn.kvcache import PageSummaries
from sparse_attn.patterns import KineticsSelect, QuestSelect, SinkLocal, get_decode_pattern, list_decode_patterns

NAME = "sparse_attn_decode_test"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture
def register():
    def do(cfg):
        hf.register(cfg, name=NAME)
        return hf.stats[NAME]
    yield do
    if NAME in hf._CONFIGS:
        hf.unregister(NAME)


def generate(model, ids, impl, **kw):
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("cache,preset,opts", [("dynamic", "kinetics", {}), ("static", "kinetics", {}),
                                               ("dynamic", "loki", {"granularity": "page"}), ("static", "loki", {})])
def test_generate_with_every_page_is_dense_token_for_token(llama, register, cache, preset, opts):
    ids = torch.randint(1, 128, (1, 70))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    dense = generate(llama, ids, "sdpa", **kw)
    stats = register(get_preset(preset, k=1.0, min_context=64, **opts))
    sparse = generate(llama, ids, NAME, **kw)
    assert torch.equal(sparse, dense)
    assert stats["sparse:decode"] == 11 * llama.config.num_hidden_layers, dict(stats)


@pytest.mark.parametrize("preset,kw", [("kinetics", dict(rerank=2.0)), ("loki", dict(rank=4)),
                                       ("loki", dict(rank=4, granularity="page"))])
def test_generate_with_a_budget_rerank_and_sketches_decodes_sparse(llama, register, preset, kw):
    """A cache growing by one key per step (pages not full): re-scored candidates and sketches kept up to date."""
    ids = torch.randint(1, 128, (2, 150))
    stats = register(get_preset(preset, k=0.5, sink=16, window=16, min_context=100, **kw))
    out = generate(llama, ids, NAME)
    assert out.shape == (2, 162) and stats["sparse:decode"] == 11 * llama.config.num_hidden_layers, dict(stats)
    state = hf._CONFIGS[NAME].state
    for layer in range(llama.config.num_hidden_layers):  # sketches were fitted to the prompt's queries
        sketch = state._entries[layer][1].sketch
        assert (sketch is not None and sketch.query_map is not None) == (preset == "loki"), layer
        assert state._entries[layer][1].has_stats == (preset != "loki")  # loki reads the sketch alone
        assert (state.query_moment(layer) is not None) == (preset == "loki")


def test_generate_with_a_budget_decodes_sparse_and_short_contexts_stay_dense(llama, register):
    ids = torch.randint(1, 128, (2, 150))
    stats = register(get_preset("quest", k=2, min_context=155))
    out = generate(llama, ids, NAME)
    layers = llama.config.num_hidden_layers
    assert out.shape == (2, 162)
    # contexts 151..161 after the prefill: the first 4 steps (151..154 keys) are below min_context
    assert stats["dense:decode (short context)"] == 4 * layers and stats["sparse:decode"] == 7 * layers, dict(stats)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_few_new_tokens_over_a_cache_decode_sparse_and_exact(llama, register, cache):
    """5 queries after 100 cached keys (speculative decoding's shape): bottom-right causal over the cache."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(1, 128, (1, 105))

    def logits(impl):
        llama.set_attn_implementation(impl)
        try:
            with torch.no_grad():
                kv = DynamicCache(config=llama.config) if cache == "dynamic" else StaticCache(
                    config=llama.config, max_cache_len=160)
                llama(ids[:, :100], cache=kv, use_cache=True)
                return llama(ids[:, 100:], cache=kv, use_cache=True).logits
        finally:
            llama.set_attn_implementation("sdpa")

    dense = logits("sdpa")
    stats = register(get_preset("kinetics", k=1.0, min_context=64))
    torch.testing.assert_close(logits(NAME), dense, atol=1e-5, rtol=1e-5)
    assert stats["sparse:decode"] == llama.config.num_hidden_layers, dict(stats)


def test_chunked_prefill_keeps_the_prefill_pattern(llama, register):
    from transformers import DynamicCache

    ids = torch.randint(1, 128, (1, 256))
    stats = register(get_preset("kinetics", prefill=SinkLocal(sink=32, window=64, block_size=32), min_seq_len=64,
                                min_context=64))
    llama.set_attn_implementation(NAME)
    try:
        with torch.no_grad():
            cache = DynamicCache(config=llama.config)
            llama(ids[:, :128], cache=cache, use_cache=True)
            llama(ids[:, 128:], cache=cache, use_cache=True)  # 128 queries after 128 cached keys
    finally:
        llama.set_attn_implementation("sdpa")
    assert stats["sparse"] == 2 * llama.config.num_hidden_layers and stats["sparse:decode"] == 0, dict(stats)


def test_page_selection_scores_budgets_and_forced_pages():
    batch, n_q_heads, n_kv_heads, dim, length, P = 2, 4, 2, 16, 200, 16
    q, k = torch.randn(batch, n_q_heads, 1, dim), torch.randn(batch, n_kv_heads, length, dim)
    seq = torch.tensor([200, 90])
    summ = PageSummaries.from_cache(k, seq, page_size=P)
    # kinetics: the group-mean query dotted with the page mean, by brute force
    kin = KineticsSelect(k=5, sink=16, window=16)
    page_mean = torch.nn.functional.pad(k[0], (0, 0, 0, 8)).view(n_kv_heads, 13, P, dim).sum(2)
    page_mean[:, -1] /= 8
    page_mean[:, :-1] /= P
    q_bar = q[0, :, 0].view(n_kv_heads, 2, dim).mean(1)
    torch.testing.assert_close(kin.scores(q, summ, None)[0], (page_mean * q_bar[:, None]).sum(-1))
    # group="softmax": each head's softmax over the row's pages, summed over the group's heads
    soft = KineticsSelect(k=5, sink=16, window=16, group="softmax")
    rows = q[1, :, 0].view(n_kv_heads, 2, dim)  # row 1 holds 90 keys: pages 0..5
    mean1 = PageSummaries.from_cache(k[1:, :, :90], seq[1:], page_size=P).mean[0]  # [Hkv, 6, D]
    want = torch.softmax(rows @ mean1.transpose(-1, -2) / dim ** 0.5, dim=-1).sum(1)  # [Hkv, 6]
    valid = torch.arange(13)[None, :] < torch.tensor([[13], [6]])
    got = soft.scores(q, summ, None, valid[:, None])[1]  # [Hkv, NP]
    torch.testing.assert_close(got[:, :6], want)
    assert bool((got[:, 6:] == 0).all())
    assert ((soft.select(q, summ, seq) >= 0).sum(-1) == 5).all()
    with pytest.raises(ValueError, match="group"):
        KineticsSelect(group="max")
    pages = kin.select(q, summ, seq)
    assert pages.shape[-1] == 5 and ((pages >= 0).sum(-1) == 5).all()
    for row, n in ((0, 13), (1, 6)):
        got = set(pages[row, 0].tolist()) - {-1}
        assert {0, n - 2, n - 1} <= got and max(got) < n  # sink, window and current page; nothing past the row
    # quest: the bound is >= every key's score in the page, per query head
    quest = QuestSelect(k=0.5)
    bound = quest.scores(q, summ, None)  # [B, Hkv, NP]
    s = (q[0, :, 0].view(n_kv_heads, 2, dim) @ k[0].transpose(-1, -2)).amax(1)  # [Hkv, L]
    page_max = torch.nn.functional.pad(s, (0, 8), value=float("-inf")).view(n_kv_heads, 13, P).amax(-1)
    assert (bound[0] >= page_max - 1e-5).all()
    pages = quest.select(q, summ, seq)
    assert ((pages[0] >= 0).sum(-1) == 7).all() and ((pages[1] >= 0).sum(-1) == 3).all()  # ceil(13/2), ceil(6/2)
    per_head = QuestSelect(k=(1, 0.25)).select(q, summ, seq)
    assert (pages_kept := (per_head >= 0).sum(-1)).tolist() == [[1, 4], [1, 2]], pages_kept


def test_decode_patterns_registry_and_bad_budgets():
    assert list_decode_patterns() == ["kinetics", "loki", "quest"]
    from sparse_attn.patterns import decode_pattern_from_dict

    for pat in (KineticsSelect(k=(3, 0.5), sink=0, window=32), QuestSelect(k=64)):
        assert decode_pattern_from_dict(pat.to_dict()) == pat
    assert get_decode_pattern("quest", k=8) == QuestSelect(k=8)
    for bad, err in [(dict(k=0), ValueError), (dict(k=1.5), ValueError), (dict(k="x"), TypeError),
                     (dict(k=()), ValueError), (dict(window=-1), ValueError)]:
        with pytest.raises(err, match="k|window"):
            KineticsSelect(**bad)
    with pytest.raises(ValueError, match="unknown decode pattern"):
        get_decode_pattern("h2o")
    with pytest.raises(TypeError, match="decode must be"):
        hf.SparseDecodeConfig({}, decode=SinkLocal())


@pytest.mark.slow
def test_smollm2_generates_with_a_budget_and_reports_decode_perplexity(capsys):
    """Real weights: SmolLM2-135M decodes 1/8 of the pages past 4096 cached keys; teacher-forced perplexity of
    the decoded tokens vs dense decoding, reported (the bar: within +3%)."""
    from _smollm2 import load_smollm2

    model, ids = load_smollm2()
    prefix, tokens = 4096, 96
    ids = ids[:, :prefix + tokens]
    model.set_attn_implementation("sdpa")
    start = hf.prefill(model, ids[:, :prefix])
    dense = hf.decode_perplexity(model, ids, prefix, prefilled=start)
    stats = hf.stats[hf.register(get_preset("kinetics", k=0.125, min_context=1024), name=NAME)]
    model.set_attn_implementation(NAME)
    try:
        sparse = hf.decode_perplexity(model, ids, prefix, prefilled=start)
        assert stats["sparse:decode"] == (tokens - 1) * model.config.num_hidden_layers, dict(stats)
        with torch.no_grad():  # generate(): the prompt past min_context decodes sparse from the first step
            out = model.generate(ids[:, :1100], max_new_tokens=4, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
        hf.unregister(NAME)
    assert out.shape == (1, 1104) and stats["sparse:decode"] == (tokens + 2) * model.config.num_hidden_layers
    with capsys.disabled():
        print(f"\nSmolLM2-135M, {prefix} prefill + {tokens} decoded tokens: dense decode ppl {dense:.3f}, kinetics 1/8 "
              f"of the pages ppl {sparse:.3f} ({(sparse / dense - 1) * 100:+.2f}%)")
    assert sparse <= 1.05 * dense


def test_decode_state_follows_a_growing_cache_and_starts_over_on_a_new_one():
    from sparse_attn.decode import DecodeState

    state, k = DecodeState(), torch.randn(2, 2, 300, 16)
    for length in list(range(20, 60)) + [200, 201, 300]:  # one token at a time, then jumps
        seq = torch.tensor([length, length - 3], dtype=torch.int32)
        got = state.summaries(0, k[:, :, :length], seq, 16)
        want = PageSummaries.from_cache(k[:, :, :length], seq, page_size=16)
        n = want.mean.shape[2]
        for name in ("mean", "kmin", "kmax"):
            assert torch.equal(getattr(got, name)[:, :, :n], getattr(want, name)), (length, name)
    other = torch.randn(2, 2, 100, 16)  # shorter: a new sequence
    seq = torch.tensor([100, 100], dtype=torch.int32)
    assert torch.equal(state.summaries(0, other, seq, 16).mean[:, :, :7],
                       PageSummaries.from_cache(other, seq, page_size=16).mean)
