"""benchmarks/decode.py and varlen.py: their models by hand, and decode.py's compared implementations computing
the same decode step (so a GPU run times like against like)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    """benchmarks/NAME.py imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _decode_module():
    return _script("decode")


def test_bytes_model_by_hand():
    d = _decode_module()
    # B 2, L 10, Nq 1, Hq 4 over Hkv 2, D 8, Dv 4, 2 bytes: K/V 2*2*10*12*2 = 960 once per KV head;
    # q and o 2*4*1*12*2 = 192; lse 2*4*1*4 = 32
    s = d.Shape(batch=2, cache_len=10, n_q=1, q_heads=4, kv_heads=2, head_dim=8, v_head_dim=4, elem_bytes=2)
    assert d.bytes_packed(s) == 960 + 192 + 32
    assert d.bytes_per_head(s) == 2 * 960 + 192 + 32  # G = 2: the cache read twice


def test_list_parsing():
    d = _decode_module()
    assert d.parse_list("1k, 16,4K") == [1024, 16, 4096]
    for bad in ("", "0", "x", "-1k"):
        with pytest.raises(Exception):
            d.parse_list(bad)


@pytest.mark.kernel
@pytest.mark.parametrize("n_q", [1, 3])
def test_compared_implementations_agree(n_q):
    """On a causal GQA spec, attngen's decode and SDPA over the padded cache give the same step."""
    from helpers import generated

    d = _decode_module()
    mod = generated("mqa")
    g = torch.Generator().manual_seed(0)
    b, n = 2, 40
    q = torch.randn(b, mod.Q_HEADS, n_q, mod.HEAD_DIM, generator=g).to(torch.float16)
    k = torch.randn(b, mod.KV_HEADS, n, mod.HEAD_DIM, generator=g).to(torch.float16)
    v = torch.randn(b, mod.KV_HEADS, n, mod.V_HEAD_DIM, generator=g).to(torch.float16)
    seqlens = torch.full((b,), n, dtype=torch.int32)
    impls = d.implementations(mod, q, k, v, seqlens, {}, 1)
    assert set(impls) == {"attngen", "sdpa_padded"}
    ours, sdpa = impls["attngen"]().float(), impls["sdpa_padded"]().float()
    assert ours.shape == sdpa.shape == (b, mod.Q_HEADS, n_q, mod.V_HEAD_DIM)
    assert torch.allclose(ours, sdpa, atol=2e-2, rtol=0), (ours - sdpa).abs().max()


@pytest.mark.slow
def test_cli_prints_the_model_and_writes_csv(tmp_path, capsys):
    d = _decode_module()
    out = tmp_path / "dec.csv"
    assert d.main(["--lengths", "1k,2k", "--batch", "1", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes-moved model, llama3_gqa" in text and out.read_text().count("\n") == 3
    assert d.main(["--n-q", "0"]) == 2


def _varlen_module():
    return _script("varlen")


def test_varlen_pair_model_by_hand():
    vb = _varlen_module()
    assert vb.pairs(3, 3, causal=True) == 6 and vb.pairs(3, 2, causal=True) == 5 and vb.pairs(3, 2, causal=False) == 6
    m = vb.model([1, 3], causal=True)
    # packed: 1 + 6 pairs; padded: 2 sequences of 3 x 3 causal = 12
    assert (m["pairs_packed"], m["pairs_padded"], m["tokens"], m["max_len"]) == (7, 12, 4, 3)
    lengths = vb.draw_lengths(50, 5, 9, seed=3)
    assert lengths == vb.draw_lengths(50, 5, 9, seed=3) and min(lengths) >= 5 and max(lengths) <= 9
