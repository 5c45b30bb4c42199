"""What a partial tile costs against a full one on the CPU path (same tiles, same pairs, same output).

    python benchmarks/partial_tiles.py [--seq-len 8192] [--density 0.1] [--threads 2]

Three masks over the same random tile lists: (a) plain tiles (every tile full, the fast path), (b) the
same tiles each carrying a bit mask with every bit set (every tile partial: bits unpacked and an additive
mask built, then the result merged by LSE), (c) the same tiles with a window that keeps every pair
(classified full tile by tile: a predicate that cuts no tile costs nothing). All three compute the same pairs, so the outputs must match;
the times differ only by the partial-tile machinery. Timed with ``torch.utils.benchmark`` (median of
interleaved rounds); prints the median over rounds of the per-round ratio partial / full.
"""

import argparse
import statistics

import torch
import torch.utils.benchmark as benchmark

from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn.bench.machine import machine_header


def masks(seq_len, block, density, heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = -(-seq_len // block)
    keep = torch.rand(1, heads, n, n, generator=gen) < density
    keep |= torch.eye(n, dtype=torch.bool)
    plain = BlockSparseMask.from_dense(keep, block, (seq_len, seq_len))
    slots = torch.arange(plain.indices.numel(), dtype=torch.int32).view(plain.indices.shape)
    ok = torch.arange(plain.indices.shape[-1]) < plain.counts[..., None]
    slots = torch.where(ok, slots, -1)
    words = torch.full((plain.indices.numel(), block, -(-block // 32)), -1, dtype=torch.int32)  # all bits set
    bits = BlockSparseMask(plain.counts, plain.indices, block, (seq_len, seq_len), bit_slots=slots, bit_words=words)
    band = plain.with_predicates(window=(seq_len, seq_len))
    return {"full tiles": plain, "bit-masked tiles": bits, "window over all tiles": band}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=gen) for _ in range(3))
    ms = masks(args.seq_len, args.block, args.density, args.heads)
    outs = {name: sparse_attention(q, k, v, m) for name, m in ms.items()}
    ref = outs["full tiles"]
    for name, o in outs.items():
        err = (o - ref).abs().max().item()
        assert err < 1e-5, f"{name}: differs from the full-tile output by {err:.2e}"
    times = {name: [] for name in ms}
    for _ in range(args.rounds):  # interleaved, so that load falls on every variant alike
        for name, m in ms.items():
            t = benchmark.Timer("sparse_attention(q, k, v, m)", globals=dict(sparse_attention=sparse_attention, q=q,
                                                                             k=k, v=v, m=m),
                                num_threads=args.threads)
            times[name].append(t.blocked_autorange(min_run_time=args.min_run_time / args.rounds).median * 1e3)
    header = machine_header(torch.device("cpu"))
    print(f"# {header['cpu']} | threads {args.threads} | torch {header['torch']} | commit {header['git_commit']} | "
          f"{header['date_utc']} | load at start {header['loadavg_1m_at_start']} | {header['command']}")
    print(f"L={args.seq_len} H={args.heads} D={args.head_dim} block={args.block} density={ms['full tiles'].density():.3f}"
          f" (tiles {int(ms['full tiles'].counts.sum())})")
    base = statistics.median(times["full tiles"])
    for name, ts in times.items():
        med = statistics.median(ts)
        # the ratio of each round (variants interleaved) is steadier than the ratio of medians on a noisy VM
        ratio = statistics.median(t / f for t, f in zip(ts, times["full tiles"]))
        print(f"{name:24s} {med:9.1f} ms  x{ratio:.2f} of full tiles (median of per-round ratios)   "
              f"rounds {[round(t, 1) for t in ts]}")


if __name__ == "__main__":
    main()
