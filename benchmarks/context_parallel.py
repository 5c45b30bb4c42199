"""Ring attention over gloo: bytes sent and time per call, sparse masks vs dense ring.

    python benchmarks/context_parallel.py --bytes-only            # bytes only (no timing): safe on a busy machine
    python benchmarks/context_parallel.py --out cp_out            # bytes and time (needs an otherwise idle machine)
    python benchmarks/context_parallel.py --backend nccl --world 8 --seq-len 65536 --dtype bfloat16 --out cp_gpu
                                                                  # one process per GPU (NVLink), not run yet

Spawns ``--world`` gloo processes on this machine. For each mask family and block density, every
rank runs :func:`ring_attention` on its contiguous shard; the bytes are the tensors actually handed
to ``isend`` (``count_bytes``), summed over ranks, for one forward and for one forward+backward.
Families: ``local`` (a band of tiles around the diagonal plus the first key block as a sink, the
shape of sliding-window / sink patterns), ``random`` (independent tiles per head: the worst case,
every shard pair keeps some tile). ``dense`` = the full mask, which sends every shard to every rank.
Times are the median of ``--repeats`` calls after a warm-up, taken on rank 0 between barriers.
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_attn import BlockSparseMask
from sparse_attn.distributed import contiguous_chunks, count_bytes, ring_attention, ring_plan, shard


def make_mask(family, density, seq_len, block, heads, seed=0):
    """A block mask of about ``density`` (share of tiles) for ``family`` in ``local``, ``random``, ``dense``."""
    n = -(-seq_len // block)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if family == "dense" or density >= 1:
        keep = torch.ones(1, 1, n, n, dtype=torch.bool)
    elif family == "local":
        band = [((i - j).abs() <= w) | (j == 0) for w in range(n)]  # the width closest to the target
        keep = min(band, key=lambda b: abs(b.float().mean().item() - density))[None, None]
    elif family == "random":
        gen = torch.Generator().manual_seed(seed)
        keep = (torch.rand(1, heads, n, n, generator=gen) < density) | (i == j)
    else:
        raise ValueError(f"family must be local, random or dense, got {family!r}.")
    return BlockSparseMask.from_dense(keep, block, (seq_len, seq_len))


def _timed(fn, repeats, device):
    fn()
    out = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _worker(rank, world, store, args, out_path):
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q = torch.randn(shape, generator=g).to(device, dtype)
    k, v = (torch.randn(1, args.kv_heads, args.seq_len, args.head_dim, generator=g).to(device, dtype)
            for _ in range(2))
    chunks = contiguous_chunks([args.seq_len // world] * (world - 1) + [args.seq_len - (world - 1) * (args.seq_len
                                                                                                    // world)])
    x = [shard(t, chunks[rank]) for t in (q, k, v)]
    rows = []
    for family in args.families:
        for density in ([1.0] if family == "dense" else args.densities):
            mask = make_mask(family, density, args.seq_len, args.block, args.kv_heads).to(device)
            plan = ring_plan(mask, x[0], x[1], chunks=chunks, causal=args.causal)
            with count_bytes() as fwd:
                ring_attention(*x, plan=plan)
            xs = [t.clone().requires_grad_() for t in x]
            with count_bytes() as both:
                ring_attention(*xs, plan=plan).sum().backward()
            sent = torch.tensor([fwd.bytes_sent, both.bytes_sent], dtype=torch.int64, device=device)
            dist.all_reduce(sent)
            row = dict(family=family, target_density=density, density=round(mask.density(args.causal), 4),
                       fwd_bytes=int(sent[0]), fwd_bwd_bytes=int(sent[1]))
            if not args.bytes_only:
                row["fwd_ms"] = 1e3 * _timed(lambda: ring_attention(*x, plan=plan), args.repeats, device)
                row["fwd_bwd_ms"] = 1e3 * _timed(lambda: ring_attention(*xs, plan=plan).sum().backward(),
                                                 args.repeats, device)
            rows.append(row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--families", nargs="+", default=["local", "random", "dense"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="nccl: one process per GPU")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--bytes-only", action="store_true", help="measure bytes, time nothing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--out", default=None, help="folder for results.json / results.csv")
    args = p.parse_args(argv)
    from sparse_attn.bench.machine import machine_header
    header = machine_header(torch.device("cuda" if args.backend == "nccl" else "cpu"))
    header.update(world=args.world, backend=args.backend, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, block=args.block, causal=args.causal, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args, out_path), nprocs=args.world)
        with open(out_path) as f:
            rows = json.load(f)
    dense = {r["family"]: r for r in rows}.get("dense")
    cols = ["family", "target_density", "density", "fwd_bytes", "fwd_vs_dense", "fwd_bwd_bytes", "fwd_bwd_vs_dense"]
    if not args.bytes_only:
        cols += ["fwd_ms", "fwd_ms_vs_dense", "fwd_bwd_ms", "fwd_bwd_ms_vs_dense"]
    ratios = {"fwd_bytes": "fwd_vs_dense", "fwd_bwd_bytes": "fwd_bwd_vs_dense", "fwd_ms": "fwd_ms_vs_dense",
              "fwd_bwd_ms": "fwd_bwd_ms_vs_dense"}
    for r in rows:
        for key, name in ratios.items():
            if dense and key in r:
                r[name] = round(r[key] / dense[key], 3) if dense[key] else float("nan")
    print(json.dumps(header))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.1f}" if isinstance(r.get(c), float) and c.endswith("_ms") else str(r.get(c, ""))
                         for c in cols))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.csv"), "w") as f:
            f.write(",".join(cols) + "\n")
            f.writelines(",".join(str(r.get(c, "")) for c in cols) + "\n" for r in rows)


if __name__ == "__main__":
    main()
