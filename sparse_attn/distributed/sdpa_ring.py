"""SDPA calls on sequence shards -> :func:`ring_attention` with a mask built for the whole sequence.

Used by the diffusers integration under diffusers' ring context parallelism (diffusers shards the hidden
states and RoPE over the ring group), and by :func:`ring_sdpa` for models whose only token-mixing layer
is attention (LLM prefill: each rank runs the model on its token shard with its ``position_ids``). Each
SDPA call then holds this rank's shard of q, k, v. The pattern needs the whole sequence, so the shards
of q and k are gathered (without gradient) to build the mask, identically on every rank; attention
itself runs as a sparse ring.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from ._comm import all_gather_ints, all_to_all, group_info
from .ring import ring_attention

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def gather_sequence(x, group):
    """Every rank's ``[B, H, S_r, D]`` shard concatenated along the sequence (no autograd)."""
    _, world = group_info(group)
    lens = [n[0] for n in all_gather_ints([x.shape[2]], group, x.device)]
    shapes = [(x.shape[0], x.shape[1], n, x.shape[3]) for n in lens]
    return torch.cat(all_to_all([x] * world, shapes, x, group, tag="gather"), dim=2)


class RingSDPA(TorchFunctionMode):
    """Within the block, ``F.scaled_dot_product_attention`` on shards runs as a sparse ring over ``group``.

    Args:
        config: a :class:`~sparse_attn.integrations.sdpa.SparseConfig` (its ``pattern_for`` and ``cache``).
        group: the ring's process group; layer, role, layout: the cache key parts and the token layout
            (``layer=None``: the call's ordinal inside the block).
    """

    def __init__(self, config, group, layer, role=None, layout=None):
        super().__init__()
        self.config, self.group, self.layer, self.role, self.layout = config, group, layer, role, layout
        self.calls, self.sparse = 0, 0  # SDPA calls seen, and those that ran with a mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(_SDPA_ARGS, args), **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        if call.get("attn_mask") is not None or call.get("dropout_p", 0.0):
            raise ValueError("ring context parallelism with sparse_attn takes SDPA calls without attn_mask and "
                             "dropout_p; use Ulysses (ContextParallelConfig(ulysses_degree=...)) for those.")
        causal = bool(call.get("is_causal", False))  # self-attention: SDPA's top-left = bottom-right
        if self.layer is None:
            layer = self.calls
        else:
            layer = self.layer if self.calls == 0 else (self.layer, self.calls)
        self.calls += 1
        pattern = self.config.pattern_for(layer)
        mask = None
        if pattern is not None:
            with torch.no_grad():
                q_all, k_all = gather_sequence(q.detach(), self.group), gather_sequence(k.detach(), self.group)
            layout = self.layout if getattr(self.layout, "seq_len", None) == q_all.shape[2] else None
            cache = self.config.cache
            if cache is not None:
                mask = cache.get_mask(pattern, q_all, k_all, layer=layer, role=self.role, causal=causal,
                                      layout=layout)
            else:
                mask = pattern.build(q_all, k_all, causal=causal, layout=layout)
            self.sparse += mask is not None
        return ring_attention(q, k, v, mask, self.group, causal=causal, scale=call.get("scale"))


class _OnePattern:
    """A bare pattern as a config: the same pattern for every layer, no cache."""

    cache = None

    def __init__(self, pattern):
        self.pattern = pattern

    def pattern_for(self, layer):
        return self.pattern


@contextlib.contextmanager
def ring_sdpa(config, group=None):
    """Run every ``F.scaled_dot_product_attention`` call in the block as sparse ring attention over ``group``.

    For sequence-sharded prefill: each rank calls the model on its contiguous token shard (rank order =
    sequence order, shard borders on the pattern's tiles) with the matching ``position_ids``; SDPA's
    ``is_causal`` becomes the global causal mask. Calls with ``attn_mask`` or dropout raise ValueError.

    Args:
        config: a pattern (``build(q, k, causal=, layout=)``) or a SparseConfig (``pattern_for(layer)`` with
            the call's ordinal as the layer, and its ``cache``).

    Example:
        >>> with ring_sdpa(get_pattern("sliding_window", left=256, right=0)):  # doctest: +SKIP
        ...     logits = model(ids[:, a:b], position_ids=torch.arange(a, b)[None], use_cache=False).logits
    """
    if not hasattr(config, "pattern_for"):
        if not hasattr(config, "build"):
            raise TypeError(f"config must be a pattern or a SparseConfig, got {type(config).__name__}.")
        config = _OnePattern(config)
    with RingSDPA(config, group, layer=None):
        yield
