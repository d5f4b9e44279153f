"""The offline evaluation report: one HTML file with tables and plots, the same tables in Markdown.

Plots are rendered with matplotlib (Agg) and embedded as base64 PNG, so the HTML is one
self-contained file that can be attached to an MLflow run or mailed around.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd

from evaluation.offline import Result, slice_gaps


def metrics_table(
    results: list[Result], ks=(10,), metrics=("recall", "ndcg", "precision", "hit_rate", "mrr")
) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {"model": r.name}
        for k in ks:
            for name in metrics:
                key = f"{name}@{k}"
                if key in r.metrics:
                    row[key] = r.metrics[key]
                    row[f"{key} 95% CI"] = f"[{r.metrics[key + '_low']:.4f}, {r.metrics[key + '_high']:.4f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def bias_table(results: list[Result]) -> pd.DataFrame:
    rows = []
    for r in results:
        b = r.bias
        curve = b.get("item_share_curve", {})
        rows.append(
            {
                "model": r.name,
                "items for 50% of recs": curve.get(0.5),
                "items for 100% of recs": curve.get(1.0),
                "gini": b.get("gini"),
                "coverage": b.get("coverage"),
                "popularity lift": b.get("popularity_lift"),
                "preference parity": b.get("preference_parity"),
            }
        )
    return pd.DataFrame(rows)


def figure_png(fig) -> str:
    """A matplotlib figure as base64 PNG for an <img> of the HTML report (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def share_curve_plot(results: list[Result]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        curve = r.bias.get("item_share_curve")
        if curve:
            shares = sorted(curve)
            ax.plot([curve[s] for s in shares], [100 * s for s in shares], marker="o", label=r.name)
    ax.set_xlabel("distinct items")
    ax.set_ylabel("% of all recommendations")
    ax.set_xscale("log")
    ax.set_title("Item-share curve (left and steep = concentrated on few items)")
    ax.legend()
    return figure_png(fig)


def metric_bar_plot(table: pd.DataFrame, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(table["model"], table[metric])
    ax.set_ylabel(metric)
    ax.set_title(metric)
    return figure_png(fig)


def write_document(
    out: Path, title: str, context: dict | None, sections: list[tuple[str, pd.DataFrame]], plots: list[tuple[str, str]]
) -> dict[str, Path]:
    """``report.md`` (context and tables) and a self-contained ``report.html`` (tables and PNG plots)."""
    md = [f"# {title}", ""]
    if context:
        md += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
    for heading, table in sections:
        md += [f"## {heading}", "", table.to_markdown(index=False, floatfmt=".4f"), ""]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>"]
    if context:
        body.append(
            "<ul>"
            + "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in context.items())
            + "</ul>"
        )
    for heading, table in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>" + table.to_html(index=False, float_format=lambda x: f"{x:.4f}"))
    for heading, png in plots:
        body.append(f"<h2>{html.escape(heading)}</h2><img src='data:image/png;base64,{png}'/>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
    )
    (out / "report.html").write_text(
        f"<html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    return {"html": out / "report.html", "markdown": out / "report.md"}


def write_report(
    results: list[Result],
    out_dir: str | Path,
    title: str,
    context: dict | None = None,
    ks=(10,),
    extra_tables: dict[str, pd.DataFrame] | None = None,
) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``results.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = metrics_table(results, ks)
    bias = bias_table(results)
    main_metric = f"ndcg@{ks[0]}"
    sections = [("Accuracy (full ranking, training items removed)", metrics), ("Popularity bias", bias)]
    sections += list((extra_tables or {}).items())
    for r in results:
        if not r.slices.empty:
            sections.append((f"{r.name}: slices by user attribute ({main_metric})", r.slices))
            sections.append((f"{r.name}: best vs worst slice", slice_gaps(r.slices, main_metric)))

    plots = [("Item-share curve", share_curve_plot(results)), (main_metric, metric_bar_plot(metrics, main_metric))]
    write_document(out, title, context, sections, plots)
    (out / "results.json").write_text(
        json.dumps(
            [{"name": r.name, "metrics": r.metrics, "bias": {k: v for k, v in r.bias.items()}} for r in results],
            indent=2,
            default=str,
        )
    )
    return {"html": out / "report.html", "markdown": out / "report.md", "json": out / "results.json"}
