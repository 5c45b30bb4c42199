"""The additive per-key score bias (``key_bias``) as the launchers and the PyTorch paths read it.

``key_bias`` is a float ``[B|1, H|1, Lk]`` tensor with ``H`` the query heads or the key/value heads: query ``i``
of head ``h`` scores key ``j`` as ``scale * q_i . k_j + key_bias[b, h', j]`` (``h'`` is ``h`` or its kv head).
Its gradient is the sum of ``dS`` over the queries, and over every dimension the bias broadcast.
"""

import torch


def bias_rows(key_bias, batch: int, n_q_heads: int, kv_len: int, dtype=torch.float32):
    """``key_bias`` as ``[B, Hq, Lk]`` in ``dtype`` (a view where it broadcasts; kv-head rows repeated for their
    group's query heads)."""
    bias = key_bias.to(dtype)
    if bias.shape[1] not in (1, n_q_heads):  # one row per kv head: each query head of its group reads it
        bias = bias.repeat_interleave(n_q_heads // bias.shape[1], dim=1)
    return bias.expand(batch, n_q_heads, kv_len)


def reduce_bias_grad(dbias, key_bias):
    """``dbias [B, Hq, Lk]`` (one row per query head) summed onto ``key_bias``'s shape and dtype."""
    if key_bias.shape[1] != dbias.shape[1]:
        dbias = dbias.reshape(dbias.shape[0], key_bias.shape[1], -1, dbias.shape[2]).sum(2)
    if key_bias.shape[0] != dbias.shape[0]:
        dbias = dbias.sum(0, keepdim=True)
    return dbias.to(key_bias.dtype)
