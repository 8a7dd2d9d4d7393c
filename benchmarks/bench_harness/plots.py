"""PNG plots of a run's rows (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from .counts import PASS_FLOP_FACTOR
from .output import Report

def write_plots(report: Report, out: Path) -> list[str] | None:
    """The PNG files written (none when there is nothing to plot); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = []
    rows = report.rows
    stamp = f"{report.meta['device']} | torch {report.meta['torch']} | triton {report.meta['triton']} | {report.meta['date']}"

    def num(r, c):
        try:
            return float(r[c])
        except (TypeError, ValueError):
            return None

    def grid(names):
        cols = min(2, len(names))
        fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.2 * ((len(names) + cols - 1) // cols)),
                                 squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{stamp}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    tiles = [r for r in rows if r["section"] == "tiles" and r["status"] == "ok"]
    specs = list(dict.fromkeys(r["spec"] for r in tiles))
    if specs:
        fig, axes = grid(specs)
        for ax, spec in zip(axes, specs):
            for role, style in (("first", "-"), ("largest", "--")):
                sel = [r for r in tiles if r["spec"] == spec and r["config"].startswith(role + ":")]
                if not sel:
                    continue
                xs = [int(r["n"]) for r in sel]
                cfg = sel[0]["config"].split(":", 1)[1]
                ax.plot(xs, [num(r, "tiles_total") for r in sel], style, color="0.6", label=f"total {cfg}")
                ax.plot(xs, [num(r, "tiles_visited") for r in sel], style, marker="o", label=f"visited {cfg}")
                ax.plot(xs, [num(r, "tiles_min") for r in sel], style, marker="x", label=f"min needed {cfg}")
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel="tiles per (batch, head)",
                   title=f"{spec} ({sel[0]['mask'] if sel else ''})")
            ax.legend(fontsize=7)
        save(fig, "tiles.png", "attngen forward: tiles visited vs needed vs total")

    comp = [r for r in rows if r["section"] == "compile" and r["status"] == "ok"]
    specs = list(dict.fromkeys(r["spec"] for r in comp))
    if specs:
        bars = [("attngen", "spec_to_module", "attngen build+import"), ("attngen", "first_call_fwd", "attngen first fwd (JIT)"),
                ("flex", "block_mask", "flex create_block_mask"), ("flex", "first_call_fwd", "flex first fwd (compile)"),
                ("attngen", "torch_import", "import torch+triton")]
        present = [b for b in bars if any(r["impl"] == b[0] and r["pass"] == b[1] for r in comp)]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(specs) * len(present) / 2), 4.5))
        width = 0.8 / max(1, len(present))
        for j, (impl, pass_, label) in enumerate(present):
            ys = []
            for spec in specs:
                hit = [num(r, "seconds") for r in comp if r["spec"] == spec and r["impl"] == impl and r["pass"] == pass_]
                ys.append(hit[0] if hit else 0.0)
            ax.bar([i + j * width for i in range(len(specs))], ys, width, label=label)
        ax.set_xticks([i + width * (len(present) - 1) / 2 for i in range(len(specs))], specs)
        ax.set(ylabel="seconds", yscale="log")
        ax.legend(fontsize=7)
        how = ("attngen kernels run in Triton's interpreter here: nothing of theirs is compiled"
               if report.meta["backend"] != "cuda" else "fresh process, empty caches")
        save(fig, "compile.png", f"spec to callable: attngen build+import vs FlexAttention first call ({how})")

    timing = [r for r in rows if r["section"] == "timing" and r["status"] == "ok" and r["pass"] in PASS_FLOP_FACTOR]
    specs = list(dict.fromkeys(r["spec"] for r in timing))
    for metric, label, fname in (("tflops", "TFLOP/s (unmasked pairs)", "tflops_{}.png"),
                                 ("peak_mem_mib", "peak memory (MiB)", "memory_{}.png")):
        for pass_ in PASS_FLOP_FACTOR:
            sel = [r for r in timing if r["pass"] == pass_ and num(r, metric) is not None]
            names = [s for s in specs if any(r["spec"] == s for r in sel)]
            if not names:
                continue
            fig, axes = grid(names)
            for ax, spec in zip(axes, names):
                for impl in dict.fromkeys(r["impl"] for r in sel if r["spec"] == spec):
                    pts = [(int(r["n"]), num(r, metric)) for r in sel if r["spec"] == spec and r["impl"] == impl]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                ax.set(xscale="log", xlabel="N", ylabel=label, title=spec)
                ax.legend(fontsize=7)
            save(fig, fname.format(pass_), f"{pass_}: {label}, {report.meta['dtype']}")
    return written
