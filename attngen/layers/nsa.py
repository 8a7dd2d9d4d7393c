"""Native Sparse Attention as torch modules: learnable token compression, the branch gates, and a
drop-in attention layer around a generated NSA module's ``nsa_attention``.

Public API (torch only; the kernels live in the generated module):

* ``MeanCompress``, ``WeightedCompress``, ``MlpCompress``: x [B, H, N, D] -> [B, H, C, D] with
  C = num_compressed(N, block, stride); compressed token i summarises tokens
  [i*stride, i*stride + block). Built by ``make_compress(method, block, stride, dim, ...)``.
* ``NativeSparseAttention(module, d_model)``: x [B, N, d_model] -> [B, N, d_model].
* ``reference_attention(module)``: an ``nsa_attention``-compatible function running the float64
  oracle (attngen.reference.nsa) with the module's constants, for ``attention_fn=``.

Sequences shorter than ``block`` have no complete block: the compressors return [B, H, 0, D]
tensors that still take part in autograd (their gradients are zeros).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attngen.reference.nsa import compress_mean, nsa_reference, num_compressed

METHODS = ("mean", "weighted", "mlp")

# What NativeSparseAttention and reference_attention read from a generated NSA module.
MODULE_CONSTANTS = (
    "Q_HEADS", "KV_HEADS", "HEAD_DIM", "V_HEAD_DIM", "BLOCK", "STRIDE", "SELECT_BLOCK", "TOP_N",
    "INITIAL", "LOCAL", "WINDOW", "SCORE", "PER", "METHOD",
)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")
    return value


def _block_windows(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """View [B, H, C, block, D] of every complete block of x [B, H, N, D] (no copy). With N < block
    the view is empty but still derived from x, so autograd reaches x (with zeros)."""
    b, h, n, d = x.shape
    if num_compressed(n, block, stride) == 0:
        return x[:, :, :0].unsqueeze(3).expand(b, h, 0, block, d)
    return x.unfold(2, block, stride).transpose(-1, -2)


class _Compress(nn.Module):
    """Shared argument handling: block, stride (dividing block), dim, and the heads the weights
    belong to (``heads=None``: one set of weights shared by every head)."""

    def __init__(self, block: int, stride: int, dim: int, heads: int | None = None):
        super().__init__()
        self.block = _check_int("block", block, 1)
        self.stride = _check_int("stride", stride, 1)
        if block % stride:
            raise ValueError(f"stride: {stride} does not divide block {block}")
        self.dim = _check_int("dim", dim, 1)
        self.heads = None if heads is None else _check_int("heads", heads, 1)

    def _param_heads(self) -> int:
        return 1 if self.heads is None else self.heads

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("x: expected a 4-D tensor [B, H, N, D]")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension {x.shape[-1]}, expected dim={self.dim}")
        if self.heads is not None and x.shape[1] != self.heads:
            raise ValueError(f"x: {x.shape[1]} heads, expected heads={self.heads} (per-head weights)")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        p = next(self.parameters(), None)
        if p is not None and p.dtype != x.dtype:
            raise ValueError(f"x: dtype {x.dtype} differs from the parameters' {p.dtype} (convert the module with .to())")

    def extra_repr(self) -> str:
        heads = "shared" if self.heads is None else self.heads
        return f"block={self.block}, stride={self.stride}, dim={self.dim}, heads={heads}"


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class MeanCompress(_Compress):
    """Mean of each block: exactly attngen.reference.nsa.compress_mean. No parameters."""

    def __init__(self, block: int, stride: int, dim: int, heads: int | None = None):
        super().__init__(block, stride, dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if num_compressed(x.shape[2], self.block, self.stride) == 0:
            return _block_windows(x, self.block, self.stride).mean(dim=3)
        return compress_mean(x, block=self.block, stride=self.stride)


class WeightedCompress(_Compress):
    """Softmax-weighted sum of each block's tokens.

    A two-layer perceptron (Linear(dim, hidden) -> GELU -> Linear(hidden, 1, no bias)) gives every
    token a score; a softmax over the block's `block` scores gives the weights; the compressed
    vector is the weighted sum of the block's token vectors. The token scores are computed once per
    token and shared by the (overlapping) blocks that contain the token. hidden defaults to dim.
    ``heads=H`` gives each of H heads its own perceptron; ``heads=None`` shares one.

    The output layer has no bias: a constant added to every score of a block cancels in the
    softmax, so such a bias would never change the output and its gradient would be exactly zero.
    """

    def __init__(self, block: int, stride: int, dim: int, heads: int | None = None, hidden: int | None = None,
                 *, device=None, dtype=None):
        super().__init__(block, stride, dim, heads)
        self.hidden = _check_int("hidden", dim if hidden is None else hidden, 1)
        kw = {"device": device, "dtype": dtype}
        hp = self._param_heads()
        self.w1 = nn.Parameter(torch.empty(hp, dim, self.hidden, **kw))  # [Hp, D, hidden]
        self.b1 = nn.Parameter(torch.empty(hp, 1, self.hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(hp, self.hidden, 1, **kw))  # [Hp, hidden, 1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.w1, self.b1):
            _uniform_(p, self.dim)
        _uniform_(self.w2, self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # per-token scores: [B, H, N, D] @ [Hp, D, hidden] -> [B, H, N, hidden] -> [B, H, N, 1]
        return self.pool(x, torch.matmul(F.gelu(torch.matmul(x, self.w1) + self.b1), self.w2))

    def pool(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Each block's tokens of x [B, H, N, D] summed with weights softmax(scores over the block),
        scores [B, H, N, 1] one per token: [B, H, C, D]."""
        w = torch.softmax(_block_windows(scores, self.block, self.stride), dim=3)  # [B, H, C, block, 1]
        return (w * _block_windows(x, self.block, self.stride)).sum(dim=3)  # [B, H, C, D]


class MlpCompress(_Compress):
    """The NSA paper's compression: MLP of the flattened block plus an intra-block position embedding.

    For block i: z = flatten(x[i*stride + j] + pos[j] for j < block) (block * dim values), then
    Linear(block * dim, hidden) -> GELU -> Linear(hidden, dim). hidden defaults to dim.

    Weights: ``heads=H`` gives each of H (KV) heads its own position embedding and MLP, the paper's
    phi^(g); ``heads=None`` shares one set across heads (as some public implementations do, with
    H times fewer parameters). NativeSparseAttention uses per-KV-head weights by default.

    Note: an additive embedding in front of a linear layer acts like a bias (W (x + pos) =
    W x + W pos); it is kept as the paper writes it and receives its own gradient.
    """

    def __init__(self, block: int, stride: int, dim: int, heads: int | None = None, hidden: int | None = None,
                 *, device=None, dtype=None):
        super().__init__(block, stride, dim, heads)
        self.hidden = _check_int("hidden", dim if hidden is None else hidden, 1)
        kw = {"device": device, "dtype": dtype}
        hp = self._param_heads()
        self.pos = nn.Parameter(torch.empty(hp, 1, block, dim, **kw))  # broadcasts over [B, H, C, block, D]
        self.w1 = nn.Parameter(torch.empty(hp, block * dim, self.hidden, **kw))
        self.b1 = nn.Parameter(torch.empty(hp, 1, self.hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(hp, self.hidden, dim, **kw))
        self.b2 = nn.Parameter(torch.empty(hp, 1, dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        for p in (self.w1, self.b1):
            _uniform_(p, self.block * self.dim)
        for p in (self.w2, self.b2):
            _uniform_(p, self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        z = (_block_windows(x, self.block, self.stride) + self.pos).flatten(3)  # [B, H, C, block*D]
        hid = F.gelu(torch.matmul(z, self.w1) + self.b1)  # [B, H, C, hidden]
        return torch.matmul(hid, self.w2) + self.b2  # [B, H, C, D]


def make_compress(method: str, block: int, stride: int, dim: int, *, heads: int | None = None,
                  hidden: int | None = None, device=None, dtype=None) -> _Compress:
    """The compressor for `method` ("mean", "weighted" or "mlp"). `hidden` is the perceptron
    width of the learnable ones (default dim); `heads` gives per-head weights (None: shared)."""
    if method == "mean":
        if hidden is not None:
            raise ValueError("hidden: mean compression has no hidden layer")
        return MeanCompress(block, stride, dim, heads)
    if method == "weighted":
        return WeightedCompress(block, stride, dim, heads, hidden, device=device, dtype=dtype)
    if method == "mlp":
        return MlpCompress(block, stride, dim, heads, hidden, device=device, dtype=dtype)
    raise ValueError(f"method: unknown compression {method!r} (expected one of {', '.join(METHODS)})")


# ----------------------------------------------------------------------------------------------
# The layer


def _module_constants(module) -> dict:
    missing = [c for c in MODULE_CONSTANTS if not hasattr(module, c)]
    if missing:
        raise ValueError(f"module: not an NSA module, missing {', '.join(missing)}")
    return {c: getattr(module, c) for c in MODULE_CONSTANTS}


def reference_attention(module) -> Callable:
    """``nsa_attention(q, k, v, gates, *, k_cmp=None, v_cmp=None, scale=None, return_aux=False)``
    computed by the float64 oracle attngen.reference.nsa with `module`'s constants (a generated NSA
    module, or any object with the same constants). Returns o in q's dtype (aux tensors float64).
    WINDOW == 0 (no window branch) is run as a window of 1 with its gate set to 0.
    """
    c = _module_constants(module)

    def nsa_attention(q, k, v, gates, *, k_cmp=None, v_cmp=None, scale=None, return_aux=False):
        window = c["WINDOW"]
        if window == 0:
            gates = torch.cat([gates[..., :2], torch.zeros_like(gates[..., 2:])], dim=-1)
        o, aux = nsa_reference(
            q, k, v, gates, block=c["BLOCK"], stride=c["STRIDE"], select_block=c["SELECT_BLOCK"],
            top_n=c["TOP_N"], initial=c["INITIAL"], local=c["LOCAL"], window=max(window, 1),
            score=c["SCORE"], per=c["PER"], k_cmp=k_cmp, v_cmp=v_cmp, scale=scale,
        )
        o = o.to(q.dtype)
        if not return_aux:
            return o
        if window == 0:
            aux = {key: val for key, val in aux.items() if key not in ("o_win", "lse_win")}
        return o, aux

    return nsa_attention


class NativeSparseAttention(nn.Module):
    """Drop-in NSA self-attention layer: x [B, N, d_model] -> [B, N, d_model].

    ``module`` is a generated NSA module (or anything exposing its constants Q_HEADS, KV_HEADS,
    HEAD_DIM, V_HEAD_DIM, BLOCK, STRIDE, METHOD, ... and ``nsa_attention``); head counts, head dims
    and the compression method come from it. Per token: q = W_q x (Hq heads of HEAD_DIM),
    k = W_k x, v = W_v x (KV_HEADS heads; one K/V shared by the three branches, as the module
    computes them), gates = sigmoid(W_g x + b_g) [Hq, 3] ordered (cmp, slc, win); the compressed
    keys and values come from two compressors of the module's METHOD (separate parameters for K and
    V; learnable ones have per-KV-head weights unless ``share_compress_heads``); the output is
    W_o concat_h(nsa_attention(q, k, v, gates, k_cmp=..., v_cmp=...)).

    gate_bias: the gate bias at initialisation, (cmp, slc, win) for every head. Default (-2, -2, 2)
    (sigmoid ~ 0.12, 0.12, 0.88): the layer starts close to sliding-window attention, the branch
    that is most useful before the compression has learnt anything; (0, 0, 0) when the module has no
    window branch (WINDOW == 0; its gate is then computed but unused, so its weights get no gradient).

    attention_fn replaces module.nsa_attention (same signature), e.g. ``reference_attention(module)``
    for the float64 oracle. bias: whether the q/k/v/o projections have biases. compress_hidden: the
    hidden width of learnable compressors (default HEAD_DIM / V_HEAD_DIM).

    Positions enter only through causality and the compressors' intra-block embedding: RoPE (or any
    other position encoding) is out of scope here.
    """

    def __init__(
        self,
        module,
        d_model: int,
        *,
        bias: bool = False,
        compress_hidden: int | None = None,
        share_compress_heads: bool = False,
        gate_bias: tuple[float, float, float] | None = None,
        attention_fn: Callable | None = None,
        scale: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        c = _module_constants(module)
        self.d_model = _check_int("d_model", d_model, 1)
        if not isinstance(bias, bool):
            raise ValueError(f"bias: expected a bool, got {type(bias).__name__}")
        if c["METHOD"] not in METHODS:
            raise ValueError(f"module: METHOD {c['METHOD']!r} is not one of {', '.join(METHODS)}")
        fn = attention_fn if attention_fn is not None else getattr(module, "nsa_attention", None)
        if not callable(fn):
            raise ValueError("attention_fn: expected a callable (the module has no nsa_attention)")
        if gate_bias is None:
            gate_bias = (-2.0, -2.0, 2.0) if c["WINDOW"] else (0.0, 0.0, 0.0)
        if len(gate_bias) != 3:
            raise ValueError(f"gate_bias: expected 3 values (cmp, slc, win), got {len(gate_bias)}")
        self.constants = c
        self.attention_fn = fn
        self.scale = scale
        self.q_heads, self.kv_heads = c["Q_HEADS"], c["KV_HEADS"]
        self.head_dim, self.v_head_dim = c["HEAD_DIM"], c["V_HEAD_DIM"]
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, self.q_heads * self.head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, self.kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, self.kv_heads * self.v_head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(self.q_heads * self.v_head_dim, d_model, bias=bias, **kw)
        self.gate = nn.Linear(d_model, 3 * self.q_heads, bias=True, **kw)
        self._gate_bias = tuple(float(g) for g in gate_bias)
        heads = None if share_compress_heads else self.kv_heads
        method = c["METHOD"]
        hk = hv = None
        if method != "mean":
            hk = compress_hidden or self.head_dim
            hv = compress_hidden or self.v_head_dim
        self.k_compress = make_compress(method, c["BLOCK"], c["STRIDE"], self.head_dim, heads=heads, hidden=hk, **kw)
        self.v_compress = make_compress(method, c["BLOCK"], c["STRIDE"], self.v_head_dim, heads=heads, hidden=hv, **kw)
        self.reset_gate()

    def reset_gate(self) -> None:
        """Gate bias to gate_bias (cmp, slc, win) for every head; default Linear init of its weight."""
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor(self._gate_bias).repeat(self.q_heads))

    def forward(self, x: torch.Tensor, *, return_aux: bool = False):
        """x [B, N, d_model] -> y [B, N, d_model]; with return_aux=True, (y, aux) where aux is what
        nsa_attention returned with return_aux=True (block indices, per-branch lse)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [B, N, d_model={self.d_model}], got {shape}")
        b, n, _ = x.shape
        # [B, N, H*D] -> [B, H, N, D] views (strided, no copy)
        q = self.q_proj(x).view(b, n, self.q_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.v_head_dim).transpose(1, 2)
        gates = torch.sigmoid(self.gate(x)).view(b, n, self.q_heads, 3).transpose(1, 2)  # [B, Hq, N, 3]
        k_cmp, v_cmp = self.k_compress(k), self.v_compress(v)
        out = self.attention_fn(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, scale=self.scale, return_aux=return_aux)
        o, aux = out if return_aux else (out, None)
        y = self.o_proj(o.to(x.dtype).transpose(1, 2).reshape(b, n, self.q_heads * self.v_head_dim))
        return (y, aux) if return_aux else y
