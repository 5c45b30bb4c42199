"""Ahead-of-time compilation of the block-sparse kernels for sm_90 (H100/H200), without a GPU.

The interpreter never compiles a kernel, so errors that only the compiler raises (types of
loop-carried values, layouts, shared memory beyond the chip's 227 KiB) would otherwise wait for a
device session. Each case compiles forward, dQ, dK/dV and preprocess kernels with Triton's bundled
ptxas, in a subprocess without TRITON_INTERPRET (tests/_aot_sm90.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HOPPER_SMEM = 227 * 1024
HELPER = pathlib.Path(__file__).with_name("_aot_sm90.py")

CASES = [  # num_stages: a configuration the autotuner can choose (kernels/_common/config.py); the last field
    # switches on every in-tile predicate (band, ranges, segments, bit masks, packed rows)
    pytest.param("bf16", 64, 64, 128, True, 1, 2, False, id="bf16-64x64-d128-causal"),
    pytest.param("bf16", 128, 128, 128, False, 4, 2, False, id="bf16-128x128-d128-gqa4"),
    pytest.param("bf16", 128, 128, 256, True, 1, 2, False, id="bf16-128x128-d256-causal"),
    pytest.param("fp16", 64, 32, 80, True, 2, 2, False, id="fp16-64x32-d80-causal"),
    pytest.param("fp32", 32, 32, 64, True, 1, 2, False, id="fp32-32x32-d64-causal"),
    pytest.param("fp32", 64, 64, 256, True, 1, 1, False, id="fp32-64x64-d256-unpipelined"),
    pytest.param("bf16", 128, 64, 128, True, 4, 2, True, id="bf16-128x64-d128-all-predicates"),
    pytest.param("fp16", 64, 16, 64, False, 1, 2, True, id="fp16-64x16-d64-all-predicates"),
]


@pytest.mark.parametrize("dtype,block_m,block_n,head_dim,causal,group,num_stages,predicates", CASES)
def test_block_sparse_kernels_compile_for_hopper(dtype, block_m, block_n, head_dim, causal, group, num_stages,
                                                 predicates):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [dtype, block_m, block_n, head_dim, int(causal), group, num_stages, int(predicates)]
    run = subprocess.run([sys.executable, str(HELPER), *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {r["kernel"]: r for r in map(json.loads, run.stdout.strip().splitlines())}
    assert set(results) == {"fwd", "dq", "dkdv", "preprocess"}
    for name, r in results.items():
        assert r["cubin_bytes"] > 0, f"{name}: no cubin"
        assert r["shared"] <= HOPPER_SMEM, f"{name}: {r['shared']} B of shared memory"
