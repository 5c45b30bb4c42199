"""Point-to-point exchanges over ``torch.distributed`` that count the bytes they send.

Every tensor this package sends goes through :func:`exchange`, which adds ``numel * element_size``
to each active :class:`CommStats` (see :func:`count_bytes`): the byte counts in the benchmarks are
the tensors actually handed to ``isend``, not a formula.
"""

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

_ACTIVE: List["CommStats"] = []


@dataclass
class CommStats:
    """Bytes and messages sent by this process (per tag: ``"kv"``, ``"dkv"``, ``"a2a"``)."""

    bytes_sent: int = 0
    messages: int = 0
    by_tag: dict = field(default_factory=dict)

    def add(self, tensor: torch.Tensor, tag: str):
        n = tensor.numel() * tensor.element_size()
        self.bytes_sent += n
        self.messages += 1
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n


@contextlib.contextmanager
def count_bytes():
    """Count what this process sends inside the block.

    Example:
        >>> with count_bytes() as stats:  # doctest: +SKIP
        ...     o = ring_attention(q, k, v, mask)
        >>> stats.bytes_sent  # doctest: +SKIP
    """
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def group_info(group):
    """``(rank, world_size)`` of this process in ``group`` (None = the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first.")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class Pending:
    """Requests in flight and the buffers they fill; :meth:`wait` returns the received tensors."""

    def __init__(self, works, received):
        self.works, self.received = works, received

    def wait(self):
        for w in self.works:
            w.wait()
        self.works = []
        return self.received


def exchange(sends: Sequence, recvs: Sequence, group, tag: str, step: int = 0) -> Pending:
    """Post point-to-point sends and receives (one ``batch_isend_irecv``) without waiting.

    Args:
        sends: ``(peer, tensor)`` pairs (group ranks); recvs: ``(peer, shape, dtype, device)`` tuples.
        tag: label for :class:`CommStats`; step: message tag, equal on both sides.

    Returns:
        :class:`Pending` whose ``wait()`` gives the received tensors in ``recvs`` order.
    """
    ops, received = [], []
    for peer, shape, dtype, device in recvs:
        buf = torch.empty(shape, dtype=dtype, device=device)
        received.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, _global(group, peer), group, step))
    for peer, tensor in sends:
        tensor = tensor.contiguous()
        for stats in _ACTIVE:
            stats.add(tensor, tag)
        ops.append(dist.P2POp(dist.isend, tensor, _global(group, peer), group, step))
    # one batch: NCCL then posts the sends and receives together (separately posted they can deadlock)
    return Pending(dist.batch_isend_irecv(ops) if ops else [], received)


def all_to_all(sends: List[Optional[torch.Tensor]], recv_shapes: List[Optional[tuple]], like: torch.Tensor,
               group, tag: str = "a2a") -> List[Optional[torch.Tensor]]:
    """All-to-all of tensors of any (ragged) shapes: ``sends[p]`` goes to rank ``p``; ``recv_shapes[p]`` is
    what comes from rank ``p`` (None or empty: nothing). The own rank's entry is passed through, unsent."""
    rank, world = group_info(group)
    out = [None] * world
    out[rank] = sends[rank]
    pairs = [(p, sends[p]) for p in range(world) if p != rank and sends[p] is not None and sends[p].numel()]
    wants = [(p, recv_shapes[p], like.dtype, like.device) for p in range(world)
             if p != rank and recv_shapes[p] is not None and 0 not in recv_shapes[p]]
    got = exchange(pairs, wants, group, tag).wait()
    for (p, shape, _, _), t in zip(wants, got):
        out[p] = t
    for p in range(world):
        if out[p] is None and recv_shapes[p] is not None:
            out[p] = like.new_zeros(recv_shapes[p])
    return out


def all_gather_ints(values: Sequence[int], group, device=None) -> List[List[int]]:
    """Every rank's ``values`` (same count on each rank)."""
    _, world = group_info(group)
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [x.tolist() for x in out]
