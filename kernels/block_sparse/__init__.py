"""Block-sparse attention: forward kernel (``fwd``), autograd op (``op``)."""
