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


def diversity_plot(d, title: str) -> MetadataValue:
    """Topic cluster sizes next to distinct-n of a quality.diversity.Diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.bar(range(1, len(d.cluster_sizes) + 1), d.cluster_sizes, color="#4c72b0")
    left.set_title("topic cluster sizes")
    left.set_xlabel("cluster (largest first)")
    left.set_ylabel("rows")
    right.bar(["distinct-1", "distinct-2"], [d.distinct_1, d.distinct_2], color="#55a868")
    right.set_ylim(0, 1)
    right.set_title("distinct-n")
    fig.suptitle(title)
    return png_markdown(fig, title)
