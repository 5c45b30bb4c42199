"""Plain PyTorch twins of the scoring kernels in ``scoring/`` (same signatures, same outputs).

They are the CPU path of the content-based patterns and the statement of what each
kernel computes. None of them materializes the full ``Lq x Lk`` score matrix: query
rows are processed in chunks of bounded size.

Conventions: causal is bottom-right (query ``i`` sees key ``j`` iff ``j <= i + Lk - Lq``);
``kv_start`` excludes the keys before it (the softmax is restricted to ``j >= kv_start``).
Every output is float32.
"""

import math

import torch

# Upper bound, in bytes, of one chunk of float32 scores.
CHUNK_BYTES = 64 * 1024 * 1024


def _pad_to(x, n, dim=2):
    pad = n - x.shape[dim]
    if pad <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _heads(k, n_q_heads):
    return k.repeat_interleave(n_q_heads // k.shape[1], dim=1) if k.shape[1] != n_q_heads else k


def _row_step(batch, heads, width, chunk_bytes):
    return max(1, chunk_bytes // max(1, batch * heads * width * 4))


def block_mean_pool_ref(x, block):
    """Mean of each block of ``block`` tokens (the ragged last block averages its valid tokens).

    Args:
        x: ``[B, H, L, D]``.
        block: tokens per block.

    Returns:
        float32 ``[B, H, ceil(L / block), D]``.
    """
    batch, heads, length, dim = x.shape
    n_b = math.ceil(length / block)
    xs = _pad_to(x.float(), n_b * block).reshape(batch, heads, n_b, block, dim).sum(3)
    cnt = torch.clamp(length - torch.arange(n_b, device=x.device) * block, max=block).clamp(min=1)
    return xs / cnt[:, None].to(xs.dtype)


def pooled_block_scores_ref(q_pool, k_pool, scale, q_len, kv_len, block_m, block_n, causal):
    """Scores of pooled query blocks against pooled key blocks: ``scale * q_pool @ k_poolᵀ``.

    Args:
        q_pool: float32 ``[B, Hq, NQB, D]``; k_pool: float32 ``[B, Hkv, NKB, D]`` (``Hq % Hkv == 0``).
        scale: softmax scale; q_len, kv_len, block_m, block_n: geometry of the blocks.
        causal: tiles with no visible pair get ``-inf``.

    Returns:
        float32 ``[B, Hq, NQB, NKB]``.
    """
    s = (q_pool.float() @ _heads(k_pool.float(), q_pool.shape[1]).transpose(-1, -2)) * scale
    if causal:
        q_last = torch.clamp((torch.arange(s.shape[2], device=s.device) + 1) * block_m, max=q_len) - 1
        k_first = torch.arange(s.shape[3], device=s.device) * block_n
        s = s.masked_fill(k_first[None, :] > q_last[:, None] + (kv_len - q_len), float("-inf"))
    return s


def _scores_chunk(q, kk, r0, r1, scale, causal, kv_start, q_len, k_end=None):
    """float32 ``[B, Hq, r1 - r0, k_end]`` scores of query rows ``r0:r1`` against keys ``0:k_end`` (``kk``: keys
    repeated to Hq heads), -inf where a key is not visible."""
    kv_len = kk.shape[2]
    k_end = kv_len if k_end is None else k_end
    s = torch.matmul(q[:, :, r0:r1].float(), kk[:, :, :k_end].transpose(-1, -2))
    s.mul_(scale)
    j = torch.arange(k_end, device=q.device)[None, :]
    keep = None
    if kv_start > 0:
        keep = j >= kv_start
    if causal and r0 + (kv_len - q_len) < k_end - 1:  # some key is hidden from some row
        i = torch.arange(r0, r1, device=q.device)[:, None]
        vis = j <= i + (kv_len - q_len)
        keep = vis if keep is None else keep & vis
    if keep is not None:
        s.masked_fill_(~keep, float("-inf"))
    return s


def _keys(k, n_q_heads, dtype=torch.float32):
    return _heads(k.to(dtype), n_q_heads)


def _visible_end(r1, q_len, kv_len, causal, multiple=1):
    """Keys past this index are hidden from rows ``< r1`` (rounded up to ``multiple``, at most ``kv_len``)."""
    if not causal:
        return kv_len
    end = max(0, min(kv_len, r1 + kv_len - q_len))
    return min(kv_len, math.ceil(end / multiple) * multiple)


def _fused_lse(q, k, scale, causal, kv_start):
    """LSE from PyTorch's fused CPU attention when it computes the same thing (else None)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if q.is_cuda or kv_start or (causal and q_len != kv_len) or q.dtype == torch.float64 or not q_len or not kv_len:
        return None
    try:
        kk = _heads(k, q.shape[1])
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kk, kk, 0.0, bool(causal), scale=float(scale))[1].float()
    except (RuntimeError, AttributeError, TypeError):
        return None


def attention_lse_ref(q, k, scale, causal, kv_start=0, chunk_bytes=CHUNK_BYTES):
    """Row log-sum-exp of ``scale * q kᵀ`` over the visible keys ``j >= kv_start``.

    Uses PyTorch's fused CPU attention (which returns the LSE) when it applies, else query chunks.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.

    Returns:
        float32 ``[B, Hq, Lq]`` (natural log; -inf on rows that see no key).
    """
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    fused = _fused_lse(q, k, scale, causal, kv_start) if chunk_bytes == CHUNK_BYTES else None
    if fused is not None:
        return fused
    out = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
    kk = _keys(k, heads)
    step = _row_step(batch, heads, kv_len, chunk_bytes)
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        k_end = _visible_end(r1, q_len, kv_len, causal)
        if k_end > 0:
            out[:, :, r0:r1] = torch.logsumexp(_scores_chunk(q, kk, r0, r1, scale, causal, kv_start, q_len, k_end), -1)
    return out


def block_mass_ref(q, k, lse, block_m, block_n, scale, causal, kv_start=0, chunk_bytes=CHUNK_BYTES):
    """Per tile, the attention mass ``W[m, n] = sum over the tile of exp(s_ij - lse_i)``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; lse: float32 ``[B, Hq, Lq]`` (from
            :func:`attention_lse_ref` with the same ``causal``/``kv_start``, or cached from a dense pass).
        block_m, block_n: tile size.

    Returns:
        float32 ``[B, Hq, NQB, NKB]``; each query block's row sums to its number of rows that see a key.
    """
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    n_qb, n_kb = math.ceil(q_len / block_m), math.ceil(kv_len / block_n)
    out = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.float32, device=q.device)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse.float())
    kk = _keys(k, heads)
    step = block_m * max(1, _row_step(batch, heads, kv_len, chunk_bytes) // block_m)
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        k_end = _visible_end(r1, q_len, kv_len, causal, block_n)
        if k_end == 0:
            continue
        nkb = math.ceil(k_end / block_n)
        p = _scores_chunk(q, kk, r0, r1, scale, causal, kv_start, q_len, k_end)
        p.sub_(lse_safe[:, :, r0:r1, None]).exp_()
        if k_end % block_n:
            p = _pad_to(p, nkb * block_n, 3)
        p = p.reshape(batch, heads, r1 - r0, nkb, block_n).sum(-1)  # [B, Hq, R, nkb]
        nb = math.ceil((r1 - r0) / block_m)
        p = _pad_to(p, nb * block_m, 2)
        out[:, :, r0 // block_m: r0 // block_m + nb, :nkb] = p.reshape(batch, heads, nb, block_m, nkb).sum(3)
    return out


def vertical_slash_scores_ref(q, k, last_q, scale, causal):
    """MInference estimate from the last ``last_q`` queries: attention probabilities of those rows over all
    keys, summed per key column (vertical) and per diagonal (slash).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; last_q: number of trailing queries used.

    Returns:
        ``(vertical, slash)``: float32 ``[B, Hq, Lk]`` and float32 ``[B, Hq, Lq + Lk - 1]`` where index
        ``s + Lk - 1`` holds the mass on diagonal ``s = i - j``.
    """
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    r0 = max(0, q_len - last_q)
    s = _scores_chunk(q, _keys(k, heads), r0, q_len, scale, causal, 0, q_len)  # [B, Hq, R, Lk]
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    vertical = p.sum(2)
    diag = (torch.arange(r0, q_len, device=q.device)[:, None] - torch.arange(kv_len, device=q.device)[None, :]
            + kv_len - 1)  # [R, Lk]
    slash = torch.zeros((batch, heads, q_len + kv_len - 1), dtype=torch.float32, device=q.device)
    slash.scatter_add_(-1, diag.reshape(1, 1, -1).expand(batch, heads, -1), p.reshape(batch, heads, -1))
    return vertical, slash


def kmeans_assign_ref(x, centroids, metric):
    """Nearest centroid of every point (first index on ties).

    Args:
        x: ``[G, L, D]`` points (already unit-normalized for ``metric="cosine"``).
        centroids: ``[G, C, D]``.
        metric: ``"cosine"`` (largest ``x.c``) or ``"l2"`` (largest ``x.c - |c|^2 / 2``, i.e. nearest).

    Returns:
        int64 ``[G, L]``.
    """
    x, centroids = x.float(), centroids.float()
    s = x @ centroids.transpose(1, 2)  # [G, L, C]
    if metric == "l2":
        s = s - 0.5 * (centroids * centroids).sum(-1)[:, None, :]
    return s.argmax(-1)
