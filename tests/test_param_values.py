"""attngen.param_values, the one registry of parameter values: each entry fits its shipped spec's
declarations, and its values do what the registry says of them (checked on the mask itself)."""

import pytest
import torch

from attngen import param_values as pv
from attngen.runtime import PARAM_DTYPES
from attngen.testing import default_params, reference_mask

from helpers import generated

SHAPES = [pv.Shape(4, 2, 20, 20), pv.Shape(4, 1, 51, 33), pv.Shape(4, 1, 1, 1)]


def _fits(decls: dict, values: dict, shape: pv.Shape):
    assert set(values) == set(decls)
    for name, v in values.items():
        kind = decls[name]
        if kind == "int":
            assert isinstance(v, int) and not isinstance(v, bool), name
        elif kind == "float":
            assert isinstance(v, float), name
        else:
            assert isinstance(v, torch.Tensor) and v.dtype == PARAM_DTYPES[kind["tensor"]] and v.dim() == kind["dims"], name


def _visible(mod, params, n_q, n_k):
    mask = reference_mask(mod, params)
    q = torch.arange(n_q).view(1, 1, n_q, 1)
    kv = torch.arange(n_k).view(1, 1, 1, n_k)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long)
    return torch.broadcast_to(mask(b, h, q, kv), (1, 1, n_q, n_k))[0, 0]


@pytest.mark.parametrize("name", sorted(pv.REGISTRY))
def test_entry_fits_the_shipped_spec_and_its_values_fit_the_declarations(name):
    entry = pv.REGISTRY[name]
    mod = generated(name)
    assert pv.entry(name, mod.PARAMS) is entry
    for shape in SHAPES:
        sets = [entry.check, entry.long(4096)] + ([entry.no_key] if entry.no_key else [])
        for values in sets:
            _fits(mod.PARAMS, pv.materialize(values, shape, "cpu"), shape)
    values, shown = pv.long_values(name, mod.PARAMS, mod.Q_HEADS, 4096, 2, "cpu")
    assert shown and all(f"{k}=" in shown for k in values)


@pytest.mark.parametrize("name", sorted(n for n, e in pv.REGISTRY.items() if generated(n).MASK != "causal"))
def test_check_values_leave_every_row_a_key_and_no_key_values_do_not(name):
    mod, entry = generated(name), pv.REGISTRY[name]
    for n in (1, 20, 77):
        vis = _visible(mod, pv.materialize(entry.check, pv.Shape(mod.Q_HEADS, 1, n, n), "cpu"), n, n)
        assert vis.any(dim=1).all(), f"{name}: a row without a key at N = {n}"
    if entry.no_key is not None:
        n_q, n_k = 51, 33
        vis = _visible(mod, pv.materialize(entry.no_key, pv.Shape(mod.Q_HEADS, 1, n_q, n_k), "cpu"), n_q, n_k)
        assert not vis.any(dim=1).all(), f"{name}: every row still sees a key"


def test_a_spec_the_registry_does_not_know_gets_values_from_its_declarations():
    decls = {"w": "int", "t": {"tensor": "fp32", "dims": 2}}
    assert pv.entry("sliding_window", decls) is None  # a shipped name with other declarations
    values, shown = pv.long_values("sliding_window", decls, 4, 300, 1, "cpu")
    assert values["w"] == 100 and values["t"].shape == (4, 300)
    assert "values from the declarations" in shown
    mod = generated("sliding_window")
    assert pv.check_values(mod, batch=1, n_q=9, n_k=9, device="cpu") == {"w": 4}
    assert default_params(mod, batch=1, n_q=9, n_k=9) == {"w": 3}  # the generic values stay available
