"""Context parallelism: one attention over a sequence sharded across the ranks of a torch.distributed
process group, with a generated dense module's kernels.

Every rank holds a shard of the sequence: q [B, Hq, N/P, D], k [B, Hkv, N/P, D], v [B, Hkv, N/P, Dv]
(P ranks). The sequence is cut into equal chunks; `layout` says which a rank holds:

* "contiguous": P chunks, rank r holds chunk r (positions r*N/P ...);
* "zigzag": 2P chunks, rank r holds chunks r and 2P-1-r, in that order (under a causal mask every
  rank then has the same work).

`shard` and `unshard` convert a full tensor to and from a layout.

Modes of `context_parallel_attention`:

* "ring": the K/V shards travel around the ring (rank r sends to r+1, receives from r-1) with
  point-to-point ops posted before each step's compute, so the transfer overlaps it where the
  backend allows. At each of the P steps every (query chunk, key chunk) pair is one call of the
  module's forward kernel at the chunks' true positions (q_offset, kv_offset), and the partial
  results are merged by their lse (a float32 torch expression). A pair that the spec's mask hides
  wholly (decided from the module's own tile bounds, `attngen.planning.classify.classify_tiles`
  with one tile per chunk, and for an id-equality mask such as `document(doc)` from the id ranges
  of the two chunks) is not computed; a step whose every pair is hidden computes nothing.
  Backward: with the global o, lse and dO of the local queries, the FlashAttention-2 backward of a
  pair gives exactly that pair's contribution to dq, dk, dv; the K/V shards go around the ring
  again and their dK/dV accumulators (float32) travel with them, each rank adding its pairs'
  contributions, until they reach their owner: the order of every sum is fixed by P (deterministic).
* "allgather": K and V are all-gathered (in sequence order), and each local query chunk is one
  kernel call over all keys at its offset (one call for "contiguous", two for "zigzag"). Backward:
  each rank's dK/dV over the whole sequence are sent to the owners of each chunk, which add them in
  rank order (deterministic).

Gradients of learnable tensor parameters (float tensors the score_mod reads) are summed over a
rank's pairs, then over the ranks in rank order; every rank gets the same value.

Parameters are passed whole on every rank (not sharded): a tensor indexed by position (document
ids [B, N]) is indexed by global positions, and scalars must agree across ranks.

Before any point-to-point op, every call exchanges (all_gather_object) each rank's shapes, dtypes,
parameters and the result of its own checks, so that a bad input on any rank raises the same
ValueError on every rank instead of leaving the others waiting.

Scope: dense modules only (NSA modules are out of scope), and masks and score_mods that do not read
`q_len` / `kv_len` (a shard's lengths are not the sequence's; "allgather" serves `kv_len`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.distributed as dist

from attngen import runtime as _rt

MODES = ("ring", "allgather")
LAYOUTS = ("contiguous", "zigzag")

__all__ = ["context_parallel_attention", "shard", "unshard", "chunk_count", "rank_chunks", "pair_visibility",
           "MODES", "LAYOUTS"]


# --------------------------------------------------------------------------- layouts


def chunk_count(layout: str, world_size: int) -> int:
    """How many equal chunks the sequence is cut into: P ("contiguous") or 2P ("zigzag")."""
    _check_layout(layout)
    return world_size if layout == "contiguous" else 2 * world_size


def rank_chunks(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """The chunks rank `rank` holds, in the order its shard holds them."""
    _check_layout(layout)
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("attngen.distributed: torch.distributed is not initialised (call init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _global(group, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


def shard(x: torch.Tensor, dim: int, layout: str = "zigzag", group=None) -> torch.Tensor:
    """This rank's shard of the full tensor `x` along `dim` (a copy): its chunks of the layout,
    concatenated. ValueError when x's length along dim is not a multiple of the chunk count."""
    p, r = _group_info(group)
    c = chunk_count(layout, p)
    n = x.shape[dim]
    if n % c:
        raise ValueError(f"shard: length {n} along dim {dim} is not divisible by the {c} chunks of layout {layout!r} over {p} ranks")
    parts = x.chunk(c, dim) if n else [x] * c
    return torch.cat([parts[i] for i in rank_chunks(layout, r, p)], dim).contiguous()


def unshard(x: torch.Tensor, dim: int, layout: str = "zigzag", group=None) -> torch.Tensor:
    """The full tensor from every rank's shard `x` (a collective: every rank calls it, and gets the
    whole tensor). No gradient. ValueError on every rank when the shards' shapes differ, or a
    shard's length along dim does not split into the layout's chunks per rank."""
    p, r = _group_info(group)
    per_rank = chunk_count(layout, p) // p
    shapes = [None] * p
    dist.all_gather_object(shapes, (tuple(x.shape), str(x.dtype)), group=group)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"unshard: shards differ across ranks: {shapes}")
    n = x.shape[dim]
    if n % per_rank:
        raise ValueError(f"unshard: a shard's length {n} along dim {dim} does not split into {per_rank} chunks (layout {layout!r})")
    x = x.detach().contiguous()
    gathered = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(gathered, x, group=group)
    chunks = [None] * (p * per_rank)
    for j, t in enumerate(gathered):
        for i, c in enumerate(rank_chunks(layout, j, p)):
            chunks[c] = t.narrow(dim, i * (n // per_rank), n // per_rank)
    return torch.cat(chunks, dim)


# --------------------------------------------------------------------------- what a module's spec says


@dataclass(frozen=True)
class _SpecInfo:
    rule: object  # attngen.planning.masks.MaskRule
    lengths: frozenset  # 'q_len' / 'kv_len' where the mask or score_mod reads them
    ids: str | None  # tensor T of an id-equality mask (document(T)), for the chunk-level skip
    per_bh: bool  # the tile bounds read i_b or i_h


_INFO: dict = {}


def _spec_info(module) -> _SpecInfo:
    key = (getattr(module, "NAME", None), getattr(module, "SPEC_SHA256", None), getattr(module, "MASK", None))
    if key in _INFO:
        return _INFO[key]
    from attngen.language.expr import parse_expr, parse_params
    from attngen.planning.classify import id_equality
    from attngen.planning.masks import MASK_RULES, expr_rule

    decls = parse_params(dict(module.PARAMS)) if module.PARAMS else {}
    lengths, ids = set(), None
    if module.MASK in MASK_RULES:
        rule = MASK_RULES[module.MASK]
    else:
        expr = parse_expr(module.MASK, kind="mask", params=decls)
        rule = expr_rule(expr)
        lengths |= expr.symbols & {"q_len", "kv_len"}
        ids = id_equality(expr.sympy)
    if getattr(module, "SCORE_MOD", ""):
        lengths |= parse_expr(module.SCORE_MOD, kind="score_mod", params=decls).symbols & {"q_len", "kv_len"}
    texts = [t for b in (rule.fwd,) for t in (b.start, b.end, b.visit, b.full_start, b.full_end, *(e for _, e in b.prelude))]
    per_bh = any("i_b" in t or "i_h" in t for t in texts)
    info = _SpecInfo(rule, frozenset(lengths), ids, per_bh)
    _INFO[key] = info
    return info


def _serves(module, mode: str) -> str | None:
    """Why `mode` cannot serve `module`, or None."""
    name = getattr(module, "NAME", type(module).__name__)
    if not all(hasattr(module, a) for a in ("_forward", "MASK", "PARAMS", "Q_HEADS")):
        return (f"{name} is not a dense attngen module (NSA modules are out of scope for context parallelism; "
                "pass a dense module or an NSA module's _cmp / _win branch)")
    info = _spec_info(module)
    unserved = info.lengths if mode == "ring" else info.lengths & {"q_len"}
    if unserved:
        return (f"{name}'s mask or score_mod reads {', '.join(sorted(unserved))}, which a shard's kernel call "
                f"cannot see as the whole sequence's in mode {mode!r}")
    return None


def pair_visibility(module, *, world_size: int, n: int, layout: str, batch: int = 1, **params) -> list[list[bool]]:
    """[query chunk][key chunk]: False where the spec's mask hides every (query, key) pair of the two
    chunks (chunks of the sequence of n positions cut as `layout` over world_size ranks), so that
    the pair need not be computed. Decided from the module's tile bounds (one tile per chunk, the
    kernels' own range statements) and, for an id-equality mask, from the chunks' id ranges;
    True when in doubt. Scalar parameters by name; tensors indexed by position are read whole."""
    c = chunk_count(layout, world_size)
    if n % c:
        raise ValueError(f"pair_visibility: n = {n} is not divisible by {c} chunks")
    return _visibility(module, _spec_info(module), c, n // c, batch, params)


_BOUNDS_VIS: dict = {}  # (spec, chunks, size, batch, scalars) -> the bounds' verdicts: one evaluation per shape


def _visibility(module, info: _SpecInfo, chunks: int, size: int, batch: int, params: dict) -> list[list[bool]]:
    from attngen.planning.classify import classify_tiles

    scalars = {k: v for k, v in params.items() if not isinstance(v, torch.Tensor)}
    bh = [(b, h) for b in range(batch) for h in range(module.Q_HEADS)] if info.per_bh else [(0, 0)]

    def bounds_visible(qc, kc):
        for b, h in bh:
            try:
                t = classify_tiles(info.rule, size, size, size, size, params=scalars, b=b, h=h,
                                   q_offset=qc * size, kv_offset=kc * size)
            except (ValueError, NameError, KeyError, TypeError, ZeroDivisionError):
                return True  # bounds we cannot evaluate here: compute the pair
            if t.fwd[0][0] != "empty":
                return True
        return False

    key = (info, chunks, size, batch if info.per_bh else 0, tuple(sorted(scalars.items())))
    vis = _BOUNDS_VIS.get(key)
    if vis is None:
        vis = [[bounds_visible(qc, kc) for kc in range(chunks)] for qc in range(chunks)]
        if len(_BOUNDS_VIS) > 256:
            _BOUNDS_VIS.clear()
        _BOUNDS_VIS[key] = vis
    ids = params.get(info.ids) if info.ids else None
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel() and not ids.is_floating_point():
        # positions past T read 0 in the kernels; rows past T's batch read 0 too
        rows = torch.zeros(batch, chunks * size, dtype=torch.int64, device=ids.device)
        nb, nn = min(batch, ids.shape[0]), min(chunks * size, ids.shape[1])
        rows[:nb, :nn] = ids[:nb, :nn]
        per = rows.view(batch, chunks, size)
        lo, hi = per.amin(2), per.amax(2)  # [B, chunks]
        meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # [B, q chunk, k chunk]
        meet = meet.any(0).tolist()
        vis = [[vis[a][b] and meet[a][b] for b in range(chunks)] for a in range(chunks)]
    return vis


# --------------------------------------------------------------------------- the call


@dataclass
class _Plan:
    module: object
    group: object
    p: int
    rank: int
    layout: str
    size: int  # rows per chunk
    scale: float
    params: tuple  # the module's parameter tuple (declaration order)
    vis: list  # [query chunk][key chunk]
    learn: tuple  # indices into params of learnable tensors that want a gradient

    def chunks(self, r: int) -> tuple[int, ...]:
        return rank_chunks(self.layout, r, self.p)

    @property
    def next(self) -> int:
        return _global(self.group, (self.rank + 1) % self.p)

    @property
    def prev(self) -> int:
        return _global(self.group, (self.rank - 1) % self.p)


def _local_checks(module, q, k, v, mode, layout, scale, params) -> tuple[str | None, tuple, float]:
    name = getattr(module, "NAME", type(module).__name__)
    if mode not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {mode!r}", (), 0.0
    if layout not in LAYOUTS:
        return f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", (), 0.0
    why = _serves(module, mode)
    if why:
        return why, (), 0.0
    try:
        _rt.check_inputs(name, q, k, v, q_heads=module.Q_HEADS, kv_heads=module.KV_HEADS, head_dim=module.HEAD_DIM,
                         v_head_dim=module.V_HEAD_DIM, dtypes=module.DTYPES)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{name}: q's shard has {q.shape[2]} positions, k's {k.shape[2]}: shards hold the same positions")
        ptuple = _rt.check_params(name, module.PARAMS, params, {k_: 1 for k_ in params if k_ not in module.PARAMS},
                                  device=q.device)
        scale = module.HEAD_DIM ** -0.5 if scale is None else float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"{name}: scale must be finite, got {scale}")
        tensors = (q, k, v, *(t for t in ptuple if isinstance(t, torch.Tensor) and t.is_floating_point()))
        if not hasattr(module, "_backward") and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ValueError(f"{name} was built with backward: false; call it under torch.no_grad() or without "
                             "tensors that require grad")
    except (ValueError, TypeError) as e:
        return str(e), (), 0.0
    return None, ptuple, scale


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype))
    return x if isinstance(x, (int, float, str, bool, type(None))) else repr(type(x))


def context_parallel_attention(module, q, k, v, *, group=None, mode: str = "ring", layout: str = "zigzag",
                               scale: float | None = None, return_lse: bool = False, **params):
    """Attention of a generated dense module over a sequence sharded across the ranks of `group`
    (default: the whole world); every rank calls it with its shard.

    q [B, Hq, N/P, D], k [B, Hkv, N/P, D], v [B, Hkv, N/P, Dv]: this rank's positions in `layout`
    order ("contiguous" | "zigzag", see `shard`); `mode` "ring" | "allgather"; `params` the module's
    mask / score_mod parameters, whole (tensors indexed by global position), equal on every rank.
    Returns this rank's o [B, Hq, N/P, Dv] in q's dtype (and lse [B, Hq, N/P] float32 with
    return_lse=True), equal up to rounding to the rows of single-device attention over the whole
    sequence; differentiable in q, k, v and the learnable tensor parameters (their gradients
    summed over the ranks). Raises the same ValueError on every rank for a bad input on any rank
    (shapes that differ across ranks, a shard length the layout cannot split, a module the mode
    cannot serve)."""
    p, rank = _group_info(group)
    try:
        err, ptuple, scale_f = _local_checks(module, q, k, v, mode, layout, scale, params)
    except Exception as e:  # anything unexpected still reaches the exchange below: no rank is left waiting
        err, ptuple, scale_f = f"{type(e).__name__}: {e}", (), 0.0
    if err is None and layout == "zigzag" and q.shape[2] % 2:
        err = (f"layout 'zigzag' splits the sequence into {2 * p} chunks: each rank's shard holds two, so its "
               f"length must be even, got {q.shape[2]} (the sequence length must be divisible by {2 * p})")
    if err is None and q.shape[2] * p > _rt.POSITION_MAX:
        err = f"a sequence of {q.shape[2] * p} positions exceeds {_rt.POSITION_MAX} (32-bit positions)"
    mine = {
        "mode": mode, "layout": layout, "module": getattr(module, "NAME", None),
        "shapes": tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (q, k, v)),
        "dtype": str(getattr(q, "dtype", None)), "scale": _describe(scale),
        "params": {n: _describe(x) for n, x in sorted(params.items())}, "error": err,
    }
    everyone = [None] * p
    dist.all_gather_object(everyone, mine, group=group)
    errors = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"]]
    if errors:
        raise ValueError("context_parallel_attention: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
    for key in ("mode", "layout", "module", "shapes", "dtype", "scale", "params"):
        values = [e[key] for e in everyone]
        if any(x != values[0] for x in values):
            raise ValueError(f"context_parallel_attention: ranks disagree on {key}: "
                             + ", ".join(f"rank {r}: {x}" for r, x in enumerate(values)))

    info = _spec_info(module)
    n_local = q.shape[2]
    per_rank = chunk_count(layout, p) // p
    size = n_local // per_rank
    vis = _visibility(module, info, chunk_count(layout, p), size, q.shape[0], params)
    grad_idx = dict(getattr(module, "_GRAD_PARAMS", {}))
    learn_tensors = [ptuple[i] for i in grad_idx.values()]
    plan = _Plan(module, group, p, rank, layout, size, scale_f, ptuple, vis, tuple(grad_idx.values()))
    fn = _Ring if mode == "ring" else _AllGather
    o, lse = fn.apply(plan, q, k, v, *learn_tensors)
    return (o, lse) if return_lse else o


# --------------------------------------------------------------------------- helpers


def _rows(t, i, size):
    return t[:, :, i * size:(i + 1) * size]


def _merge(acc, o, lse):
    """Running LSE merge in float32: acc (o float32, lse) with a new part (o, lse)."""
    o = o.float()
    if acc is None:
        return torch.where((lse > float("-inf"))[..., None], o, 0.0), lse
    ao, al = acc
    m = torch.maximum(al, lse)
    m = torch.where(m == float("-inf"), 0.0, m)
    wa, wb = torch.exp(al - m), torch.exp(lse - m)
    total = wa + wb
    out = ao * wa[..., None] + torch.where((wb > 0)[..., None], o * wb[..., None], 0.0)
    out = out / torch.where(total > 0, total, 1.0)[..., None]
    return out, torch.where(total > 0, m + torch.log(torch.where(total > 0, total, 1.0)), float("-inf"))


def _exchange(plan: _Plan, send: tuple, recv: tuple) -> list:
    """Post send of `send` to the next rank and receive of `recv` from the previous one."""
    if plan.p == 1:
        for s, r in zip(send, recv):
            r.copy_(s)
        return []
    ops = [dist.P2POp(dist.isend, t, plan.next, plan.group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, plan.prev, plan.group) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs:
        r.wait()


def _empty_out(q, module, size):
    b = q.shape[0]
    return (torch.zeros(b, module.Q_HEADS, size, module.V_HEAD_DIM, dtype=torch.float32, device=q.device),
            torch.full((b, module.Q_HEADS, size), float("-inf"), dtype=torch.float32, device=q.device))


def _sum_over_ranks(plan: _Plan, grads: list) -> list:
    """Sum of each rank's tensors, added in rank order (the same bits on every rank)."""
    out = []
    for g in grads:
        parts = [torch.empty_like(g) for _ in range(plan.p)]
        dist.all_gather(parts, g.contiguous(), group=plan.group)
        total = parts[0].clone()
        for t in parts[1:]:
            total += t
        out.append(total)
    return out


def _backward_call(plan: _Plan, want: bool, qi, kj, vj, oi, lsei, doi, dlsei, q_off, kv_off):
    extra = {"param_grads": want} if plan.learn else {}
    return plan.module._backward(qi, kj, vj, oi, lsei, doi, dlsei, plan.scale, plan.params, q_off, kv_off, **extra)


def _wants_params(plan: _Plan, ctx) -> bool:
    return bool(plan.learn) and any(ctx.needs_input_grad[4:])


def _param_grads_out(plan: _Plan, ctx, sums):
    """The autograd outputs for the learnable tensors: the rank-order sum, or None."""
    if not plan.learn:
        return ()
    want = ctx.needs_input_grad[4:]
    if not any(want):
        return (None,) * len(plan.learn)
    totals = _sum_over_ranks(plan, sums)
    return tuple(t.to(plan.params[i].dtype) if w else None for t, i, w in zip(totals, plan.learn, want))


# --------------------------------------------------------------------------- ring


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, *learn):
        mod, size = plan.module, plan.size
        mine = plan.chunks(plan.rank)
        acc = [None] * len(mine)
        kv = (k.contiguous(), v.contiguous())
        for s in range(plan.p):
            src = (plan.rank - s) % plan.p
            reqs, nxt = [], None
            if s < plan.p - 1:  # the next step's shard travels while this one computes
                nxt = (torch.empty_like(kv[0]), torch.empty_like(kv[1]))
                reqs = _exchange(plan, kv, nxt)
            for j, kc in enumerate(plan.chunks(src)):
                for i, qc in enumerate(mine):
                    if not plan.vis[qc][kc]:
                        continue
                    o, lse = mod._forward(_rows(q, i, size), _rows(kv[0], j, size), _rows(kv[1], j, size),
                                          plan.scale, plan.params, qc * size, kc * size)
                    acc[i] = _merge(acc[i], o, lse)
            _wait(reqs)
            if nxt is not None:
                kv = nxt
        parts = [a if a is not None else _empty_out(q, mod, size) for a in acc]
        o = torch.cat([a[0] for a in parts], 2).to(q.dtype)
        lse = torch.cat([a[1] for a in parts], 2).contiguous()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        plan: _Plan = ctx.plan
        q, k, v, o, lse = ctx.saved_tensors
        size = plan.size
        do = torch.zeros_like(o) if do is None else do
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        mine = plan.chunks(plan.rank)
        q_rows = [(_rows(q, i, size), _rows(o, i, size), _rows(lse, i, size).contiguous(), _rows(do, i, size),
                   _rows(dlse, i, size).contiguous()) for i in range(len(mine))]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        want = _wants_params(plan, ctx)
        sums = [torch.zeros(plan.params[i].shape, dtype=torch.float32, device=q.device) for i in plan.learn] if want else []
        kv = (k.contiguous(), v.contiguous())
        dkv, pending = None, []
        for s in range(plan.p):
            src = (plan.rank - s) % plan.p
            reqs, nxt = [], None
            if s < plan.p - 1:
                nxt = (torch.empty_like(kv[0]), torch.empty_like(kv[1]))
                reqs = _exchange(plan, kv, nxt)
            part_k = torch.zeros(kv[0].shape, dtype=torch.float32, device=q.device)
            part_v = torch.zeros(kv[1].shape, dtype=torch.float32, device=q.device)
            for j, kc in enumerate(plan.chunks(src)):
                for i, qc in enumerate(mine):
                    if not plan.vis[qc][kc]:
                        continue
                    g = _backward_call(plan, want, q_rows[i][0], _rows(kv[0], j, size), _rows(kv[1], j, size),
                                       *q_rows[i][1:], qc * size, kc * size)
                    _rows(dq, i, size).add_(g[0])
                    _rows(part_k, j, size).add_(g[1])
                    _rows(part_v, j, size).add_(g[2])
                    for t, gp in zip(sums, g[3:]):
                        t.add_(gp)
            # the accumulators of this step's shard arrive from the previous rank (step 0: start at 0)
            _wait(pending)
            if dkv is None:
                dkv = (part_k, part_v)
            else:
                dkv[0].add_(part_k)
                dkv[1].add_(part_v)
            _wait(reqs)
            if nxt is not None:
                kv = nxt
            # pass them on (overlapping the next step's compute): after the last step they reach their owner
            incoming = (torch.empty_like(dkv[0]), torch.empty_like(dkv[1]))
            pending = _exchange(plan, dkv, incoming)
            sending, dkv = dkv, incoming  # the sent buffers stay referenced until their sends complete
        _wait(pending)
        del sending
        dk, dv = dkv
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *_param_grads_out(plan, ctx, sums))


# --------------------------------------------------------------------------- all-gather


def _gather_sequence(plan: _Plan, t):
    """[B, H, N, D] in sequence order from every rank's [B, H, N/P, D] shard."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(plan.p)]
    dist.all_gather(parts, t, group=plan.group)
    chunks = [None] * chunk_count(plan.layout, plan.p)
    for r, x in enumerate(parts):
        for j, c in enumerate(plan.chunks(r)):
            chunks[c] = _rows(x, j, plan.size)
    return torch.cat(chunks, 2)


def _scatter_sum(plan: _Plan, full):
    """Every rank's full-sequence float32 gradient [B, H, N, D] -> this rank's shard of their sum,
    added in rank order."""
    def shard_of(r):
        return torch.cat([_rows(full, c, plan.size) for c in plan.chunks(r)], 2).contiguous()

    recv = [None] * plan.p
    ops = []
    for r in range(plan.p):
        if r == plan.rank:
            recv[r] = shard_of(r)
            continue
        recv[r] = torch.empty_like(shard_of(plan.rank))
        ops.append(dist.P2POp(dist.isend, shard_of(r), _global(plan.group, r), plan.group))
        ops.append(dist.P2POp(dist.irecv, recv[r], _global(plan.group, r), plan.group))
    _wait(dist.batch_isend_irecv(ops) if ops else [])
    total = recv[0].clone()
    for t in recv[1:]:
        total += t
    return total


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, *learn):
        mod, size = plan.module, plan.size
        kf, vf = _gather_sequence(plan, k), _gather_sequence(plan, v)
        outs = []
        for i, qc in enumerate(plan.chunks(plan.rank)):
            if any(plan.vis[qc]):
                o, lse = mod._forward(_rows(q, i, size), kf, vf, plan.scale, plan.params, qc * size, 0)
                outs.append((o, lse))
            else:
                e = _empty_out(q, mod, size)
                outs.append((e[0].to(q.dtype), e[1]))
        o = torch.cat([x[0] for x in outs], 2)
        lse = torch.cat([x[1] for x in outs], 2).contiguous()
        ctx.save_for_backward(q, kf, vf, o, lse)
        ctx.plan = plan
        ctx.kv_dtypes = (k.dtype, v.dtype)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        plan: _Plan = ctx.plan
        q, kf, vf, o, lse = ctx.saved_tensors
        size = plan.size
        do = torch.zeros_like(o) if do is None else do
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(vf.shape, dtype=torch.float32, device=q.device)
        want = _wants_params(plan, ctx)
        sums = [torch.zeros(plan.params[i].shape, dtype=torch.float32, device=q.device) for i in plan.learn] if want else []
        for i, qc in enumerate(plan.chunks(plan.rank)):
            if not any(plan.vis[qc]):
                continue
            g = _backward_call(plan, want, _rows(q, i, size), kf, vf, _rows(o, i, size), _rows(lse, i, size).contiguous(),
                               _rows(do, i, size), _rows(dlse, i, size).contiguous(), qc * size, 0)
            _rows(dq, i, size).add_(g[0])
            dk.add_(g[1])
            dv.add_(g[2])
            for t, gp in zip(sums, g[3:]):
                t.add_(gp)
        dk, dv = _scatter_sum(plan, dk), _scatter_sum(plan, dv)
        kd, vd = ctx.kv_dtypes
        return (None, dq.to(q.dtype), dk.to(kd), dv.to(vd), *_param_grads_out(plan, ctx, sums))
