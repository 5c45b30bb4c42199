"""Small patterns for the cache and integration tests (the protocol: ``build(q, k, *, causal, layout)``)."""

import math

import torch

from sparse_attn import BlockSparseMask


class DensePattern:
    """Every block kept: sparse attention equals dense attention. Counts its builds."""

    def __init__(self, block=64):
        self.block = block
        self.builds = 0
        self.layouts = []

    def build(self, q, k, *, causal=False, layout=None):
        self.builds += 1
        self.layouts.append(layout)
        return BlockSparseMask.full(q.shape[2], k.shape[2], self.block, device=q.device)


class BandPattern:
    """Key blocks within ``width`` blocks of the (bottom-right aligned) diagonal, plus the first block."""

    def __init__(self, block=32, width=1):
        self.block, self.width = block, width
        self.builds = 0

    def build(self, q, k, *, causal=False, layout=None):
        self.builds += 1
        n_q, n_k = math.ceil(q.shape[2] / self.block), math.ceil(k.shape[2] / self.block)
        shift = n_k - n_q
        d = torch.arange(n_q, device=q.device)[:, None] + shift - torch.arange(n_k, device=q.device)[None, :]
        keep = (d.abs() <= self.width) | (torch.arange(n_k, device=q.device) == 0)[None, :]
        return BlockSparseMask.from_dense(keep[None, None], self.block, (q.shape[2], k.shape[2]))


class StatefulPattern(DensePattern):
    """Carries a state between builds: a tensor holding the number of earlier builds of this entry."""

    def __init__(self, block=64):
        super().__init__(block)
        self.seen_states = []

    def build_stateful(self, q, k, *, causal=False, layout=None, state=None):
        self.seen_states.append(None if state is None else int(state[0]))
        nxt = torch.zeros(16) if state is None else state + 1
        return self.build(q, k, causal=causal, layout=layout), nxt
