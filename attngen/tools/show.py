"""`attngen show`: a spec's mask at a small size with the tile classes its kernels use.

Prints the path each kernel takes, the tile grids of the forward / dQ kernels and of the dK/dV
kernel (F full: visited without the mask, P partial: visited with it, . skipped), the pairs at
N <= 64 with the forward tile classes, and the fractions of tiles visited / full / partial, at
batch 0 and head 0 (a tensor parameter is given as a JSON list: --param win=[4,2]). The
classes come from attngen.planning.classify's mirror of the kernels' own range statements; visibility from
the mask itself (attngen.language.expr.to_torch). With --out, draws the same as a PNG (matplotlib, the
`bench` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

MAX_TEXT_N = 64  # widest pair grid printed as text
MAX_N = 4096

# pair characters: (visible, tile class) -> char
_PAIR = {(True, "full"): "#", (True, "partial"): "+", (False, "partial"): "-", (False, "full"): "X",
         (False, "empty"): " ", (True, "empty"): "!"}
_TILE = {"full": "F", "partial": "P", "empty": "."}


def resolve_spec(arg: str, spec_dir: str = "specs") -> Path:
    """A spec file path, or the name of a spec in `spec_dir`."""
    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return Path(spec_dir) / f"{arg}.yaml"


def parse_param_args(items: list[str], decls: dict) -> dict:
    """--param name=value strings, typed by the spec's declarations ('int', 'float', or a tensor's
    {tensor: DTYPE, dims: N}, given as a JSON list nested N deep: --param win=[4,2]); ValueError
    naming the problem."""
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--param {item!r}: expected name=value")
        if name not in decls:
            known = ", ".join(decls) or "none"
            raise ValueError(f"--param {name}: the spec declares no parameter {name!r} (declared: {known})")
        if not isinstance(decls[name], str):
            values[name] = _tensor_arg(name, text, decls[name])
            continue
        try:
            values[name] = int(text) if decls[name] == "int" else float(text)
        except ValueError:
            raise ValueError(f"--param {name}: {text!r} is not {'an int' if decls[name] == 'int' else 'a float'}") from None
    missing = [n for n in decls if n not in values]
    if missing:
        raise ValueError("missing " + ", ".join(f"--param {n}={_want(decls[n])}" for n in missing))
    return values


def _want(kind) -> str:
    if isinstance(kind, str):
        return f"VALUE ({kind})"
    dims = kind["dims"]
    return f"{'[' * dims}...{']' * dims} ({kind['tensor']} tensor, {dims} dim{'s' * (dims > 1)}, as a JSON list)"


def _tensor_arg(name: str, text: str, kind):
    """A tensor parameter from a JSON list nested `dims` deep, of the declared element type."""
    import json

    import torch

    from attngen.runtime import PARAM_DTYPES

    dtype, dims = PARAM_DTYPES[kind["tensor"]], kind["dims"]
    want = f"--param {name}: expected {_want(kind)}"
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{want}, got {text!r}") from None
    flat, level = [data], 0
    while level < dims and all(isinstance(x, list) for x in flat):
        flat, level = [y for x in flat for y in x], level + 1
    numbers = (int,) if not dtype.is_floating_point else (int, float)
    if level != dims or not flat or not all(isinstance(x, numbers) and not isinstance(x, bool) for x in flat):
        raise ValueError(f"{want}, got {text!r}")
    if not dtype.is_floating_point and any(not -(2**31) <= x < 2**31 for x in flat):
        raise ValueError(f"--param {name}: elements must fit in 32 bits")
    try:
        return torch.tensor(data, dtype=dtype)
    except (ValueError, TypeError, RuntimeError):  # ragged rows
        raise ValueError(f"{want} with rows of equal length, got {text!r}") from None


def visibility(spec, params: dict, n_q: int, n_k: int):
    """[n_q, n_k] bool tensor: the mask at batch 0, head 0."""
    import torch

    qi = torch.arange(n_q).view(-1, 1)
    ki = torch.arange(n_k).view(1, -1)
    if spec.mask == "none":
        return torch.ones(n_q, n_k, dtype=torch.bool)
    if spec.mask == "causal":
        return qi >= ki
    from attngen.language.expr import to_torch

    fn = to_torch(spec.mask_expr)
    return torch.as_tensor(fn(0, 0, qi, ki, n_q, n_k, **params), dtype=torch.bool).expand(n_q, n_k).clone()


def _shown(params: dict) -> str:
    text = ", ".join(f"{k}={str(v.tolist()).replace(' ', '') if hasattr(v, 'tolist') else v}" for k, v in params.items())
    return text if len(text) <= 200 else text[:197] + "..."


def _fraction(label: str, counts: dict) -> str:
    total = counts["total"]

    def pct(k):
        return f"{counts[k]} ({100 * counts[k] / total:.1f}%)"

    return f"{label}: tiles visited {pct('visited')} of {total}: full {pct('full')}, partial {pct('partial')}"


def render_text(spec, paths, classes, vis, block_m: int, block_n: int, params: dict) -> str:
    n_q, n_k = vis.shape
    shown = _shown(params)
    lines = [
        f"{spec.name}: mask {spec.mask}" + (f" with {shown}" if shown else ""),
        f"N_Q = {n_q}, N_K = {n_k}, tiles BLOCK_M x BLOCK_N = {block_m} x {block_n}",
        *paths,
        "",
    ]
    for label, grid in (("forward and dQ", classes.fwd), ("dK/dV", classes.dkdv)):
        lines.append(f"{label} tiles (row: query tile, column: KV tile; F full, P partial, . skipped):")
        lines += ["  " + " ".join(_TILE[c] for c in row) for row in grid]
        lines.append("")
    if n_q <= MAX_TEXT_N and n_k <= MAX_TEXT_N:
        lines.append("pairs (row: query, column: key) in the forward tiles: # visible, unmasked tile; + visible, "
                     "masked tile; - hidden, masked tile; blank: skipped tile")
        for q in range(n_q):
            row = classes.fwd[q // block_m]
            cells = "".join(_PAIR[(bool(vis[q, k]), row[k // block_n])] for k in range(n_k))
            lines.append(f"{q:4d} |{cells}|")
        lines.append("")
    else:
        lines.append(f"(pairs not printed above N = {MAX_TEXT_N}; see --out)")
    pairs = int(vis.sum())
    lines.append(_fraction("forward and dQ", classes.counts("fwd")))
    lines.append(_fraction("dK/dV", classes.counts("dkdv")))
    lines.append(f"visible pairs: {pairs} of {n_q * n_k} ({100 * pairs / (n_q * n_k):.1f}%)")
    return "\n".join(lines) + "\n"


def draw_png(path: Path, spec, classes, vis, block_m: int, block_n: int, params: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    n_q, n_k = vis.shape
    # 0 skipped, 1 hidden in a masked tile, 2 visible in a masked tile, 3 visible in an unmasked tile
    cmap = ListedColormap(["#ffffff", "#e0e0e0", "#8fd18f", "#1f7a1f"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), squeeze=False)
    v = vis.numpy()
    for ax, (label, grid) in zip(axes[0], (("forward and dQ", classes.fwd), ("dK/dV", classes.dkdv))):
        cls = np.array([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])
        per_pair = np.kron(cls, np.ones((block_m, block_n), dtype=int))[:n_q, :n_k]
        img = np.where(per_pair == 0, 0, np.where(v, np.where(per_pair == 2, 3, 2), 1))
        ax.imshow(img, cmap=cmap, vmin=0, vmax=3, interpolation="nearest", aspect="auto")
        for x in range(block_n, n_k, block_n):
            ax.axvline(x - 0.5, color="#555555", linewidth=0.5)
        for y in range(block_m, n_q, block_m):
            ax.axhline(y - 0.5, color="#555555", linewidth=0.5)
        c = classes.counts("fwd" if grid is classes.fwd else "dkdv")
        ax.set_title(f"{label}: {c['full']} full, {c['partial']} partial, {c['total'] - c['visited']} skipped")
        ax.set_xlabel("key (kv_idx)")
        ax.set_ylabel("query (q_idx)")
    shown = _shown(params)
    fig.suptitle(f"{spec.name}" + (f" ({shown})" if shown else "") + "\ndark green: visible, unmasked tile; light "
                 "green: visible, masked tile; grey: hidden, masked tile; white: skipped tile", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(spec_arg: str, *, spec_dir: str = "specs", out: str | None = None, n: int = MAX_TEXT_N,
         n_k: int | None = None, block_m: int | None = None, block_n: int | None = None,
         params: list[str] | tuple[str, ...] = ()) -> int:
    from attngen.planning.classify import classify_tiles
    from attngen.planning.masks import mask_rule
    from attngen.planning.plan import make_plan
    from attngen.language.spec import SpecError, load_spec

    def fail(msg: str) -> int:
        print(f"attngen show: {msg}", file=sys.stderr)
        return 2

    path = resolve_spec(spec_arg, spec_dir)
    if not path.exists():
        return fail(f"no spec {spec_arg!r} (not a file, and no {path})")
    try:
        spec = load_spec(path)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    n_k = n if n_k is None else n_k
    for name, value in (("--n", n), ("--n-k", n_k)):
        if not 1 <= value <= MAX_N:
            return fail(f"{name} must be in [1, {MAX_N}], got {value}")
    block_m = block_m or min(spec.tiles.block_m)
    block_n = block_n or min(spec.tiles.block_n)
    for name, value in (("--block-m", block_m), ("--block-n", block_n)):
        if value < 1 or value & (value - 1):
            return fail(f"{name} must be a power of two, got {value}")
    decls = dict(spec.params)
    try:
        values = parse_param_args(list(params), decls)
    except ValueError as e:
        return fail(str(e))
    rule = mask_rule(spec)
    # the tile bounds read the scalars only (a tensor read bounds nothing at build time)
    classes = classify_tiles(rule, n, n_k, block_m, block_n, {k: v for k, v in values.items() if decls[k] in ("int", "float")})
    vis = visibility(spec, values, n, n_k)
    sys.stdout.write(render_text(spec, make_plan(spec).paths, classes, vis, block_m, block_n, values))
    if out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail("--out needs matplotlib: pip install 'attngen[bench]'")
        draw_png(Path(out), spec, classes, vis, block_m, block_n, values)
        print(f"wrote {out}")
    return 0
