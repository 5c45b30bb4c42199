"""The fp64 oracle and the tolerance rule of shared/RELIABILITY.md, used by every kernel test.

Rule: max|out - ref| <= factor * max|out_lowp - ref| + floor, where ref is math attention in
fp64 on the (already rounded) inputs and out_lowp the same math in the input dtype.
Forward factor 2 (10 for fp32, whose baseline is nearly exact), gradients 3.
"""

import math

import torch

FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}


def expand_heads(token_mask, n_q_heads, n_kv_heads):
    """[Bm, Hm, Lq, Lk] with Hm in (1, Hkv, Hq) -> broadcastable over [B, Hq, Lq, Lk]."""
    hm = token_mask.shape[1]
    if hm in (1, n_q_heads):
        return token_mask
    return token_mask.repeat_interleave(n_q_heads // n_kv_heads, dim=1)


def causal_keep(q_len, kv_len, device=None):
    """Bottom-right causal predicate [Lq, Lk]: j <= i + (Lk - Lq)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i + (kv_len - q_len)


def math_attention(q, k, v, token_mask=None, causal=False, scale=None, dtype=torch.float64):
    """Plain attention in ``dtype``; rows with no visible key give 0 and lse -inf.

    Returns (o [B, Hq, Lq, D], lse [B, Hq, Lq]) in ``dtype``.
    """
    n_q_heads, n_kv_heads = q.shape[1], k.shape[1]
    group = n_q_heads // n_kv_heads
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if token_mask is not None:
        keep = keep & expand_heads(token_mask.to(q.device), n_q_heads, n_kv_heads)
    if causal:
        keep = keep & causal_keep(q.shape[2], k.shape[2], q.device)
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
    p = torch.softmax(s.float() if dtype == torch.float16 else s, dim=-1).to(dtype).nan_to_num(0.0)
    return p @ vd, lse


def check_close(out, ref, lowp, name="out", factor=None, dtype=None):
    """Assert the tolerance rule; out/ref/lowp broadcast-compatible tensors."""
    dtype = dtype or lowp.dtype
    if factor is None:
        factor = 10.0 if dtype == torch.float32 else 2.0
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    base = (lowp.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    bound = factor * base + FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x baseline {base:.3e} + floor {FLOOR[dtype]:.0e}"


def check_lse(lse, ref_lse, name="lse"):
    """lse: -inf exactly where the oracle has -inf, within 2e-4 elsewhere."""
    ref_inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ref_inf), f"{name}: -inf rows differ from the oracle"
    if (~ref_inf).any():
        err = (lse.double() - ref_lse.double())[~ref_inf].abs().max().item()
        assert err <= 2e-4, f"{name}: max error {err:.3e} > 2e-4"


def routed_reference(q, k, v, q_index, k_index, causal=False, dtype=torch.float64):
    """Plain loop over (batch, head, cluster): dense attention of the cluster's queries over its keys in
    ``dtype``; outputs averaged over the clusters holding a query, 0 for a query in none."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    out = torch.zeros(b, hq, lq, d, dtype=dtype)
    cnt = torch.zeros(b, hq, lq, dtype=dtype)
    for bi in range(b):
        for h in range(hq):
            iq = q_index[min(bi, q_index.shape[0] - 1), min(h, q_index.shape[1] - 1)]
            kh = h if k_index.shape[1] == hq else (h // (hq // hkv) if k_index.shape[1] == hkv else 0)
            ik = k_index[min(bi, k_index.shape[0] - 1), kh]
            for c in range(iq.shape[0]):
                qs = q[bi, h, iq[c]].to(dtype)
                ks, vs = k[bi, h // (hq // hkv), ik[c]].to(dtype), v[bi, h // (hq // hkv), ik[c]].to(dtype)
                s = (qs @ ks.T) * d ** -0.5
                if causal:
                    s = s.masked_fill(ik[c][None, :] > iq[c][:, None], -math.inf)
                p = torch.softmax(s.float() if dtype == torch.float16 else s, -1).to(dtype)
                out[bi, h].index_add_(0, iq[c], p @ vs)
                cnt[bi, h].index_add_(0, iq[c], torch.ones(iq.shape[1], dtype=dtype))
    return out / cnt.clamp_min(1)[..., None]


def box_ids_reference(lay, shape):
    """Box per token of a video layout, by loops: 0 for text, 1 + frame-major box index for video tokens
    (boxes of ``shape = (frames, rows, cols)``; edge boxes may be smaller)."""
    n_y, n_x = -(-lay.height // shape[1]), -(-lay.width // shape[2])
    ids = []
    for i in range(lay.seq_len):
        if lay.text_start <= i < lay.text_start + lay.text_len:
            ids.append(0)
            continue
        v = i - lay.video_start
        t, y, x = v // (lay.height * lay.width), (v // lay.width) % lay.height, v % lay.width
        ids.append(1 + ((t // shape[0]) * n_y + y // shape[1]) * n_x + x // shape[2])
    return torch.tensor(ids)
