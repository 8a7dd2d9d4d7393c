"""The Hugging Face transformers backend (attngen.hf): tiny Llama and Qwen2 models built offline from
configs, one with attn_implementation=register(module) and one with "sdpa" on the same fp32 weights.
Logits, loss and every parameter gradient agree (no padding, left and right padding, real positions
only), greedy generation gives the same tokens and scores (with and without padding, and with a
static cache), a sliding window longer than the sequence is served (Mistral), the paths
without a model (a KV cache with padding and gradients, 4-D masks) agree with SDPA under the mask
they stand for, and a model the module does not fit fails clearly."""

import collections
import inspect
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'attngen[hf]')")

from attngen import hf  # noqa: E402

from helpers import build_and_import, dense_spec  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
             head_dim=HEAD_DIM, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**SMALL, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**SMALL, **kw}),
}
MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    return build_and_import(tmp_path_factory.mktemp("hf"), dense_spec("hf_tiny", q=HEADS, kv=KV_HEADS, d=HEAD_DIM, dtypes="[fp32]"))


@pytest.fixture(scope="module")
def name(mod):
    return hf.register(mod)


@pytest.fixture
def calls(mod, monkeypatch):
    """Counts the module's entry points the backend calls (so a test cannot pass on SDPA alone)."""
    seen = collections.Counter()
    for f in ("attention", "attention_varlen", "attention_with_kvcache"):
        def spy(*args, _f=getattr(mod, f), _n=f, **kwargs):
            seen[_n] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(mod, f, spy)
    return seen


def _pair(kind, name, seed=0, **kw):
    """(sdpa model, attngen model) with the same weights; each its own config object (transformers
    keeps the implementation on the config)."""
    cls = getattr(transformers, MODELS[kind])
    torch.manual_seed(seed)
    ref = cls(CONFIGS[kind](attn_implementation="sdpa", **kw))
    ours = cls(CONFIGS[kind](attn_implementation=name, **kw))
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == name and ref.config._attn_implementation == "sdpa"
    return ref, ours


def _batch(padding, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    if padding == "left":
        mask[0, :5], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, 7:], mask[2, n - 1:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_forward_loss_and_gradients_match_sdpa(kind, padding, name, calls):
    ref, ours = _pair(kind, name)
    ref.train(), ours.train()  # dropout is 0 in these configs
    ids, mask = _batch(padding)
    # no loss on a token predicted from a padded position (the first real token after left padding):
    # what a padded row holds differs between implementations and is never a real prediction
    follows_real = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1)
    labels = ids.masked_fill((mask * follows_real) == 0, -100)
    real = mask.bool()
    outs = []
    for model in (ref, ours):
        out = model(ids, attention_mask=None if padding == "none" else mask, labels=labels)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits[real], outs[0].logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, ref_grads[pname].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{pname}: {m}")
    assert calls["attention_varlen" if padding != "none" else "attention"] == 2  # once a layer


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generation_matches_sdpa(kind, padding, name, calls):
    ref, ours = _pair(kind, name, seed=2)
    ref.eval(), ours.eval()
    ids, mask = _batch(padding, n=9, seed=3)
    gens = [model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
            for model in (ref, ours)]
    assert torch.equal(gens[1].sequences, gens[0].sequences)
    assert gens[1].sequences.shape == (3, 17)
    for s_ours, s_ref in zip(gens[1].scores, gens[0].scores):
        torch.testing.assert_close(s_ours, s_ref, rtol=1e-4, atol=1e-5)
    # decoding steps (one query over the cache) went through the KV-cache entry point
    assert calls["attention_with_kvcache"] == 2 * 7


@pytest.mark.kernel
def test_greedy_generation_with_a_static_cache_matches_sdpa(name, calls):
    """A static cache hands the layers its whole capacity; only the rows in use are attended."""
    ref, ours = _pair("llama", name, seed=6)
    ref.eval(), ours.eval()
    ids, mask = _batch("left", n=9, seed=7)
    gens = [model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           cache_implementation="static") for model in (ref, ours)]
    assert torch.equal(gens[1], gens[0])
    assert calls["attention_varlen"] == 2 and calls["attention_with_kvcache"] == 2 * 3


@pytest.mark.kernel
def test_a_sliding_window_longer_than_the_sequence_is_served_and_a_shorter_one_refused(name):
    """Mistral asks for a sliding-window mask: served while the window covers every key (the mask
    is then causal over padded sequences), refused otherwise."""
    ids, mask = _batch("left", n=9)
    real = mask.bool()
    torch.manual_seed(8)
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=32, attn_implementation="sdpa"))
    ours = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=32, attn_implementation=name))
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real],
                                   rtol=1e-4, atol=1e-5)
    short = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=4, attn_implementation=name))
    with pytest.raises(ValueError, match="not causal attention over padded sequences|sliding window of 4"):
        short(ids, attention_mask=mask)


def test_packed_sequences_are_refused(name):
    """Sequences packed into one row (position_ids restarting, no mask) need a block-diagonal mask,
    which these modules do not apply: refused, not attended across documents."""
    pytest.importorskip("transformers.masking_utils", reason="transformers before 4.53 does not mask packed sequences for SDPA either")
    model = transformers.LlamaForCausalLM(CONFIGS["llama"](attn_implementation=name))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with pytest.raises(ValueError, match="not causal attention over padded sequences"):
        model(torch.ones(1, 7, dtype=torch.long), position_ids=position_ids, use_cache=False)


def _sdpa_reference(q, k, v, allowed, scale):
    """SDPA under an explicit mask allowed [B, Nq, Nk], query heads repeated over their KV heads."""
    g = q.shape[1] // k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed[:, None], scale=scale)
    return o.transpose(1, 2)


@pytest.mark.kernel
def test_cache_with_padding_paths_agree_with_the_mask_they_stand_for(name, mod, calls):
    """Queries at the end of the keys, padded sequences (left padding, a hole, a static cache's
    unused tail past L): the KV-cache path (no gradient), the per-sequence path (gradients) and the
    same mask given as 4-D (bool and additive) all equal SDPA under the mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[name]
    layer = torch.nn.Module()
    layer.is_causal = True
    g = torch.Generator().manual_seed(4)
    b, nq, n_used, n_keys = 3, 3, 10, 13
    pad = torch.ones(b, n_used, dtype=torch.bool)
    pad[0, :4] = False     # left padding
    pad[1, 2:5] = False    # a hole (a right-padded prompt continued by generation)
    pad[2, 7] = False      # a padded query: its row is zeros
    q = torch.randn(b, HEADS, nq, HEAD_DIM, generator=g)
    k = torch.randn(b, KV_HEADS, n_keys, HEAD_DIM, generator=g)
    v = torch.randn(b, KV_HEADS, n_keys, HEAD_DIM, generator=g)
    pos = n_used - nq + torch.arange(nq)
    allowed = pad[:, None, :] & (torch.arange(n_used)[None, None, :] <= pos[None, :, None])
    real = pad[:, n_used - nq:]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _sdpa_reference(leaves[0], leaves[1][:, :, :n_used], leaves[2][:, :, :n_used], allowed, 0.3)
    do = torch.randn(want.shape, generator=g) * real[:, :, None, None]
    want_grads = torch.autograd.grad(want, leaves, do)

    with torch.no_grad():
        o, weights = fn(layer, q, k, v, pad, scaling=0.3)
    assert weights is None and o.shape == (b, nq, HEADS, HEAD_DIM) and o.is_contiguous()
    assert calls["attention_with_kvcache"] == 1
    torch.testing.assert_close(o[real], want[real].detach(), rtol=1e-5, atol=1e-5)
    assert torch.all(o[~real] == 0)

    full = torch.zeros(b, 1, nq, n_keys, dtype=torch.bool)
    full[..., :n_used] = allowed[:, None]
    additive = torch.zeros(full.shape).masked_fill(~full, torch.finfo(torch.float32).min)
    for mask4d in (full, additive):
        with torch.no_grad():
            o4, _ = fn(layer, q, k, v, mask4d, scaling=0.3)
        torch.testing.assert_close(o4[real], o[real], rtol=0, atol=0)

    got = fn(layer, *leaves, pad, scaling=0.3)[0]
    assert calls["attention"] == b  # one call a sequence when a gradient is needed
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    for got_g, want_g in zip(torch.autograd.grad(got, leaves, do), want_grads):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.kernel
def test_a_4d_mask_of_padded_causal_attention_is_served_and_packed_sequences_are_refused(name):
    ref, ours = _pair("llama", name, seed=5)
    ref.eval(), ours.eval()
    ids, mask = _batch("left", n=8)
    n = ids.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    four_d = (causal[None] & mask.bool()[:, None, :])[:, None]
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=four_d).logits
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    packed = four_d.clone()
    packed[:, :, 5:, :5] = False  # two documents in each row
    with pytest.raises(ValueError, match="not causal attention over padded sequences"):
        with torch.no_grad():
            ours(ids, attention_mask=packed)


def test_the_mask_function_gives_a_padding_mask_not_none(name):
    pytest.importorskip("transformers.masking_utils", reason="transformers before 4.53 builds 4-D masks itself")
    """Registered with the mask interface: transformers hands the attention the 2-D padding mask of a
    padded batch, not None (a name without a mask function gets no mask at all)."""
    from transformers.masking_utils import create_causal_mask

    config = CONFIGS["llama"](attn_implementation=name)
    embeds = torch.zeros(2, 6, 64)
    mask = torch.ones(2, 6, dtype=torch.long)
    if "cache_position" in inspect.signature(create_causal_mask).parameters:  # transformers 4.53 - 4.57
        make = lambda m: create_causal_mask(config, embeds, m, cache_position=torch.arange(6), past_key_values=None)  # noqa: E731
    else:
        make = lambda m: create_causal_mask(config, embeds, m, None)  # noqa: E731
    assert make(mask) is None
    mask[1, :2] = 0
    got = make(mask)
    assert got is not None and got.dtype == torch.bool and torch.equal(got, mask.bool())


def test_a_model_of_other_heads_fails_naming_both(name):
    model = transformers.LlamaForCausalLM(CONFIGS["llama"](num_attention_heads=8, head_dim=8, attn_implementation=name))
    with pytest.raises(ValueError, match=r"8 query heads over 2 KV heads, head_dim 8.*hf_tiny.*4 query heads over 2 KV heads, head_dim 16"):
        model(torch.ones(1, 4, dtype=torch.long))


def test_dropout_in_training_is_refused(name):
    model = transformers.LlamaForCausalLM(CONFIGS["llama"](attention_dropout=0.1, attn_implementation=name)).train()
    with pytest.raises(ValueError, match="dropout 0.1"):
        model(torch.ones(1, 4, dtype=torch.long))


def test_a_bidirectional_module_refuses_a_causal_model(tmp_path):
    none_mod = build_and_import(tmp_path, dense_spec("hf_bidir", q=HEADS, kv=KV_HEADS, d=HEAD_DIM, dtypes="[fp32]", mask="none"))
    model = transformers.LlamaForCausalLM(CONFIGS["llama"](attn_implementation=hf.register(none_mod)))
    with pytest.raises(ValueError, match="mask 'none'.*causal"):
        model(torch.ones(1, 4, dtype=torch.long))


def test_register_refuses_what_a_model_cannot_use(tmp_path, mod):
    window = build_and_import(tmp_path, dense_spec("hf_win", q=HEADS, kv=KV_HEADS, d=HEAD_DIM, dtypes="[fp32]",
                                                   mask="sliding_window(w)", extra="params: {w: int}\n"))
    with pytest.raises(ValueError, match="sliding_window"):
        hf.register(window)
    with pytest.raises(ValueError, match="not a generated dense attngen module"):
        hf.register(hf)
    with pytest.raises(ValueError, match="transformers' own"):
        hf.register(mod, "sdpa")
    with pytest.raises(ValueError, match="plain name"):
        hf.register(mod, "kernels-community/flash-attn")


def test_without_transformers_register_says_what_to_install(mod, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'attngen\[hf\]'"):
        hf.register(mod)
