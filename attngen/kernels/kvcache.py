"""The spec-independent side of KV-cache decoding (a generated module's attention_with_kvcache):
argument checks, the in-place append of new keys and values, and the split count.

Layouts (any strides):
  contiguous  k_cache [B, Hkv, S, D], v_cache [B, Hkv, S, Dv]; key j of batch b at [b, :, j];
  paged       k_cache [num_pages, Hkv, page_size, D], v_cache [num_pages, Hkv, page_size, Dv],
              block_table int32 [B, max_pages]; key j of batch b at
              [block_table[b, j // page_size], :, j % page_size]; page_size a power of two >= 16.
cache_seqlens int32 [B] counts the tokens already in the cache; new keys k [B, Hkv, Nnew, D] and
values v [B, Hkv, Nnew, Dv] go to positions cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1.

check_kvcache validates everything (shapes, dtypes, devices, lengths against the cache, the block
table's entries) before append_kv_ writes anything, so a rejected call leaves the cache as it was.
The checks read cache_seqlens and the used part of block_table on the host (one synchronisation).

No Triton kernel here: the append is a torch scatter; the attention kernel is the module's own
(_decode_kernel, one per spec) and the split results are merged by attngen.kernels.merge.
"""

from __future__ import annotations

import numbers

import torch

from attngen import runtime as _rt

MIN_PAGE = 16


def _tensor(name: str, fn: str, t, dims: int, what: str):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be {dims}-D {what}, got shape {tuple(t.shape)}")


def _same(name: str, fn: str, t: torch.Tensor, q: torch.Tensor, dtype=None):
    dtype = q.dtype if dtype is None else dtype
    if t.dtype != dtype:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype}; expected {dtype}" + (" (q's dtype)" if dtype == q.dtype else ""))
    if t.device != q.device:
        raise ValueError(f"{fn}: {name} is on {t.device}; expected q's device {q.device}")


def check_kvcache(
    fn: str, q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_splits, *,
    kv_heads: int, head_dim: int, v_head_dim: int, values: bool = True,
) -> tuple[int, list[int], int]:
    """Validate the cache arguments of attention_with_kvcache (q itself checked by the caller).
    Returns (Nnew, the lengths L_b = cache_seqlens[b] + Nnew, page_size or 0 for a contiguous
    cache). Raises ValueError naming the argument. values=False checks only what needs no
    tensor's values (shapes, dtypes, devices; the lengths come back empty): a module's wrapper
    does that, and its op, which reads cache_seqlens and the block table, checks again with values."""
    b = q.shape[0]
    for name, t, d in (("k_cache", k_cache, head_dim), ("v_cache", v_cache, v_head_dim)):
        _tensor(name, fn, t, 4, "[B, Hkv, S, D] or [num_pages, Hkv, page_size, D]")
        _same(name, fn, t, q)
        if t.shape[1] != kv_heads:
            raise ValueError(f"{fn}: {name} has {t.shape[1]} heads (dim 1); expected {kv_heads} KV heads")
        if t.shape[3] != d:
            raise ValueError(f"{fn}: {name} has head dim {t.shape[3]} (dim 3); expected {d}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"{fn}: v_cache has shape {tuple(v_cache.shape)}; its first three dims must be k_cache's {tuple(k_cache.shape[:3])}")
    _tensor("cache_seqlens", fn, cache_seqlens, 1, "[B]")
    _same("cache_seqlens", fn, cache_seqlens, q, torch.int32)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"{fn}: cache_seqlens has {cache_seqlens.shape[0]} entries; expected {b} (q's batch)")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: give both k and v (the new keys and values), or neither")
    n_new = 0
    if k is not None:
        for name, t, d in (("k", k, head_dim), ("v", v, v_head_dim)):
            _tensor(name, fn, t, 4, "[B, Hkv, Nnew, D]")
            _same(name, fn, t, q)
            want = (b, kv_heads, k.shape[2], d)
            if tuple(t.shape) != want:
                raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected {want} ([B, Hkv, Nnew, D])")
        n_new = k.shape[2]
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 1):
        raise ValueError(f"{fn}: num_splits must be None or an int >= 1, got {num_splits!r}")
    seqlens = [int(x) for x in cache_seqlens.tolist()] if values else []
    for i, s in enumerate(seqlens):
        if s < 0:
            raise ValueError(f"{fn}: cache_seqlens[{i}] = {s} is negative")
    lengths = [s + n_new for s in seqlens]
    longest = max(lengths, default=0)
    if longest >= 2**30:
        raise ValueError(f"{fn}: cache_seqlens + Nnew = {longest} is too long (kernel positions are 32-bit)")
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"{fn}: k_cache has batch {k_cache.shape[0]}; expected {b} (q's batch; pass block_table for a paged cache)")
        cap = k_cache.shape[2]
        for i, n in enumerate(lengths):
            if n > cap:
                raise ValueError(
                    f"{fn}: k_cache holds {cap} positions but batch {i} needs cache_seqlens[{i}] + Nnew = {n}: the cache is too small"
                )
        return n_new, lengths, 0
    _tensor("block_table", fn, block_table, 2, "[B, max_pages]")
    _same("block_table", fn, block_table, q, torch.int32)
    if block_table.shape[0] != b:
        raise ValueError(f"{fn}: block_table has {block_table.shape[0]} rows; expected {b} (q's batch)")
    page = k_cache.shape[2]
    if page < MIN_PAGE or page & (page - 1):
        raise ValueError(f"{fn}: k_cache's page size (dim 2) is {page}; expected a power of two >= {MIN_PAGE}")
    num_pages, max_pages = k_cache.shape[0], block_table.shape[1]
    for i, n in enumerate(lengths):
        used = -(-n // page)
        if used > max_pages:
            raise ValueError(
                f"{fn}: block_table has {max_pages} pages per row but batch {i} needs {used} "
                f"(cache_seqlens[{i}] + Nnew = {n}, page size {page}): the block table is too short"
            )
        if used:
            row = block_table[i, :used]
            bad = (row < 0) | (row >= num_pages)
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{fn}: block_table[{i}, {j}] = {int(row[j])} is outside the cache's {num_pages} pages (k_cache dim 0)"
                )
    return n_new, lengths, page


def append_kv_(k_cache, v_cache, cache_seqlens, k, v, block_table, page_size: int) -> None:
    """Write k [B, Hkv, Nnew, D] and v into the caches in place at positions cache_seqlens[b] ...,
    through the block table when paged (arguments checked by check_kvcache)."""
    b, _, n_new, _ = k.shape
    if b == 0 or n_new == 0:
        return
    dev = k_cache.device
    pos = cache_seqlens.to(dev, torch.int64)[:, None] + torch.arange(n_new, device=dev)  # [B, Nnew]
    if block_table is None:
        rows = torch.arange(b, device=dev)[:, None].expand(b, n_new)
        slot = pos
    else:
        rows = torch.gather(block_table.to(torch.int64), 1, pos // page_size)
        slot = pos % page_size
    # [B, Nnew] index pairs around the head dim: the indexed view is [B, Nnew, Hkv, D]
    with torch.no_grad():
        k_cache[rows, :, slot] = k.transpose(1, 2)
        v_cache[rows, :, slot] = v.transpose(1, 2)


def num_splits(num: int | None, programs: int, longest: int, block_n: int, device) -> int:
    """The split count: `num` when given; else 1 under the interpreter, and on a GPU enough splits
    for `programs` (B x Hkv x row tiles) to fill the streaming multiprocessors once, with at least
    4 key tiles per split of the longest sequence, at most 64."""
    if num is not None:
        return int(num)
    if _rt.INTERPRET or programs <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    tiles = -(-longest // block_n)
    return max(1, min(-(-sms // programs), tiles // 4, 64))
