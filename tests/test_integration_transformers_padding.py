"""transformers: padded batches (left and right padding), chunked prefill after a KV cache and static caches
run sparse, with exact padding semantics: each row gives the logits it gives alone."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from _tiny_llama import tiny_llama  # noqa: E402

from sparse_attn import get_pattern  # noqa: E402
from sparse_attn.integrations import transformers as hf  # noqa: E402
from sparse_attn.integrations.hf_masks import padding_ranges  # noqa: E402
from sparse_attn.integrations.sdpa import SparseConfig  # noqa: E402

NAME = "sparse_attn_padding_test"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


def _register(llama, pattern):
    hf.register(SparseConfig(pattern, min_seq_len=32, backend="torch"), name=NAME)
    llama.set_attn_implementation(NAME)
    return hf.stats[NAME]


@pytest.fixture
def sparse(llama):
    yield lambda pattern: _register(llama, pattern)
    llama.set_attn_implementation("sdpa")
    hf.unregister(NAME)


# Patterns whose meaning does not depend on where a row starts in the padded batch: a relative window is
# the same for every row; sinks sit at absolute positions, so they match the row alone only with right padding.
CASES = [("left", get_pattern("sliding_window", left=40, right=0, block_size=32)),
         ("right", get_pattern("sliding_window", left=40, right=0, block_size=32)),
         ("right", get_pattern("sink_local", sink=16, window=48, block_size=32))]


@pytest.mark.parametrize("side,pattern", CASES, ids=["left-window", "right-window", "right-sink-local"])
def test_padded_batch_gives_each_row_its_own_logits(llama, sparse, side, pattern):
    stats = sparse(pattern)
    lengths, total = [160, 97, 130], 160
    ids = torch.randint(0, 128, (3, total))
    attn = torch.zeros(3, total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            attn[b, total - n:] = 1
        else:
            attn[b, :n] = 1
    with torch.no_grad():
        batched = llama(ids, attention_mask=attn).logits
        for b, n in enumerate(lengths):
            real = attn[b].bool()
            alone = llama(ids[b:b + 1, real]).logits[0]
            torch.testing.assert_close(batched[b, real], alone, atol=2e-5, rtol=1e-4)
    assert stats["dense:attention_mask"] == 0 and stats["sparse"] == 2 * (1 + len(lengths))


def test_padded_batch_with_a_content_pattern_runs_sparse(llama, sparse):
    stats = sparse(get_pattern("sink_local", sink=16, window=48, block_size=32)
                   | get_pattern("block_topk", k=2, block_size=32))
    ids = torch.randint(0, 128, (2, 160))
    attn = torch.ones_like(ids)
    attn[1, :50] = 0
    with torch.no_grad():
        out = llama(ids, attention_mask=attn).logits
    assert torch.isfinite(out[attn.bool()]).all()
    assert stats["sparse"] == 2 and stats["dense:attention_mask"] == 0


def test_chunked_prefill_with_a_cache_runs_sparse_and_matches_one_prefill(llama, sparse):
    stats = sparse(get_pattern("sliding_window", left=40, right=0, block_size=32))
    ids = torch.randint(0, 128, (2, 192))
    attn = torch.ones_like(ids)
    attn[1, :20] = 0  # left padding in the first chunk
    with torch.no_grad():
        whole = llama(ids, attention_mask=attn).logits
        cache = DynamicCache(config=llama.config)
        first = llama(ids[:, :96], attention_mask=attn[:, :96], past_key_values=cache, use_cache=True).logits
        second = llama(ids[:, 96:], attention_mask=attn, past_key_values=cache, use_cache=True).logits
    chunked = torch.cat([first, second], 1)
    valid = attn.bool()
    torch.testing.assert_close(chunked[valid], whole[valid], atol=2e-5, rtol=1e-4)
    assert stats["dense:attention_mask"] == 0 and stats["sparse"] == 2 * 3


def test_masks_that_are_not_padding_stay_dense():
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    assert padding_ranges(keep, causal=True) is not None
    holes = keep.clone()
    holes[0, 0, 5, 2] = False  # a hole inside the valid keys of a row
    assert padding_ranges(holes, causal=True) is None
    docs = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()[None, None] & keep  # packed documents
    assert padding_ranges(docs, causal=True) is None
    assert padding_ranges(keep, causal=False) is None  # causal structure without causal=True is no padding


@pytest.mark.slow
def test_padded_smollm2_batch_gives_each_row_its_own_logits():
    """Real weights: a left-padded SmolLM2-135M batch under a sparse window runs sparse and gives each row's
    logits alone."""
    from _smollm2 import load_smollm2

    model, ids = load_smollm2()
    rows = [ids[0, :600], ids[0, 1000:1420]]
    total = max(len(r) for r in rows)
    batch = torch.zeros(2, total, dtype=torch.long)
    attn = torch.zeros(2, total, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, total - len(r):] = r
        attn[b, total - len(r):] = 1
    name = "sparse_attn_smollm2_padding"
    hf.register(SparseConfig(get_pattern("sliding_window", left=192, right=0, block_size=64), min_seq_len=128,
                             backend="torch"), name=name)
    try:
        model.set_attn_implementation(name)
        with torch.no_grad():
            out = model(batch, attention_mask=attn).logits
            alone = [model(r[None]).logits[0] for r in rows]
        stats = dict(hf.stats[name])
    finally:
        model.set_attn_implementation("sdpa")
        hf.unregister(name)
    for b, r in enumerate(rows):
        torch.testing.assert_close(out[b, total - len(r):], alone[b], atol=1e-4, rtol=1e-4)
    n_layers = model.config.num_hidden_layers
    assert stats.get("sparse") == 3 * n_layers and "dense:attention_mask" not in stats
