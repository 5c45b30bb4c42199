"""Layouts of paged KV caches (``[num_pages, page_size, Hkv, D]`` + ``block_table [B, max_pages]``)."""


def logical_cache(cache, block_table):
    """``[B, Hkv, L, D]`` view of a cache: contiguous as is; paged ``[pages, P, Hkv, D]`` gathered by
    ``block_table [B, max_pages]`` (``L = max_pages * P``; entries < 0 read page 0)."""
    if block_table is None:
        return cache
    pages = cache[block_table.long().clamp(min=0)]  # [B, max_pages, P, Hkv, D]
    return pages.flatten(1, 2).transpose(1, 2)
