"""Compile the block-sparse kernels for sm_90 without a GPU; run by tests/test_compile_sm90.py.

Runs in its own process because the test session sets TRITON_INTERPRET=1, under which the
kernels are interpreted functions that cannot be compiled. Prints one JSON line per kernel.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import torch

from sparse_attn_kernels._common.config import inner_tile
from sparse_attn_kernels.block_sparse import bwd, fwd


def compile_sm90(fn, dtype, constexprs, num_warps=4, num_stages=2):
    """Compile ``fn`` for sm_90 with pointers to ``dtype`` (int32 for index lists, fp32 for row stats)."""
    signature, consts = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            if any(t in name for t in ("count", "indices", "slots", "words", "ranges", "cu_", "seg")):
                signature[name] = "*i32"
            elif name in ("lse_ptr", "delta_ptr", "dlse_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "*" + dtype
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=consts)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main(dtype, block_m, block_n, head_dim, causal, group, num_stages, predicates=False):
    pad = triton.next_power_of_2(head_dim)
    common = dict(GROUP=group, MASK_HEAD_DIV=1, HAS_BAND=causal or predicates, HAS_RANGE=predicates,
                  HAS_SEG=predicates, HAS_BITS=predicates, VARLEN=predicates, BLOCK_M=block_m, BLOCK_N=block_n,
                  WORDS=-(-block_n // 32), HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tile_n, tile_m = inner_tile(block_n, pad, torch_dtype), inner_tile(block_m, pad, torch_dtype)  # as the launchers
    kernels = {
        "fwd": (fwd._block_sparse_fwd_kernel, dict(common, TILE_N=tile_n)),
        "dq": (bwd._block_sparse_bwd_dq_kernel, dict(common, TILE_N=tile_n)),
        "dkdv": (bwd._block_sparse_bwd_dkdv_kernel, dict(common, TILE_M=tile_m)),
        "preprocess": (bwd._bwd_preprocess_kernel, dict(HAS_DLSE=True, BLOCK_M=64, HEAD_DIM=head_dim,
                                                         HEAD_DIM_PAD=pad)),
    }
    for name, (fn, constexprs) in kernels.items():
        kernel = compile_sm90(fn, dtype, constexprs, num_warps=8 if head_dim > 128 else 4, num_stages=num_stages)
        print(json.dumps(dict(kernel=name, cubin_bytes=len(kernel.asm.get("cubin", b"")),
                              shared=kernel.metadata.shared)), flush=True)


if __name__ == "__main__":
    dtype, bm, bn, d, causal, group, stages, preds = sys.argv[1:]
    main(dtype, int(bm), int(bn), int(d), causal == "1", int(group), int(stages), preds == "1")
