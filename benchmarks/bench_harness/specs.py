"""The specs a run benchmarks: built and imported, their parameter values at each length (from
attngen.param_values, shared with the tests and `attngen verify`), and the causal baseline variant."""

from __future__ import annotations

from pathlib import Path

from .counts import expr_fns

NSA_NOTE = "NSA specs are timed by benchmarks/nsa_model.py --gpu (model of the NSA kernels: benchmarks/nsa_model.py)"


def spec_decls(spec) -> dict:
    """A loaded spec's parameter declarations in the generated module's PARAMS form."""
    return {n: k if isinstance(k, str) else {"tensor": k.tensor, "dims": k.dims} for n, k in spec.params}


def bench_params(name: str, decls: dict, q_heads: int, n: int, batch: int, device) -> tuple[dict, str]:
    """(keyword arguments of the module's attention, how they read in the CSV) at length n: the
    shared registry's long-sequence values (attngen.param_values.long_values)."""
    from attngen.param_values import long_values

    return long_values(name, decls, q_heads, n, batch, device)


class SpecInfo:
    """A spec, built into out/modules and imported."""

    def __init__(self, path: Path, module):
        self.path = path
        self.mod = module
        self.name = module.NAME
        self.mask = module.MASK
        self.score_mod = getattr(module, "SCORE_MOD", "")
        self.decls = dict(getattr(module, "PARAMS", {}))
        self.q_heads = module.Q_HEADS
        self.kv_heads = module.KV_HEADS
        self.d = module.HEAD_DIM
        self.dv = module.V_HEAD_DIM

    def shape_cols(self) -> dict:
        return dict(spec=self.name, mask=self.mask, score_mod=self.score_mod, q_heads=self.q_heads,
                    kv_heads=self.kv_heads, head_dim=self.d, v_head_dim=self.dv)

    @property
    def plain(self) -> bool:
        """Mask none or causal, no parameters, no score_mod: closed-form counts, every implementation."""
        return self.mask in ("none", "causal") and not self.decls and not self.score_mod

    def params(self, n: int, batch: int, device) -> tuple[dict, str]:
        return bench_params(self.name, self.decls, self.q_heads, n, batch, device)

    def fns(self):
        return expr_fns(self.mask, self.score_mod, self.decls)


def load_modules(paths: list[Path], out: Path) -> list[SpecInfo]:
    from attngen.codegen.build import build
    from attngen.tools.verify import import_generated

    built = build(paths, out / "modules")
    return [SpecInfo(Path(p), import_generated(m)) for p, (m, _) in zip(paths, built)]


def tile_configs(space) -> list[tuple[str, dict]]:
    """The first config of the space (what the interpreter runs) and the one with the largest tiles."""
    first = space[0]
    largest = max(space, key=lambda c: (c["block_m"] * c["block_n"], c["block_m"]))
    return [("first", first), ("largest", largest)]


def causal_variant(info: SpecInfo, out: Path):
    """The spec built with mask causal and without parameters or score_mod: attngen's own dense
    causal kernel of the same heads, dims and tile space, the baseline of attngen_causal."""
    import yaml

    from attngen.codegen.build import build
    from attngen.tools.verify import import_generated

    data = yaml.safe_load(info.path.read_text(encoding="utf-8"))
    for key in ("params", "score_mod"):
        data.pop(key, None)
    data.update(name=f"{info.name}_causal", mask="causal",
                description=f"{info.name} with mask causal, no parameters, no score_mod (benchmark baseline)")
    path = out / "baselines" / f"{info.name}_causal.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    [(module_path, _)] = build([path], out / "modules")
    return import_generated(module_path)
