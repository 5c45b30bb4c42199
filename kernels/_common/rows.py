"""The work split of a block-sparse problem into query rows, shared by the PyTorch paths.

A row ("unit") is one query block of one mask head together with every query head that uses that
head's K/V and mask: the G heads of a GQA group share one gather unless the mask differs per query
head. Rows are ordered (batch, unit head, query block); R = B * units * NQB.
"""

import math

import torch


class BlockRows:
    """Row geometry and per-row lists of ``counts [Bm, Hm, NQB]`` / ``indices [Bm, Hm, NQB, W]``.

    Attributes:
        count: ``[R]`` kept blocks per row; slot_ok: ``[R, W]`` slots inside the count;
        idx: ``[R, W]`` key blocks (0 outside the count); m_of: ``[R]`` query block of each row;
        b_of: ``[R]`` batch row; kv_base: ``[R]`` flat index of the row's first K/V block in :meth:`key_blocks`;
        slots: ``[R, W]`` bit slots of the entries (-1 outside the count or without bits) or None.
    """

    def __init__(self, q, k, counts, indices, block_m, block_n, bit_slots=None):
        self.batch, self.n_q_heads, self.q_len, self.head_dim = q.shape
        self.n_kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.group = self.n_q_heads // self.n_kv_heads
        self.block_m, self.block_n = block_m, block_n
        self.n_qb, self.width = indices.shape[2], indices.shape[3]
        self.n_kb = max(1, math.ceil(self.kv_len / block_n))
        self.shared = not (counts.shape[1] == self.n_q_heads and self.group > 1)
        self.g_u = self.group if self.shared else 1
        self.n_units = self.n_kv_heads if self.shared else self.n_q_heads
        dev = q.device
        self.count = counts.expand(self.batch, self.n_units, self.n_qb).reshape(-1).long()  # [R]
        idx = indices.expand(self.batch, self.n_units, self.n_qb, self.width).reshape(-1, self.width).long()
        self.slot_ok = torch.arange(self.width, device=dev)[None, :] < self.count[:, None]  # [R, W]
        self.idx = torch.where(self.slot_ok, idx, 0)  # [R, W]
        self.slots = None
        if bit_slots is not None:
            slots = bit_slots.expand(self.batch, self.n_units, self.n_qb, self.width).reshape(-1, self.width).long()
            self.slots = torch.where(self.slot_ok, slots, -1)  # [R, W]
        self.b_of = b_of = torch.arange(self.batch, device=dev).repeat_interleave(self.n_units * self.n_qb)
        u_of = torch.arange(self.n_units, device=dev).repeat_interleave(self.n_qb).repeat(self.batch)
        self.m_of = torch.arange(self.n_qb, device=dev).repeat(self.batch * self.n_units)  # [R]
        kv_head = u_of if self.shared else u_of // self.group
        self.kv_base = (b_of * self.n_kv_heads + kv_head) * self.n_kb  # [R]
        self.n_rows = self.count.numel()

    def gather_queries(self, x, value=0.0):
        """[B, Hq, Lq, X] -> [R, G*bm, X], padded with ``value`` to whole blocks."""
        pad = self.n_qb * self.block_m - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=value)
        dim = x.shape[-1]
        x = x.reshape(self.batch, self.n_q_heads, self.n_qb, self.block_m, dim)
        if self.shared:
            x = x.reshape(self.batch, self.n_kv_heads, self.group, self.n_qb, self.block_m, dim).transpose(2, 3)
        return x.reshape(self.n_rows, self.g_u * self.block_m, dim)

    def scatter_rows(self, x):
        """[R, G*bm, ...] -> [B, Hq, Lq, ...] (inverse of :meth:`gather_queries`)."""
        tail = x.shape[2:]
        x = x.reshape(self.batch, self.n_units, self.n_qb, self.g_u, self.block_m, *tail)
        if self.shared:
            x = x.transpose(2, 3)
        return x.reshape(self.batch, self.n_q_heads, self.n_qb * self.block_m, *tail)[:, :, : self.q_len]

    def key_blocks(self, x):
        """[B, Hkv, Lk, D] -> [B*Hkv*NKB, bn, D], zero padded to whole blocks."""
        pad = self.n_kb * self.block_n - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(-1, self.block_n, x.shape[-1])
