"""Rank-analysis results → per-block/head JSON, stage means, a Markdown table and two plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from ..models.attention import SoftmaxAttention
from ..reports import markdown_table
from .probe import FEATURES, RankProbe, native_kind

_COLOURS = {"rala": "C0", "plain": "C1", "softmax": "C2"}
_MARKERS = {"rala": "o", "plain": "s", "softmax": "^"}
_SHORT = {"kv": "KV", "out": "out", "pre_proj": "pre-proj"}


def block_results(probe: RankProbe) -> list[dict]:
    """One entry per block: shape facts, and per kind and feature the per-image × head ranks and means."""
    blocks = []
    for name, stage, index, attn in probe.blocks:
        kinds: dict[str, dict] = {}
        tokens = None
        for kind in probe.kinds_of(attn):
            features = {}
            for feature in FEATURES:
                record = probe.records.get((name, kind, feature))
                if record is None:
                    continue
                rank = torch.cat(record["rank"]).to(torch.float64)  # (images, heads)
                erank = torch.cat(record["effective_rank"])
                full = min(record["shape"])
                tokens = record["shape"][0] if feature == "out" else tokens
                features[feature] = {
                    "shape": list(record["shape"]),
                    "full_rank": full,
                    "rank_mean": rank.mean().item(),
                    "rank_fraction": rank.mean().item() / full,
                    "effective_rank_mean": erank.mean().item(),
                    "rank": rank.to(torch.int64).tolist(),
                    "effective_rank": [[round(v, 3) for v in row] for row in erank.tolist()],
                }
            if features:
                kinds[kind] = features
        blocks.append(
            dict(name=name, stage=stage, block=index,
                 attention="softmax" if isinstance(attn, SoftmaxAttention) else "linear",
                 native=native_kind(attn), heads=attn.num_heads, head_dim=attn.head_dim, tokens=tokens, kinds=kinds)
        )  # fmt: skip
    return blocks


def stage_means(blocks: Sequence[Mapping]) -> list[dict]:
    """Per stage, kind and feature: mean rank / full rank, mean rank, mean effective rank (over blocks, images, heads)."""
    stages = []
    for stage in sorted({b["stage"] for b in blocks}):
        members = [b for b in blocks if b["stage"] == stage]
        first = members[0]
        kinds: dict[str, dict] = {}
        for kind in dict.fromkeys(k for b in members for k in b["kinds"]):
            kinds[kind] = {}
            for feature in FEATURES:
                entries = [b["kinds"][kind][feature] for b in members if feature in b["kinds"].get(kind, {})]
                if not entries:
                    continue
                rank = torch.tensor([v for e in entries for row in e["rank"] for v in row], dtype=torch.float64)
                erank = torch.tensor(
                    [v for e in entries for row in e["effective_rank"] for v in row], dtype=torch.float64
                )
                full = entries[0]["full_rank"]
                kinds[kind][feature] = {"rank_fraction": rank.mean().item() / full, "rank_mean": rank.mean().item(),
                                        "effective_rank_mean": erank.mean().item(), "full_rank": full}  # fmt: skip
        stages.append(
            dict(stage=stage, attention=first["attention"], blocks=len(members), heads=first["heads"],
                 head_dim=first["head_dim"], tokens=first["tokens"], kinds=kinds)
        )  # fmt: skip
    return stages


def headline(blocks: Sequence[Mapping]) -> dict:
    """Mean KV-buffer rank / d of RALA over the linear blocks (else the first kind's output rank fraction)."""
    rala = [b["kinds"]["rala"]["kv"]["rank_fraction"] for b in blocks if "kv" in b["kinds"].get("rala", {})]
    if rala:
        return {"name": "kv_rank_fraction/rala", "value": sum(rala) / len(rala)}
    kind = next(k for b in blocks for k in b["kinds"])
    out = [b["kinds"][kind]["out"]["rank_fraction"] for b in blocks if "out" in b["kinds"].get(kind, {})]
    return {"name": f"out_rank_fraction/{kind}", "value": sum(out) / len(out)}


def _label(kind: str, attention: str) -> str:
    return f"{kind}*" if kind == "softmax" and attention == "linear" else kind


def markdown(data: Mapping) -> str:
    """Title, the run's facts, the stage × kind table and what the columns mean."""
    facts = data["run"]
    rows = []
    for stage in data["stages"]:
        for kind, features in stage["kinds"].items():
            row = [
                stage["stage"] + 1,
                stage["attention"],
                _label(kind, stage["attention"]),
                stage["tokens"],
                stage["head_dim"],
            ]
            for feature in FEATURES:
                f = features.get(feature)
                row += [f["rank_fraction"], f["effective_rank_mean"]] if f else ["–", "–"]
            rows.append(row)
    headers = ["stage", "attention", "kind", "N", "d"]
    for feature in FEATURES:
        headers += [f"{_SHORT[feature]} rank / full", f"{_SHORT[feature]} eff. rank"]
    lines = [
        f"# Rank analysis: {facts['config']}\n",
        f"- weights: {facts['weights']}",
        f"- images: {facts['num_images']} from `{facts['images']}` at {facts['image_size']}×{facts['image_size']}",
        f"- numerical rank: σ_i > σ_max · {facts['tolerance']}; effective rank exp(H(σ/Σσ)); "
        "means over blocks, heads and images",
        f"- headline: {data['headline']['name']} = {data['headline']['value']:.4f}\n",
        markdown_table(headers, rows, floatfmt=".3f"),
        "Features: " + "; ".join(f"**{_SHORT[k]}** = {v}" for k, v in FEATURES.items()) + ".",
        "Full rank = min(rows, cols) (d for the KV buffer, min(N, d) for the outputs). All kinds of a block are "
        "computed on the same block input and weights; the network itself runs its native attention.",
    ]
    if any(_label(k, s["attention"]) == "softmax*" for s in data["stages"] for k in s["kinds"]):
        lines.append("softmax* = softmax attention computed with a linear stage's qkvo weights (RoPE, no elu), "
                     "for reference: those weights were not trained for it.")  # fmt: skip
    return "\n".join(lines) + "\n"


def _series(blocks: Sequence[Mapping], feature: str) -> dict[str, list[tuple[int, Mapping]]]:
    """``label → [(block position, entry)]``; softmax on linear stages is its own series (``softmax*``)."""
    series: dict[str, list[tuple[int, Mapping]]] = {}
    for x, b in enumerate(blocks):
        for kind, features in b["kinds"].items():
            if feature in features:
                series.setdefault(_label(kind, b["attention"]), []).append((x, features[feature]))
    return series


def _style(label: str) -> dict:
    kind = label.rstrip("*")
    return dict(color=_COLOURS[kind], linestyle="--" if label.endswith("*") else "-", label=label,
                zorder=3 if kind == "rala" else 2)  # fmt: skip


def figures(blocks: Sequence[Mapping]) -> dict[str, plt.Figure]:
    """``blocks``: rank and effective rank / full rank per block, one line per kind; ``hist``: ranks per head."""
    labels = [f"{b['stage'] + 1}.{b['block']}" for b in blocks]
    fig_blocks, axes = plt.subplots(2, len(FEATURES), figsize=(5 * len(FEATURES), 7), sharey=True, squeeze=False)
    for col, feature in enumerate(FEATURES):
        series = _series(blocks, feature)
        for row, (metric, name) in enumerate((("rank", "rank"), ("effective_rank", "effective rank"))):
            ax = axes[row, col]
            for label, points in series.items():
                ys = [torch.tensor(e[metric], dtype=torch.float64).mean().item() / e["full_rank"] for _, e in points]
                ax.plot([x for x, _ in points], ys, marker=_MARKERS[label.rstrip("*")], **_style(label))
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{_SHORT[feature]}: {name} / full", fontsize=10)
            ax.grid(alpha=0.3)
        axes[1, col].set_xlabel("stage.block")
    axes[0, 0].set_ylabel("mean over heads and images")
    _legend(fig_blocks)

    fig_hist, axes = plt.subplots(1, len(FEATURES), figsize=(5 * len(FEATURES), 3.5), squeeze=False)
    for col, feature in enumerate(FEATURES):
        ax = axes[0, col]
        for label, points in _series(blocks, feature).items():
            values = [v / e["full_rank"] for _, e in points for row in e["rank"] for v in row]
            ax.hist(values, bins=20, range=(0, 1), histtype="step", linewidth=1.5, **_style(label))
        ax.set_title(f"{_SHORT[feature]}: rank / full per head and image", fontsize=10)
        ax.set_xlabel("rank / full")
    axes[0, 0].set_ylabel("count")
    _legend(fig_hist)
    return {"blocks": fig_blocks, "hist": fig_hist}


def _legend(fig: plt.Figure) -> None:
    """One legend for all panels, above them (``softmax*``: softmax on a linear stage's weights)."""
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), frameon=False)
