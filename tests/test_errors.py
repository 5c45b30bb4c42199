"""Bad inputs to sparse_attention raise ValueError/TypeError naming the argument, the expected and the actual."""

import pytest
import torch

from sparse_attn import BlockSparseMask, StripeSparseMask, sparse_attention, stripe_attention


def qkv(b=1, hq=2, hkv=2, lq=64, lk=64, d=32, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype),
            torch.randn(b, hkv, lk, d, dtype=dtype))


def full(lq=64, lk=64, block=32, b=1, h=1):
    keep = torch.ones(b, h, -(-lq // (block if isinstance(block, int) else block[0])),
                      -(-lk // (block if isinstance(block, int) else block[1])), dtype=torch.bool)
    return BlockSparseMask.from_dense(keep, block, seq_lens=(lq, lk))


@pytest.mark.parametrize("make,exc,message", [
    (lambda: (torch.randn(2, 64, 32),) + qkv()[1:], ValueError, r"q must have shape \[B, H, L, D\] \(rank 4\), got \[2, 64, 32\]"),
    (lambda: (qkv()[0], [1], qkv()[2]), TypeError, "k must be a torch.Tensor, got list"),
    (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), TypeError, "q, k and v must share one dtype"),
    (lambda: tuple(x.long() for x in qkv()), TypeError, "q must have dtype in"),
    (lambda: qkv(hq=3, hkv=2), ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (lambda: (qkv()[0], qkv(lk=64)[1], qkv(lk=50)[2]), ValueError, "k and v must have the same shape"),
    (lambda: (qkv(d=32)[0],) + qkv(d=64)[1:], ValueError, "k must have batch 1 and head dim 32 like q"),
    (lambda: (qkv(b=1)[0],) + qkv(b=2)[1:], ValueError, "k must have batch 1 and head dim 32 like q"),
])
def test_bad_tensors(make, exc, message):
    q, k, v = make()
    with pytest.raises(exc, match=message):
        sparse_attention(q, k, v)


def test_mask_for_other_lengths():
    q, k, v = qkv(lq=64, lk=64)
    with pytest.raises(ValueError, match=r"mask was built for seq_lens=\(64, 96\), but q and k have lengths \(64, 64\)"):
        sparse_attention(q, k, v, full(64, 96))


def test_mask_for_other_heads_and_batch():
    q, k, v = qkv(b=2, hq=4, hkv=2)
    with pytest.raises(ValueError, match=r"mask heads must be 1, 2 \(kv heads\) or 4 \(query heads\), got 3"):
        sparse_attention(q, k, v, full(h=3))
    with pytest.raises(ValueError, match="mask batch must be 1 or 2, got 3"):
        sparse_attention(q, k, v, full(b=3))


def test_mask_wrong_type_and_device():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="mask must be a BlockSparseMask or None, got Tensor"):
        sparse_attention(q, k, v, torch.ones(64, 64, dtype=torch.bool))
    mask = full()
    mask.counts = mask.counts.to("meta")
    with pytest.raises(ValueError, match="mask is on meta, but q is on cpu"):
        sparse_attention(q, k, v, mask)


def test_bad_backend_and_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        sparse_attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="scale must be a float or None, got str"):
        sparse_attention(q, k, v, scale="0.1")


def test_triton_limits():
    q, k, v = qkv(d=8)
    with pytest.raises(ValueError, match=r"head dim must be in \[16, 256\] for the Triton kernel, got 8"):
        sparse_attention(q, k, v, backend="triton")
    q, k, v = qkv(d=288)
    with pytest.raises(ValueError, match="head dim must be in"):
        sparse_attention(q, k, v, backend="triton")
    q, k, v = qkv(lq=60, lk=60)
    with pytest.raises(ValueError, match=r"mask.block_size must use sizes in \(16, 32, 64, 128\)"):
        sparse_attention(q, k, v, full(60, 60, block=(20, 20)), backend="triton")
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="for backend='triton', got torch.float64"):
        sparse_attention(q, k, v, backend="triton")


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\), got device cpu"):
        sparse_attention(q, k, v, backend="triton")


def test_torch_backend_takes_other_block_sizes_and_fp64():
    q, k, v = qkv(lq=60, lk=60, dtype=torch.float64)
    out = sparse_attention(q, k, v, full(60, 60, block=(20, 12)), backend="torch")
    ref = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1) @ v
    assert torch.allclose(out, ref, atol=1e-12)


def test_head_dim_zero_is_a_value_error_naming_head_dim():
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match=r"q must have head dim \(last dimension\) >= 1, got shape \[1, 2, 64, 0\]"):
        sparse_attention(q, k, v)


def test_bf16_triton_in_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"cannot run bfloat16 in the Triton CPU interpreter"):
        sparse_attention(q, k, v, backend="triton")
    with pytest.raises(TypeError, match=r"cannot run bfloat16 in the Triton CPU interpreter"):
        sparse_attention(q, k, v, full(), backend="triton")
    stripes = StripeSparseMask.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0, 1]]]), seq_lens=(64, 64),
                                                   block_size=32)
    with pytest.raises(TypeError, match=r"cannot run bfloat16 in the Triton CPU interpreter"):
        stripe_attention(q, k, v, stripes, backend="triton")


def test_auto_backend_on_cpu_takes_fp64_like_the_torch_backend():
    q, k, v = qkv(dtype=torch.float64)
    mask = full()
    out = sparse_attention(q, k, v, mask)  # "auto" on CPU is the PyTorch path, which runs fp64
    assert out.dtype == torch.float64
    assert torch.equal(out, sparse_attention(q, k, v, mask, backend="torch"))


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, torch.tensor(True)])
def test_check_bool_refuses_non_booleans(value):
    from sparse_attn._checks import check_bool

    with pytest.raises(TypeError, match=r"causal must be a bool \(True or False\), got " + type(value).__name__):
        check_bool(value, "causal")


def test_check_bool_returns_booleans():
    from sparse_attn._checks import check_bool

    assert check_bool(True, "causal") is True and check_bool(False, "return_lse") is False
