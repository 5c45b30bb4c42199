"""Pattern layer II quality table (docs/patterns.md): routing, chunk selection, region routing.

    python benchmarks/layer2_table.py [--length 8192] [--heads 4] [--only NAME ...]

Inputs: ``planted_qkv(structure, L, heads, seed=0)`` (``clusters16`` = ``clusters`` with 16 topics).
Per row: recall mean/min, relative error and density from ``attention_quality`` (``mask.quality`` for
permuted/routed masks), build = best of 3 builds (ms, this machine), warm = one build from the previous
mask's state (routing patterns only; their ``warm_iters``). Prints a markdown table.
"""

import argparse
import time

import torch

from sparse_attn import attention_quality
from sparse_attn.bench.machine import machine_header
from sparse_attn.patterns import get_pattern, planted_qkv

ROWS = [  # (label, registry name, config, structure, causal)
    ("16 clusters, top_p 0.9", "kmeans_routing", dict(q_clusters=16, k_clusters=16), "clusters", False),
    ("32 clusters, top_p 0.9", "kmeans_routing", dict(q_clusters=32, k_clusters=32), "clusters", False),
    ("64 clusters, top_p 0.95", "kmeans_routing", dict(q_clusters=64, k_clusters=64, top_p=0.95), "clusters", False),
    ("16 clusters, top_p 0.9", "kmeans_routing", dict(q_clusters=16, k_clusters=16), "clusters16", False),
    ("16 clusters, top_p 0.9, kmeans++", "kmeans_routing", dict(q_clusters=16, k_clusters=16, init="kmeans++"),
     "clusters16", False),
    ("32 clusters, top_p 0.9", "kmeans_routing", dict(q_clusters=32, k_clusters=32), "mixed", False),
    ("16 clusters", "equal_size_routing", dict(clusters=16), "clusters", False),
    ("16 clusters, kmeans++", "equal_size_routing", dict(clusters=16, init="kmeans++"), "clusters16", False),
    ("8 clusters, kmeans++", "equal_size_routing", dict(clusters=8, init="kmeans++"), "clusters16", False),
    ("16 clusters, kmeans++", "equal_size_routing", dict(clusters=16, init="kmeans++"), "clusters16", True),
    ("256, top-k 4", "chunk_select", dict(chunk_size=256, k=4), "clusters", False),
    ("256, threshold tau 0.25", "chunk_select", dict(chunk_size=256, rule="threshold"), "clusters", False),
    ("256, top-k 4", "chunk_select", dict(chunk_size=256, k=4), "sink_local", True),
    ("256, top-k 4", "chunk_select", dict(chunk_size=256, k=4), "mixed", False),
    ("(1, 16, 16) 1-D, top-k 6", "video_chunk_select", dict(chunk_shape=(1, 16, 16), rule="topk", k=6), "video", False),
    ("(31, 8, 8) 2-D, top-k 1", "video_chunk_select", dict(chunk_shape=(31, 8, 8), rule="topk", k=1), "video", False),
    ("(2, 8, 8) 3-D, top-k 6", "video_chunk_select", dict(chunk_shape=(2, 8, 8), rule="topk", k=6), "video", False),
    ("(2, 8, 8) 3-D, threshold tau 0.25", "video_chunk_select", dict(chunk_shape=(2, 8, 8)), "video", False),
    ("(2, 8, 8), top-k 6", "region_routing", dict(region_shape=(2, 8, 8), topk=6), "video", False),
    ("(1, 8, 8), top-k 12", "region_routing", dict(region_shape=(1, 8, 8), topk=12), "video", False),
]


def best_of(fn, n=3):
    out, best = None, float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="registry names to include")
    args = ap.parse_args()
    print(machine_header(torch.device("cpu")))
    inputs = {}
    dense = None
    print("| pattern (parameters) | structure | recall mean | recall min | error | density | build ms | warm ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, cfg, structure, causal in ROWS:
        if args.only and name not in args.only:
            continue
        if structure not in inputs:
            base, topics = ("clusters", 16) if structure == "clusters16" else (structure, 64)
            inputs[structure] = planted_qkv(base, args.length, heads=args.heads, seed=0, topics=topics)
        inp = inputs[structure]
        if dense is None:
            _, dense = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(inp.q, inp.k, inp.v))
        pat = get_pattern(name, **cfg)
        mask, build = best_of(lambda: pat.build(inp.q, inp.k, causal=causal, layout=inp.layout))
        warm = ""
        if getattr(mask, "state", None) is not None:
            _, t = best_of(lambda: pat.build(inp.q, inp.k, causal=causal, layout=inp.layout, state=mask.state), 1)
            warm = f"{t:.0f}"
        qual = attention_quality(inp.q, inp.k, inp.v, mask, causal=causal)
        tag = structure + (" (causal)" if causal else "")
        print(f"| `{name}` ({label}) | {tag} | {qual['recall_mean']:.3f} | {qual['recall_min']:.3f} | "
              f"{qual['error_mean']:.3f} | {qual['density_mean']:.3f} | {build:.0f} | {warm} |", flush=True)
    print(f"dense scaled_dot_product_attention on the same input (best of 3): {dense:.0f} ms")


if __name__ == "__main__":
    main()
