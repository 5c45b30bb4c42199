"""How much exact attention mass the keys a sketch selects hold, on SmolLM2's own queries and keys.

    python benchmarks/sketch_mass.py [--text essays] [--rank 16] [--positions 50]

One dense forward pass of SmolLM2-135M over ``--prompt`` + ``--decode`` tokens of a text records every layer's
post-RoPE queries and keys. At ``--positions`` evenly spaced positions past the prompt, per layer and kv head,
the keys a selection keeps (``--budget`` keys: the ``--sink`` first and ``--window`` newest ones plus the best
scored others, as ``loki``'s token selection) are scored three ways: the key basis fitted on the prompt's keys
(:func:`~sparse_attn.kvcache.fit_key_basis`), the query-aware maps fitted on the prompt's keys and queries
(:func:`~sparse_attn.kvcache.fit_sketch_maps`), and the exact scores. Printed: the mean share of the group's
exact softmax mass that the kept keys hold (1 = nothing lost), and its 10th percentile.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def record_qk(model, ids):
    """``{layer: (q [Hq, N, D], k [Hkv, N, D])}`` float64 of one dense forward pass over ``ids [1, N]``."""
    import torch.nn.functional as F
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    seen = {}

    def attend(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        seen[module.layer_idx] = (q[0].double(), k[0].double())
        group = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                           is_causal=True, scale=scaling)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register("record_qk", attend)
    AttentionMaskInterface.register("record_qk", sdpa_mask)
    model.set_attn_implementation("record_qk")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation("sdpa")
    return seen


def kept_mass(share, score, sink, window, budget):
    """Share of ``share [n]`` (exact, summed over the group) held by the forced keys + the best ``score`` others."""
    n = share.shape[0]
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:sink] = True
    forced[max(0, n - window - 1):] = True  # the window and the query's own key
    extra = max(0, budget - int(forced.sum()))
    best = score.masked_fill(forced, -math.inf).topk(min(extra, n)).indices
    return float(share[forced].sum() + share[best].sum())


def mass_rows(seen, prompt, positions, rank, sink, window, budget):
    from sparse_attn.kvcache import fit_key_basis, fit_sketch_maps

    out = {"key basis": [], "query-aware": [], "exact": []}
    for _, (q, k) in sorted(seen.items()):
        n_q, _, dim = q.shape
        n_kv = k.shape[0]
        group = n_q // n_kv
        qg = q.reshape(n_kv, group, -1, dim)  # [Hkv, G, N, D]
        keys = k[None, :, :prompt].float()  # [1, Hkv, L, D]
        valid = torch.ones(1, prompt, dtype=torch.bool)
        rows = qg[:, :, :prompt].reshape(n_kv, -1, dim)
        moment = rows.transpose(1, 2) @ rows / rows.shape[1]  # [Hkv, D, D]
        basis = fit_key_basis(keys, valid, rank).double()
        kmap, qmap = (m.double() for m in fit_sketch_maps(keys, valid, rank, moment))
        maps = {"key basis": (basis, basis), "query-aware": (qmap, kmap)}
        for h in range(n_kv):
            for t in positions:
                qt, kt = qg[h, :, t], k[h, :t + 1]  # [G, D], [t+1, D]
                share = torch.softmax(qt @ kt.T / math.sqrt(dim), -1).sum(0) / group
                out["exact"].append(kept_mass(share, share, sink, window, budget))
                for name, (qm, km) in maps.items():
                    approx = (qt @ qm[h]) @ (kt @ km[h]).T / math.sqrt(dim)
                    score = torch.softmax(approx, -1).sum(0)
                    out[name].append(kept_mass(share, score, sink, window, budget))
    return {name: torch.tensor(v) for name, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="essays", help="a text of benchmarks/lm_texts.py")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=600)
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=int, default=512, help="keys kept (1/8 of a 4096-key cache: 512)")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode import _smollm2

    model, ids = _smollm2(args.text)
    ids = ids[:, :args.prompt + args.decode]
    seen = record_qk(model, ids)
    last = ids.shape[1] - 1
    step = max(1, (last - args.prompt) // max(1, args.positions))
    positions = list(range(args.prompt, last + 1, step))[:args.positions]
    rows = mass_rows(seen, args.prompt, positions, args.rank, args.sink, args.window, args.budget)
    print(f"text {args.text}, prompt {args.prompt}, {len(positions)} positions, rank {args.rank}, "
          f"{args.budget} keys ({args.sink} sink + {args.window} window)")
    for name, v in rows.items():
        print(f"  {name:12s} kept mass {v.mean():.4f} (p10 {v.quantile(0.1):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
