"""The offline evaluation report: one HTML page a person reads top to bottom, the same tables in Markdown.

The page answers, in this order:

1. **Headline**: does the served funnel beat each peer (Pop, EASE, ALS, ...) at NDCG@K, by how
   much (the ratio), and is the difference more than noise (a paired bootstrap interval of the
   difference over the same users: "beats" when the whole interval is above 0);
2. **Accuracy** with error bars (95% bootstrap intervals) for NDCG@K and Recall@K;
3. **The funnel**: candidates kept and held-out positives still present after each stage;
4. **Slices**: NDCG@K per user group, every model, as a chart, and the best-worst gap of the funnel;
5. **Popularity bias**: the item-share curve and a narrow table;
6. **Tuning**: the tuning step's search (one point per trial), or "not run";
7. the other tables (rankers, mitigation, ordering) and **not applicable**: every figure the split
   cannot support, with the reason (``Result.not_applicable``), while every other figure comes out.

Plots are rendered with matplotlib (Agg) and embedded as base64 PNG, so the HTML is one
self-contained file that can be attached to an MLflow run or mailed around. ``write_document`` and
``figure_png`` are the plain building blocks the online reports (A/B test, feedback loop) share.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.metrics import bootstrap_means
from evaluation.offline import Result, slice_gaps
from models.tuning import edge_text

STAGE_LABELS = {
    "candidate_ids": "retrieval",
    "filtered_ids": "filters",
    "light_ids": "light ranker",
    "heavy_ids": "heavy ranker",
    "final": "served top-K",
}
NOT_RUN = "not run"


def json_text(value, indent: int = 2) -> str:
    """``value`` as standard JSON: every number that is not finite (a figure the data cannot give, an
    infinite ratio or statistic) is null, not Python's ``NaN`` / ``Infinity``, which jq, JavaScript's
    ``JSON.parse`` and most JSON readers refuse. numpy scalars, data frames (as records) and
    dataclasses become plain JSON; anything else its ``str``."""
    return json.dumps(_jsonable(value), indent=indent, allow_nan=False)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict(orient="records"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# --------------------------------------------------------------------------- tables


def metrics_table(
    results: list[Result], ks=(10,), metrics=("recall", "ndcg", "precision", "hit_rate", "mrr")
) -> pd.DataFrame:
    """Every metric at every K with its interval, one row per model (wide: for notebooks and JSON)."""
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


def _with_ci(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "n/a"
    low, high = metrics.get(key + "_low"), metrics.get(key + "_high")
    ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
    return f"{metrics[key]:.4f}{ci}"


def accuracy_table(results: list[Result], k: int) -> pd.DataFrame:
    """One K, six columns: NDCG and Recall with their 95% intervals, Precision, HitRate, MRR."""
    rows = []
    for r in results:
        m = r.metrics
        rows.append(
            {
                "model": r.name,
                f"NDCG@{k} (95% CI)": _with_ci(m, f"ndcg@{k}"),
                f"Recall@{k} (95% CI)": _with_ci(m, f"recall@{k}"),
                f"Precision@{k}": m.get(f"precision@{k}"),
                f"HitRate@{k}": m.get(f"hit_rate@{k}"),
                f"MRR@{k}": m.get(f"mrr@{k}"),
            }
        )
    return pd.DataFrame(rows)


def bias_table(results: list[Result]) -> pd.DataFrame:
    rows = []
    for r in results:
        b = r.bias
        curve = b.get("item_share_curve") or {}
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
    # None (not applicable) as NaN, so the report prints "n/a" and the numbers stay numbers
    return pd.DataFrame(rows).fillna(np.nan).infer_objects()


def served_result(results: list[Result], served: str | None = None) -> Result:
    """The served funnel among ``results``: by name, else the first whose name starts with "funnel",
    else the last one."""
    if served is not None:
        return next(r for r in results if r.name == served)
    return next((r for r in results if r.name.lower().startswith("funnel")), results[-1])


def headline(
    results: list[Result], k: int, served: str | None = None, n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """The served funnel against each other model at NDCG@``k``: the ratio of the means (inf over a
    peer at 0, NaN when both are 0) and the difference with a paired bootstrap 95% interval (users
    resampled together, so both models are judged on the same users), and a verdict: "beats" /
    "loses to" when the interval excludes 0, "within noise of" otherwise. Without per-user values
    the verdict compares the two intervals."""
    key = f"ndcg@{k}"
    funnel = served_result(results, served)
    rng = np.random.default_rng(seed)
    ours = funnel.per_user.get(key)
    rows = []
    for peer in results:
        if peer is funnel or key not in peer.metrics:
            continue
        theirs = peer.per_user.get(key)
        a, b = funnel.metrics[key], peer.metrics[key]
        # Over a peer at 0 the ratio is infinite only when the funnel is above 0; 0 / 0 has none (NaN: "n/a").
        ratio = a / b if b > 0 else math.inf if a > 0 else math.nan
        if ours is not None and theirs is not None and len(ours) == len(theirs) and len(ours):
            mean_ours, mean_theirs = bootstrap_means(rng, [ours, theirs], n_resamples)
            diffs = mean_ours - mean_theirs
            low, high = (float(q) for q in np.quantile(diffs, [0.025, 0.975]))
            interval = f"[{low:+.4f}, {high:+.4f}]"
        else:  # no paired values: disjoint intervals or not
            low = funnel.metrics[key + "_low"] - peer.metrics[key + "_high"]
            high = funnel.metrics[key + "_high"] - peer.metrics[key + "_low"]
            interval = "intervals " + ("disjoint" if low > 0 or high < 0 else "overlap")
        verdict = "beats" if low > 0 else "loses to" if high < 0 else "within noise of"
        rows.append(
            {
                "peer": peer.name,
                f"peer NDCG@{k}": b,
                "funnel / peer": ratio,
                "difference (95% CI)": f"{a - b:+.4f} {interval}",
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def headline_sentence(table: pd.DataFrame, funnel: Result, k: int) -> str:
    if table.empty:
        return f"{funnel.name}: NDCG@{k} {funnel.metrics[f'ndcg@{k}']:.4f} (no peer to compare with)."
    parts = [
        f"{row['verdict']} {row['peer']} ({_ratio_text(row['funnel / peer'])}, {row['difference (95% CI)']})"
        for _, row in table.iterrows()
    ]
    return f"{funnel.name}, NDCG@{k} {_with_ci(funnel.metrics, f'ndcg@{k}')}: " + "; ".join(parts) + "."


def _ratio_text(ratio: float) -> str:
    if math.isinf(ratio):  # the peer scored 0 and the funnel did not: no ratio to print ("infx")
        return "the peer at 0"
    return "ratio n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def stage_table(stages: dict | None) -> pd.DataFrame:
    """Per funnel stage: mean candidates kept and the share of held-out positives still among them."""
    rows = [
        {
            "stage": STAGE_LABELS.get(name, name),
            "candidates kept (mean)": f"{v['mean_size']:.1f}",
            "held-out recall": v["recall"],
        }
        for name, v in (stages or {}).items()
        if isinstance(v, dict)
    ]
    return pd.DataFrame(rows, columns=["stage", "candidates kept (mean)", "held-out recall"])


def tuning_searches(tuning) -> list[dict]:
    """The tuning step's search in one shape, whatever shape the manifest stored it in.

    Accepted: a list of trials; ``{"trials": [...], "metric": name, "chosen": {...}}`` (also under
    ``"search"``); or a dict of such searches by name (``{"blend": [...], "logq": {...}}``). A trial
    is ``{"params": {...}, "metric": value}`` (``"value"``/``"score"``/the metric's name also read;
    a search may hold further searches by name beside its trials, as ``candidate_generator``;
    a dict of metrics gives its first number). Returns ``[{"name", "metric", "trials", "chosen",
    "at_edge"}]`` (``at_edge``: the chosen values at the end of their searched range, ``models.tuning.at_edge``),
    each trial as ``{"params": dict, "value": float}``; an empty list when the step did not run."""
    if not tuning:
        return []
    if isinstance(tuning, list):
        tuning = {"trials": tuning}
    if not isinstance(tuning, dict):
        return []
    if not any(key in tuning for key in ("trials", "search")):
        out = []
        for name, sub in tuning.items():
            if isinstance(sub, (list, dict)):
                for search in tuning_searches(sub):
                    search["name"] = name if search["name"] == "search" else f"{name}: {search['name']}"
                    out.append(search)
        return out
    metric = str(tuning.get("metric") or tuning.get("objective") or "metric")
    trials = []
    for trial in tuning.get("trials", tuning.get("search")) or []:
        if not isinstance(trial, dict):
            continue
        value = next((trial[k] for k in ("metric", "value", "score", metric) if k in trial), None)
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, (int, float))), None)
        params = trial.get("params")
        if params is None:
            params = {k: v for k, v in trial.items() if k not in ("metric", "value", "score", metric)}
        if isinstance(value, (int, float)) and math.isfinite(value):
            trials.append({"params": dict(params), "value": float(value)})
    chosen = tuning.get("chosen") or tuning.get("best")
    edges = [e for e in tuning.get("at_edge") or [] if isinstance(e, dict) and {"knob", "value", "side"} <= e.keys()]
    out = [
        {
            "name": str(tuning.get("name", "search")),
            "metric": metric,
            "trials": trials,
            "chosen": chosen,
            "at_edge": edges,
        }
    ]
    # A search nested by name beside the trials (``candidate_generator``: the retrained knobs).
    for name, sub in tuning.items():
        if isinstance(sub, dict) and any(key in sub for key in ("trials", "search")):
            for search in tuning_searches(sub):
                search["name"] = name if search["name"] == "search" else f"{name}: {search['name']}"
                out.append(search)
    return [search for search in out if search["trials"]]


def _short(key: str) -> str:
    """``serving.ordering.affinity_weight`` -> ``affinity_weight``: the table and axes stay narrow."""
    return str(key).rsplit(".", 1)[-1]


def _params_text(params: dict) -> str:
    return ", ".join(f"{_short(k)}={v:.4g}" if isinstance(v, float) else f"{_short(k)}={v}" for k, v in params.items())


def tuning_table(search: dict, top: int = 5) -> pd.DataFrame:
    best = sorted(search["trials"], key=lambda t: -t["value"])[:top]
    return pd.DataFrame(
        [{"rank": i + 1, "params": _params_text(t["params"]), search["metric"]: t["value"]} for i, t in enumerate(best)]
    )


def not_applicable_table(results: list[Result], notes: dict | None = None) -> pd.DataFrame:
    rows = [{"model": r.name, "figure": f, "reason": why} for r in results for f, why in r.not_applicable.items()]
    rows += [{"model": "", "figure": f, "reason": why} for f, why in (notes or {}).items()]
    return pd.DataFrame(rows, columns=["model", "figure", "reason"])


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> str:
    """A matplotlib figure as base64 PNG for an <img> of the HTML report (the figure is closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _colors(results: list[Result], funnel: Result) -> list[str]:
    return ["#d62728" if r is funnel else "#1f77b4" for r in results]


def share_curve_plot(results: list[Result]) -> str:
    plt = _pyplot()
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
    """A plain bar chart of one column of ``table`` by model (no intervals; ``accuracy_plot`` has them)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(table["model"], table[metric])
    ax.set_ylabel(metric)
    ax.set_title(metric)
    return figure_png(fig)


def accuracy_plot(results: list[Result], k: int, funnel: Result) -> str:
    """NDCG@k and Recall@k per model, horizontal bars with 95% bootstrap error bars."""
    plt = _pyplot()
    names = [r.name for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(results) + 1.4), sharey=True)
    for ax, metric in zip(axes, (f"ndcg@{k}", f"recall@{k}")):
        means = np.array([r.metrics.get(metric, np.nan) for r in results])
        low = np.array([r.metrics.get(metric + "_low", np.nan) for r in results])
        high = np.array([r.metrics.get(metric + "_high", np.nan) for r in results])
        err = np.nan_to_num(np.vstack([means - low, high - means]))
        ax.barh(names, means, xerr=err, capsize=4, color=_colors(results, funnel))
        for y, (v, top) in enumerate(zip(means, high)):  # the value right of its error bar
            ax.text(top if np.isfinite(top) else v, y, f"  {v:.3f}", va="center", ha="left", fontsize=8)
        ax.set_title(f"{metric.replace('ndcg', 'NDCG').replace('recall', 'Recall')} (95% CI)")
        ax.invert_yaxis()
        ax.set_xlim(0, np.nanmax(high) * 1.25 if np.isfinite(high).any() and np.nanmax(high) > 0 else 1)
    return figure_png(fig)


def funnel_plot(table: pd.DataFrame) -> str:
    """Candidates kept (log scale) and held-out recall after each stage."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    x = np.arange(len(table))
    sizes = table["candidates kept (mean)"].astype(float).to_numpy()
    recall = table["held-out recall"].astype(float).to_numpy()
    left.bar(x, sizes, color="#1f77b4")
    left.set_yscale("log")
    left.set_title("candidates kept (mean per request)")
    right.bar(x, recall, color="#2ca02c")
    right.set_ylim(0, max(1e-9, float(np.nanmax(recall))) * 1.25)
    right.set_title("held-out positives still in the list (recall)")
    for ax, values, fmt in ((left, sizes, "{:.0f}"), (right, recall, "{:.3f}")):
        ax.set_xticks(x, table["stage"], rotation=15)
        for xi, v in zip(x, values):
            ax.text(xi, v, fmt.format(v), ha="center", va="bottom", fontsize=8)
    return figure_png(fig)


def slices_plot(results: list[Result], metric: str, funnel: Result) -> str | None:
    """One panel per user attribute: ``metric`` per group, one bar per model (the funnel in red)."""
    with_slices = [r for r in results if not r.slices.empty and metric in r.slices]
    if not with_slices:
        return None
    plt = _pyplot()
    base = with_slices[0].slices
    attributes = list(dict.fromkeys(base["attribute"]))
    sizes = [int((base["attribute"] == a).sum()) for a in attributes]  # panels as wide as their groups
    fig, axes = plt.subplots(
        1, len(attributes), figsize=(min(14, 2 + 1.1 * sum(sizes)), 3.6), squeeze=False, width_ratios=sizes
    )
    width = 0.8 / len(with_slices)
    cmap = plt.get_cmap("tab10")
    for ax, attr in zip(axes[0], attributes):
        groups = base[base["attribute"] == attr].set_index("value")
        x = np.arange(len(groups))
        for i, r in enumerate(with_slices):
            table = r.slices[r.slices["attribute"] == attr].set_index("value").reindex(groups.index)
            color = "#d62728" if r is funnel else cmap(i % 10 if i % 10 != 3 else 9)
            ax.bar(x + (i - (len(with_slices) - 1) / 2) * width, table[metric], width, label=r.name, color=color)
        labels = [f"{_plain(v)}\n(n={int(n)})" for v, n in zip(groups.index, groups["users"])]
        ax.set_xticks(x, labels, fontsize=8, rotation=30 if len(groups) > 4 else 0)
        ax.set_title(f"{metric} by {_plain(attr)}")
    axes[0][0].legend(fontsize=7)
    return figure_png(fig)


def _plain(text) -> str:
    """A user's text as matplotlib draws it literally: between two "$" it would be read as mathtext."""
    return str(text).replace("$", r"\$")


def tuning_plot(search: dict) -> str:
    """One point per trial, the chosen one starred. When the first parameter that varies is a
    number it is the x axis, one line per combination of the other varying parameters (a grid reads
    as curves); otherwise, or with more than eight lines, the trials in the order tried with the
    best-so-far line."""
    plt = _pyplot()
    trials = search["trials"]
    values = np.array([t["value"] for t in trials])
    varying = [
        key
        for key in dict.fromkeys(k for t in trials for k in t["params"])
        if len({repr(t["params"].get(key)) for t in trials}) > 1
    ]
    lines: dict[str, list[int]] = {}
    if varying and all(isinstance(t["params"].get(varying[0]), (int, float)) for t in trials):
        for i, t in enumerate(trials):
            lines.setdefault(_params_text({k: t["params"].get(k) for k in varying[1:]}), []).append(i)
    chosen = search.get("chosen")
    best = next((i for i, t in enumerate(trials) if chosen and t["params"] == chosen), int(np.argmax(values)))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if lines and len(lines) <= 8:
        x = np.array([t["params"][varying[0]] for t in trials], dtype=np.float64)
        for label, members in lines.items():
            members = sorted(members, key=lambda i: x[i])
            ax.plot(x[members], values[members], marker="o", label=label or None)
        ax.set_xlabel(_short(varying[0]))
    else:
        x = np.arange(1, len(trials) + 1)
        ax.scatter(x, values, color="#1f77b4", s=18, label="trial")
        ax.plot(x, np.maximum.accumulate(values), color="#7f7f7f", label="best so far")
        ax.set_xlabel("trial (in the order tried)")
    ax.scatter([x[best]], [values[best]], marker="*", s=240, color="#d62728", zorder=3, label="chosen")
    ax.set_ylabel(search["metric"])
    name = "" if search["name"] == "search" else f" {search['name']}"
    ax.set_title(f"Tuning search{name} ({len(trials)} trials on validation)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a point
    return figure_png(fig)


# --------------------------------------------------------------------------- documents


def _table_html(table: pd.DataFrame) -> str:
    # to_html prints a None of a text (object) column as "None": its na_rep covers NaN only. A column
    # whose figure is not applicable in every row (``pipeline._trade_off`` gives None) read "None"
    # where report.md reads "n/a"; None becomes NaN first (column by column, the dtypes otherwise kept).
    cells = table.apply(lambda column: column.map(_none_as_nan) if column.dtype == object else column)
    return cells.to_html(index=False, na_rep="n/a", float_format=lambda x: f"{x:.4f}", border=0)


def _none_as_nan(value):
    return np.nan if value is None else value


def _md_cell(value):
    """A text cell that keeps its row whole: tabulate writes ``|`` and line breaks as they are, so a
    slice value ``a|b`` (user data) split its row into more cells and a newline started a new row.
    Backslashes are doubled first (a value's own backslash cannot undo the added one); numbers pass."""
    if value is None or isinstance(value, (bool, int, float, np.generic)):
        return value
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def _table_md(table: pd.DataFrame) -> str:
    # tabulate's missingval replaces None only; a NaN (a figure not applicable) would print "nan".
    # (None set after the escaping: applymap would read the column back as floats, None as NaN)
    # (column by column: DataFrame.applymap is deprecated from pandas 2.1, which a GPU image may have)
    cells = table.astype(object).apply(lambda column: column.map(_md_cell)).astype(object).where(table.notna(), None)
    cells.columns = [_md_cell(c) for c in cells.columns]
    return cells.to_markdown(index=False, floatfmt=".4f", missingval="n/a")


def write_document(
    out: Path, title: str, context: dict | None, sections: list[tuple[str, pd.DataFrame]], plots: list[tuple[str, str]]
) -> dict[str, Path]:
    """``report.md`` (context and tables) and a self-contained ``report.html`` (tables and PNG plots)."""
    md = [f"# {title}", ""]
    if context:
        md += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
    for heading, table in sections:
        md += [f"## {heading}", "", _table_md(table), ""]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>"]
    if context:
        body.append(_context_html(context))
    for heading, table in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>" + _table_html(table))
    for heading, png in plots:
        body.append(f"<h2>{html.escape(heading)}</h2>" + _img(png, heading))
    (out / "report.html").write_text(_page(title, body))
    return {"html": out / "report.html", "markdown": out / "report.md"}


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1060px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}"
    "td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
    "img{max-width:100%;display:block;margin:.5em 0}"
    ".headline{font-size:1.15em;background:#f6f8fa;border-left:4px solid #d62728;padding:.6em 1em}"
    ".note{color:#555;font-size:.92em}.context li{font-size:.92em}"
)


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _img(png: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{png}'/>"


def _context_html(context: dict) -> str:
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in context.items())
    return f"<ul class='context'>{items}</ul>"


def write_report(
    results: list[Result],
    out_dir: str | Path,
    title: str,
    context: dict | None = None,
    ks=(10,),
    extra_tables: dict[str, pd.DataFrame] | None = None,
    stages: dict | None = None,
    tuning=None,
    served: str | None = None,
    notes: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``results.json`` into ``out_dir``; return their paths.

    ``stages`` is the funnel's per-stage recall (``pipeline.funnel_results``), ``tuning`` the tuning
    step's search as stored in the manifest (``tuning_searches`` reads it; None: "not run"),
    ``served`` the name of the served funnel among ``results`` (default: the one named "funnel..."),
    ``notes`` more figures that are not applicable, by name, with the reason."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = ks[0]
    main_metric = f"ndcg@{k}"
    funnel = served_result(results, served)
    head = headline(results, k, funnel.name)
    sentence = headline_sentence(head, funnel, k)
    funnel_stages = stage_table(stages)
    searches = tuning_searches(tuning)
    missing = not_applicable_table(results, notes)
    gaps = slice_gaps(funnel.slices, main_metric).rename(
        columns={"best": "best group", "best_value": "best", "worst": "worst group", "worst_value": "worst"}
    )

    # (heading, intro, tables, plots) in reading order; the Markdown gets the same minus the plots
    sections: list[tuple[str, str, list[pd.DataFrame], list[str]]] = [
        (f"Headline: the served funnel against each peer (NDCG@{k})", "", [head], []),
        (
            "Accuracy (full ranking, training items removed)",
            "Bars are means over users, error bars the 95% bootstrap interval.",
            [accuracy_table(results, kk) for kk in ks],
            [accuracy_plot(results, k, funnel)],
        ),
    ]
    if len(funnel_stages):
        ms = (stages or {}).get("ms_per_user")
        intro = "How many candidates each stage passes on, and how many held-out positives are still among them."
        if isinstance(ms, (int, float)):
            intro += f" {ms:.1f} ms per user in-process."
        sections.append(("The funnel, stage by stage", intro, [funnel_stages], [funnel_plot(funnel_stages)]))
    slices_png = slices_plot(results, main_metric, funnel)
    if slices_png:
        sections.append(
            (
                f"Slices: {main_metric} by user group",
                f"Mean {main_metric} of each group's users (n = users in the group); the table gives the "
                f"best and worst group of {funnel.name}.",
                [gaps] if len(gaps) else [],
                [slices_png],
            )
        )
    bias_intro = (
        f"Over each model's top-{max(ks)} lists (preference parity: over each user's held-out items' scores, no K)."
    )
    sections.append(
        (
            "Popularity bias",
            bias_intro,
            [bias_table(results)],
            [share_curve_plot(results)] if _has_curve(results) else [],
        )
    )
    if searches:
        for search in searches:
            sections.append(
                (
                    "Tuning search" + ("" if search["name"] == "search" else f": {search['name']}"),
                    f"{len(search['trials'])} trials on the validation part; the best {min(5, len(search['trials']))}:"
                    + (f" (at the edge: {edge_text(search['at_edge'])})" if search.get("at_edge") else ""),
                    [tuning_table(search)],
                    [tuning_plot(search)],
                )
            )
    else:
        sections.append(("Tuning search", f"{NOT_RUN}: this model version records no tuning step.", [], []))
    for heading, table in (extra_tables or {}).items():
        sections.append((heading, "", [table], []))
    sections.append(
        (
            "Not applicable on this split",
            "Figures this protocol cannot support, and why; every other figure above is computed."
            if len(missing)
            else "None: every figure could be computed on this split.",
            [missing] if len(missing) else [],
            [],
        )
    )

    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='headline'>{html.escape(sentence)}</p>"]
    md = [f"# {title}", "", f"**{sentence}**", ""]
    for heading, intro, tables, plots in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        md += [f"## {heading}", ""]
        if intro:
            body.append(f"<p class='note'>{html.escape(intro)}</p>")
            md += [intro, ""]
        body += [_img(png, heading) for png in plots]
        for table in tables:
            body.append(_table_html(table))
            md += [_table_md(table), ""]
    if context:
        body += ["<h2>Setup</h2>", _context_html(context)]
        md += ["## Setup", ""] + [f"- **{key}**: {v}" for key, v in context.items()] + [""]
    (out / "report.html").write_text(_page(title, body))
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(
        json_text(
            {
                "headline": sentence,
                "results": [
                    {"name": r.name, "metrics": r.metrics, "bias": r.bias, "not_applicable": r.not_applicable}
                    for r in results
                ],
                "stages": stages,
                "tuning": searches or NOT_RUN,
                "not_applicable": notes or {},
            }
        )
    )
    return {"html": out / "report.html", "markdown": out / "report.md", "json": out / "results.json"}


def _has_curve(results: list[Result]) -> bool:
    return any(r.bias.get("item_share_curve") for r in results)
