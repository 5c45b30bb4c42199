"""Dynamic Mask Attention (sparse_attn.dynamic_mask): the token-exact top-k-by-bias selection against a plain
per-row loop, the attention against the fp64 oracle, and a short CPU training run in which the learned bias
comes to select planted keys."""

import math

import pytest
import torch

from sparse_attn.dynamic_mask import DynamicMaskAttention, dynamic_mask


def loop_selection(bias, q_len, keep, causal):
    """bool ``[B, H, Lq, Lk]``: per row, the ``keep`` visible keys of largest bias (all when fewer)."""
    batch, heads, kv_len = bias.shape
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                seen = min(kv_len, i + kv_len - q_len + 1) if causal else kv_len
                if seen <= 0:
                    continue
                top = torch.topk(bias[b, h, :seen], min(keep, seen)).indices
                out[b, h, i, top] = True
    return out


@pytest.mark.parametrize("causal,q_len,kv_len,keep", [(True, 70, 70, 9), (True, 40, 90, 30), (False, 50, 77, 12),
                                                      (True, 33, 33, 64)])
def test_selection_is_each_rows_top_k(causal, q_len, kv_len, keep):
    bias = torch.randn(2, 3, kv_len)
    mask = dynamic_mask(bias, q_len, keep, causal=causal, block_size=16)
    assert torch.equal(mask.to_dense(causal=causal), loop_selection(bias, q_len, keep, causal))


def test_attention_matches_the_oracle_on_the_selection():
    torch.manual_seed(0)
    dma = DynamicMaskAttention(num_heads=4, num_kv_heads=2, head_dim=16, keep=20, block_size=16)
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    o, mask = dma(q, k, v, return_mask=True)
    bias = dma.key_bias(v).double()  # [1, 4, 64]
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4.0 + bias[:, :, None, :]
    keep = mask.to_dense(causal=True)
    assert int(keep.sum(-1).max()) == 20
    ref = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v.double().repeat_interleave(2, 1)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    o.sum().backward()  # the gradient reaches the bias parameters
    assert dma.A.grad is not None and dma.value_proj.weight.grad.abs().sum() > 0


def planted_problem(seed, length=256, n_planted=20, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = 0.3 * torch.randn(1, 2, length, dim, generator=gen)
    k = 0.3 * torch.randn(1, 1, length, dim, generator=gen)
    v = torch.randn(1, 1, length, dim, generator=gen)
    planted = torch.randperm(length - 4, generator=gen)[:n_planted - 1] + 4
    planted = torch.cat([torch.tensor([1]), planted])  # one early key: every row but the first sees one
    v[..., planted, 0] += 4.0  # the values of planted keys carry a marker the bias can learn
    is_planted = torch.zeros(length, dtype=torch.bool)
    is_planted[planted] = True
    # the teacher attends only the planted keys it can see
    s = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = visible & is_planted[None, :]
    target = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v
    rows = allowed.any(-1)
    return q, k, v, is_planted, target, rows


def recovered(mask, is_planted):
    """Share of (row, visible planted key) pairs that the selection keeps."""
    keep = mask.to_dense(causal=True)  # [1, H, L, L]
    length = is_planted.shape[0]
    want = torch.ones(length, length, dtype=torch.bool).tril() & is_planted[None, :]
    return (keep & want).sum().item() / (want.sum().item() * keep.shape[1])


def test_training_learns_to_select_planted_keys():
    """Trained on 8 planted inputs (their own keys and planted positions), judged on a ninth."""
    torch.manual_seed(0)
    q, k, v, held_out, _, _ = planted_problem(seed=1)
    dma = DynamicMaskAttention(num_heads=2, num_kv_heads=1, head_dim=16, keep=32, block_size=32)
    before = recovered(dma.select(dma.key_bias(v).detach(), 256), held_out)
    train = [planted_problem(seed=100 + i) for i in range(8)]
    opt = torch.optim.Adam(dma.parameters(), lr=0.05)
    for step in range(40):
        q_t, k_t, v_t, _, target, rows = train[step % len(train)]
        loss = ((dma(q_t, k_t, v_t) - target)[:, :, rows] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recovered(dma.select(dma.key_bias(v).detach(), 256), held_out)
    assert before < 0.8, before  # an untrained bias does not find them
    assert after >= 0.95, (before, after)


def test_errors_and_config_round_trip():
    dma = DynamicMaskAttention(num_heads=4, num_kv_heads=2, head_dim=8, keep=16, block_size=(32, 16))
    again = DynamicMaskAttention.from_json(dma.to_json())
    assert again.config() == dma.config()
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        DynamicMaskAttention(num_heads=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(TypeError, match="keep must be an int"):
        DynamicMaskAttention(num_heads=2, num_kv_heads=1, head_dim=8, keep=0.5)
    with pytest.raises(ValueError, match=r"v must have shape \[B, 2, Lk, 8\]"):
        dma.key_bias(torch.randn(1, 4, 10, 8))
    with pytest.raises(ValueError, match="bias must be a float tensor"):
        dynamic_mask(torch.zeros(3, 4), 4, 2)
    with pytest.raises(ValueError, match="bias holds NaN"):
        dynamic_mask(torch.full((1, 1, 8), float("nan")), 8, 2)
