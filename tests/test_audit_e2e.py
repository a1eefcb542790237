"""The audit verb on the embedded demo: the real job, then the report; the BadNets target must stand out."""

from __future__ import annotations

import json

from pipeline.cli import main
from pipeline.demo import build_demo_shards

CHEAP = ["purify.method=sdedit", "purify.params={t_start: 250, steps: 4}", "resources.purify_batch_size=40"]


def test_audit_flags_the_backdoor_target_and_exits_nonzero_on_threshold(ray_local, tmp_path, capsys):
    build_demo_shards(tmp_path / "demo", n=120, attack="badnets", n_shards=2)
    args = ["audit", "--config", "jobs/configs/audit.yaml", "--report", str(tmp_path / "report"),
            f"source.uri={tmp_path / 'demo' / 'shards'}", f"output.uri={tmp_path / 'audit-out'}", *CHEAP]
    code = main([*args[:1], "--thresholds", json.dumps({"max_class_replaced_rate": 0.3}), *args[1:]])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rows"] == 120 and report["errors"] == 0
    # Half the images carry the trigger: the victim calls them class 0, purification sends them home.
    assert report["most_replaced"][0]["class"] == 0
    assert report["per_class"]["0"]["replaced_rate"] > 0.5
    assert code == 3 and report["alerts"]
    assert "ALERT" in capsys.readouterr().out
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html

    # Same data, a lenient threshold and the previous report for the trend: no alert, exit 0.
    code = main([*args[:1], "--thresholds", json.dumps({"max_class_replaced_rate": 0.99}),
                 "--previous", str(tmp_path / "report" / "report.json"),
                 *[a if not a.startswith(str(tmp_path / "report")) else str(tmp_path / "report2") for a in args[1:]]])
    again = json.loads((tmp_path / "report2" / "report.json").read_text())
    assert code == 0 and not again["alerts"]
    assert "trend" in again and again["trend"]
