"""Issue-6 GPU bar: k-means routing mask build time vs one dense SDPA on the same input.

Bar (bf16, L = 32k): a cold build (10 k-means iterations) <= 10% of dense SDPA-flash, a warm build
(2 iterations from the previous centroids) <= 3%. Input: ``planted_qkv("clusters")``.
"""

import torch

from ..patterns import KMeansRouting, planted_qkv
from .timing import time_fn


def routing_bar_rows(device, length=32768, heads=16, head_dim=128, clusters=64, dtype=torch.bfloat16,
                     min_run_time=1.0):
    """Rows ``{"what", "ms", "ratio"}``: dense SDPA, cold build, warm build (ratio = build / dense)."""
    device = torch.device(device)
    inp = planted_qkv("clusters", length, heads=heads, head_dim=head_dim, seed=0, dtype=dtype, device=device)
    q, k, v = inp.q, inp.k, inp.v
    pat = KMeansRouting(q_clusters=clusters, k_clusters=clusters, iters=10, warm_iters=2)
    dense = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device,
                    min_run_time=min_run_time)
    state = pat.build(q, k).state
    cold = time_fn(lambda: pat.build(q, k), device, min_run_time=min_run_time)
    warm = time_fn(lambda: pat.build(q, k, state=state), device, min_run_time=min_run_time)
    rows = [dict(what="dense SDPA", ms=dense, ratio=1.0),
            dict(what=f"kmeans_routing build, {pat.iters} iters (bar <= 0.10)", ms=cold, ratio=cold / dense),
            dict(what=f"kmeans_routing warm build, {pat.warm_iters} iters (bar <= 0.03)", ms=warm, ratio=warm / dense)]
    for r in rows:
        r.update(length=length, heads=heads, head_dim=head_dim, clusters=clusters, dtype=str(dtype).replace("torch.", ""))
    return rows


def format_rows(rows) -> str:
    lines = [f"routing bar (L={rows[0]['length']}, heads={rows[0]['heads']}, D={rows[0]['head_dim']}, "
             f"{rows[0]['dtype']}, {rows[0]['clusters']} q/k clusters, planted clusters):"]
    lines += [f"  {r['what']:<48} {r['ms']:9.2f} ms   {r['ratio']:.3f} x dense" for r in rows]
    return "\n".join(lines)
