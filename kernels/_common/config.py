"""Launch configurations shared by the kernel families, sized to fit an H100/H200.

Autotuning covers ``num_warps``/``num_stages`` only; tile sizes come from the mask and the launcher, and
sequence lengths are never part of an autotune key. Every kernel has a *preferred* configuration per
(kernel, dtype, block size, padded head dim): what a launch uses when autotuning is off (the Triton
interpreter, ``SPARSE_ATTN_NO_AUTOTUNE=1``) and the first candidate otherwise. The candidates are
:data:`CONFIG_SPACE` pruned before any launch by :func:`smem_estimate` (no candidate over the 227 KiB a
block may use) and by the register budget (4 warps where the fp32 accumulators alone would take 128 or
more registers per thread always spill, so they are not candidates). The estimate is an upper bound of
the shared memory that Triton allocates on sm_90, checked against ahead-of-time compiles by
``tests/test_compile_sm90.py``; the whole table is ``benchmarks/compile_table.py`` (docs/kernels.md).
"""

import os

import torch
import triton

HOPPER_SMEM = 227 * 1024  # bytes of shared memory one block may use on an H100/H200 (sm_90)
CONFIG_SPACE = tuple((w, s) for w in (4, 8) for s in (1, 2, 3))  # (num_warps, num_stages)
_ACC_REGS_PER_THREAD = 128  # fp32 accumulator registers per thread above which a config is known to spill


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """False in the interpreter and under ``SPARSE_ATTN_NO_AUTOTUNE=1``: launches use the preferred config."""
    return not (interpreting() or os.environ.get("SPARSE_ATTN_NO_AUTOTUNE", "0") == "1")


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32: ``torch.backends.cuda.matmul.fp32_precision == "tf32"``,
    which ``torch.set_float32_matmul_precision("high" | "medium")`` and ``allow_tf32 = True`` both set."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:
            return False
    if precision == "none":  # not set for cuda matmuls: the generic setting decides
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype, tf32=None) -> str:
    """``input_precision`` of the kernels' dots.

    fp32 inputs use TF32 tensor cores when PyTorch allows TF32 for fp32 matmuls (:func:`tf32_allowed`, or
    ``tf32=True``) and exact fp32 products ("ieee") otherwise, PyTorch's default. fp16/bf16 ignore it.
    The Triton interpreter computes every dot in fp32, so on CPU both give exact products.
    """
    if dtype != torch.float32:
        return "tf32"
    allowed = tf32_allowed() if tf32 is None else tf32
    return "tf32" if allowed else "ieee"


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor)."""
    return max(floor, triton.next_power_of_2(int(n)))


def inner_tile(block: int, head_dim_pad: int, dtype: torch.dtype) -> int:
    """Rows of K/V (or Q) loaded per step inside one mask block: 64, or 32 for fp32 with head dims padded to
    256 (whose 64-row tiles need more shared memory than an H100/H200 has, from sm_90 compiles)."""
    tile = 32 if (dtype == torch.float32 and head_dim_pad >= 256) else 64
    return min(block, tile)


def fwd_tile(block_m: int, block_n: int, head_dim_pad: int, dtype: torch.dtype) -> int:
    """K/V rows per step of the block-sparse forward: :func:`inner_tile`, but 32 for 128-row query blocks at
    fp16/bf16 with head dims padded to >= 128, where 64-row steps spill registers under Triton 3.6 (block fwd bf16
    128x128 D=128 at 8 warps, 2 stages: 208 B per thread at 64 rows, 0 B at 32; sm_90 compiles)."""
    tile = inner_tile(block_n, head_dim_pad, dtype)
    if block_m >= 128 and head_dim_pad >= 128 and dtype != torch.float32:
        tile = min(tile, 32)
    return tile


def key_tile(block_n: int, head_dim_pad: int, dtype: torch.dtype) -> int:
    """Key rows of one block-sparse dK/dV program (a mask key block runs as ``block_n // key_tile`` programs):
    the fp32 dK and dV accumulators ``[key_tile, D]`` must fit the registers of 8 warps (64 rows at D >= 128),
    and fp32 K/V tiles at D = 256 the shared memory (32 rows)."""
    if dtype == torch.float32 and head_dim_pad >= 256:
        return min(block_n, 32)
    return min(block_n, 64) if head_dim_pad >= 128 or dtype == torch.float32 else block_n


def dkdv_passes(dtype: torch.dtype, head_dim_pad: int) -> tuple:
    """``((kernel name, PASS), ...)`` of the block-sparse dK/dV launches: one fused pass, or at head dims >= 128
    in fp16/bf16 a dK pass and a dV pass (one fp32 accumulator each; the fused pass spills registers there)."""
    if head_dim_pad >= 128 and dtype != torch.float32:
        return (("dk", 1), ("dv", 2))
    return (("dkdv", 0),)


def stripe_dkv_passes(dtype: torch.dtype, head_dim_pad: int) -> tuple:
    """``((block-pass name, column-pass name, PASS), ...)`` of the stripe dK/dV launches (as :func:`dkdv_passes`)."""
    return tuple((f"st_{n}_block", f"st_{n}_col", p) for n, p in
                 (("dkv" if name == "dkdv" else name, p) for name, p in dkdv_passes(dtype, head_dim_pad)))


def stripe_tiles(block_m: int, block_n: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Inner tiles of the stripe kernels: ``q_tile_n`` (K/V rows per step of the query-major forward and dQ
    block part), ``tile_n`` (key slice of one key-major dK/dV program), ``tile_c`` (gathered columns), ``sub_m``
    (query slice of the key-major block pass), ``col_m`` (query tile of the column pass). Where dK/dV run as
    split passes (fp16/bf16, D >= 128) the key-major pass steps 16 queries, the column pass 32, and 128-row
    blocks step 32 keys in the forward/dQ (larger tiles spill registers, from sm_90 compiles); fp32 at
    head dims > 128 takes 32-row K/V tiles (64 rows do not fit shared memory)."""
    wide = head_dim > 128 or dtype == torch.float32
    big = head_dim > 128 and dtype == torch.float32
    split = len(dkdv_passes(dtype, pow2_at_least(head_dim))) > 1
    tile_n = min(block_n, 32 if big else 64)
    sub_m = min(block_m, 16 if split else (32 if wide else 64))
    tile_c = 32 if head_dim > 128 else 64
    return dict(q_tile_n=min(tile_n, 32) if split and block_m >= 128 else tile_n, tile_n=tile_n, tile_c=tile_c,
                dq_tile_c=32 if _narrow_stripe_dq(dtype, block_m, pow2_at_least(head_dim)) else tile_c,
                sub_m=sub_m, col_m=32 if split else sub_m)


def _narrow_stripe_dq(dtype, block_m, head_dim_pad):
    """The stripe dQ kernel at fp16/bf16, 64-row blocks, head dims padded to 128 runs 32-column gathers at 4
    warps: at 64 columns and 8 warps it spills 100 B per thread under Triton 3.6 (4 warps, 32 columns: 52 B under
    3.6, 0 B under 3.9; sm_90 compiles, bf16 64x64 GQA 4, 2 stages)."""
    return dtype != torch.float32 and block_m == 64 and head_dim_pad == 128


def _footprint(kernel, elem, block_m, block_n, pad, dtype):
    """``(resident, per_stage, n_sub, copies, a_tiles, acc_rows)`` of one program, in bytes unless said:

    resident: operand tiles loaded once; per_stage: loaded per iteration of the pipelined loop (one buffer per
    stage; ``n_sub`` statically unrolled sub-tiles, of which an unpipelined loop holds one at a time); copies:
    operand tiles that the masked path rewrites in registers (a second shared-memory copy); a_tiles: elements of
    the ``[rows, cols]`` operands computed in registers (p, dS), which TF32 dots read from shared memory;
    acc_rows: rows of the fp32 ``[rows, D]`` accumulators.
    """
    row = pad * elem  # one row of an operand tile
    if kernel in ("fwd", "dq"):
        tile = fwd_tile(block_m, block_n, pad, dtype) if kernel == "fwd" else inner_tile(block_n, pad, dtype)
        resident = (1 if kernel == "fwd" else 2) * block_m * row
        return resident, 2 * block_n * row, block_n // tile, tile * row, block_m * tile, block_m
    if kernel in ("dkdv", "dk", "dv"):
        kt, tile = key_tile(block_n, pad, dtype), inner_tile(block_m, pad, dtype)
        n_acc = 2 if kernel == "dkdv" else 1
        return 2 * kt * row, 2 * block_m * row, block_m // tile, 2 * tile * row, n_acc * kt * tile, n_acc * kt
    tiles = stripe_tiles(block_m, block_n, pad, dtype)
    n_sub = block_n // tiles["q_tile_n"]
    wide = max(tiles["q_tile_n"], tiles["tile_c"])
    if kernel in ("st_fwd", "st_dq"):  # the block loop and the column loop reuse one set of buffers
        resident = (1 if kernel == "st_fwd" else 2) * block_m * row
        tile_c = tiles["tile_c" if kernel == "st_fwd" else "dq_tile_c"]
        wide = max(tiles["q_tile_n"], tile_c)
        return resident, 2 * max(block_n, tile_c) * row, n_sub, wide * row, block_m * wide, block_m
    n_acc = 1 if kernel in ("st_dk_block", "st_dv_block", "st_dk_col", "st_dv_col") else 2
    if kernel in ("st_dkv_block", "st_dk_block", "st_dv_block"):
        tn, sm = tiles["tile_n"], tiles["sub_m"]
        return 2 * tn * row, 2 * block_m * row, block_m // sm, 2 * sm * row, n_acc * tn * sm, n_acc * tn
    if kernel in ("st_dkv_col", "st_dk_col", "st_dv_col"):
        tc, cm = tiles["tile_c"], tiles["col_m"]
        return 2 * tc * row, 2 * cm * row, 1, 2 * cm * row, n_acc * tc * cm, n_acc * tc
    if kernel == "decode":  # block_n: the page size, read in flat steps of inner_tile keys
        tile = inner_tile(block_n, pad, dtype)
        return block_m * row, 2 * tile * row, 1, tile * row, block_m * tile, block_m
    if kernel == "lse":
        return 64 * row, 64 * row, 1, 0, 0, 0
    if kernel == "mass":
        return block_m * row, block_n * row, block_n // min(block_n, 64), 0, 0, 0
    if kernel == "vertical_slash":
        return 128 * row, 0, 1, 0, 0, 0
    if kernel == "pooled_scores":
        return 16 * pad * 4, 32 * pad * 4, 1, 0, 0, 0
    if kernel == "kmeans":
        return 64 * pad * 4, 32 * pad * 4, 1, 0, 0, 0
    if kernel in ("preprocess", "pool"):
        return 0, 0, 1, 0, 0, 0
    raise ValueError(f"kernel must be one of the package's kernels, got {kernel!r}.")


def smem_estimate(kernel: str, dtype: torch.dtype, block_m: int, block_n: int, head_dim_pad: int,
                  num_stages: int, num_warps: int = 8) -> int:
    """Upper bound (bytes) of the shared memory of one program on sm_90 (:func:`_footprint`): the resident
    operand tiles, one buffer of the loop's loads per stage (one sub-tile unpipelined), the masked path's
    rewritten operands, fp32 operands computed in registers (TF32 dots take them from shared memory), 2 KiB per
    warp of layout-conversion and reduction scratch and 1 KiB of barriers and scalars. Checked against the
    compiler by tests/test_compile_sm90.py; the whole comparison is benchmarks/compile_table.py."""
    elem = 4 if dtype == torch.float32 else 2
    resident, per_stage, n_sub, copies, a_tiles, _ = _footprint(kernel, elem, block_m, block_n, head_dim_pad,
                                                                dtype)
    loop = per_stage // n_sub if num_stages <= 1 else num_stages * per_stage
    # the key-major kernels' transposed p / dS operands go through shared memory for TF32 dots
    scratch = a_tiles * 4 if dtype == torch.float32 and kernel not in ("fwd", "dq", "st_fwd", "st_dq") else 0
    if kernel in ("dkdv", "dk", "dv") and dtype == torch.float32:
        copies //= 2  # one of q / dO takes a free loop buffer (fitted to the compile table)
    elif num_stages <= 1 or kernel not in ("fwd", "dq", "st_fwd", "st_dq"):
        copies = 0  # rewritten in place of a free loop buffer (fitted to the compile table)
    return resident + loop + copies + scratch + 2048 * num_warps + 1024


def _acc_regs(kernel, dtype, block_m, block_n, pad, warps):
    """fp32 accumulator registers per thread."""
    return _footprint(kernel, 4, block_m, block_n, pad, dtype)[5] * pad // (32 * warps)


def _fits(kernel, dtype, block_m, block_n, pad, warps, stages):
    if smem_estimate(kernel, dtype, block_m, block_n, pad, stages, warps) > HOPPER_SMEM:
        return False
    return warps == 8 or _acc_regs(kernel, dtype, block_m, block_n, pad, warps) < _ACC_REGS_PER_THREAD


def candidate_configs(kernel: str, dtype: torch.dtype, block_m: int, block_n: int, head_dim_pad: int) -> list:
    """``[(num_warps, num_stages)]`` of :data:`CONFIG_SPACE` that fit the chip (shared memory, registers)."""
    return [(w, s) for w, s in CONFIG_SPACE if _fits(kernel, dtype, block_m, block_n, head_dim_pad, w, s)]


def preferred_config(kernel: str, dtype: torch.dtype, block_m: int, block_n: int, head_dim_pad: int,
                     predicates: bool = False) -> tuple:
    """``(num_warps, num_stages)`` launched without autotuning and tried first by the autotuner: 8 warps where the
    fp32 accumulators would take 64 or more registers per thread at 4 (4 warps spill there, from sm_90 compiles),
    else 4; 2 stages (1 where two do not fit). The forward with in-tile predicates other than the causal/window
    band (``predicates=True``) and the stripe dQ at 64-row blocks, D = 128 are exceptions (8 and 4 warps).

    Raises:
        ValueError: nothing fits (callers turn this into an error naming the argument).
    """
    cands = candidate_configs(kernel, dtype, block_m, block_n, head_dim_pad)
    if not cands:
        raise ValueError(f"{kernel}: no launch configuration fits the 227 KiB of shared memory of an H100/H200 "
                         f"at dtype {dtype}, block size ({block_m}, {block_n}), head dim {head_dim_pad} "
                         f"(needs {smem_estimate(kernel, dtype, block_m, block_n, head_dim_pad, 1, 4)} B unpipelined).")
    wide = _acc_regs(kernel, dtype, block_m, block_n, head_dim_pad, 4) >= _ACC_REGS_PER_THREAD // 2
    if kernel == "st_dq" and _narrow_stripe_dq(dtype, block_m, head_dim_pad):
        wide = False  # 4 warps, 32-column gathers (stripe_tiles)
    if kernel == "fwd" and predicates:
        # the in-tile predicates (ranges, segments, bit masks, packed rows) need registers of their own: fp16
        # 64x64 D=64 with all of them spills 184 B at 4 warps under Triton 3.6 (44 B under 3.9), 0 B at 8
        wide = True
    order = ((8, 2), (8, 1), (4, 2), (4, 1)) if wide else ((4, 2), (8, 2), (4, 1), (8, 1))
    for pref in order:
        if pref in cands:
            return pref
    return cands[0]


def fits(kernel: str, dtype: torch.dtype, block_m: int, block_n: int, head_dim_pad: int) -> bool:
    """Whether any configuration of ``kernel`` fits the chip for this shape."""
    return bool(candidate_configs(kernel, dtype, block_m, block_n, head_dim_pad))


def autotune_configs(kernel: str) -> list:
    """The whole :data:`CONFIG_SPACE` as ``triton.Config`` (the pruner of :func:`pruner` narrows it per shape)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in CONFIG_SPACE]


def pruner(kernel, block_m_arg: str = "BLOCK_M", block_n_arg: str = "BLOCK_N", dtype_arg: str = "q_ptr"):
    """``prune_configs_by`` of ``triton.autotune``: keep the candidates of :func:`candidate_configs`.
    ``kernel``: a kernel name, or a function of the launch arguments returning one."""
    def early_config_prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        name = kernel(args) if callable(kernel) else kernel
        keep = candidate_configs(name, args[dtype_arg].dtype, args[block_m_arg], args[block_n_arg],
                                 args["HEAD_DIM_PAD"])
        return [c for c in configs if (c.num_warps, c.num_stages) in keep] or configs[:1]
    return {"early_config_prune": early_config_prune}


def check_fits(kernel: str, x: torch.Tensor, block_m: int, block_n: int, head_dim_pad: int) -> None:
    """Raise ``ValueError`` naming the block size when no configuration of ``kernel`` fits an H100/H200 for CUDA
    tensors like ``x`` (the Triton interpreter has no shared-memory limit)."""
    if x.is_cuda and not fits(kernel, x.dtype, block_m, block_n, head_dim_pad):
        need = smem_estimate(kernel, x.dtype, block_m, block_n, head_dim_pad, 1, 4)
        raise ValueError(
            f"block_size=({block_m}, {block_n}) with head dim {head_dim_pad} (padded) in {x.dtype}: the {kernel} "
            f"kernel needs about {need // 1024} KiB of shared memory even unpipelined, over the 227 KiB of an "
            f"H100/H200; use smaller blocks or bf16/fp16.")


def launch(autotuned, kernel_fn, kernel: str, grid, args, meta, dtype, block_m: int, block_n: int) -> None:
    """Launch ``kernel_fn`` with its preferred config (autotuning off), or the pruned autotuner ``autotuned``."""
    if autotuning():
        autotuned[grid](*args, **meta)
        return
    predicates = any(meta.get(flag, False) for flag in ("HAS_RANGE", "HAS_SEG", "HAS_BITS", "VARLEN"))
    warps, stages = launch_config(kernel, dtype, block_m, block_n, meta["HEAD_DIM_PAD"], predicates)
    kernel_fn[grid](*args, num_warps=warps, num_stages=stages, **meta)


def launch_config(kernel: str, dtype: torch.dtype, block_m: int, block_n: int, head_dim_pad: int,
                  predicates: bool = False) -> tuple:
    """:func:`preferred_config`, or ``(4, 1)`` where nothing fits a GPU (the interpreter ignores both numbers; a
    CUDA launcher has refused such a shape with :func:`check_fits` before)."""
    if fits(kernel, dtype, block_m, block_n, head_dim_pad):
        return preferred_config(kernel, dtype, block_m, block_n, head_dim_pad, predicates)
    return 4, 1
