"""Sparse decoding over a KV cache: attention of a few new queries over the selected pages of a cache.

- :mod:`.fwd`: the Triton split-K kernel and its launcher :func:`~.fwd.decode_fwd` (returns ``(o, lse)``);
- :mod:`.cpu`: the PyTorch path used for CPU tensors (same signature);
- :mod:`.merge`: the log-sum-exp merge of the split-K partial results.

The plain reference is ``sparse_attn_kernels.reference_decode`` (never imported from here).
"""
