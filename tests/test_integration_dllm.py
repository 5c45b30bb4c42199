"""Diffusion-LM sessions: one forward per step, SparseD's schedule, reset per generation."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn.cache import CachePolicy, StepCache
from sparse_attn.integrations.dllm import DiffusionLMSession, session, sparsed_policy
from sparse_attn.integrations.sdpa import SparseConfig

from _toy_patterns import BandPattern, DensePattern

MASK_ID, VOCAB = 0, 50


class TinyBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # bidirectional, called directly as in LLaDA
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


class TinyLLaDA(torch.nn.Module):
    def __init__(self, dim=64, heads=4, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.pos = torch.nn.Parameter(torch.randn(512, dim) * 0.02)
        self.blocks = torch.nn.ModuleList([TinyBlock(dim, heads) for _ in range(layers)])
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


@torch.no_grad()
def generate(model, prompt, gen_len=96, steps=10):
    """LLaDA-style: start fully masked, unmask the most confident gen_len/steps tokens per step."""
    x = torch.cat([prompt, torch.full((1, gen_len), MASK_ID)], dim=1)
    per_step = gen_len // steps
    for _ in range(steps):
        logits = model(x)
        logits[..., MASK_ID] = -float("inf")
        conf, pred = logits.softmax(-1).max(-1)
        conf = torch.where(x == MASK_ID, conf, -1.0)
        idx = conf.topk(per_step, dim=-1).indices
        x = x.scatter(1, idx, pred.gather(1, idx))
    return x


def model_and_prompt(length=64):
    torch.manual_seed(0)
    return TinyLLaDA().eval(), torch.randint(1, VOCAB, (1, length))


def test_dense_pattern_reproduces_generation_and_sparsed_schedule():
    model, prompt = model_and_prompt()
    ref = generate(model, prompt)
    pat = DensePattern(block=32)
    steps = 10
    cfg = SparseConfig(pat, cache=StepCache(sparsed_policy(steps)), min_seq_len=64)
    with session(model, cfg, num_steps=steps) as s:
        out = generate(model, prompt, steps=steps)
        first = list(s.cache.build_log)
        out2 = generate(model, prompt, steps=steps)  # the 11th forward starts a new generation
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    # dense for steps 0..int(10*0.2) = 0..2, built once at step 3 per layer, reused after
    assert first == [(0, 3, 0, None), (0, 3, 1, None)]
    assert s.cache.build_log[2:] == [(1, 3, 0, None), (1, 3, 1, None)]
    assert s.cache.stats.dense == 2 * 3 * 2 and s.cache.stats.reuses == 2 * 6 * 2
    assert pat.builds == 4
    logits = model(out)  # after the session: the original SDPA, bit-identical
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(out), logits)


def test_new_generation_on_shape_change_and_by_hand():
    model, prompt = model_and_prompt()
    pat = BandPattern(block=32, width=1)
    cfg = SparseConfig(pat, cache=StepCache(CachePolicy(warmup_steps=1)), min_seq_len=64)
    with session(model, cfg) as s:  # no num_steps: generations end on shape change or by hand
        generate(model, prompt, steps=4)
        assert s.cache.generation == 0 and pat.builds == 2
        generate(model, prompt[:, :32], steps=4)  # other prompt length: new generation
        assert s.cache.generation == 1 and pat.builds == 4 and s.cache.stats.invalidations == 0
        s.new_generation()
        generate(model, prompt[:, :32], steps=4)
        assert s.cache.generation == 2 and pat.builds == 6
    assert s.stats["sparse"] == 3 * 3 * 2


def test_manual_steps_and_transformers_sdpa_path():
    transformers = pytest.importorskip("transformers")
    cfg_l = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg_l).eval()
    llama.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (1, 128))
    with torch.no_grad():
        ref = llama(ids).logits
        pat = DensePattern(block=32)
        cfg = SparseConfig(pat, cache=StepCache(CachePolicy(warmup_steps=2)), min_seq_len=64)
        with DiffusionLMSession(llama, cfg, model_forward_counts_as_step=False) as s:
            for step in range(4):
                s.begin_step()
                out = llama(ids).logits
                assert s.step == step
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert [entry[1:3] for entry in s.cache.build_log] == [(2, 0), (2, 1)]  # layers by call order


def test_bad_input():
    model, _ = model_and_prompt()
    with pytest.raises(TypeError, match="model must be"):
        session(object(), DensePattern())
    with pytest.raises(ValueError, match="num_steps"):
        session(model, DensePattern(), num_steps=0)
    with pytest.raises(ValueError, match="skip"):
        sparsed_policy(10, skip=1.5)
    with pytest.raises(TypeError, match="model_forward_counts_as_step"):
        session(model, DensePattern(), model_forward_counts_as_step="yes")


def test_sparsed_preset():
    from sparse_attn.integrations.presets import get_preset

    model, prompt = model_and_prompt()
    cfg = get_preset("sparsed", num_steps=10, short_prompt=True, min_seq_len=64)
    assert cfg.pattern.block_pair == (32, 32) and cfg.pattern.select == 0.5
    with session(model, cfg, num_steps=10) as s:
        out = generate(model, prompt, steps=10)
    assert [e[1] for e in s.cache.build_log] == [3, 3] and s.stats["sparse"] == 2 * 7
    assert int((out[:, 64:] != MASK_ID).sum()) == 10 * (96 // 10)
