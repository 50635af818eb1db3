"""Plots for materialization metadata: PNG embedded in Markdown."""

import base64
import io

from dagster import MetadataValue


def png_markdown(fig, alt: str) -> MetadataValue:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return MetadataValue.md(
        f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    )


def bar_plot(counts: dict[str, float], title: str, ylabel: str) -> MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(counts), list(counts.values()), color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return png_markdown(fig, title)


def grouped_bar_plot(series: dict[str, dict[str, float]], title: str, ylabel: str) -> MetadataValue:
    """Bars side by side: one group per x label, one bar per series (e.g. per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({x for values in series.values() for x in values})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(labels) + 2), 3.2))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [values.get(x, 0.0) for x in labels], width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right")
    ax.axhline(0, color="#444", linewidth=0.6)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png_markdown(fig, title)


def barh_plot(values: dict[str, float], title: str, xlabel: str) -> MetadataValue:
    """Horizontal bars, for many labelled categories (one bar per schema dimension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 0.22 * len(values) + 1.2))
    ax.barh(list(values), list(values.values()), color="#4c72b0")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    return png_markdown(fig, title)


def histogram(
    values: list[float], title: str, xlabel: str, ylabel: str = "rows", bins: int = 20
) -> MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.hist(values, bins=bins, color="#dd8452")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return png_markdown(fig, title)


def line_plot(
    xs: list[float], series: dict[str, list[float]], title: str, xlabel: str
) -> MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend()
    return png_markdown(fig, title)


def sft_grpo_curves(history: dict, name: str, reward_parts: tuple[str, ...]) -> dict:
    """`sft_loss_curve` and `reward_curve` (the reward and its parts per GRPO step) of a
    two-stage training run's history, for the stages that ran."""
    md = {}
    if history["sft"]:
        md["sft_loss_curve"] = line_plot(
            [h["step"] for h in history["sft"]],
            {"loss": [h["loss"] for h in history["sft"]]},
            f"{name} SFT loss",
            "step",
        )
    if history["grpo"]:
        md["reward_curve"] = line_plot(
            [h["step"] for h in history["grpo"]],
            {k: [h.get(k, 0.0) for h in history["grpo"]] for k in ("reward", *reward_parts)},
            f"{name} GRPO reward and its parts",
            "step",
        )
    return md


def diversity_plot(d, title: str) -> MetadataValue:
    """Topic cluster sizes next to distinct-n of a quality.diversity.Diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    left.bar(range(1, len(d.cluster_sizes) + 1), d.cluster_sizes, color="#4c72b0")
    left.set_title("topic cluster sizes")
    left.set_xlabel("cluster (largest first)")
    left.set_ylabel("rows")
    right.bar(["distinct-1", "distinct-2"], [d.distinct_1, d.distinct_2], color="#55a868")
    right.set_ylim(0, 1)
    right.set_title("distinct-n")
    fig.suptitle(title)
    # The figure title above the panel titles, not on them.
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return png_markdown(fig, title)


def search_tree_plot(nodes: list[dict], title: str) -> MetadataValue:
    """One search tree: nodes at (leaf order, depth), coloured by reward, pruned in grey,
    the best node ringed. `nodes` carry node_id, parent_node_id, depth, action, status, reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    children: dict[int, list[int]] = {n["node_id"]: [] for n in nodes}
    for n in nodes:
        if n["parent_node_id"] is not None:
            children[n["parent_node_id"]].append(n["node_id"])
    x: dict[int, float] = {}
    next_leaf = [0.0]

    def place(i: int) -> float:  # leaves left to right, parents centred over their children
        if not children[i]:
            x[i] = next_leaf[0]
            next_leaf[0] += 1
        else:
            xs = [place(c) for c in children[i]]
            x[i] = sum(xs) / len(xs)
        return x[i]

    by_id = {n["node_id"]: n for n in nodes}
    place(0)
    scored = [n for n in nodes if n["status"] == "simulated"]
    best = max(scored, key=lambda n: n["reward"])["node_id"] if scored else None
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * next_leaf[0]), 3.6))
    for n in nodes:
        if n["parent_node_id"] is not None:
            p = by_id[n["parent_node_id"]]
            ax.plot([x[p["node_id"]], x[n["node_id"]]], [-p["depth"], -n["depth"]], color="#999")
    cmap = plt.get_cmap("viridis")
    for n in nodes:
        xy = (x[n["node_id"]], -n["depth"])
        colour = "#cccccc" if n["status"] != "simulated" else cmap(n["reward"])
        ax.scatter(
            *xy,
            s=160,
            color=colour,
            edgecolors="red" if n["node_id"] == best else "k",
            linewidths=2 if n["node_id"] == best else 0.5,
            zorder=3,
        )
        label = (
            n["action"].replace("_", "\n")
            if n["status"] == "simulated"
            else f"{n['action']}\n({n['prune_reason']})".replace("_", " ")
        )
        ax.annotate(
            label,
            xy,
            xytext=(0, -14),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=6,
        )
    ax.set_title(title, fontsize=9)
    deepest = max(n["depth"] for n in nodes)
    ax.set_ylabel("depth")
    ax.set_xticks([])
    ax.set_yticks([-d for d in range(deepest + 1)], [str(d) for d in range(deepest + 1)])
    ax.set_ylim(-deepest - 0.9, 0.4)
    ax.margins(x=0.2)  # room for the labels of the outermost nodes
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, label="reward")
    return png_markdown(fig, title)


def partial_order_plot(
    nodes: list[dict], pairs: list[dict], mask: str, title: str
) -> MetadataValue:
    """A Hasse diagram of one scenario: nodes are dimension vectors over `mask`, ranked by
    how many dimensions they satisfy; each covering pair is an edge labelled with the
    dimensions it teaches. `nodes` carry node, role, in_record, members; `pairs` carry
    chosen_node, rejected_node, dims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda n: n["node"], reverse=True):
        levels.setdefault(n["node"].count("1"), []).append(n["node"])
    pos = {
        key: (i - (len(keys) - 1) / 2, level)
        for level, keys in levels.items()
        for i, key in enumerate(keys)
    }
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * max(len(k) for k in levels.values())), 3.6))
    for p in pairs:
        (x1, y1), (x2, y2) = pos[p["chosen_node"]], pos[p["rejected_node"]]
        ax.annotate("", (x2, y2), (x1, y1), arrowprops={"arrowstyle": "->", "color": "#777"})
        ax.text((x1 + x2) / 2, (y1 + y2) / 2, "".join(p["dims"]), fontsize=8, color="#c44e52")
    for n in nodes:
        x, y = pos[n["node"]]
        ax.scatter(x, y, s=500, color="#4c72b0" if n["in_record"] else "#cccccc", zorder=3)
        named = ", ".join(f"{d}={v}" for d, v in zip(mask, n["node"], strict=True))
        ax.annotate(
            f"{n['role']} ({n['members']})\n{named}",
            (x, y),
            xytext=(0, -18),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7,
        )
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("active dimensions satisfied")
    ax.set_xticks([])
    top = max(levels)
    ax.set_yticks(range(min(levels), top + 1))
    ax.set_ylim(min(levels) - 0.9, top + 0.5)
    ax.margins(x=0.3)
    return png_markdown(fig, title)


def ability_plot(abilities: list[dict], title: str) -> MetadataValue:
    """Per-dimension ability estimates with 95% intervals, one marker series per model.
    `abilities` carry model, dimension, estimate, se."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({a["model"] for a in abilities})
    dims = sorted({a["dimension"] for a in abilities}, key="ATEC".find)
    fig, ax = plt.subplots(figsize=(5, 3))
    for k, m in enumerate(models):
        rows = {a["dimension"]: a for a in abilities if a["model"] == m}
        xs = [i + (k - (len(models) - 1) / 2) * 0.15 for i, d in enumerate(dims) if d in rows]
        ys = [rows[d]["estimate"] for d in dims if d in rows]
        err = [1.96 * rows[d]["se"] for d in dims if d in rows]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=m)
    ax.set_xticks(range(len(dims)), dims)
    ax.axhline(0, color="#bbb", linewidth=0.8)
    ax.set_ylabel("ability (logits)")
    ax.set_title(title)
    ax.legend()
    return png_markdown(fig, title)


def contact_sheet(panels: list[dict], title: str, columns: int = 6) -> MetadataValue:
    """Image panels (`image`: HxW or HxWx3 uint8, optional `mask`: label array whose
    outlines are drawn, `label`: caption) in a grid."""
    return png_markdown(contact_sheet_figure(panels, title, columns), title)


def contact_sheet_figure(panels: list[dict], title: str, columns: int = 6):
    """The figure behind `contact_sheet`, for saving to a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.05 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels, strict=False):
        ax.imshow(p["image"], cmap="gray", vmin=0, vmax=255)
        if p.get("mask") is not None and p["mask"].any():
            ax.contour(p["mask"] > 0, levels=[0.5], colors="#ff3030", linewidths=0.8)
        ax.set_title(p.get("label", ""), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
