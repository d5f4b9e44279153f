"""The dashboard and the alert rules only query metrics the server really exports."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = ("_bucket", "_sum", "_count")


def _exported_names() -> set[str]:
    """Names our Python models register (serving/metrics.py), with the histogram series suffixes."""
    source = (ROOT / "serving" / "metrics.py").read_text()
    names = set(re.findall(r'"((?:funnel|online)_[a-z_]+)"', source))
    return names | {n + s for n in names for s in SUFFIXES}


def _queried_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:funnel|online)_[a-z_]+)\b", expr))


def test_dashboard_and_alerts_use_exported_metrics():
    exported = _exported_names()
    dashboard = json.loads((ROOT / "monitoring/grafana/funnel-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "monitoring/prometheus/funnel-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    queried = set().union(*map(_queried_names, exprs))
    assert {"online_clicks_total", "online_impressions_total", "online_churned_users_total"} <= queried
    assert queried <= exported, sorted(queried - exported)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
