"""Compile the package's Triton kernels for sm_90 (H100/H200) as a real launch would, without a GPU.

Used by tests/test_compile_sm90.py (one subprocess per kernel family) and benchmarks/compile_table.py
(the whole table). Runs in its own process because the test session sets TRITON_INTERPRET=1, under
which the kernels are interpreted functions that cannot be compiled.

A real launch specializes every pointer of a 16-byte-aligned tensor and every integer argument that is
a multiple of 16 (unless listed in ``do_not_specialize``) with ``tt.divisibility=16``; without those
attributes K/V loads are not vectorized, ``cp.async`` is rarely used and shared memory comes out about
half of what the chip is asked for. Here pointers and ``stride_*`` arguments carry the attribute.

Per compile: registers, spill bytes per thread (``ptxas -v``), shared memory (bytes), whether the PTX
has Hopper ``wgmma``, ``cp.async`` (pipelined loads) and ``mma.sync``. Results are cached per Triton
version and kernel source hash (``$SPARSE_ATTN_AOT_CACHE``, default ``~/.cache/sparse-attn/aot``).

    python tests/_aot_sm90.py FAMILY [--quick]    # the CI subset of one family, one JSON line per compile
"""

import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import sys

# the compiling process (this file run as a script, or a script that sets SPARSE_ATTN_AOT_PROCESS=1 before
# importing it); a test process that imports this module keeps its environment (TRITON_INTERPRET=1)
if __name__ == "__main__" or os.environ.get("SPARSE_ATTN_AOT_PROCESS") == "1":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a Triton cache hit would skip ptxas and its log; we cache results

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sparse_attn_kernels._common import config as cfg  # noqa: E402

HOPPER_SMEM = 227 * 1024  # bytes of shared memory one block may use on an H100/H200
SPILL_LIMIT = 64  # bytes of spill stores per thread allowed for a preferred bf16/fp16 config at head dim <= 128
# "fp32": fp32 inputs with exact products (PyTorch's default); "tf32": fp32 inputs with TF32 allowed
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
CACHE = pathlib.Path(os.environ.get("SPARSE_ATTN_AOT_CACHE", pathlib.Path.home() / ".cache" / "sparse-attn" / "aot"))

# pointer element types by argument name: the attention tensors take the input dtype
_I32 = ("count", "index", "indices", "slots", "words", "ranges", "cu_", "seg")
_F32 = ("lse_ptr", "delta_ptr", "dlse_ptr", "vert_ptr", "slash_ptr", "w_ptr", "bias_ptr", "dbias_ptr")
_I8 = ("bfull_ptr", "diag_ptr", "vert_ptr")


def _pointer_type(kernel, name, dtype):
    dtype = "fp32" if dtype == "tf32" else dtype
    if kernel.startswith("decode"):  # fp32 split partials; lengths, page lists and the block table in int32
        if name in ("o_ptr", "lse_ptr"):
            return "*fp32"
        return "*i32" if name in ("seqlens_ptr", "counts_ptr", "pages_ptr", "table_ptr") else "*" + dtype
    if kernel.startswith("st_") and name in _I8:
        return "*i8"
    if kernel.startswith("st_dkv") and name in ("dk_ptr", "dv_ptr"):
        return "*fp32"  # the stripe backward accumulates dK/dV in fp32 buffers
    if kernel == "kmeans":
        return "*i64" if name == "out_ptr" else "*fp32"
    if kernel in ("pool", "pooled_scores") and (name == "out_ptr" or kernel == "pooled_scores"):
        return "*fp32"
    if any(t in name for t in _I32):
        return "*i32"
    if name in _F32:
        return "*fp32"
    return "*" + dtype


# strides that are no multiple of 16 in a typical launch (the JIT specializes only those that are): the decode
# kernel's LSE partials [B, Hkv, S, GROUP * Lq], page counts [B, Hkv], page lists and the block table
_ODD_STRIDES = {"decode": ("stride_lb", "stride_lh", "stride_ls", "stride_cb", "stride_ch", "stride_pb", "stride_ph",
                           "stride_tb")}


def signature(kernel, fn, dtype, constexprs):
    """``(signature, constexprs by index, attrs)`` of a launch with 16-byte-aligned tensors and strides."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        if name.endswith("_ptr"):
            sig[name] = _pointer_type(kernel, name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and name not in _ODD_STRIDES.get(_config_name(kernel), ()):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(kernel, fn, dtype, constexprs, num_warps, num_stages):
    """Compile one variant; returns a dict of its resources (cached)."""
    sig, consts, attrs = signature(kernel, fn, dtype, constexprs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    key = hashlib.sha256(json.dumps([triton.__version__, fn.cache_key, sig, sorted(map(str, consts.items())),
                                     sorted(map(str, attrs.items())), options]).encode()).hexdigest()
    path = CACHE / triton.__version__ / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    ptx = compiled.asm.get("ptx", "")
    result = dict(registers=int(regs.group(1)) if regs else -1, spill=int(spill.group(1)) if spill else -1,
                  shared=int(compiled.metadata.shared), cubin_bytes=len(compiled.asm.get("cubin", b"")),
                  wgmma="wgmma.mma_async" in ptx, cp_async="cp.async" in ptx, mma_sync="mma.sync" in ptx)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


# -- the kernels of each family with the constexprs their launchers pass ----

def _block_family(dtype, block_m, block_n, head_dim, causal, group, predicates):
    from sparse_attn_kernels.block_sparse import bwd, fwd

    t = DTYPES[dtype]
    pad = cfg.pow2_at_least(head_dim)
    common = dict(GROUP=group, MASK_HEAD_DIV=1, HAS_BAND=causal or predicates, HAS_RANGE=predicates,
                  HAS_SEG=predicates, HAS_BITS=predicates, VARLEN=predicates, HAS_BIAS=predicates,
                  BLOCK_M=block_m, BLOCK_N=block_n,
                  WORDS=-(-block_n // 32), HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                  DOT_PRECISION=cfg.dot_precision(t, tf32=dtype == "tf32"))
    tile_n = cfg.inner_tile(block_n, pad, t)
    kernels = {
        "fwd": (fwd._block_sparse_fwd_kernel, dict(common, TILE_N=cfg.fwd_tile(block_m, block_n, pad, t))),
        "dq": (bwd._block_sparse_bwd_dq_kernel, dict(common, TILE_N=tile_n)),
    }
    for name, which in cfg.dkdv_passes(t, pad):  # one fused dK/dV pass, or a dK pass and a dV pass
        kernels[name] = (bwd._block_sparse_bwd_dkdv_kernel,
                         dict(common, TILE_M=cfg.inner_tile(block_m, pad, t), KEY_TILE=cfg.key_tile(block_n, pad, t),
                              PASS=which))
    kernels["preprocess"] = (bwd._bwd_preprocess_kernel, dict(HAS_DLSE=True, BLOCK_M=64, HEAD_DIM=head_dim,
                                                              HEAD_DIM_PAD=pad))
    return kernels


def _stripe_family(dtype, block_m, block_n, head_dim, causal, group, predicates):
    from sparse_attn_kernels.stripe_sparse import bwd, fwd

    t = DTYPES[dtype]
    pad = cfg.pow2_at_least(head_dim)
    tiles = cfg.stripe_tiles(block_m, block_n, head_dim, t)
    common = dict(GROUP=group, MASK_HEAD_DIV=1, IS_CAUSAL=causal, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                  DOT_PRECISION=cfg.dot_precision(t, tf32=dtype == "tf32"))
    kernels = {
        "st_fwd": (fwd._stripe_sparse_fwd_kernel, dict(common, BLOCK_M=block_m, BLOCK_N=block_n,
                                                       TILE_N=tiles["q_tile_n"], TILE_C=tiles["tile_c"])),
        "st_dq": (bwd._stripe_sparse_bwd_dq_kernel, dict(common, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         TILE_N=tiles["q_tile_n"], TILE_C=tiles["dq_tile_c"])),
    }
    for block_pass, col_pass, which in cfg.stripe_dkv_passes(t, pad):  # fused dK/dV, or a dK and a dV pass
        kernels[block_pass] = (bwd._stripe_sparse_bwd_dkv_block_kernel,
                               dict(common, BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=tiles["tile_n"],
                                    SUB_M=tiles["sub_m"], PASS=which))
        kernels[col_pass] = (bwd._stripe_sparse_bwd_dkv_col_kernel,
                             dict(common, G_LOOP=group, BLOCK_M=tiles["col_m"], TILE_C=tiles["tile_c"], PASS=which))
    return kernels


def _scoring_family(dtype, block_m, block_n, head_dim, causal, group, predicates):
    from sparse_attn_kernels.scoring import kmeans, mass, pool, vertical_slash

    t = DTYPES[dtype]
    pad = cfg.pow2_at_least(head_dim)
    prec = cfg.dot_precision(t, tf32=dtype == "tf32")
    return {
        "lse": (mass._attention_lse_kernel, dict(GROUP=group, IS_CAUSAL=causal, BLOCK_M=64, TILE_N=64,
                                                 HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, DOT_PRECISION=prec)),
        "mass": (mass._block_mass_kernel, dict(GROUP=group, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
                                               TILE_N=min(block_n, 64), HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                                               DOT_PRECISION=prec)),
        "vertical_slash": (vertical_slash._vertical_slash_kernel,
                           dict(GROUP=group, IS_CAUSAL=causal, ROWS=64, TILE_N=64, HEAD_DIM=head_dim,
                                HEAD_DIM_PAD=pad, DOT_PRECISION=prec)),
        "pool": (pool._block_mean_pool_kernel, dict(BLOCK_PAD=cfg.pow2_at_least(block_n), HEAD_DIM=head_dim,
                                                    HEAD_DIM_PAD=pad)),
        "pooled_scores": (pool._pooled_scores_kernel, dict(GROUP=group, IS_CAUSAL=causal, BLOCK_M=block_m,
                                                           BLOCK_N=block_n, TM=16, TN=32, HEAD_DIM=head_dim,
                                                           HEAD_DIM_PAD=pad)),
        "kmeans": (kmeans._kmeans_assign_kernel, dict(IS_L2=True, TL=64, TC=32, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad)),
    }


def _decode_family(dtype, block_m, block_n, head_dim, causal, group, predicates):
    """The decode kernel over a contiguous and a paged cache: ``block_m`` packed query rows (GROUP x Lq),
    ``block_n`` the page size."""
    from sparse_attn_kernels.decode import fwd

    t = DTYPES[dtype]
    pad = cfg.pow2_at_least(head_dim)
    common = dict(GROUP=group, CAUSAL=causal, PAGE=block_n, TILE=fwd.page_tile(block_n, pad, t), TOKENS=False,
                  BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                  DOT_PRECISION=cfg.dot_precision(t, tf32=dtype == "tf32"))
    tok_tile = fwd.page_tile(64, pad, t)  # token lists: the launcher's tile of gathered keys (page_size=1)
    return {"decode": (fwd._decode_fwd_kernel, dict(common, PAGED=False)),
            "decode_paged": (fwd._decode_fwd_kernel, dict(common, PAGED=True)),
            "decode_tokens": (fwd._decode_fwd_kernel, dict(common, PAGED=False, TOKENS=True, PAGE=tok_tile,
                                                           TILE=tok_tile))}


FAMILIES = {"block": _block_family, "stripe": _stripe_family, "scoring": _scoring_family, "decode": _decode_family}


# the (dtype, block_m, block_n) a scoring launcher passes to the config functions (kernels/scoring/*.py)
_SCORING_SHAPE = {"lse": lambda t, bm, bn: (t, 64, 64), "vertical_slash": lambda t, bm, bn: (t, 64, 64),
                  "pool": lambda t, bm, bn: (t, bn, bn), "pooled_scores": lambda t, bm, bn: (torch.float32, 16, 32),
                  "kmeans": lambda t, bm, bn: (torch.float32, 64, 32)}
_DECODE = ("decode", "decode_paged", "decode_tokens")


def _config_name(kernel):
    """The name of ``kernel`` in kernels/_common/config.py (the decode variants are one kernel)."""
    return "decode" if kernel in _DECODE else kernel


def _config_shape(kernel, t, block_m, block_n):
    """(dtype, block_m, block_n) that the launcher passes to the config functions."""
    if kernel in _SCORING_SHAPE:
        return _SCORING_SHAPE[kernel](t, block_m, block_n)
    if kernel == "decode_tokens":  # token lists: one tile of 64 gathered keys per step, whatever the page size
        return t, block_m, 64
    return t, block_m, block_n


def launch_configs(kernel, dtype, block_m, block_n, head_dim, predicates=False):
    """``[(num_warps, num_stages, role)]``: what the launcher and the autotuner can choose for this shape, the
    preferred config first (role "preferred", then "candidate"), then the pruned ones (role "pruned")."""
    pad = cfg.pow2_at_least(head_dim)
    t, block_m, block_n = _config_shape(kernel, DTYPES[dtype], block_m, block_n)
    kernel = _config_name(kernel)
    if not cfg.fits(kernel, t, block_m, block_n, pad):
        return [(w, s, "pruned") for w, s in cfg.CONFIG_SPACE]  # the launcher refuses the shape
    pref = cfg.preferred_config(kernel, t, block_m, block_n, pad, predicates)
    kept = cfg.candidate_configs(kernel, t, block_m, block_n, pad)
    rows = [(pref[0], pref[1], "preferred")]
    rows += [(w, s, "candidate") for w, s in kept if (w, s) != pref]
    rows += [(w, s, "pruned") for w, s in cfg.CONFIG_SPACE if (w, s) not in kept and (w, s) != pref]
    return rows


# the shapes every family is compiled for in CI: (dtype, block_m, block_n, head_dim, causal, group, predicates);
# the first of each family is the quick check (another Triton version), the rest extend it under the newest
CI_SHAPES = {
    "block": [("bf16", 128, 128, 128, True, 4, False), ("fp16", 64, 64, 64, True, 1, True),
              ("tf32", 128, 128, 128, True, 4, False), ("fp32", 64, 64, 64, True, 1, False),
              ("bf16", 64, 64, 256, True, 1, False)],
    "stripe": [("bf16", 64, 64, 128, True, 4, False), ("tf32", 64, 64, 128, True, 1, False)],
    "scoring": [("bf16", 64, 64, 128, True, 4, False), ("tf32", 64, 64, 128, True, 1, False)],
    # decode: block_m = packed query rows (GQA 4 x Lq 1 -> 16), block_n = page size; Lq 16 with GQA 4 -> 64 rows
    "decode": [("bf16", 16, 64, 128, False, 4, False), ("fp16", 64, 256, 128, True, 4, False),
               ("tf32", 16, 64, 128, False, 4, False), ("bf16", 16, 16, 256, False, 8, False)],
}
# the kernels whose largest candidate CI compiles too (the rest: the preferred config; all: compile_table.py)
CI_LARGEST = {"fwd", "dq", "st_fwd", "decode"}


# the kernels launched through the autotuner; the others launch their preferred config only
AUTOTUNED = {"fwd", "dq", "dkdv", "dk", "dv", "st_fwd", "st_dq", "decode", "decode_paged", "decode_tokens"}


def ci_variants(family, quick=False):
    """The CI subset: per shape and kernel, the preferred config and, for the kernels of :data:`CI_LARGEST` (on
    the first shape), the candidate with the most pipeline stages, i.e. the most shared memory. ``quick``: the
    first shape, preferred configs only. Shapes the launchers refuse are skipped."""
    for i, shape in enumerate(CI_SHAPES[family][:1] if quick else CI_SHAPES[family]):
        for kernel in FAMILIES[family](*shape):
            if family == "scoring" and shape[0] == "tf32" and kernel not in ("lse", "mass", "vertical_slash"):
                continue  # pool, pooled scores and k-means take fp32 whatever the input dtype
            rows = launch_configs(kernel, *shape[:4], predicates=shape[6])
            if rows[0][2] != "preferred":
                continue
            chosen = [rows[0]]
            cands = [r for r in rows if r[2] == "candidate"]
            if cands and kernel in CI_LARGEST and i == 0 and not quick:
                chosen.append(max(cands, key=lambda r: (r[1], r[0])))
            for w, s, role in chosen:
                yield shape, kernel, w, s, role


def estimate(kernel, dtype, block_m, block_n, head_dim, num_stages, num_warps):
    """The pruner's shared-memory estimate (bytes) for a variant, with the shape its launcher passes."""
    pad = cfg.pow2_at_least(head_dim)
    t, block_m, block_n = _config_shape(kernel, DTYPES[dtype], block_m, block_n)
    return cfg.smem_estimate(_config_name(kernel), t, block_m, block_n, pad, num_stages, num_warps)


def compile_variant(family, shape, kernel, num_warps, num_stages):
    fn, constexprs = FAMILIES[family](*shape)[kernel]
    return compile_sm90(kernel, fn, shape[0], constexprs, num_warps, num_stages)


def main(argv):
    family = argv[0]
    for shape, kernel, w, s, role in ci_variants(family, quick="--quick" in argv):
        r = compile_variant(family, shape, kernel, w, s)
        dtype, bm, bn, d, causal, group, preds = shape
        print(json.dumps(dict(r, family=family, kernel=kernel, dtype=dtype, block=f"{bm}x{bn}", head_dim=d,
                              causal=causal, group=group, predicates=preds, num_warps=w, num_stages=s, role=role,
                              estimate=estimate(kernel, dtype, bm, bn, d, s, w), triton=triton.__version__)),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
