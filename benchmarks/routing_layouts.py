"""k-means routing: ragged cluster boundaries (what `kmeans_routing` builds) vs clusters padded to whole tiles.

Ragged is measured in both cluster orders: ``cluster_order="spectral"`` (the default: related clusters
side by side) and ``"label"`` (k-means label order).

    python benchmarks/routing_layouts.py [--length 8192] [--heads 4] [--device cpu|cuda]

Ragged: the permuted order keeps the sequence length; a boundary tile shared by two clusters is kept
when any of its cluster pairs is kept (exact superset). Padded: every cluster is padded to a multiple of
the tile size, so the kept cluster pairs are exactly whole tiles, over a longer sequence.

Padded attention itself is NOT implemented in the package (padded keys would need a key-padding mask
in the kernel). The padded column is therefore a timing PROXY: the same kernel on the padded length with
exactly the kept pairs' tiles (random q/k/v of that length), plus the same gather/scatter. Both columns
count tiles exactly; the times come from ``sparse_attn.bench.timing.time_fn`` (CPU: torch.utils.benchmark
median; CUDA: triton do_bench median) in the same run.
"""

import argparse
import math

import torch

from sparse_attn import BlockSparseMask, sparse_attention
from sparse_attn.bench.machine import machine_header
from sparse_attn.bench.timing import time_fn
from sparse_attn.patterns import KMeansRouting, kmeans, planted_qkv
from sparse_attn.patterns.routing import _cluster_means, top_p_pairs


def padded_tiles(pat, mask, q, k):
    """``(tile map [B*Hq, NQB', NKB'] of the padded layout, padded lengths (Lq', Lk'))``."""
    (b, hq, _, d), hkv = q.shape, k.shape[1]
    xq, xk = q.flatten(0, 1).float(), k.flatten(0, 1).float()
    st = mask.state
    _, aq = kmeans(xq, pat.q_clusters, 0, metric=pat.metric, centroids=st.q_centroids.flatten(0, 1))
    _, ak = kmeans(xk, pat.k_clusters, 0, metric=pat.metric, centroids=st.k_centroids.flatten(0, 1))
    n_cq, n_ck = st.q_centroids.shape[2], st.k_centroids.shape[2]
    mq, size_q = _cluster_means(xq, aq, n_cq)
    mk, size_k = _cluster_means(xk, ak, n_ck)
    group = hq // hkv
    mk_q = mk.view(b, hkv, n_ck, d).repeat_interleave(group, 1).flatten(0, 1)
    sk_q = size_k.view(b, hkv, n_ck).repeat_interleave(group, 1).flatten(0, 1)
    pairs = top_p_pairs(mq, mk_q, sk_q, pat.top_p, d ** -0.5)  # [G, Cq, Ck]
    bm, bn = pat.block_pair
    tq, tk = torch.ceil(size_q / bm), torch.ceil(sk_q / bn)  # tiles per cluster
    n_tiles = (pairs.float() * tq[:, :, None] * tk[:, None, :]).sum((1, 2))  # [G]
    lq_pad, lk_pad = int(tq.sum(-1).max()) * bm, int(tk.sum(-1).max()) * bn
    return n_tiles, (lq_pad, lk_pad)


def random_tile_mask(n_tiles, lens, block, batch, heads, gen):
    """A BlockSparseMask over ``lens`` with (about) ``n_tiles[g]`` tiles per group, block-diagonal-ish rows."""
    nq, nk = math.ceil(lens[0] / block[0]), math.ceil(lens[1] / block[1])
    dens = (n_tiles / (nq * nk)).clamp(max=1.0).view(batch, heads, 1, 1)
    keep = torch.rand(batch, heads, nq, nk, generator=gen) < dens
    keep[..., 0] = True
    return BlockSparseMask.from_dense(keep, block, lens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(machine_header(dev))
    inp = planted_qkv("clusters", args.length, heads=args.heads, seed=0, dtype=dtype, device=dev)
    q, k, v = inp.q, inp.k, inp.v
    gen = torch.Generator().manual_seed(0)
    dense = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), dev)
    print(f"L={args.length} heads={args.heads} dtype={dtype} dense SDPA {dense:.1f} ms")
    print("clusters | label-order tiles | spectral tiles | padded tiles | padded Lq | label ms | spectral ms | "
          "padded-proxy ms | spectral/padded")
    for n_c in (16, 32, 64, 128, 256):
        pat = KMeansRouting(q_clusters=n_c, k_clusters=n_c, top_p=0.9, block_size=64)
        mask = pat.build(q, k)
        label = KMeansRouting(q_clusters=n_c, k_clusters=n_c, top_p=0.9, block_size=64,
                              cluster_order="label").build(q, k)
        ragged = int(mask.inner.counts.sum())
        n_tiles, lens = padded_tiles(pat, mask, q, k)
        pad_mask = random_tile_mask(n_tiles.cpu(), lens, pat.block_pair, q.shape[0], q.shape[1], gen).to(dev)
        qp, kp, vp = (torch.randn(q.shape[0], q.shape[1], n, q.shape[3], generator=gen).to(dev, dtype)
                      for n in (lens[0], lens[1], lens[1]))
        perm = mask.perm_q
        t_rag = time_fn(lambda: sparse_attention(q, k, v, mask), dev)
        t_label = time_fn(lambda: sparse_attention(q, k, v, label), dev)

        def padded():
            q.take_along_dim(perm[..., None], 2), k.take_along_dim(mask.perm_k[..., None], 2)
            v.take_along_dim(mask.perm_k[..., None], 2)  # the same gathers as the ragged path
            o = sparse_attention(qp, kp, vp, pad_mask)
            return o[:, :, :q.shape[2]].take_along_dim(mask.inv_q[..., None], 2)
        t_pad = time_fn(padded, dev)
        print(f"{n_c:8d} | {int(label.inner.counts.sum()):17d} | {ragged:14d} | {int(n_tiles.sum()):12d} | "
              f"{lens[0]:9d} | {t_label:8.1f} | {t_rag:11.1f} | {t_pad:15.1f} | {t_rag / t_pad:.2f}", flush=True)


if __name__ == "__main__":
    main()
