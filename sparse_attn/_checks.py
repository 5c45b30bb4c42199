"""Argument checks that raise ValueError/TypeError naming the argument, the expected and the actual value."""

import torch

_INT_DTYPES = (torch.int32, torch.int64)


def check_positive_int(value, name, allow_zero=False):
    """Return ``value`` as int if it is a positive (or, with ``allow_zero``, non-negative) integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    return value


def check_int_tensor(x, name, ndim):
    """``x`` must be an int32/int64 tensor of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {x.dtype}.")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {list(x.shape)}.")


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
