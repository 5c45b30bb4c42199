"""sparse_attn_kernels: Triton kernels for sparse attention and their PyTorch references.

This package depends on torch and triton only; it never imports ``sparse_attn``.
Triton is imported lazily by the kernel modules, so the references work without it.
"""

__version__ = "0.1.0"
