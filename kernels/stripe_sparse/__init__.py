"""Stripe-sparse (vertical + slash) attention: forward kernel (``fwd``), autograd op (``op``)."""
