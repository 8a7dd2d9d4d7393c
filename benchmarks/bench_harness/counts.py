"""What the benchmarks count: the FLOP convention, visible (q, kv) pairs and the tiles that hold
one, in closed form for none / causal and by evaluating a spec's expressions for the others."""

from __future__ import annotations

import math

FLOP_RULE = (
    "fwd = 2*B*Hq*pairs*D (QK^T) + 2*B*Hq*pairs*Dv (PV), i.e. 4*B*Hq*pairs*D when Dv = D; "
    "bwd = 2.5 * fwd; fwd_bwd = 3.5 * fwd; pairs = unmasked (q, kv) pairs per (batch, head)"
)

PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# Largest N at which the tiles section counts the visible pairs and the tiles holding one by
# evaluating the mask over every (q, kv) pair: on the CPU, and on a CUDA device.
COUNT_MAX_N = {"cpu": 4096, "cuda": 65536}


def unmasked_pairs(mask: str, n_q: int, n_k: int) -> int | None:
    """Visible (q, kv) pairs per (batch, head); None for a mask with no closed form."""
    if mask == "none":
        return n_q * n_k
    if mask == "causal":  # sum over q < n_q of min(q + 1, n_k)
        m = min(n_q, n_k)
        return m * (m + 1) // 2 + (n_q - m) * n_k
    return None


def min_tiles(mask: str, n_q: int, n_k: int, block_m: int, block_n: int) -> int | None:
    """Tiles holding at least one visible pair, per (batch, head), from the tiles' extreme indices
    (vectorised over query tiles); None for a mask with no rule here."""
    import numpy as np

    if n_q == 0 or n_k == 0:
        return 0
    n_mt, n_nt = -(-n_q // block_m), -(-n_k // block_n)
    if mask == "none":
        return n_mt * n_nt
    if mask == "causal":
        # query tile i sees keys [0, last_q + 1): tiles up to the one holding min(last_q, n_k - 1)
        last_q = np.minimum((np.arange(n_mt, dtype=np.int64) + 1) * block_m, n_q) - 1
        return int((-(-np.minimum(last_q + 1, n_k) // block_n)).sum())
    return None


def brute_min_tiles(visible, n_q: int, n_k: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(tiles with a visible pair, visible pairs) by evaluating `visible` on the full index grid:
    for checking the closed forms on small sizes only."""
    import numpy as np

    q = np.arange(n_q)[:, None]
    kv = np.arange(n_k)[None, :]
    vis = np.broadcast_to(np.asarray(visible(q, kv), dtype=bool), (n_q, n_k))
    n_mt, n_nt = -(-n_q // block_m), -(-n_k // block_n)
    padded = np.zeros((n_mt * block_m, n_nt * block_n), dtype=bool)
    padded[:n_q, :n_k] = vis
    per_tile = padded.reshape(n_mt, block_m, n_nt, block_n).any(axis=(1, 3))
    return int(per_tile.sum()), int(vis.sum())


def flops_fwd(batch: int, q_heads: int, pairs: int, d: int, dv: int) -> int:
    return 2 * batch * q_heads * pairs * d + 2 * batch * q_heads * pairs * dv


def expr_fns(mask: str, score_mod: str, decls: dict):
    """(visible, score) callables of a spec's mask and score_mod, on broadcast index tensors:
    visible(b, h, q, kv, q_len, kv_len, **params) -> bool tensor (None for mask none),
    score(s, b, h, q, kv, q_len, kv_len, **params) (None without a score_mod)."""
    import torch

    from attngen.language.expr import parse_expr, parse_params, to_torch

    parsed = parse_params(dict(decls)) if decls else {}
    visible = None
    if mask == "causal":
        visible = lambda b, h, q, kv, q_len, kv_len, **p: q >= kv  # noqa: E731
    elif mask != "none":
        fn = to_torch(parse_expr(mask, kind="mask", params=parsed))

        def visible(b, h, q, kv, q_len, kv_len, **p):
            out = fn(b, h, q, kv, q_len, kv_len, **p)
            return out if isinstance(out, torch.Tensor) else torch.full((), bool(out), device=q.device)
    score = None
    if score_mod:
        fs = to_torch(parse_expr(score_mod, kind="score_mod", params=parsed))
        score = lambda s, b, h, q, kv, q_len, kv_len, **p: fs(b, h, q, kv, q_len, kv_len, score=s, **p)  # noqa: E731
    return visible, score


def mask_counts(visible, n_q: int, n_k: int, blocks, *, params=None, device="cpu",
                chunk_elems: int = 1 << 24) -> tuple[list[int], int, int]:
    """([tiles holding a visible pair, per (BLOCK_M, BLOCK_N) of `blocks`], visible pairs, visible
    pairs above the diagonal kv > q) at batch 0, head 0, by evaluating the mask on every pair, a few
    query tiles at a time."""
    import torch

    params = params or {}
    kv = torch.arange(n_k, device=device).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    step = math.lcm(*(bm for bm, _ in blocks)) if blocks else 1
    rows = max(1, chunk_elems // max(1, n_k * step)) * step
    tiles, pairs, above = [0] * len(blocks), 0, 0
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        q = torch.arange(start, stop, device=device).view(-1, 1)
        vis = visible(zero, zero, q, kv, n_q, n_k, **params).expand(stop - start, n_k)
        pairs += int(vis.sum())
        above += int((vis & (kv > q)).sum())
        for i, (bm, bn) in enumerate(blocks):
            n_nt = -(-n_k // bn)
            pad = torch.zeros(-(-(stop - start) // bm) * bm, n_nt * bn, dtype=torch.bool, device=device)
            pad[: stop - start, :n_k] = vis
            tiles[i] += int(pad.view(-1, bm, n_nt, bn).any(dim=3).any(dim=1).sum())
    return tiles, pairs, above
