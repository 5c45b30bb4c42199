"""Scoring kernels for content-based patterns (Triton), twins of ``reference_scoring``.

``pool``: block mean pooling and pooled block scores; ``mass``: row LSE and per-tile
attention mass ``sum exp(s - lse)``; ``vertical_slash``: MInference column/diagonal sums.
"""
