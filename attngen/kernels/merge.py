"""LSE merge of partial attention results.

Attention over a set of keys split into parts (split-KV decoding: one part per chunk of the cache;
context parallelism: one part per rank) gives each part's normalised output o_i and natural-log
lse_i. The attention over all the keys is

    lse = logsumexp_i lse_i,    o = sum_i exp(lse_i - lse) * o_i

merge(o_parts, lse_parts) computes it in one kernel, in float32: a first pass over the parts finds
each row's largest lse_i m, a second sums w_i = exp(lse_i - m) and w_i * o_i, and
o = sum w_i o_i / sum w_i, lse = m + log(sum w_i). A part with lse_i = -inf for a row (it saw no
key there) contributes nothing to it, whatever its o_i holds (its o_i is not read); a row where
every part has lse = -inf gets o = 0 and lse = -inf, as the attention kernels give a row that sees
nothing. No gradient.

Kernel (one program per tile of rows, all parts, the whole Dv): merge_kernel.
"""

from attngen import runtime as _rt  # first: selects Triton's interpreter when there is no GPU

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""dtypes of the parts' o and of the merged o."""

_TILE = 4096  # elements of a row tile [BLOCK_R, BLOCK_DV]


@triton.jit(do_not_specialize=["R", "P"])
def merge_kernel(
    O, LSE, OUT, LSE_OUT,
    stride_op, stride_or, stride_od, stride_lp, stride_lr, stride_outr, stride_outd,
    R, P,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """O [P, R, DV] (any float dtype), LSE float32 [P, R] -> OUT [R, DV], LSE_OUT float32 [R]."""
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_DV)
    m_r = o_r < R
    m_o = m_r[:, None] & (o_d[None, :] < DV)
    p_lse0 = LSE + o_r.to(tl.int64) * stride_lr  # [BR], part 0
    p_o0 = O + o_r.to(tl.int64)[:, None] * stride_or + o_d[None, :] * stride_od  # [BR, BDV], part 0

    # -- pass 1: the largest lse of each row (-inf where every part is -inf)
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    p_lse = p_lse0
    for _ in range(0, P):
        b_m = tl.maximum(b_m, tl.load(p_lse, mask=m_r, other=float("-inf")))
        p_lse += stride_lp
    b_m_use = tl.where(b_m == float("-inf"), 0.0, b_m)  # keeps exp finite for rows with nothing

    # -- pass 2: weights exp(lse_i - m) <= 1, the largest exactly 1; a part of weight 0 is not read
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    p_lse = p_lse0
    p_o = p_o0
    for _ in range(0, P):
        b_w = tl.exp(tl.load(p_lse, mask=m_r, other=float("-inf")) - b_m_use)  # [BR]
        b_o = tl.load(p_o, mask=m_o & (b_w > 0.0)[:, None], other=0.0).to(tl.float32)  # [BR, BDV]
        b_acc += b_w[:, None] * b_o
        b_l += b_w
        p_lse += stride_lp
        p_o += stride_op

    # -- rows where every part saw nothing: o = 0, lse = -inf
    m_any = b_l > 0.0
    b_l_use = tl.where(m_any, b_l, 1.0)
    b_out = b_acc / b_l_use[:, None]
    b_lse = tl.where(m_any, b_m_use + tl.log(b_l_use), float("-inf"))
    p_out = OUT + o_r.to(tl.int64)[:, None] * stride_outr + o_d[None, :] * stride_outd
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=m_o)
    tl.store(LSE_OUT + o_r, b_lse, mask=m_r)


def _stack(name, parts):
    if isinstance(parts, torch.Tensor):
        return parts
    parts = list(parts)
    if not parts:
        raise ValueError(f"merge: {name} holds no part")
    for i, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"merge: {name}[{i}] is a {type(t).__name__}, not a tensor")
        if t.shape != parts[0].shape or t.dtype != parts[0].dtype or t.device != parts[0].device:
            raise ValueError(
                f"merge: {name}[{i}] is {t.dtype} {list(t.shape)} on {t.device}; "
                f"{name}[0] is {parts[0].dtype} {list(parts[0].shape)} on {parts[0].device}"
            )
    return torch.stack(parts)


def _check(o, lse, out_dtype):
    if o.dim() < 3:
        raise ValueError(f"merge: o must be parts of shape [..., N, Dv], got {list(o.shape)} stacked")
    if o.shape[0] < 1:
        raise ValueError("merge: o holds no part")
    if tuple(lse.shape) != tuple(o.shape[:-1]):
        raise ValueError(f"merge: lse has shape {list(lse.shape)}; expected {list(o.shape[:-1])} (o's without Dv)")
    if o.dtype not in DTYPES:
        raise ValueError(f"merge: o has dtype {o.dtype}; expected one of float16, bfloat16, float32")
    if out_dtype not in DTYPES:
        raise ValueError(f"merge: out_dtype {out_dtype} is not one of float16, bfloat16, float32")
    if lse.dtype != torch.float32:
        raise ValueError(f"merge: lse has dtype {lse.dtype}; expected float32")
    if lse.device != o.device:
        raise ValueError(f"merge: lse on {lse.device}, o on {o.device}")
    if o.device.type != _rt.DEVICE:
        raise ValueError(f"merge: o on {o.device}; kernels run on {_rt.DEVICE} in this process ({_rt.backend()})")


def merge(o, lse, *, out_dtype=None):
    """Merge partial attention results over disjoint key sets into the attention over their union.

    o: P parts [..., N, Dv] (a sequence of tensors of one shape and dtype, or one tensor
    [P, ..., N, Dv], which saves the stacking copy), float16 / bfloat16 / float32, any strides;
    lse: float32 [..., N] per part likewise (natural log, -inf where a part saw no key).
    Returns (o [..., N, Dv] in out_dtype, default o's dtype; lse float32 [..., N]), with
    lse = logsumexp_i lse_i and o = sum_i exp(lse_i - lse) o_i accumulated in float32; rows where
    every lse_i is -inf give o = 0, lse = -inf. Bad arguments raise ValueError. No gradient.
    """
    if isinstance(o, torch.Tensor) != isinstance(lse, torch.Tensor):
        raise ValueError("merge: o and lse must both be sequences of parts or both stacked tensors")
    o, lse = _stack("o", o), _stack("lse", lse)
    out_dtype = o.dtype if out_dtype is None else out_dtype
    _check(o, lse, out_dtype)
    p, lead, dv = o.shape[0], tuple(o.shape[1:-1]), o.shape[-1]
    out = _rt.empty((*lead, dv), dtype=out_dtype, device=o.device)
    out_lse = _rt.empty(lead, dtype=torch.float32, device=o.device)
    rows = out_lse.numel()
    if rows == 0:
        return out, out_lse
    o3, lse2 = o.reshape(p, rows, dv), lse.reshape(p, rows)  # views unless the strides forbid
    out2 = out.view(rows, dv)
    block_dv = max(16, triton.next_power_of_2(dv))
    block_r = max(1, min(64, _TILE // block_dv))
    with torch.no_grad():
        merge_kernel[(triton.cdiv(rows, block_r),)](
            o3, lse2, out2, out_lse,
            *o3.stride(), *lse2.stride(), *out2.stride(),
            rows, p,
            DV=dv, BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4,
        )
    return out, out_lse
