"""Ahead-of-time compilation of every kernel family for sm_90 (H100/H200) as a real launch compiles it.

The interpreter never compiles a kernel, so what only the compiler knows (types of loop-carried values,
layouts, shared memory beyond the chip's 227 KiB, register spills, whether loads are pipelined) would
otherwise wait for a device session. One subprocess per family (without TRITON_INTERPRET) compiles the CI
subset of tests/_aot_sm90.py with the alignment attributes of a real launch: per shape the preferred config
of every kernel and the largest autotune candidate of the forward/dQ kernels. The whole table is
``benchmarks/compile_table.py`` (docs/kernels.md). ``SPARSE_ATTN_AOT_QUICK=1`` compiles the quick subset
(CI's run under a second Triton version).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

HELPER = pathlib.Path(__file__).with_name("_aot_sm90.py")
HOPPER_SMEM = 227 * 1024
SPILL_LIMIT = 64  # bytes per thread, for the preferred bf16/fp16 configs at head dim <= 128 (every Triton version)
FP32_ONLY = {"pooled_scores", "kmeans"}  # take fp32 (pooled means, points) whatever the input dtype
ATTENTION = {"fwd", "dq", "dkdv", "dk", "dv", "st_fwd", "st_dq", "st_dkv_block", "st_dkv_col", "st_dk_block",
             "st_dv_block", "st_dk_col", "st_dv_col"}
QUICK = os.environ.get("SPARSE_ATTN_AOT_QUICK", "0") == "1"


def _compile(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(HELPER), family] + (["--quick"] if QUICK else [])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines()]


def _name(r):
    return (f"{r['kernel']} {r['dtype']} {r['block']} d{r['head_dim']} {r['num_warps']}w{r['num_stages']}s "
            f"({r['role']})")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["block", "stripe", "scoring", "decode"])
def test_family_compiles_for_hopper_within_limits(family):
    rows = _compile(family)
    from _aot_sm90 import FAMILIES

    kernels = {r["kernel"] for r in rows}
    expected = {k for shape in [("bf16", 64, 64, 128, True, 1, False)] for k in FAMILIES[family](*shape)}
    assert expected <= kernels, f"kernels not compiled: {expected - kernels}"
    for r in rows:
        name = _name(r)
        assert r["cubin_bytes"] > 0, f"{name}: no cubin"
        assert r["shared"] <= HOPPER_SMEM, f"{name}: {r['shared']} B of shared memory > 227 KiB"
        assert r["shared"] <= r["estimate"], f"{name}: the pruner's estimate {r['estimate']} B < {r['shared']} B"
        if (r["role"] == "preferred" and r["dtype"] in ("bf16", "fp16") and r["head_dim"] <= 128
                and r["kernel"] not in FP32_ONLY):
            assert 0 <= r["spill"] <= SPILL_LIMIT, f"{name}: {r['spill']} B of register spills per thread"
            if r["kernel"] in ATTENTION:
                assert r["wgmma"], f"{name}: no Hopper wgmma"
        if r["kernel"] in ("fwd", "dq", "st_fwd", "st_dq", "decode", "decode_paged") and r["num_stages"] >= 2:
            assert r["cp_async"], f"{name}: K/V loads are not pipelined (no cp.async)"


def test_no_candidate_config_exceeds_the_chip():
    """Over the shapes the launchers accept, every autotune candidate fits by the estimate (an upper bound of
    the compiler's figure, checked above), and a shape nothing fits is refused with a ValueError."""
    import torch

    from sparse_attn_kernels._common import config as cfg

    for kernel in ("fwd", "dq", "dkdv", "dk", "dv", "st_fwd", "st_dq", "st_dkv_block", "st_dkv_col", "lse", "mass",
                   "decode"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for pad in (16, 32, 64, 128, 256):
                for bm in (16, 32, 64, 128):
                    for bn in (16, 32, 64, 128):
                        for w, s in cfg.candidate_configs(kernel, dtype, bm, bn, pad):
                            assert cfg.smem_estimate(kernel, dtype, bm, bn, pad, s, w) <= HOPPER_SMEM
                        if dtype != torch.float32 and pad <= 128:
                            assert cfg.fits(kernel, dtype, bm, bn, pad), (kernel, dtype, bm, bn, pad)
                            assert cfg.preferred_config(kernel, dtype, bm, bn, pad)
    # fp32 at head dim 256: the dQ kernels need block_m <= 64 (docs/kernels.md); nothing fits 128
    with pytest.raises(ValueError, match="227 KiB"):
        cfg.preferred_config("dq", torch.float32, 128, 64, 256)
    assert not cfg.fits("st_dq", torch.float32, 128, 128, 256) and cfg.fits("st_dq", torch.float32, 64, 64, 256)


def test_fp32_dot_precision_follows_pytorch():
    """fp32 inputs use TF32 dots exactly when PyTorch allows TF32 for fp32 matmuls; 16-bit inputs ignore it."""
    import torch

    from sparse_attn_kernels._common.config import dot_precision

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "tf32"  # what set_float32_matmul_precision("high"/"medium") and allow_tf32 set
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float32, tf32=False) == "ieee"
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
    finally:
        matmul.fp32_precision = saved
    assert dot_precision(torch.float32) == ("tf32" if saved == "tf32" else "ieee")


def test_autotune_pruner_keeps_the_candidates():
    """The ``early_config_prune`` the autotuned launchers pass keeps exactly the fitting candidates, preferred one
    included, from the arguments of a launch (the dK/dV pruner names its pass from ``PASS``)."""
    import torch

    from sparse_attn_kernels._common import config as cfg

    configs = cfg.autotune_configs("fwd")
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = cfg.pruner("fwd")["early_config_prune"](configs, {"q_ptr": q}, BLOCK_M=128, BLOCK_N=128, HEAD_DIM_PAD=128)
    assert [(c.num_warps, c.num_stages) for c in kept] == cfg.candidate_configs("fwd", torch.bfloat16, 128, 128, 128)
    assert cfg.preferred_config("fwd", torch.bfloat16, 128, 128, 128) in [(c.num_warps, c.num_stages) for c in kept]
    dkdv = cfg.pruner(lambda a: ("dkdv", "dk", "dv")[a["PASS"]])["early_config_prune"]
    kept = dkdv(configs, {"q_ptr": q}, BLOCK_M=128, BLOCK_N=128, HEAD_DIM_PAD=128, PASS=1)
    assert [(c.num_warps, c.num_stages) for c in kept] == cfg.candidate_configs("dk", torch.bfloat16, 128, 128, 128)
