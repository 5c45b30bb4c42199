"""A tiny random-weight Llama (4 query heads, 2 kv heads, head dim 16) for the transformers integration tests."""

import torch


def tiny_llama(num_layers: int = 2, seed=None):
    """``LlamaForCausalLM`` in eval mode (``seed``: set torch's seed first, for reproducible weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()
