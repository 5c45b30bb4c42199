"""Time the CPU path of two source trees in one run (interleaved processes): a speed check against a commit.

    git worktree add /tmp/base 2015d06
    python benchmarks/compare_commits.py --base /tmp/base [--rounds 5]

Each round runs one short process per tree (its own ``sparse_attn`` on ``sys.path``) that times the same
seeded cases with ``torch.utils.benchmark``; rounds alternate the trees, so machine load falls on both.
Prints per case the median time of each tree and the median of the per-round ratios (this tree / base).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
import torch.utils.benchmark as benchmark
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[4])
import sparse_attn, sparse_attn_kernels
from sparse_attn import BlockSparseMask, sparse_attention
for m in (sparse_attn, sparse_attn_kernels):  # this tree's packages, never an installed copy
    assert str(__import__("pathlib").Path(m.__file__).resolve()).startswith(sys.argv[1]), m.__file__
torch.set_num_threads(int(sys.argv[2]))
out = {}
for name, L, density, causal in (("8k 10% blocks", 8192, 0.1, False), ("8k 30% blocks", 8192, 0.3, False),
                                  ("4k dense causal", 4096, 1.0, True)):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, L, 64, generator=gen) for _ in range(3))
    n = L // 64
    keep = torch.rand(1, 8, n, n, generator=gen) < density
    keep |= torch.eye(n, dtype=torch.bool)
    mask = None if density >= 1.0 else BlockSparseMask.from_dense(keep, 64, (L, L))
    t = benchmark.Timer("sparse_attention(q, k, v, mask, causal=causal)",
                        globals=dict(sparse_attention=sparse_attention, q=q, k=k, v=v, mask=mask, causal=causal),
                        num_threads=int(sys.argv[2]))
    out[name] = t.blocked_autorange(min_run_time=float(sys.argv[3])).median * 1e3
print(json.dumps(out))
"""


def run_tree(tree: Path, threads: int, min_run_time: float) -> dict:
    """Timings (ms) of one tree, in a fresh process with the tree's packages first on the path."""
    with tempfile.TemporaryDirectory() as tmp:  # kernels/ imports as sparse_attn_kernels: a link outside the tree
        (Path(tmp) / "sparse_attn_kernels").symlink_to(tree.resolve() / "kernels")
        res = subprocess.run([sys.executable, "-c", CHILD, str(tree.resolve()), str(threads), str(min_run_time),
                              tmp], capture_output=True, text=True, cwd=tree)
    if res.returncode:
        raise RuntimeError(f"timing {tree} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="source tree of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    trees = {"base": args.base.resolve(), "this": ROOT}
    times = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            times[name].append(run_tree(tree, args.threads, args.min_run_time))
    cases = list(times["this"][0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    base = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=args.base).stdout
    print(f"this tree {commit.strip()} vs base {base.strip()}, {args.rounds} interleaved rounds, "
          f"{args.threads} threads")
    for case in cases:
        this = [r[case] for r in times["this"]]
        ref = [r[case] for r in times["base"]]
        ratio = statistics.median(a / b for a, b in zip(this, ref))
        print(f"{case:18s} base {statistics.median(ref):8.1f} ms   this {statistics.median(this):8.1f} ms   "
              f"this/base x{ratio:.2f}")


if __name__ == "__main__":
    main()
