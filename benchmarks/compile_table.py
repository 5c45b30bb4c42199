"""The sm_90 compile table: every kernel x launch config -> registers, spill bytes, shared memory, wgmma/cp.async.

Compiles each ``@triton.jit`` entry kernel of ``kernels/`` for an H100/H200 as a real launch would (pointers and
strides with ``tt.divisibility=16``; tests/_aot_sm90.py), for the shapes below and every configuration of
``CONFIG_SPACE`` that the launcher or the autotuner can choose (with ``--pruned`` also the ones the pruner
removes), without a GPU. Results are cached per Triton version and kernel source, so a rerun after a change
compiles only what changed. A new kernel must enter ``tests/_aot_sm90.FAMILIES`` and this table.

    python benchmarks/compile_table.py [--family block|stripe|scoring] [--preferred] [--pruned]
                                       [--jsonl out.jsonl] [--markdown out.md]

Slow (about 300 compiles, 3-30 s each on one core, 600 with ``--pruned``); run it with ``nice`` in the background.
"""

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

os.environ["SPARSE_ATTN_AOT_PROCESS"] = "1"  # _aot_sm90 sets up the compile-only environment before triton loads
import _aot_sm90 as aot  # noqa: E402

# (dtype, block_m, block_n, head_dim, causal, group, predicates); fp16 compiles as bf16 does (one shape shows it);
# "tf32": fp32 inputs with TF32 allowed; "fp32": exact fp32 products (PyTorch's default), preferred configs only
_IEEE = [("fp32", 128, 128, 128, True, 1, False), ("fp32", 64, 64, 64, True, 1, False)]
TABLE_SHAPES = {
    "block": [(dt, bm, bn, d, True, 1, False) for dt in ("bf16", "tf32") for d in (128, 64, 256)
              for bm, bn in ((128, 128), (64, 64))] + [("fp16", 128, 128, 128, True, 1, False),
                                                       ("bf16", 128, 64, 128, True, 4, True)] + _IEEE,
    "stripe": [(dt, 64, 64, d, True, 1, False) for dt in ("bf16", "tf32") for d in (128, 64, 256)]
              + [("bf16", 128, 128, 128, True, 1, False), ("fp16", 64, 64, 128, True, 1, False)] + _IEEE,
    "scoring": [(dt, 64, 64, d, True, 1, False) for dt in ("bf16", "tf32") for d in (128, 64, 256)] + _IEEE[1:],
    # decode: block = packed query rows (GQA x Lq) x page size
    "decode": [(dt, 16, 64, d, False, 4, False) for dt in ("bf16", "tf32") for d in (128, 64, 256)]
              + [("bf16", 64, 256, 128, True, 4, False), ("fp16", 16, 16, 128, False, 1, False),
                 ("fp32", 16, 64, 128, False, 4, False)],
}


def variants(families, pruned=False):
    seen = set()
    for family in families:
        for shape in TABLE_SHAPES[family]:
            for kernel in aot.FAMILIES[family](*shape):
                rows = aot.launch_configs(kernel, *shape[:4], predicates=shape[6])
                if kernel not in aot.AUTOTUNED or shape[0] == "fp32":
                    rows = rows[:1]
                for w, s, role in rows:
                    if role == "pruned" and not pruned:
                        continue
                    key = (kernel, shape if kernel not in ("preprocess",) else (shape[0], shape[3]), w, s)
                    if key in seen:  # preprocess does not depend on the block size
                        continue
                    seen.add(key)
                    yield family, shape, kernel, w, s, role


HEADER = ("| kernel | dtype | block | D | warps | stages | role | regs | spill B | smem KiB | est KiB | wgmma | "
          "cp.async |")


def row_md(r):
    mark = lambda b: "yes" if b else "-"  # noqa: E731
    return (f"| {r['kernel']} | {r['dtype']} | {r['block']} | {r['head_dim']} | {r['num_warps']} | {r['num_stages']} "
            f"| {r['role']} | {r['registers']} | {r['spill']} | {r['shared'] / 1024:.0f} | {r['estimate'] / 1024:.0f} "
            f"| {mark(r['wgmma'])} | {mark(r['cp_async'])} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(aot.FAMILIES), action="append")
    ap.add_argument("--jsonl", type=pathlib.Path)
    ap.add_argument("--markdown", type=pathlib.Path)
    ap.add_argument("--pruned", action="store_true", help="compile the configs the pruner removes too (slow)")
    ap.add_argument("--preferred", action="store_true", help="only the preferred configs (docs/kernels.md)")
    args = ap.parse_args(argv)
    families = args.family or list(aot.FAMILIES)
    import triton

    out = args.jsonl.open("w") if args.jsonl else None
    rows, t0 = [], time.time()
    print(f"# Triton {triton.__version__}, sm_90; shared memory limit {aot.HOPPER_SMEM // 1024} KiB", flush=True)
    print(HEADER, flush=True)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    for family, shape, kernel, w, s, role in variants(families, args.pruned):
        if args.preferred and role != "preferred":
            continue
        dtype, bm, bn, d, causal, group, preds = shape
        try:
            r = aot.compile_variant(family, shape, kernel, w, s)
        except Exception as err:  # a config over the chip's limits may fail to compile: show it
            r = dict(registers=-1, spill=-1, shared=-1, cubin_bytes=0, wgmma=False, cp_async=False,
                     mma_sync=False, error=str(err).splitlines()[0][:200])
        r = dict(r, family=family, kernel=kernel, dtype=dtype, block=f"{bm}x{bn}", head_dim=d, causal=causal,
                 group=group, predicates=preds, num_warps=w, num_stages=s, role=role,
                 estimate=aot.estimate(kernel, dtype, bm, bn, d, s, w),
                 triton=triton.__version__)
        rows.append(r)
        print(row_md(r), flush=True)
        if out:
            out.write(json.dumps(r) + "\n")
            out.flush()
    bad_smem = [r for r in rows if r["role"] != "pruned" and r["shared"] > aot.HOPPER_SMEM]
    under = [r for r in rows if r["shared"] > r["estimate"]]
    print(f"# {len(rows)} compiles in {time.time() - t0:.0f} s; kept configs over 227 KiB: {len(bad_smem)}; "
          f"estimate below the compiler: {len(under)}", flush=True)
    if args.markdown:
        lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [row_md(r) for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 1 if bad_smem or under else 0


if __name__ == "__main__":
    sys.exit(main())
