"""The Grafana dashboard only queries metrics that the node agent actually exports."""

import json
import pathlib
import re

from prometheus_client import generate_latest

from resilient.agent.metrics import AgentMetrics

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "examples" / "grafana" / "resilient-dashboard.json"


def _exported_names() -> set[str]:
    m = AgentMetrics()
    m.worker_exits.labels(outcome="crash").inc()
    m.recovery.labels(phase="detect").set(0.1)
    m.spawn_seconds.labels(how="fork").set(0.1)
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_metric_is_exported():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\b(resilient_[a-z_]+)", e)}
    exported = _exported_names()
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the agent does not export: {missing}"


def test_panels_have_unique_ids_and_positions():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
