"""transformers: the "sparse_attn" attention implementation on real model classes with random weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaForCausalLM  # noqa: E402

from sparse_attn.cache import CachePolicy, StepCache  # noqa: E402
from sparse_attn.integrations import transformers as hf  # noqa: E402
from sparse_attn.integrations.sdpa import SparseConfig  # noqa: E402

from _toy_patterns import BandPattern, DensePattern  # noqa: E402


class Recorder(DensePattern):
    def __init__(self):
        super().__init__()
        self.kv_heads, self.causal = [], []

    def build(self, q, k, *, causal=False, layout=None):
        self.kv_heads.append(k.shape[1])
        self.causal.append(causal)
        return super().build(q, k, causal=causal, layout=layout)


from _tiny_llama import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture
def name():
    yield "sparse_attn_test"
    if "sparse_attn_test" in hf._CONFIGS:  # a test that failed before registering leaves nothing to undo
        hf.unregister("sparse_attn_test")


def test_dense_pattern_reproduces_sdpa_and_gqa_is_not_repeated(llama, name):
    ids = torch.randint(0, 128, (2, 200))
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        ref = llama(ids).logits
        pat = Recorder()
        hf.register(SparseConfig(pat, min_seq_len=64), name=name)
        llama.set_attn_implementation(name)
        out = llama(ids).logits
        llama.set_attn_implementation("sdpa")
        again = llama(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, ref)  # back to sdpa: bit-identical
    assert pat.kv_heads == [2, 2] and pat.causal == [True, True]
    assert hf.stats[name]["sparse"] == 2


def test_sparse_pattern_stays_causal_and_sparse(llama, name):
    ids = torch.randint(0, 128, (1, 256))
    hf.register(SparseConfig(BandPattern(block=32, width=1), min_seq_len=64), name=name)
    with torch.no_grad():
        llama.set_attn_implementation(name)
        out = llama(ids).logits
        ids2 = ids.clone()
        ids2[0, 200:] = (ids2[0, 200:] + 1) % 128
        out2 = llama(ids2).logits
        llama.set_attn_implementation("sdpa")
        dense = llama(ids).logits
    assert torch.equal(out[:, :200], out2[:, :200])  # no leak from the future
    assert not torch.allclose(out[:, 128:], dense[:, 128:], atol=1e-4)  # the band dropped far blocks
    torch.testing.assert_close(out[:, :64], dense[:, :64], atol=1e-5, rtol=1e-4)  # inside the band: exact


def test_generate_decode_goes_dense_and_padding_runs_sparse(llama, name):
    pat = DensePattern()
    hf.register(SparseConfig(pat, min_seq_len=64), name=name)
    ids = torch.randint(0, 128, (2, 100))
    attn = torch.ones_like(ids)
    attn[1, :10] = 0  # left padding
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        ref = llama.generate(ids[:1], max_new_tokens=4, do_sample=False)
        ref_pad = llama(ids, attention_mask=attn).logits
        llama.set_attn_implementation(name)
        out = llama.generate(ids[:1], max_new_tokens=4, do_sample=False)
        out_pad = llama(ids, attention_mask=attn).logits
        llama.set_attn_implementation("sdpa")
    assert torch.equal(out, ref)
    valid = attn.bool()
    torch.testing.assert_close(out_pad[valid], ref_pad[valid], atol=1e-5, rtol=1e-4)  # exact padding semantics
    counts = hf.stats[name]
    assert counts["sparse"] == 2 + 2 and counts["dense:decode"] == 3 * 2 and counts["dense:attention_mask"] == 0


def test_masks_over_max_density_run_dense(llama, name):
    ids = torch.randint(0, 128, (1, 256))
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        dense = llama(ids).logits
        hf.register(SparseConfig(BandPattern(block=32, width=1), min_seq_len=64, max_density=0.6), name=name)
        llama.set_attn_implementation(name)  # the band's tiles: 0.65 of the causal work, over the limit
        out = llama(ids).logits
        llama.set_attn_implementation("sdpa")
    assert torch.equal(out, dense)
    assert hf.stats[name]["dense:mask too dense"] == 2 and hf.stats[name]["sparse"] == 0


def test_moba_preset_runs_dense_where_its_budget_keeps_most_of_the_work():
    from sparse_attn.integrations.presets import moba
    from sparse_attn.integrations.sdpa import too_dense

    cfg = moba()
    for n, dense in ((1536, True), (2048, False)):  # the budget keeps 0.68 / 0.58 of the work: limit 0.6
        q, k = torch.randn(1, 6, n, 64), torch.randn(1, 2, n, 64)
        assert too_dense(cfg, cfg.pattern.build(q, k, causal=True), True) is dense, n
    assert not too_dense(moba(max_density=None), cfg.pattern.build(q, k, causal=True), True)


def test_per_layer_patterns_cache_and_use(llama, name):
    only1 = DensePattern()
    hf.register(None, name=name)
    ids = torch.randint(0, 128, (1, 128))
    with torch.no_grad():
        llama.set_attn_implementation(name)
        with pytest.raises(ValueError, match="has no SparseConfig"):
            llama(ids)
        cache = StepCache(CachePolicy(warmup_steps=1))
        with hf.use(SparseConfig({1: only1}, cache=cache, min_seq_len=64)):
            for step in range(3):  # a diffusion-LM-like loop: same shapes, one call per step
                cache.set_step(step)
                llama(ids)
        llama.set_attn_implementation("sdpa")
    assert only1.builds == 1 and cache.build_log == [(0, 1, 1, None)]
    assert hf.stats[name]["dense:dense layer"] == 3 and hf.stats[name]["dense:dense step"] == 1


def test_from_pretrained_with_attn_implementation(tmp_path, name):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    pat = DensePattern()
    hf.register(SparseConfig(pat, min_seq_len=64), name=name)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    ids = torch.randint(0, 128, (1, 96))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    assert pat.builds == 2


def test_bert_encoder_non_causal(name):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 160))
    pat = Recorder()
    hf.register(SparseConfig(pat, min_seq_len=64), name=name)
    with torch.no_grad():
        bert.set_attn_implementation("sdpa")
        ref = bert(ids).last_hidden_state
        bert.set_attn_implementation(name)
        out = bert(ids).last_hidden_state
        padded = torch.ones_like(ids)
        padded[0, 150:] = 0
        out_pad = bert(ids, attention_mask=padded).last_hidden_state
        bert.set_attn_implementation("sdpa")
        ref_pad = bert(ids, attention_mask=padded).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    valid = padded.bool()  # key padding runs sparse and exact (padded query rows are not compared)
    torch.testing.assert_close(out_pad[valid], ref_pad[valid], atol=1e-5, rtol=1e-4)
    assert pat.causal == [False] * 4 and hf.stats[name]["sparse"] == 4


def test_bad_input():
    with pytest.raises(ValueError, match="name must be"):
        hf.register(DensePattern(), name="sdpa")
    with pytest.raises(ValueError, match="was not registered"):
        hf.unregister("never_registered")
    with pytest.raises(TypeError, match="pattern must be"):
        hf.register(42, name="x_bad")


class DensityMeter:
    """Wraps a pattern; records each mask's share of the causally visible (query, key) pairs."""

    def __init__(self, pattern):
        self.pattern, self.shares = pattern, []

    def build(self, q, k, *, causal=False, layout=None):
        from sparse_attn import BlockSparseMask

        mask = self.pattern.build(q, k, causal=causal, layout=layout)
        full = BlockSparseMask.full(q.shape[2], k.shape[2], 64).density(causal=causal)
        self.shares.append(mask.density(causal=causal) / full)
        return mask


PPL_PRESET, PPL_PRESET_KW = "moba", {"k": 8, "sink": 64, "window": 0}


@pytest.mark.slow
def test_smollm2_perplexity(name, capsys):
    """Real weights: SmolLM2-135M on 4096 tokens of English, dense vs a sparse preset at <= 30% density."""
    import math
    import time

    from _smollm2 import load_smollm2
    from sparse_attn.integrations.presets import get_preset

    model, ids = load_smollm2()
    ids = ids[:, :4096]
    assert ids.shape[1] == 4096

    def perplexity():
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        return math.exp(loss), time.perf_counter() - t0

    model.set_attn_implementation("sdpa")
    dense, t_dense = perplexity()
    preset = get_preset(PPL_PRESET, **PPL_PRESET_KW)
    meter = DensityMeter(preset.pattern)
    hf.register(SparseConfig(meter, min_seq_len=preset.min_seq_len), name=name)
    model.set_attn_implementation(name)
    sparse, t_sparse = perplexity()
    model.set_attn_implementation("sdpa")
    share = sum(meter.shares) / len(meter.shares)
    with capsys.disabled():
        print(f"\nSmolLM2-135M, 4096 tokens: dense ppl {dense:.3f} ({t_dense:.1f} s), {PPL_PRESET} {PPL_PRESET_KW} "
              f"ppl {sparse:.3f} ({(sparse / dense - 1) * 100:+.2f}%, {t_sparse:.1f} s) at {share:.3f} of the "
              f"causal pairs")
    assert len(meter.shares) == model.config.num_hidden_layers and hf.stats[name]["sparse"] == 30
    assert share <= 0.30
    assert sparse <= 1.03 * dense


def test_a_new_prompt_of_the_same_length_never_gets_the_previous_mask(llama, name):
    """A content-based pattern with a StepCache: each prefill is a new generation, so the second prompt's logits
    are those of a fresh build, not of the first prompt's mask."""
    from sparse_attn.patterns import BlockTopK

    pattern = BlockTopK(k=4, block_size=32)  # beyond the 2 causal anchors: content decides
    first, second = torch.randint(0, 128, (1, 256)), torch.randint(0, 128, (1, 256))
    cache = StepCache()
    with torch.no_grad():
        hf.register(SparseConfig(pattern, min_seq_len=64), name=name)  # no cache: a build at every call
        llama.set_attn_implementation(name)
        fresh = llama(second).logits
        hf.register(SparseConfig(pattern, cache=cache, min_seq_len=64), name=name)
        llama(first)
        cached = llama(second).logits
        stale = first_mask_logits(llama, name, pattern, first, second)
        llama.set_attn_implementation("sdpa")
    assert not torch.allclose(stale, fresh, atol=1e-4)  # the masks of the two prompts differ: the check can fail
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-5)
    assert cache.generation == 1 and cache.stats.builds == 2 * 2 and cache.stats.reuses == 0


def first_mask_logits(llama, name, pattern, first, second):
    """Logits of ``second`` with the masks built from ``first`` (what a stale cache would apply)."""
    masks = {}

    class Record:
        def build(self, q, k, *, causal=False, layout=None):
            return masks.setdefault(len(masks), pattern.build(q, k, causal=causal, layout=layout))

    class Replay:
        def __init__(self):
            self.calls = 0

        def build(self, q, k, *, causal=False, layout=None):
            self.calls += 1
            return masks[self.calls - 1]

    hf.register(SparseConfig(Record(), min_seq_len=64), name=name)
    llama(first)
    hf.register(SparseConfig(Replay(), min_seq_len=64), name=name)
    return llama(second).logits
