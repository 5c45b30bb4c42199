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


def check_bool(value, name):
    """Return ``value`` if it is a bool (``True``/``False``); anything else (``"False"``, 1, None) is a TypeError,
    since Python's truthiness would silently turn ``"False"`` into True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} ({value!r}).")
    return value


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")


# ---- shared by the attention entry points (ops.py, stripe_ops.py) ----------------------------
import os  # noqa: E402

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_BLOCKS = (16, 32, 64, 128)
TRITON_HEAD_DIMS = (16, 256)
BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_qkv(q, k, v, backend):
    """q ``[B, Hq, Lq, D]``, k and v ``[B, Hkv, Lk, D]``: one dtype and device, ``Hq % Hkv == 0``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D] (rank 4), got {list(x.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    # "auto" takes the PyTorch path for non-CUDA tensors, which runs fp64 like backend="torch"
    torch_path = backend == "torch" or (backend == "auto" and not q.is_cuda)
    allowed = FLOAT_DTYPES + ((torch.float64,) if torch_path else ())
    if q.dtype not in allowed:
        raise TypeError(f"q must have dtype in {[str(d) for d in allowed]} for backend={backend!r}, got {q.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}.")
    batch, n_q_heads, _, head_dim = q.shape
    if head_dim == 0:
        raise ValueError(f"q must have head dim (last dimension) >= 1, got shape {list(q.shape)}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Lk, D], got {list(k.shape)} and {list(v.shape)}.")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have batch {batch} and head dim {head_dim} like q, got shape {list(k.shape)}.")
    n_kv_heads = k.shape[1]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of key/value heads ({n_kv_heads}).")


def check_mask_fits(mask, q, k):
    """A mask (anything with ``seq_lens``, ``batch_heads``, ``device``) built for these q and k."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask.seq_lens != (q_len, kv_len):
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths ({q_len}, {kv_len}).")
    mb, mh = mask.batch_heads
    if mb not in (1, q.shape[0]):
        raise ValueError(f"mask batch must be 1 or {q.shape[0]}, got {mb}.")
    if mh not in (1, k.shape[1], q.shape[1]):
        raise ValueError(f"mask heads must be 1, {k.shape[1]} (kv heads) or {q.shape[1]} (query heads), got {mh}.")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device}, but q is on {q.device}; use mask.to(q.device).")


def use_fused_cpu_path(q, k, v, return_lse):
    """Whether the fused block-sparse CPU path runs this call: CPU tensors, a torch build that has it, and no
    gradient through lse (that needs the reference path)."""
    from sparse_attn_kernels.block_sparse.cpu import available

    if q.device.type != "cpu" or not available():
        return False
    return not (return_lse and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))


def resolve_backend(backend, q, block_size=None):
    """``"auto"`` -> Triton on CUDA, PyTorch elsewhere; checks what the Triton kernels support."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if not (q.is_cuda or interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}.")
        head_dim = q.shape[-1]
        if not TRITON_HEAD_DIMS[0] <= head_dim <= TRITON_HEAD_DIMS[1]:
            raise ValueError(f"head dim must be in [16, 256] for the Triton kernel, got {head_dim}.")
        if interpreting() and q.dtype == torch.bfloat16:
            raise TypeError("backend='triton' cannot run bfloat16 in the Triton CPU interpreter (TRITON_INTERPRET=1): "
                            "the interpreter has no bf16 dot and returns wrong values; use float16/float32, "
                            "backend='torch', or a CUDA device.")
        if block_size is not None and any(b not in TRITON_BLOCKS for b in block_size):
            raise ValueError(f"mask.block_size must use sizes in {TRITON_BLOCKS} for the Triton kernel, "
                             f"got {block_size}.")
    return backend


def check_scale(scale, q):
    """The softmax scale as a float (default ``1/sqrt(D)``)."""
    if scale is None:
        return q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}.")
    return float(scale)


def empty_attention(q, k, v):
    """Output and lse for B = 0, Lq = 0 or Lk = 0: zeros attached to q, k, v (an empty sum is exactly
    0), so a backward gives zero gradients; lse is -inf."""
    o = q.new_zeros(q.shape) + (q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum())
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    return o, lse


def check_index_mask_inputs(mask, q, k, v, q_name, q_index, k_name, k_index):
    """Rank-4 q/k/v matching ``mask.seq_lens`` and device; batch/head dims of the mask's index tensors
    (``q_index [1|B, 1|Hq, ...]``, ``k_index [1|B, 1|Hkv|Hq, ...]``) fit. Shared by permuted and routed masks."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a rank-4 tensor [B, H, L, D], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    (batch, n_q_heads), n_kv_heads = q.shape[:2], k.shape[1]
    if (q.shape[2], k.shape[2]) != mask.seq_lens:
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths "
                         f"({q.shape[2]}, {k.shape[2]}).")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device}, but q is on {q.device}; use mask.to(q.device).")
    for name, idx in ((q_name, q_index), (k_name, k_index)):
        if idx.shape[0] not in (1, batch):
            raise ValueError(f"{name} batch must be 1 or {batch}, got {idx.shape[0]}.")
    if q_index.shape[1] not in (1, n_q_heads):
        raise ValueError(f"{q_name} heads must be 1 or {n_q_heads} (query heads), got {q_index.shape[1]}.")
    if k_index.shape[1] not in (1, n_kv_heads, n_q_heads):
        raise ValueError(f"{k_name} heads must be 1, {n_kv_heads} (kv heads) or {n_q_heads} (query heads), "
                         f"got {k_index.shape[1]}.")
