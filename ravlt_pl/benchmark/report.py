"""What ``python -m ravlt_pl benchmark`` prints and draws: the results table and ``benchmark.png``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..reports import atomic_write


def print_table(results: list[dict], args, peak: float) -> None:
    """One line per (model, resolution): GMACs, images/s, memory, achieved GFLOP/s and ratios; then the estimators."""
    bss = [str(b) for b in args.batch_sizes]
    train = args.train_batch_size > 0
    head = (["model", "res", "params M", "GMACs"] + [f"img/s bs{b}" for b in bss]
            + ([f"train img/s bs{args.train_batch_size}", "train ms"] if train else []) + ["mem inf MB"]
            + (["mem train MB"] if train else []) + ["GFLOP/s", "% peak"] + [f"x base bs{b}" for b in bss]
            + (["x base train"] if train else []))  # fmt: skip
    lines = []
    for r in results:
        ratio = r["ratio_vs_baseline"]
        mem_inf = r["peak_mem_mb"][f"infer_bs{max(args.batch_sizes)}"]
        lines.append([r["model"], str(r["resolution"]), f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}"]
                     + [f"{r['infer'][b]['img_s']:.1f}" for b in bss]
                     + ([f"{r['train']['img_s']:.1f}", f"{r['train']['ms']:.0f}"] if train else [])
                     + [f"{mem_inf:.0f}"] + ([f"{r['peak_mem_mb']['train']:.0f}"] if train else [])
                     + [f"{r['achieved_gflops']:.1f}", f"{100 * r['peak_share']:.1f}"]
                     + ([f"{ratio[f'infer_bs{b}']:.2f}" for b in bss] + ([f"{ratio['train']:.2f}"] if train else [])
                        if ratio else ["-"] * (len(bss) + train)))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)] if lines else []
    print(f"\npeak matmul: {peak:.1f} GFLOP/s; ratios: x baseline {args.baseline} (>1 = faster)")
    for row in [head] + lines:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if any(r["ratio_vs_baseline"] for r in results):
        keys = [f"infer_bs{b}" for b in bss] + (["train"] if train else [])
        print(
            f"\nratios x {args.baseline}, three estimators (median of medians | median of per-round ratios | best sample):"
        )
        for r in results:
            if r["ratio_vs_baseline"]:
                cells = [f"{k} {r['ratio_vs_baseline'][k]:.2f} | {r['ratio_vs_baseline_paired'][k]:.2f} | "
                         f"{r['ratio_vs_baseline_best'][k]:.2f}" for k in keys]  # fmt: skip
                print(f"  {r['model']:>{widths[0]}} {r['resolution']}  " + "    ".join(cells))


def plot(results: list[dict], args, path: Path) -> None:
    """Bar charts at the first resolution: images/s per batch size, training images/s and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res0 = args.resolutions[0]
    rs = [r for r in results if r["resolution"] == res0]
    metrics = [(f"inference img/s, batch {b}", lambda r, b=str(b): r["infer"][b]["img_s"]) for b in args.batch_sizes]
    if args.train_batch_size > 0:
        metrics.append((f"training img/s, batch {args.train_batch_size}", lambda r: r["train"]["img_s"]))
        metrics.append((f"training peak memory MB, batch {args.train_batch_size}", lambda r: r["peak_mem_mb"]["train"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(rs) + 1.8), squeeze=False)
    for ax, (title, get) in zip(axes[0], metrics):
        colors = ["tab:red" if r["model"] == args.baseline else
                  "tab:blue" if r["model"].startswith("ravlt") else "tab:gray" for r in rs]  # fmt: skip
        ax.barh([r["model"] for r in rs], [get(r) for r in rs], color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{args.device}, {args.dtype}, {res0}², threads={torch.get_num_threads()}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def print_scaling(scaling: dict) -> None:
    for s in scaling["results"]:
        print(f"  {s['model']:22s} {s['resolution']:4d}²  {s['img_s']:8.2f} img/s  {s['ms_per_megapixel']:8.1f} ms/MP")
