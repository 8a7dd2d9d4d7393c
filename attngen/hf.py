"""Hugging Face transformers backend: a generated dense module as an `attn_implementation`.

    from attngen.hf import register
    name = register(llama3_gqa)                                    # "attngen_llama3_gqa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name, dtype=torch.bfloat16)

`register(module)` puts an attention function into transformers' `AttentionInterface` and, where
transformers has one (4.53 and later), a mask function into its `AttentionMaskInterface` under the
same name: without a mask function transformers builds no mask at all for an unknown name, and a
padded batch would be silently attended as if it had no padding. Like FlashAttention-2's, the mask
function hands the attention a 2-D padding mask `[B, L]` (True = a real token; key rows from L on,
the unused tail of a static cache, are ignored) or None when every key is a real token. Older
transformers (4.48 to 4.52) give every implementation that is not theirs a 4-D additive mask; that
is read too, checked to be causal (or bidirectional) attention over padded sequences, and turned into
the same 2-D mask (once per mask, not per layer).

What the attention computes, with L the keys in use and Nq the queries, which are always the last Nq
of those L positions (the keys include the queries' own):
- no padding: `module.attention(q, k, v)` with `q_offset = L - Nq` (prefill and training: Nq = L;
  with a KV cache the queries sit at the end of the keys), or `attention_with_kvcache` over the
  cache as it is when no gradient is needed and Nq < L (decoding);
- padding, Nq = L (prefill, training; left or right padding): the real tokens are packed and run
  through `attention_varlen` (positions from 0 at each sequence's first real token, causal over real
  tokens only), and the result is scattered back; padded query rows get zeros, as in transformers'
  FlashAttention-2 path;
- padding, Nq < L (generation from a padded batch): each sequence's real keys are gathered to the
  front of a compact cache and its real queries to the end of the query rows, and
  `attention_with_kvcache` places them bottom-right (query t of the real ones at the position of its
  own key); with a gradient, one `attention()` per sequence with `q_offset` instead.

Supported modules: dense ones with mask `causal` or `none`, no `score_mod` and no parameters. A
causal module refuses a non-causal layer (`is_causal` False, e.g. an encoder) and a `none` module
refuses a causal layer (it would let tokens see the future); `none` serves bidirectional models.
Dropout must be 0 (a model in training mode with attention dropout raises), a sliding window is
refused unless it covers every key, and so are softcapping and attention sinks. The model's head
counts and head dims must be the spec's (a ValueError at the first call names both).
"""

from __future__ import annotations

import re
import weakref

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_INSTALL = "pip install 'attngen[hf]'"
_MIN_VERSION = (4, 48)


def register(module, name: str | None = None) -> str:
    """Register a generated dense `module` as a transformers attention implementation named `name`
    (default "attngen_" + module.NAME), with the mask function it needs; returns the name to pass as
    `attn_implementation=`. Registering the same module again under its name is harmless."""
    _check_module(module)
    name = "attngen_" + module.NAME if name is None else name
    if not isinstance(name, str) or not name or any(c in name for c in "/|: ") or name.startswith("paged"):
        raise ValueError(
            f"attngen.hf.register: name must be a plain name such as 'attngen_{module.NAME}' (no '/', '|', ':' "
            f"or spaces, which transformers reads as hub kernels or combined implementations), got {name!r}"
        )
    transformers = _import_transformers()
    fn = _attention_function(module, name)
    attn_interface, mask_interface = _interfaces(transformers)
    for registry in (attn_interface, mask_interface):
        if registry is None:
            continue
        current = registry.get(name)
        if current is not None and getattr(current, "_attngen_name", None) is None:
            raise ValueError(f"attngen.hf.register: {name!r} is already one of transformers' own implementations; choose another name")
    if hasattr(attn_interface, "register"):
        type(attn_interface).register(name, fn)
    else:  # transformers 4.48 / 4.49: a plain dict
        attn_interface[name] = fn
    if mask_interface is not None:
        type(mask_interface).register(name, _mask_function(name))
    return name


# --------------------------------------------------------------------------------------------------
# transformers, imported lazily


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"attngen.hf needs Hugging Face transformers >= 4.48: {_INSTALL}") from e
    if _version(transformers.__version__) < _MIN_VERSION:
        raise ImportError(f"attngen.hf needs transformers >= 4.48 (its AttentionInterface); found {transformers.__version__}: {_INSTALL}")
    return transformers


def _version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _interfaces(transformers):
    """The attention registry (the AttentionInterface, or the plain dict of 4.48 / 4.49) and the mask
    registry (None before transformers had an AttentionMaskInterface)."""
    try:
        from transformers import AttentionInterface

        attn = AttentionInterface()
    except ImportError:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as attn
    try:
        from transformers.masking_utils import AttentionMaskInterface

        mask = AttentionMaskInterface()
    except ImportError:
        mask = None
    return attn, mask


# --------------------------------------------------------------------------------------------------
# The module


def _check_module(module):
    what = getattr(module, "NAME", repr(module))
    missing = [f for f in ("attention", "attention_varlen", "attention_with_kvcache", "Q_HEADS", "KV_HEADS",
                           "HEAD_DIM", "V_HEAD_DIM", "MASK", "DTYPES") if not hasattr(module, f)]
    if missing:
        raise ValueError(f"attngen.hf.register: {what} is not a generated dense attngen module (it lacks {', '.join(missing)})")
    if module.MASK not in ("causal", "none"):
        raise ValueError(
            f"attngen.hf.register: {module.NAME} has mask {module.MASK!r}; a transformers model asks for causal "
            "(decoders) or bidirectional (encoders) attention over padded sequences, so only modules with mask "
            "'causal' or 'none' can serve it"
        )
    if getattr(module, "SCORE_MOD", "") or getattr(module, "PARAMS", {}):
        raise ValueError(
            f"attngen.hf.register: {module.NAME} has a score_mod or parameters, which a transformers model "
            "does not pass; only modules without them can serve it"
        )


def _shape_text(hq, hkv, d, dv):
    return f"{hq} query heads over {hkv} KV heads, head_dim {d}" + (f", value head_dim {dv}" if dv != d else "")


def _check_call(mod, name, q, k, v, attention_mask, dropout, is_causal, kw):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[2] != v.shape[2] or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"{name}: expected query [B, H, Nq, D], key and value [B, Hkv, Nk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    got = (q.shape[1], k.shape[1], q.shape[3], v.shape[3])
    want = (mod.Q_HEADS, mod.KV_HEADS, mod.HEAD_DIM, mod.V_HEAD_DIM)
    if got != want or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"{name}: the model's attention has {_shape_text(*got)}, but module {mod.NAME} was built for "
            f"{_shape_text(*want)}; build a spec with heads: {{q: {got[0]}, kv: {got[1]}}}, head_dim: {got[2]}"
            + (f", v_head_dim: {got[3]}" if got[3] != got[2] else "")
        )
    dtypes = [_DTYPES[d] for d in mod.DTYPES]
    if q.dtype not in dtypes:
        raise ValueError(
            f"{name}: the model runs attention in {q.dtype}, but module {mod.NAME} supports {', '.join(mod.DTYPES)}; "
            "load the model in one of those (dtype=...) or add the dtype to the spec's dtypes"
        )
    if dropout:
        raise ValueError(
            f"{name}: attention dropout {dropout} is not supported (the kernels have no dropout); set the config's "
            "attention_dropout to 0 or call model.eval()"
        )
    for key in ("softcap", "s_aux", "sinks", "position_bias"):
        if kw.get(key) is not None:
            raise ValueError(f"{name}: the model passes {key}, which module {mod.NAME} does not implement")
    if is_causal and mod.MASK == "none":
        raise ValueError(
            f"{name}: module {mod.NAME} has mask 'none' (bidirectional), but this layer of the model is causal; "
            "a causal model needs a module with mask: causal"
        )
    if not is_causal and mod.MASK == "causal":
        raise ValueError(
            f"{name}: module {mod.NAME} is causal, but this layer of the model is not (is_causal False: an encoder "
            "or a bidirectional model); it needs a module with mask: none"
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"{name}: the model passed a {type(attention_mask).__name__} as the attention mask; expected None, a 2-D "
            "padding mask or a 4-D mask tensor"
        )


# --------------------------------------------------------------------------------------------------
# Masks


def _mask_function(name):
    """The mask function registered for `name`: transformers calls it once per forward (per mask
    kind) with the sizes of the keys the layers will see. Plain causal or bidirectional attention
    gives a 2-D padding mask [B, L] (or None: no padding and L equals the keys); anything else the
    model asks for (packed sequences, sliding windows, overlays) is materialised as transformers'
    4-D boolean mask, which the attention checks and refuses unless it is causal or bidirectional
    attention over padded sequences after all (e.g. a window longer than the sequence)."""
    from transformers import masking_utils as mu

    plain = tuple(f for f in (getattr(mu, "causal_mask_function", None), getattr(mu, "bidirectional_mask_function", None)) if f)

    def attngen_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, **kwargs):
        cache_position = kwargs.get("cache_position")
        device = kwargs.get("device")
        if q_length is None and cache_position is not None:  # the signature before transformers 5
            q_length = cache_position.shape[0]
            q_offset = cache_position[0]
            device = cache_position.device if device is None else device
        if mask_function is not None and not any(mask_function is f for f in plain):
            full = dict(kwargs, batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                        mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
            if cache_position is None:
                full.update(q_length=q_length, q_offset=q_offset)
            return mu.sdpa_mask(**full)
        end = int(q_offset) + int(q_length) - int(kv_offset)  # key rows in use: the rest of a static cache is empty
        if end > kv_length or end < q_length:
            raise ValueError(f"{name}: {q_length} queries at offset {int(q_offset)} do not fit {kv_length} keys at offset {int(kv_offset)}")
        if attention_mask is None:
            if end == kv_length:
                return None
            return torch.ones(batch_size, end, dtype=torch.bool, device="cpu" if device is None else device)
        if attention_mask.dim() != 2:
            return attention_mask
        start = int(kv_offset)
        if attention_mask.shape[1] < start + end:
            raise ValueError(
                f"{name}: the 2-D attention_mask covers {attention_mask.shape[1]} positions, but the model has seen "
                f"{start + end} tokens; pass a mask over every token, cached ones included"
            )
        mask = attention_mask[:, start:start + end].to(torch.bool)
        if end == kv_length and bool(mask.all()):
            return None
        return mask

    attngen_mask._attngen_name = name
    return attngen_mask


class _Memo:
    """One remembered result per mask tensor: the layers of a model receive the same mask object, so
    its analysis (and the packing indices) is done once per forward, not once per layer. Keyed by
    the tensor's identity (held weakly), its in-place version and the call's shape."""

    def __init__(self):
        self._ref = None
        self._key = None
        self._value = None

    def get(self, tensor, key):
        if self._ref is not None and self._ref() is tensor and self._key == (tensor._version, key):
            return self._value
        return None

    def put(self, tensor, key, value):
        self._ref, self._key, self._value = weakref.ref(tensor), (tensor._version, key), value
        return value


def _from_4d(name, mask, b, nq, nk, causal):
    """A 4-D mask [B or 1, 1 or H, Nq, >= Nk] (bool, True = attend; or additive float, 0 = attend)
    as the 2-D padding mask [B, L] it is equivalent to, or a ValueError when it is not causal (or,
    for a bidirectional layer, full) attention over padded sequences."""
    refuse = (f"{name}: the model's attention mask is not {'causal' if causal else 'bidirectional'} attention "
              "over padded sequences (packed sequences, a sliding window shorter than the sequence, or a custom "
              "4-D mask?); attngen modules serve only that")
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[2] != nq or mask.shape[3] < nk:
        raise ValueError(f"{name}: attention mask of shape {tuple(mask.shape)} does not fit {b} sequences of {nq} queries over {nk} keys")
    mask = mask[..., :nk]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError(f"{name}: the model's additive attention mask holds biases (values other than 0 and -inf); attngen modules do not add them")
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise ValueError(refuse + " (it differs between heads)")
    allowed = allowed[:, 0].expand(b, nq, nk)
    valid = allowed.any(1)  # a key is a real token iff some query attends it
    end = nk
    if causal and nq < nk:
        # With a cache the queries are the last Nq rows in use (a static cache leaves later rows
        # empty): the last key any row attends is the last query's own. Were every sequence's last
        # query padding, the rows would be placed too early; the check below then fails for every
        # real row (its own key would lie past its placed position), so nothing is computed wrongly.
        cols = torch.arange(nk, device=mask.device)
        end = max(int(torch.where(allowed, cols, -1).max()) + 1, nq)
        valid, allowed = valid[:, :end], allowed[:, :, :end]
    if causal:
        pos = end - nq + torch.arange(nq, device=mask.device)
        expected = valid[:, None, :] & (torch.arange(end, device=mask.device)[None, None, :] <= pos[None, :, None])
    else:
        expected = valid[:, None, :]
    # every row, padded ones too: transformers masks padding on the key side only
    if not bool((allowed == expected).all()):
        raise ValueError(refuse)
    return valid


# --------------------------------------------------------------------------------------------------
# The attention function


def _attention_function(mod, name):
    memo_4d, memo_pack = _Memo(), _Memo()

    def attngen_attention(layer, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          sliding_window=None, **kwargs):
        causal = bool(is_causal if is_causal is not None else getattr(layer, "is_causal", True))
        _check_call(mod, name, query, key, value, attention_mask, dropout, causal, kwargs)
        b, _, nq, _ = query.shape
        nk = key.shape[2]
        pad = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                pad = attention_mask.to(torch.bool)
                if pad.shape[0] != b or not nq <= pad.shape[1] <= nk:
                    raise ValueError(f"{name}: 2-D attention mask of shape {tuple(pad.shape)} does not fit {b} sequences of {nq} queries over {nk} keys")
            else:
                pad = memo_4d.get(attention_mask, (b, nq, nk, causal))
                if pad is None:
                    pad = memo_4d.put(attention_mask, (b, nq, nk, causal), _from_4d(name, attention_mask, b, nq, nk, causal))
        end = nk if pad is None else pad.shape[1]
        if sliding_window is not None and end > sliding_window:
            raise ValueError(
                f"{name}: the layer has a sliding window of {sliding_window} keys over {end}; module {mod.NAME} "
                "attends every earlier key (use sequences no longer than the window or a model without one)"
            )
        if nq > end:
            raise ValueError(f"{name}: {nq} queries over {end} keys; the keys must include the queries")
        out = _attend(mod, query, key[:, :, :end], value[:, :, :end], pad, scaling, causal, memo_pack)
        return out, None

    attngen_attention._attngen_name = name
    attngen_attention._attngen_module = mod
    return attngen_attention


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _attend(mod, q, k, v, pad, scale, causal, memo):
    """[B, Nq, H, Dv] contiguous: attention of q [B, H, Nq, D] over k, v [B, Hkv, L, D] whose last
    Nq rows are the queries' own tokens, with pad [B, L] (True = real token) or None."""
    b, h, nq, _ = q.shape
    n = k.shape[2]
    if pad is not None and bool(pad.all()):
        pad = None
    if pad is None:
        if causal and nq < n and not _needs_grad(q, k, v):
            lens = torch.full((b,), n, dtype=torch.int32, device=q.device)
            o = mod.attention_with_kvcache(q, k, v, lens, scale=scale)
        else:
            o = mod.attention(q, k, v, scale=scale, q_offset=n - nq if causal else 0)
        return o.transpose(1, 2).contiguous()
    real_q = pad if nq == n else pad[:, n - nq:]
    if not bool(real_q.any()):
        return q.new_zeros(b, nq, h, v.shape[3])
    if not causal or nq == n:
        return _attend_varlen(mod, q, k, v, pad, real_q, scale, memo)
    if _needs_grad(q, k, v):
        return _attend_per_sequence(mod, q, k, v, pad, real_q, scale)
    return _attend_kvcache(mod, q, k, v, pad, real_q, scale)


def _packing(pad):
    """Row indices of the real tokens in [B * N] order, cu_seqlens (int32) and the longest length."""
    lens = pad.sum(1, dtype=torch.int32)
    cu = torch.zeros(pad.shape[0] + 1, dtype=torch.int32, device=pad.device)
    torch.cumsum(lens, 0, out=cu[1:])
    return pad.reshape(-1).nonzero().squeeze(1), cu, int(lens.max())


def _attend_varlen(mod, q, k, v, pad, real_q, scale, memo):
    """Pack the real queries and real keys of every sequence, attend each sequence with
    attention_varlen (causal is top-left there: exact here, as the queries are the keys' own tokens
    whenever the layer is causal) and scatter the rows back, zeros at padded queries."""
    b, h, nq, _ = q.shape
    keys = memo.get(pad, k.shape[2])
    if keys is None:
        keys = memo.put(pad, k.shape[2], _packing(pad))
    idx_k, cu_k, max_k = keys
    idx_q, cu_q, max_q = keys if real_q is pad else _packing(real_q)
    qp = q.transpose(1, 2).reshape(b * nq, h, q.shape[3])[idx_q]
    kp = k.transpose(1, 2).reshape(b * k.shape[2], k.shape[1], k.shape[3])[idx_k]
    vp = v.transpose(1, 2).reshape(b * v.shape[2], v.shape[1], v.shape[3])[idx_k]
    o = mod.attention_varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, scale=scale)
    out = o.new_zeros(b * nq, h, o.shape[2]).index_copy(0, idx_q, o)
    return out.view(b, nq, h, o.shape[2])


def _attend_kvcache(mod, q, k, v, pad, real_q, scale):
    """Generation from a padded batch, no gradient: each sequence's real keys gathered to the front
    of a compact cache, its real queries to the end of the query rows, so attention_with_kvcache's
    bottom-right placement puts the t-th last real query at the t-th last real key (its own token:
    every real key after the first query is a query); padded query rows come back as zeros."""
    b, h, nq, d = q.shape
    lens = pad.sum(1, dtype=torch.int32)
    width = int(lens.max())
    keys_first = torch.argsort((~pad).to(torch.int8), dim=1, stable=True)[:, :width]
    kc = k.gather(2, keys_first[:, None, :, None].expand(b, k.shape[1], width, k.shape[3]))
    vc = v.gather(2, keys_first[:, None, :, None].expand(b, v.shape[1], width, v.shape[3]))
    queries_last = torch.argsort(real_q.to(torch.int8), dim=1, stable=True)
    qc = q.gather(2, queries_last[:, None, :, None].expand(b, h, nq, d))
    o = mod.attention_with_kvcache(qc, kc, vc, lens, scale=scale)
    back = torch.argsort(queries_last, dim=1)
    o = o.gather(2, back[:, None, :, None].expand(b, h, nq, o.shape[3]))
    o = torch.where(real_q[:, None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.transpose(1, 2).contiguous()


def _attend_per_sequence(mod, q, k, v, pad, real_q, scale):
    """As _attend_kvcache, with gradients: one attention() a sequence over its real keys, its real
    queries at offset (real keys - real queries)."""
    b, h, nq, _ = q.shape
    rows = []
    for i in range(b):
        row = q.new_zeros(nq, h, v.shape[3])
        qi = q[i][:, real_q[i]]
        if qi.shape[1]:
            ki, vi = k[i][:, pad[i]], v[i][:, pad[i]]
            o = mod.attention(qi[None], ki[None], vi[None], scale=scale, q_offset=ki.shape[1] - qi.shape[1])
            row = row.index_put((real_q[i].nonzero().squeeze(1),), o[0].transpose(0, 1))
        rows.append(row)
    return torch.stack(rows)
