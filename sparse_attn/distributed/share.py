"""Send one rank's mask to every rank: for masks that only one rank can build (content-based patterns
need q/k of the whole sequence, which under the ring no rank holds by default)."""

import torch
import torch.distributed as dist

from ..mask import BlockSparseMask
from ..stripe_mask import StripeSparseMask
from ._comm import _global, group_info

_BLOCK_TENSORS = ("counts", "indices", "bit_slots", "bit_words", "q_range", "kv_range", "q_segments", "kv_segments")


def broadcast_mask(mask, src: int = 0, group=None, device=None):
    """Return rank ``src``'s mask on every rank of ``group`` (other ranks pass None).

    Args:
        mask: a BlockSparseMask or StripeSparseMask on rank ``src``; ignored elsewhere.
        device: where the received tensors go (default: the mask's device on ``src``, CPU elsewhere when
            unspecified; pass the attention inputs' device).

    Example:
        >>> mask = broadcast_mask(pattern.build(q_full, k_full) if rank == 0 else None)  # doctest: +SKIP
    """
    rank, _ = group_info(group)
    if rank == src:
        if isinstance(mask, BlockSparseMask):
            names, meta = _BLOCK_TENSORS, {"window": mask.window}
        elif isinstance(mask, StripeSparseMask):
            names, meta = StripeSparseMask._FIELDS + StripeSparseMask._OPTIONAL_FIELDS, {}  # None ones skipped
        else:
            raise TypeError(f"mask must be a BlockSparseMask or StripeSparseMask on rank {src}, got "
                            f"{type(mask).__name__}.")
        tensors = {n: getattr(mask, n) for n in names if getattr(mask, n) is not None}
        header = [type(mask).__name__, mask.block_size, mask.seq_lens, meta,
                  {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}]
        device = mask.device if device is None else torch.device(device)
    else:
        header = [None] * 5
    dist.broadcast_object_list(header, src=_global(group, src), group=group)
    kind, block_size, seq_lens, meta, specs = header
    device = torch.device("cpu") if device is None else torch.device(device)
    out = {}
    for name, (shape, dtype) in specs.items():
        t = tensors[name].to(device).contiguous() if rank == src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=_global(group, src), group=group)
        out[name] = t
    if kind == "StripeSparseMask":
        return StripeSparseMask(**out, block_size=block_size, seq_lens=seq_lens, validate=False)
    counts, indices = out.pop("counts"), out.pop("indices")
    return BlockSparseMask(counts, indices, block_size, seq_lens, window=meta["window"], validate=False, **out)
